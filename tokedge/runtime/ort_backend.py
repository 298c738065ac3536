"""ONNX Runtime runner: the only module that imports onnxruntime."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokedge.errors import ArtifactError, UsageError
from tokedge.safeio import printable

def _empty_dir() -> tempfile.TemporaryDirectory:
    """An empty private directory for one session's creation: where ONNX Runtime would look for
    external data that was not handed over in memory, so that such a reference fails instead of
    reading some file. Removed once the session exists (it has read all it will read)."""
    return tempfile.TemporaryDirectory(prefix="tokedge-no-external-")


def quiet_onnxruntime(debug: bool = False) -> None:
    """ONNX Runtime's own log lines (coloured, multi-line) stay off stderr unless debugging: its
    errors reach the user as tokedge's one-line messages."""
    import onnxruntime as ort

    ort.set_default_logger_severity(0 if debug and os.environ.get("TOKEDGE_ORT_VERBOSE") else (2 if debug else 4))


# `--backend` names that run on ONNX Runtime, and the execution provider each one asks for
ORT_BACKENDS = {
    "onnxruntime": "CPUExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-tensorrt": "TensorrtExecutionProvider",
}


# intra-op threads when OrtOptions leaves it at 0: 0 lets ONNX Runtime decide (one per core). A process
# that runs sessions side by side with others on the same cores (the test suite's per-core workers)
# sets 1: measured on 2 cores, two concurrent export+verify loops ran 12% faster than with 2 threads each
DEFAULT_INTRA_OP_THREADS = 0


@dataclass(frozen=True)
class GpuOptions:
    """ONNX Runtime GPU execution-provider settings (`--backend ort-cuda | ort-tensorrt`)."""

    device_id: int = 0
    fp16: bool = True  # TensorRT EP: let TensorRT pick fp16 kernels (the CUDA EP runs the graph's own dtypes)
    cache_dir: str | None = None  # TensorRT EP: engine and timing caches, one subdirectory per graph
    workspace_mb: int | None = None  # TensorRT EP: builder workspace cap (the device profile's)
    # TensorRT EP: graph -> its optimisation profiles, each {input name: (min, opt, max) shape}, from
    # the build plan of a device profile (`tokedge.build.plan.plan_shapes`)
    profiles: dict[str, tuple[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]], ...]] | None = None


@dataclass(frozen=True)
class OrtOptions:
    providers: tuple[str, ...] | None = None  # explicit provider names; None: those of `backend`
    intra_op_threads: int = 0  # 0 lets ONNX Runtime decide
    optimization: str = "all"  # "disable" | "basic" | "extended" | "all"
    # Busy-wait of idle intra-op threads. Off: an artifact runs three sessions one after another,
    # and a pool that spins after its graph finished takes the cores the next graph needs (on a
    # shared or small CPU that doubled prefill and decode time); see docs/runtime.md.
    spinning: bool = False
    backend: str = "onnxruntime"  # a key of ORT_BACKENDS
    gpu: GpuOptions = GpuOptions()


def _shape_list(profiles, pick: int, sizes_only: bool = True) -> str:
    """TensorRT EP profile-shape option text: "name:d1xd2,name:d1xd2" with one entry per input per
    profile, profiles in order (an input named again starts the next profile). 0-d inputs (shape
    tensors such as the runtime budget) have no dims to give and are left out."""
    entries = []
    for profile in profiles:
        for name, ranges in profile.items():
            dims = ranges[pick]
            if len(dims) == 0 and sizes_only:
                continue
            entries.append(f"{name}:{'x'.join(str(int(d)) for d in dims)}")
    return ",".join(entries)


def session_providers(options: OrtOptions, graph: str, available: list[str]) -> list[tuple[str, dict]]:
    """The (execution provider, provider options) list for one graph's session, in preference
    order: pure, so the option building is tested on any machine. A backend whose provider this
    ONNX Runtime lacks is refused in one line naming what to install."""
    if options.providers is not None:
        return [(p, {}) for p in options.providers]
    backend = options.backend
    if backend not in ORT_BACKENDS:
        raise UsageError(f"--backend {backend} is not an ONNX Runtime backend; use one of {', '.join(ORT_BACKENDS)}")
    wanted = ORT_BACKENDS[backend]
    cpu = ("CPUExecutionProvider", {})
    if backend == "onnxruntime":
        return [cpu]
    require_provider(backend, available)
    gpu = options.gpu
    cuda = ("CUDAExecutionProvider", {
        "device_id": gpu.device_id,
        "arena_extend_strategy": "kSameAsRequested",  # grow the arena by what is asked, not in powers of two
        "cudnn_conv_algo_search": "HEURISTIC",  # no exhaustive search at session start
        "do_copy_in_default_stream": True,
    })
    if backend == "ort-cuda":
        return [cuda, cpu]
    trt: dict = {
        "device_id": gpu.device_id,
        "trt_fp16_enable": gpu.fp16,
        "trt_engine_cache_enable": gpu.cache_dir is not None,
        "trt_timing_cache_enable": gpu.cache_dir is not None,
    }
    if gpu.cache_dir is not None:
        path = str(Path(gpu.cache_dir) / graph)
        trt.update(trt_engine_cache_path=path, trt_timing_cache_path=path)
    if gpu.workspace_mb is not None:
        trt["trt_max_workspace_size"] = int(gpu.workspace_mb) << 20
    profiles = (gpu.profiles or {}).get(graph)
    if profiles:
        trt.update(trt_profile_min_shapes=_shape_list(profiles, 0), trt_profile_opt_shapes=_shape_list(profiles, 1),
                   trt_profile_max_shapes=_shape_list(profiles, 2))
        if not trt["trt_profile_min_shapes"]:  # only shape-tensor inputs: nothing explicit to give
            for key in ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"):
                del trt[key]
    # what TensorRT cannot take falls back to CUDA, then the CPU (ONNX Runtime partitions the graph)
    return [(wanted, trt)] + ([cuda] if "CUDAExecutionProvider" in available else []) + [cpu]


def require_provider(backend: str, available: list[str]) -> None:
    """One line naming the missing execution provider and what to install."""
    wanted = ORT_BACKENDS.get(backend)
    if wanted is None or wanted in available:
        return
    from tokedge.errors import MissingDependencyError

    have = ", ".join(p.removesuffix("ExecutionProvider") for p in available) or "none"
    raise MissingDependencyError(
        f"--backend {backend} needs ONNX Runtime's {wanted}, which this onnxruntime lacks (it has: {have}); "
        "install onnxruntime-gpu (on Jetson, NVIDIA's JetPack build: see docs/device.md)")


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def max_threads() -> int:
    return 4 * (os.cpu_count() or 1)


def check_threads(threads: int) -> None:
    """0 (automatic) or a count up to 4x the CPU cores; more only oversubscribes the machine."""
    if not 0 <= threads <= max_threads():
        raise UsageError(f"--threads must be between 0 (automatic) and {max_threads()} "
                         f"(4x this machine's {os.cpu_count()} CPU cores); got {threads}")


class OrtRunner:
    """Runner over one ONNX graph. Session creation is deferred to `__enter__` (or first use).

    `source` is the model's bytes (what `tokedge.artifact.open_artifact` verified; `external`
    then maps each external-data location named in the model to its verified bytes) or, for
    graphs tokedge itself just wrote (export validation), a path.
    """

    def __init__(self, source: Path | str | bytes, options: OrtOptions = OrtOptions(), name: str | None = None,
                 external: dict[str, bytes] | None = None):
        self._model: bytes | None = source if isinstance(source, bytes) else None
        self._external = dict(external or {})
        self.path = None if isinstance(source, bytes) else Path(source)
        self.options = options
        self.name = name or (self.path.stem if self.path is not None else "graph")
        self.last_inference_time = 0.0
        self.deadline = None  # a tokedge.runtime.deadline.Deadline while a time-limited run is active
        self._session = None

    def _open(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        # the embed graph is one Gather of a few rows: a pool's wake-up costs more than it saves
        threads = self.options.intra_op_threads or DEFAULT_INTRA_OP_THREADS
        so.intra_op_num_threads = 1 if self.name == "embed" and not threads else threads
        so.log_severity_level = 4
        if not self.options.spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.options.optimization]
        chosen = session_providers(self.options, self.name, available_providers())
        if self._model is None and self.path is None:
            raise ArtifactError(f"{self.name} graph was closed; load the artifact again")
        empty = contextlib.ExitStack()
        if self._model is not None:
            if self._external:
                names = list(self._external)
                buffers = [self._external[n] for n in names]
                so.add_external_initializers_from_files_in_memory(names, buffers, [len(b) for b in buffers])
            # any location the model names that was not handed over above must not be read from disk
            so.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                        empty.enter_context(_empty_dir()))
        source = self._model if self._model is not None else str(self.path)
        try:
            with empty:
                self._session = ort.InferenceSession(source, sess_options=so, providers=[p for p, _ in chosen],
                                                     provider_options=[o for _, o in chosen])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactError(f"ONNX Runtime cannot load the {self.name} graph: "
                                f"{printable(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)}") from None
        finally:
            if self._model is not None:  # ONNX Runtime copied what it needs; free the verified bytes
                self._model, self._external = None, {}
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._outputs = [o.name for o in self._session.get_outputs()]

    @property
    def session(self):
        if self._session is None:
            self._open()
        assert self._session is not None
        return self._session

    def __enter__(self) -> "OrtRunner":
        self.session  # noqa: B018 - opens the session
        return self

    def __exit__(self, *exc) -> None:
        self._session = None

    @property
    def device(self) -> str:
        """Where outputs bound with `infer_bound` live: "cuda" under the CUDA/TensorRT EPs, else "cpu"."""
        providers = self.session.get_providers()
        return "cuda" if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(providers) else "cpu"

    def infer_bound(self, host: dict[str, np.ndarray], resident: dict, keep: set[str]) -> tuple[dict, dict]:
        """Run with IO binding: `host` arrays are copied in, `resident` OrtValues (e.g. the KV cache
        from the previous step) are bound where they already live, and the outputs named in `keep`
        stay on the device as OrtValues; the others come back as numpy arrays."""
        session = self.session
        binding = session.io_binding()
        for name, array in host.items():
            if name in self._inputs:
                binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name, value in resident.items():
            if name in self._inputs:
                binding.bind_ortvalue_input(name, value)
        device = self.device
        for name in self._outputs:
            binding.bind_output(name, device if name in keep else "cpu")
        start = time.perf_counter()
        with self._limited() as run_options:
            session.run_with_iobinding(binding, run_options)
        self.last_inference_time = time.perf_counter() - start
        values = dict(zip(self._outputs, binding.get_outputs()))
        return ({k: v.numpy() for k, v in values.items() if k not in keep}, {k: v for k, v in values.items() if k in keep})

    @contextlib.contextmanager
    def _limited(self):
        """RunOptions for one run; a deadline that passes meanwhile terminates it. ONNX Runtime's
        errors become one line."""
        import onnxruntime as ort

        deadline = self.deadline
        run_options = ort.RunOptions()
        run_options.log_severity_level = 4
        key = None
        if deadline is not None:
            deadline.check()

            def cancel() -> None:
                run_options.terminate = True

            key = deadline.register(cancel)
        try:
            yield run_options
        except Exception as exc:  # onnxruntime's own exception types; keep one line for the user
            if deadline is not None and deadline.expired():
                raise deadline.error() from None
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ArtifactError(f"{self.name} graph failed in ONNX Runtime: {printable(message)}") from None
        finally:
            if key is not None and deadline is not None:
                deadline.unregister(key)

    @property
    def input_names(self) -> set[str]:
        self.session  # noqa: B018
        return self._inputs

    def infer(self, feed: dict, keep: frozenset[str] = frozenset()) -> dict:
        """The runner protocol: outputs in `keep` stay on the session's device (IO binding), as do
        device-resident values fed back in; otherwise a plain run."""
        resident = {k: v for k, v in feed.items() if not isinstance(v, np.ndarray)}
        if keep or resident:
            host = {k: v for k, v in feed.items() if isinstance(v, np.ndarray)}
            out, kept = self.infer_bound(host, resident, set(keep))
            return {**out, **kept}
        session = self.session
        start = time.perf_counter()
        with self._limited() as run_options:
            values = session.run(self._outputs, {k: v for k, v in feed.items() if k in self._inputs}, run_options)
        self.last_inference_time = time.perf_counter() - start
        return dict(zip(self._outputs, values))
