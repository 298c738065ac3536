"""Device profiles as data (`tokedge/profiles/*.toml`), validated on load."""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path

from tokedge.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib  # pyright: ignore[reportMissingImports]

HERE = Path(__file__).parent
TRT_FAMILIES = ("10.3", "11")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    trt_version: str  # TensorRT family: "10.3" (JetPack 6: builder precision flags) or "11" (strongly typed)
    precision: str  # engine precision
    workspace_mb: int  # builder workspace cap
    max_batch: int
    max_prompt_tokens: int  # text tokens plus visual tokens
    max_new_tokens: int
    budget_min: int  # runtime budget range the engines are built for
    budget_max: int
    memory_gb: float  # device memory (unified on Jetson)
    fp16_tflops: float  # peak dense FP16 tensor throughput, for roofline predictions
    bandwidth_gbs: float  # memory bandwidth
    dla_cores: int = 0
    compute_capability: str = ""
    # latency floors of the roofline prediction: no kernel runs faster than kernel_launch_us
    # (launch + tail, a few us on any CUDA GPU, more on Jetson), and every engine call pays
    # call_overhead_us (enqueue, synchronisation, host copies of the logits)
    kernel_launch_us: float = 6.0
    call_overhead_us: float = 40.0

    @property
    def max_sequence(self) -> int:
        return self.max_prompt_tokens + self.max_new_tokens


def _check(p: DeviceProfile, source: str) -> None:
    def bad(what: str) -> UsageError:
        return UsageError(f"device profile {source}: {what}")

    if p.trt_version not in TRT_FAMILIES:
        raise bad(f"trt_version '{p.trt_version}' is not one of {', '.join(TRT_FAMILIES)}")
    if p.precision not in PRECISIONS:
        raise bad(f"precision '{p.precision}' is not one of {', '.join(PRECISIONS)}")
    for name in ("workspace_mb", "max_batch", "max_prompt_tokens", "max_new_tokens", "budget_min"):
        if getattr(p, name) < 1:
            raise bad(f"{name} must be >= 1")
    if p.budget_max < p.budget_min:
        raise bad("budget_max is smaller than budget_min")
    for name in ("memory_gb", "fp16_tflops", "bandwidth_gbs"):
        if getattr(p, name) <= 0:
            raise bad(f"{name} must be > 0")


def parse_profile(data: dict, source: str) -> DeviceProfile:
    known = {f.name for f in fields(DeviceProfile)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UsageError(f"device profile {source}: unknown key '{unknown[0]}'")
    missing = sorted(f.name for f in fields(DeviceProfile) if f.name not in data and f.default is f.default_factory)
    missing = [m for m in missing if m not in ("dla_cores", "compute_capability")]
    if missing:
        raise UsageError(f"device profile {source}: missing key '{missing[0]}'")
    try:
        profile = DeviceProfile(**data)
    except TypeError as exc:
        raise UsageError(f"device profile {source}: {exc}") from None
    for f in fields(DeviceProfile):
        value = getattr(profile, f.name)
        expected = {"int": int, "float": (int, float), "str": str}[str(f.type)]
        if not isinstance(value, expected) or isinstance(value, bool):
            raise UsageError(f"device profile {source}: '{f.name}' must be {f.type}")
    _check(profile, source)
    return profile


def list_profiles() -> dict[str, DeviceProfile]:
    out = {}
    for path in sorted(HERE.glob("*.toml")):
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
        profile = parse_profile(data, path.name)
        if profile.name != path.stem:
            raise UsageError(f"device profile {path.name}: name '{profile.name}' does not match the file name")
        out[profile.name] = profile
    return out


def load_profile(name_or_path: str) -> DeviceProfile:
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.is_file():
        with open(path, "rb") as fh:
            try:
                return parse_profile(tomllib.load(fh), path.name)
            except tomllib.TOMLDecodeError as exc:
                raise UsageError(f"device profile {path}: invalid TOML ({exc})") from None
    profiles = list_profiles()
    if name_or_path not in profiles:
        raise UsageError(f"unknown device profile '{name_or_path}'; choose one of: {', '.join(profiles)} "
                         "(or pass a .toml file)")
    return profiles[name_or_path]
