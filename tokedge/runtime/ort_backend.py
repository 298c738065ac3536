"""ONNX Runtime runner: the only module that imports onnxruntime."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokedge.errors import ArtifactError


@dataclass(frozen=True)
class OrtOptions:
    providers: tuple[str, ...] | None = None  # None: TensorRT/CUDA EP when available, else CPU
    intra_op_threads: int = 0  # 0 lets ONNX Runtime decide
    optimization: str = "all"  # "disable" | "basic" | "extended" | "all"
    # Busy-wait of idle intra-op threads. Off: an artifact runs three sessions one after another,
    # and a pool that spins after its graph finished takes the cores the next graph needs (on a
    # shared or small CPU that doubled prefill and decode time); see docs/runtime.md.
    spinning: bool = False


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    preferred = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    return [p for p in preferred if p in available] or ["CPUExecutionProvider"]


class OrtRunner:
    """Runner over one ONNX file. Session creation is deferred to `__enter__` (or first use)."""

    def __init__(self, path: Path | str, options: OrtOptions = OrtOptions(), name: str | None = None):
        self.path = Path(path)
        self.options = options
        self.name = name or self.path.stem
        self.last_inference_time = 0.0
        self._session = None

    def _open(self):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = self.options.intra_op_threads
        so.log_severity_level = 3
        if not self.options.spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[self.options.optimization]
        providers = list(self.options.providers or default_providers())
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=so, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ArtifactError(f"ONNX Runtime cannot load {self.path.name}: {str(exc).splitlines()[0]}") from exc
        self._inputs = {i.name for i in self._session.get_inputs()}
        self._outputs = [o.name for o in self._session.get_outputs()]

    @property
    def session(self):
        if self._session is None:
            self._open()
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
        try:
            session.run_with_iobinding(binding)
        except Exception as exc:
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ArtifactError(f"{self.name} graph failed in ONNX Runtime: {message}") from exc
        self.last_inference_time = time.perf_counter() - start
        values = dict(zip(self._outputs, binding.get_outputs()))
        return ({k: v.numpy() for k, v in values.items() if k not in keep}, {k: v for k, v in values.items() if k in keep})

    @property
    def input_names(self) -> set[str]:
        self.session  # noqa: B018
        return self._inputs

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.session
        start = time.perf_counter()
        try:
            values = session.run(self._outputs, {k: v for k, v in feed.items() if k in self._inputs})
        except Exception as exc:  # onnxruntime's own exception types; keep one line for the user
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ArtifactError(f"{self.name} graph failed in ONNX Runtime: {message}") from exc
        self.last_inference_time = time.perf_counter() - start
        return dict(zip(self._outputs, values))
