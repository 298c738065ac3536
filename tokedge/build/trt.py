"""TensorRT: engine building from a BuildPlan, loaders (verified plan bytes -> engine) and the
runner behind the runner protocol, kept apart as in Polygraphy: a runner takes an engine loader.

The only module that imports `tensorrt` (and, through ctypes, the CUDA runtime). Written against
TensorRT 10.3 (JetPack 6: builder precision flags) and TensorRT 11 (strongly typed networks);
type-checked in CI with pyright against `tensorrt-stubs`. Nothing here runs on a machine without
TensorRT and a GPU; every decision it takes comes from `tokedge.build.plan` (pure, unit-tested).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tokedge.build.plan import BuildPlan, EnginePlan
from tokedge.errors import ArtifactError, IntegrityError, MissingDependencyError, TokedgeError

METADATA_SUFFIX = ".json"


class BuildError(TokedgeError):
    exit_code = 1


def tensorrt_available() -> bool:
    try:
        import tensorrt
    except ImportError:
        return False
    return hasattr(tensorrt, "Builder")  # the type stubs alone install an empty `tensorrt` package


def _require_trt() -> None:
    if not tensorrt_available():
        raise MissingDependencyError(
            "TensorRT is not installed here: install it from NVIDIA (JetPack ships it) or pip install "
            "'tokedge[tensorrt]' on a machine with a GPU; use --dry-run to see the build plan without it"
        )


# --- CUDA runtime through ctypes (no extra Python dependency on the device) -----------------------


class Cuda:
    """The few CUDA runtime/driver calls the runner needs."""

    H2D, D2H, D2D = 1, 2, 3

    def __init__(self) -> None:
        name = ctypes.util.find_library("cudart") or "libcudart.so"
        try:
            self.rt = ctypes.CDLL(name)
        except OSError:
            raise MissingDependencyError("the CUDA runtime (libcudart) was not found; TensorRT needs a GPU") from None
        self.rt.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        self.rt.cudaFree.argtypes = [ctypes.c_void_p]
        self.rt.cudaMemcpyAsync.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                            ctypes.c_void_p]
        self.rt.cudaStreamCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
        self.rt.cudaStreamSynchronize.argtypes = [ctypes.c_void_p]
        self.rt.cudaDeviceGetAttribute.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int]

    def check(self, status: int, what: str) -> None:
        if status != 0:
            raise ArtifactError(f"CUDA error {status} in {what}")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self.check(self.rt.cudaMalloc(ctypes.byref(ptr), max(1, nbytes)), "cudaMalloc")
        return int(ptr.value or 0)

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ctypes.c_void_p(ptr))

    def stream(self) -> int:
        s = ctypes.c_void_p()
        self.check(self.rt.cudaStreamCreate(ctypes.byref(s)), "cudaStreamCreate")
        return int(s.value or 0)

    def copy(self, dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        self.check(self.rt.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(src), nbytes, kind,
                                           ctypes.c_void_p(stream)), "cudaMemcpyAsync")

    def destroy_stream(self, stream: int) -> None:
        self.rt.cudaStreamDestroy(ctypes.c_void_p(stream))

    def sync(self, stream: int) -> None:
        self.check(self.rt.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")

    def compute_capability(self, device: int = 0) -> str:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check(self.rt.cudaDeviceGetAttribute(ctypes.byref(major), 75, device), "cudaDeviceGetAttribute")
        self.check(self.rt.cudaDeviceGetAttribute(ctypes.byref(minor), 76, device), "cudaDeviceGetAttribute")
        return f"{major.value}.{minor.value}"

    def device_name(self, device: int = 0) -> str:
        try:
            drv = ctypes.CDLL(ctypes.util.find_library("cuda") or "libcuda.so")
            drv.cuInit(0)
            handle = ctypes.c_int()
            drv.cuDeviceGet(ctypes.byref(handle), device)
            buf = ctypes.create_string_buffer(256)
            drv.cuDeviceGetName(buf, 256, handle)
            return buf.value.decode()
        except OSError:
            return "unknown"


def gpu_identity() -> dict[str, str]:
    cuda = Cuda()
    return {"gpu_name": cuda.device_name(), "compute_capability": cuda.compute_capability()}


# --- building ---------------------------------------------------------------------------------


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def build_engine(engine: EnginePlan, artifact: Path, out: Path, timing_cache: Path, profile_name: str) -> dict:
    """Build one engine; writes `<graph>.plan` and its metadata JSON into `out`. Returns the metadata."""
    _require_trt()
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if engine.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    onnx_path = artifact / engine.onnx
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT cannot parse {engine.onnx}: {errors} (run `tokedge check` for a static report)")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, engine.workspace_mb << 20)
    for flag in engine.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if engine.fp32_layer_types:
        pinned = {getattr(trt.LayerType, name) for name in engine.fp32_layer_types}
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            floating = layer.num_inputs > 0 and layer.get_input(0) is not None and \
                layer.get_input(0).dtype in (trt.float16, trt.float32)
            if layer.type in pinned and floating:  # integer reductions / ArgMax stay as they are
                layer.precision = trt.float32
                for j in range(layer.num_outputs):
                    if layer.get_output(j).dtype == trt.float16:
                        layer.set_output_type(j, trt.float32)
    for opt in engine.profiles:
        profile = builder.create_optimization_profile()
        for name, rng in opt.shapes.items():
            profile.set_shape(name, trt.Dims(list(rng.min)), trt.Dims(list(rng.opt)), trt.Dims(list(rng.max)))
        for name, rng in opt.values.items():
            profile.set_shape_input(name, list(rng.min), list(rng.opt), list(rng.max))
        config.add_optimization_profile(profile)
    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # a cache from another TensorRT version or GPU: start from an empty one
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=True)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError(f"TensorRT failed to build {engine.graph} (see the TensorRT log above)")
    data = bytes(serialized)
    _atomic_write(out / engine.plan, data)
    _atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
    meta = {
        "graph": engine.graph,
        "tensorrt_version": trt.__version__,
        **gpu_identity(),
        "profile": profile_name,
        "onnx": engine.onnx,
        "onnx_sha256": engine.onnx_sha256,
        "plan_sha256": _sha256(data),
        "strongly_typed": engine.strongly_typed,
        "builder_flags": list(engine.builder_flags),
        "build_seconds": round(time.perf_counter() - start, 1),
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    _atomic_write(out / (engine.plan + METADATA_SUFFIX), (json.dumps(meta, indent=2) + "\n").encode())
    return meta


def build_all(plan: BuildPlan, artifact: Path, out: Path, timing_cache: Path) -> list[dict]:
    return [build_engine(e, artifact, out, timing_cache, plan.profile) for e in plan.engines]


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- loading and running ----------------------------------------------------------------------


def check_engine(plan_path: Path, meta: dict, expected_sha256: str) -> bytes:
    """Hash first, then build metadata against this TensorRT and GPU; returns the plan bytes."""
    data = plan_path.read_bytes()
    if _sha256(data) != expected_sha256 or meta.get("plan_sha256") != expected_sha256:
        raise IntegrityError(f"engine {plan_path.name} does not match its recorded sha256; rebuild it with tokedge build")
    _require_trt()
    import tensorrt as trt

    here = {"tensorrt_version": trt.__version__, **gpu_identity()}
    for key in ("tensorrt_version", "compute_capability", "gpu_name"):
        if meta.get(key) != here[key]:
            raise ArtifactError(
                f"engine {plan_path.name} was built for {key} {meta.get(key)!r}, this device has {here[key]!r}; "
                f"rebuild with `tokedge build ARTIFACT --profile {meta.get('profile', 'PROFILE')}` on this device"
            )
    return data


@dataclass
class DeviceTensor:
    """A tensor resident in GPU memory (a past/present KV buffer between decode steps)."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype


class VerifiedPlanBytes:
    """Loader: a plan file's bytes, once its sha256 and build metadata match (`check_engine`)."""

    def __init__(self, plan_path: Path, meta: dict, expected_sha256: str):
        self.plan_path, self.meta, self.expected = plan_path, meta, expected_sha256

    def __call__(self) -> bytes:
        return check_engine(self.plan_path, self.meta, self.expected)


class EngineFromBytes:
    """Loader: a deserialised engine from plan bytes or from a loader of them, e.g.
    `EngineFromBytes(VerifiedPlanBytes(path, meta, sha))`. Returns (runtime, engine): the runtime
    must outlive the engine."""

    def __init__(self, data: bytes | Callable[[], bytes], label: str = "engine"):
        self.data, self.label = data, label

    def __call__(self) -> tuple[Any, Any]:
        data = self.data() if callable(self.data) else self.data  # verified before TensorRT is needed
        _require_trt()
        import tensorrt as trt

        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise ArtifactError(f"TensorRT could not deserialize {self.label}; rebuild it")
        return runtime, engine


class TrtRunner:
    """Runner over one engine from a loader: sets input shapes, binds preallocated device buffers,
    and runs execute_async_v3 on its own stream. `infer(..., keep=...)` keeps KV outputs on the GPU."""

    def __init__(self, engine: Callable[[], tuple[Any, Any]], meta: dict, name: str):
        self.load_engine, self.meta = engine, meta
        self.name = name
        self.last_inference_time = 0.0
        self.deadline = None  # checked between steps by the caller (TensorRT runs are not interrupted)
        self._ctx: Any = None

    def __enter__(self) -> "TrtRunner":
        self.runtime, self.engine = self.load_engine()
        import tensorrt as trt

        self.cuda = Cuda()
        self.stream = self.cuda.stream()
        self._ctx = self.engine.create_execution_context()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = {n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        self.buffers: dict[str, list[int]] = {}  # name -> device buffers (two for ping-pong outputs)
        self.capacity: dict[str, int] = {}
        self.retired: list[int] = []
        self.profile_index = 0
        return self

    def __exit__(self, *exc) -> None:
        for ptr in [p for ptrs in getattr(self, "buffers", {}).values() for p in ptrs] + getattr(self, "retired", []):
            self.cuda.free(ptr)
        self.buffers, self.retired = {}, []
        if getattr(self, "stream", None):
            self.cuda.destroy_stream(self.stream)
            self.stream = 0
        self._ctx = None

    def _buffer(self, name: str, nbytes: int, slot: int = 0) -> int:
        """A device buffer of at least nbytes. Grown by doubling; a replaced buffer is retired, not
        freed, because a resident KV tensor may still point at it (freed on exit)."""
        ptrs = self.buffers.setdefault(name, [])
        key = f"{name}#{slot}"
        if len(ptrs) <= slot or self.capacity.get(key, 0) < nbytes:  # zero-size tensors still get a buffer
            size = max(nbytes, 2 * self.capacity.get(key, 0))
            if len(ptrs) > slot:
                self.retired.append(ptrs[slot])
                ptrs[slot] = self.cuda.malloc(size)
            else:
                ptrs.append(self.cuda.malloc(size))
            self.capacity[key] = size
        return ptrs[slot]

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self._ctx.set_input_shape(name, shape):
            raise ArtifactError(
                f"{self.name} engine: input {name} of shape {list(shape)} is outside the shapes it was built for "
                f"(profile {self.meta.get('profile')}); shorten the prompt or rebuild with a larger profile"
            )

    def _select_profile(self, host: dict[str, np.ndarray]) -> None:
        """Decoder engines have a prefill and a decode profile: pick by the new-token count."""
        if self.engine.num_optimization_profiles > 1 and "inputs_embeds" in host:
            index = 1 if host["inputs_embeds"].shape[1] == 1 else 0
            if index != self.profile_index:
                if not self._ctx.set_optimization_profile_async(index, self.stream):
                    raise ArtifactError(f"{self.name} engine has no optimisation profile {index}; rebuild it")
                self.profile_index = index

    def infer(self, feed: dict[str, Any], keep: frozenset[str] = frozenset()) -> dict[str, Any]:
        """The runner protocol: `DeviceTensor` values in `feed` are bound where they live; outputs
        in `keep` stay on the GPU as `DeviceTensor`s, the others are copied to numpy arrays."""
        host = {k: v for k, v in feed.items() if isinstance(v, np.ndarray)}
        resident = {k: v for k, v in feed.items() if isinstance(v, DeviceTensor)}
        out, kept = self._infer_bound(host, resident, set(keep))
        return {**out, **kept}

    def _infer_bound(self, host: dict[str, np.ndarray], resident: dict[str, "DeviceTensor"],
                     keep: set[str]) -> tuple[dict, dict]:
        import tensorrt as trt

        ctx = self._ctx
        start = time.perf_counter()
        self._select_profile(host)
        staged: list[np.ndarray] = []
        for name in self.inputs:
            if name in resident:
                value = resident[name]
                self._set_shape(name, value.shape)
                ctx.set_tensor_address(name, value.ptr)
                continue
            if name not in host:
                raise ArtifactError(f"{self.name} engine needs input '{name}'")
            array = np.ascontiguousarray(host[name].astype(trt.nptype(self.engine.get_tensor_dtype(name)), copy=False))
            staged.append(array)
            if self.engine.is_shape_inference_io(name):  # the budget: a shape tensor read on the host
                ctx.set_tensor_address(name, array.ctypes.data)
                continue
            self._set_shape(name, array.shape)
            ptr = self._buffer(name, array.nbytes)
            self.cuda.copy(ptr, array.ctypes.data, array.nbytes, Cuda.H2D, self.stream)
            ctx.set_tensor_address(name, ptr)
        in_use = {v.ptr for v in resident.values()}
        outputs: dict[str, tuple[int, tuple[int, ...], np.dtype]] = {}
        for name in self.names:
            if name in self.inputs:
                continue
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            nbytes = int(np.prod(shape)) * dtype.itemsize
            slot = 0
            if name in keep:  # ping-pong: never write the buffer the matching past input reads
                slot = 1 if self.buffers.get(name, [None])[0] in in_use else 0
            ptr = self._buffer(name, nbytes, slot)
            ctx.set_tensor_address(name, ptr)
            outputs[name] = (ptr, shape, dtype)
        if not ctx.execute_async_v3(self.stream):
            raise ArtifactError(f"TensorRT execution of {self.name} failed")
        host_out: dict[str, np.ndarray] = {}
        kept: dict[str, DeviceTensor] = {}
        for name, (ptr, shape, dtype) in outputs.items():
            if name in keep:
                kept[name] = DeviceTensor(ptr, shape, dtype)
            else:
                arr = np.empty(shape, dtype=dtype)
                self.cuda.copy(arr.ctypes.data, ptr, arr.nbytes, Cuda.D2H, self.stream)
                host_out[name] = arr
        self.cuda.sync(self.stream)
        self.last_inference_time = time.perf_counter() - start
        return host_out, kept


def open_engines(engines_dir: Path, index: dict) -> dict[str, TrtRunner]:
    """Runners for every engine listed in engines.json (`index`), each checked before deserialising."""
    runners = {}
    for graph, entry in index["engines"].items():
        meta = json.loads((engines_dir / (entry["plan"] + METADATA_SUFFIX)).read_text())
        plan = engines_dir / entry["plan"]
        runners[graph] = TrtRunner(EngineFromBytes(VerifiedPlanBytes(plan, meta, entry["sha256"]), plan.name), meta,
                                   graph)
    return runners
