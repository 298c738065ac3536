"""Where an artifact runs (`--backend`): ONNX Runtime on the CPU (`onnxruntime`), ONNX Runtime's
GPU execution providers (`ort-cuda`, `ort-tensorrt`), or tokedge's own TensorRT engines
(`tensorrt`, built by `tokedge build`). One choice object for run, serve, verify and profile.

`ort-tensorrt` builds its engines inside ONNX Runtime at session start; the optimisation profiles
it gets are those of `tokedge build`'s plan for a device profile (`build.plan.plan_shapes`), so
every shape the runtime feeds lies inside them, and the engines are cached (`--trt-cache`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from tokedge.errors import UsageError
from tokedge.runtime.ort_backend import (
    ORT_BACKENDS,
    GpuOptions,
    OrtOptions,
    available_providers,
    require_provider,
)

BACKENDS = (*ORT_BACKENDS, "tensorrt")


@dataclass(frozen=True)
class Backend:
    name: str = "onnxruntime"
    engines: Path | None = None  # tensorrt: the directory `tokedge build` wrote
    threads: int = 0  # ONNX Runtime intra-op threads (0: ONNX Runtime decides)
    device_id: int = 0  # ort-cuda / ort-tensorrt: the CUDA device
    device_profile: str | None = None  # ort-tensorrt: the device profile whose build plan gives the shapes
    cache_dir: Path | None = None  # ort-tensorrt: engine cache (default: next to the artifact)
    fp16: bool = True  # ort-tensorrt: fp16 kernels allowed

    def check(self) -> None:
        """Refuse in one line, before any artifact is read: an unknown name, flags that belong to
        another backend, a GPU provider this ONNX Runtime lacks."""
        if self.name not in BACKENDS:
            raise UsageError(f"--backend {self.name} is unknown; use one of {', '.join(BACKENDS)}")
        if self.engines is not None and self.name != "tensorrt":
            raise UsageError("--engines is for --backend tensorrt (engines from `tokedge build`)")
        if self.name == "tensorrt" and self.engines is None:
            raise UsageError("--backend tensorrt needs --engines DIR (the output of `tokedge build`)")
        if self.name != "ort-tensorrt" and (self.device_profile is not None or self.cache_dir is not None):
            raise UsageError("--device-profile and --trt-cache are for --backend ort-tensorrt")
        if self.device_id < 0:
            raise UsageError(f"--device-id must be >= 0 (got {self.device_id})")
        if self.name in ("ort-cuda", "ort-tensorrt"):
            require_provider(self.name, available_providers())

    def ort_options(self, manifest, artifact: Path) -> OrtOptions:
        """The ONNX Runtime options of this choice for an artifact (the CPU for `tensorrt`'s
        graphs that have no engine)."""
        name = self.name if self.name in ORT_BACKENDS else "onnxruntime"
        options = OrtOptions(intra_op_threads=self.threads, backend=name)
        if name == "onnxruntime":
            return options
        gpu = GpuOptions(device_id=self.device_id, fp16=self.fp16)
        if name == "ort-tensorrt":
            gpu = dataclasses.replace(gpu, **trt_provider_plan(manifest, artifact, self.device_profile, self.cache_dir))
        return dataclasses.replace(options, gpu=gpu)

    def describe(self) -> dict:
        """What a report records about the choice."""
        out: dict = {"backend": self.name}
        if self.name in ("ort-cuda", "ort-tensorrt"):
            out["device_id"] = self.device_id
        if self.name == "ort-tensorrt":
            out.update(device_profile=self.device_profile, fp16=self.fp16)
        if self.name == "tensorrt":
            out["engines"] = str(self.engines)
        return out


def trt_provider_plan(manifest, artifact: Path, device_profile: str | None, cache_dir: Path | None) -> dict:
    """GpuOptions fields for the TensorRT execution provider: each graph's optimisation profiles
    from the build plan of the device profile, its workspace, and the engine cache directory."""
    from tokedge.build.plan import plan_shapes
    from tokedge.profiles import load_profile

    if device_profile is None:
        device_profile = this_device_profile()
    if device_profile is None:
        raise UsageError("--backend ort-tensorrt needs --device-profile NAME (see `tokedge profiles`; `tokedge "
                         "doctor` found none for this machine): its build plan gives the engines' shape ranges")
    profile = load_profile(device_profile)
    shapes, _ = plan_shapes(manifest, profile)
    profiles = {graph: tuple({name: (r.min, r.opt, r.max) for name, r in opt.shapes.items()} for opt in opts)
                for graph, opts in shapes.items()}
    cache = cache_dir if cache_dir is not None else Path(artifact).parent / f"{Path(artifact).name}.ort-trt-{profile.name}"
    return {"profiles": profiles, "workspace_mb": profile.workspace_mb, "cache_dir": str(cache)}


def this_device_profile() -> str | None:
    """The device profile `tokedge doctor` matches to this machine (exactly or as the nearest), if any."""
    from tokedge.doctor import diagnose

    match = diagnose().profile
    return match.name if match.match in ("exact", "nearest") else None
