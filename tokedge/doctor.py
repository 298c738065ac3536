"""`tokedge doctor`: what this machine has, what it means for tokedge, and what to install.

Two halves, so that every answer can be tested on fixture roots:

* `Probes` is what the running interpreter has (Python version, packages, ONNX Runtime's
  providers, the CUDA runtime library). `Probes.from_interpreter()` fills it without importing
  torch, transformers, onnx or onnx-ir (`importlib.util.find_spec` and `importlib.metadata` only);
  tests build one by hand.
* `diagnose(root, probes) -> Report` reads the system files under `root` (default "/"):
  `etc/nv_tegra_release`, `proc/device-tree/model`, `proc/meminfo`, `proc/cpuinfo`,
  `usr/local/cuda/version.json` (or `version.txt`, or the `libcudart.so.N` beside them) and
  `proc/driver/nvidia/gpus/*/information`, matches a device profile and says which commands work.

`Report` is data (saved as `--json`, schema in docs/cli.md); `render(report, width)` turns it into
the plain-text table. Nothing here raises for a missing or odd file: an absent answer is `None`.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokedge.profiles import DeviceProfile

SCHEMA = 1
GIB = 2**30
MIN_PYTHON = (3, 10)  # JetPack 6 ships Python 3.10

# --- what the interpreter has -------------------------------------------------------------------

# import name -> distribution names to ask importlib.metadata for its version, first found wins
# (onnxruntime-gpu installs the same `onnxruntime` module; TensorRT's wheels are split by CUDA major)
PACKAGES: dict[str, tuple[str, ...]] = {
    # base install: the device runtime
    "numpy": ("numpy",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino"),
    "tokenizers": ("tokenizers",),
    "PIL": ("pillow",),
    "jinja2": ("jinja2",),
    # extras
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11"),
    "av": ("av",),
    "matplotlib": ("matplotlib",),
    "starlette": ("starlette",),
    "uvicorn": ("uvicorn",),
    "torch": ("torch",),
    "transformers": ("transformers",),
    "safetensors": ("safetensors",),
    "onnx": ("onnx",),
    "onnxscript": ("onnxscript",),
    "onnx_ir": ("onnx-ir", "onnx_ir"),
}
BASE = ("numpy", "onnxruntime", "tokenizers", "PIL", "jinja2")
EXPORT = ("torch", "transformers", "safetensors", "onnx", "onnxscript", "onnx_ir")


@dataclass(frozen=True)
class Probes:
    """What the running interpreter has. Tests construct one; `from_interpreter()` measures it."""

    python: tuple[int, int, int] = (3, 10, 12)
    packages: Mapping[str, str | None] = field(default_factory=dict)  # import name -> version ("?" unknown), None: absent
    ort_providers: tuple[str, ...] = ()  # onnxruntime.get_available_providers(); () when onnxruntime is absent
    ort_distribution: str | None = None  # "onnxruntime" or "onnxruntime-gpu" (the wheel that provides the module)
    cudart: str | None = None  # the CUDA runtime library the loader finds (ctypes.util.find_library), e.g. "libcudart.so.12"
    nvinfer: str | None = None  # TensorRT's library the loader finds, e.g. "libnvinfer.so.10" (ONNX Runtime's TensorRT EP loads it)
    machine: str = ""  # platform.machine(), used when /proc/cpuinfo says nothing
    cpu_count: int = 0  # os.cpu_count(), used when /proc/cpuinfo lists no processors

    @classmethod
    def from_interpreter(cls, system: bool = True) -> Probes:
        """Measure this interpreter. `system=False` (a fixture root) skips the loader's library search."""
        import ctypes.util
        import os
        import platform

        packages: dict[str, str | None] = {}
        dist_of: dict[str, str] = {}
        for name, dists in PACKAGES.items():
            version, dist = _package_version(name, dists)
            packages[name] = version
            if dist:
                dist_of[name] = dist
        providers: tuple[str, ...] = ()
        if packages.get("onnxruntime") is not None:
            try:  # the one import doctor makes: ONNX Runtime is in the base install and torch-free
                import onnxruntime

                providers = tuple(onnxruntime.get_available_providers())
            except Exception:  # noqa: BLE001 - a broken install is a finding, not a crash
                providers = ()

        def library(name: str) -> str | None:
            if not system:
                return None
            try:
                return ctypes.util.find_library(name)
            except Exception:  # noqa: BLE001 - find_library runs ldconfig/gcc; any failure means "not found"
                return None

        python = (sys.version_info.major, sys.version_info.minor, sys.version_info.micro)
        return cls(python=python, packages=packages, ort_providers=providers,
                   ort_distribution=dist_of.get("onnxruntime"), cudart=library("cudart"),
                   nvinfer=library("nvinfer"), machine=platform.machine(),
                   cpu_count=os.cpu_count() or 0)


def _package_version(name: str, dists: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(version, distribution) of an importable module without importing it; (None, None) if absent."""
    import importlib.metadata
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:  # a bare namespace directory (tensorrt-stubs' .pyi files) is no module
        return None, None
    for dist in dists:
        try:
            return importlib.metadata.version(dist), dist
        except importlib.metadata.PackageNotFoundError:
            continue
    # no metadata (e.g. JetPack's apt-installed python3-libnvinfer): read `__version__` from the source
    origin = getattr(spec, "origin", None)
    if origin and origin.endswith(".py"):
        try:
            match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", Path(origin).read_text(errors="replace")[:20000],
                              re.MULTILINE)
        except OSError:
            match = None
        if match:
            return match.group(1), None
    return "?", None


# --- what the system files say ------------------------------------------------------------------

# L4T release -> JetPack, exact releases only, from NVIDIA's JetPack archive
# (https://developer.nvidia.com/embedded/jetpack-archive), as also tabulated by jetson-stats
# (github.com/rbonghi/jetson_stats, jtop/core/jetson_variables.py; issues #603 for 36.4.3 -> 6.2,
# #705 for 36.4.4). A release not listed is reported as its major's family ("6.x").
L4T_TO_JETPACK = {
    "35.1.0": "5.0.2", "35.2.1": "5.1", "35.3.1": "5.1.1", "35.4.1": "5.1.2", "35.5.0": "5.1.3",
    "35.6.0": "5.1.4",
    "36.2.0": "6.0 DP", "36.3.0": "6.0", "36.4.0": "6.1", "36.4.3": "6.2", "36.4.4": "6.2.1", "36.4.7": "6.2.1",
    "38.2.0": "7.0", "38.2.1": "7.0", "38.4.0": "7.1",
    "39.2.0": "7.2", "39.2.1": "7.2.1",
}
JETPACK_FAMILY = {"32": "4.x", "34": "5.x", "35": "5.x", "36": "6.x", "38": "7.x", "39": "7.x"}

# `# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: ...`
_L4T_LINE = re.compile(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+(?:\.\d+)*)")

# device-tree model substring -> the profile made for that module (most specific first). The
# strings boards print are quoted, with their sources, in tests/fixtures/doctor/SOURCES.md; JetPack 5
# wrote "NVIDIA Orin Nano Developer Kit" (no "Jetson"), so match on the module name only.
JETSON_MODULES = (
    ("AGX Thor", "jetson-agx-thor"),
    ("AGX Orin", "jetson-agx-orin-64gb"),
    ("Orin NX", "jetson-orin-nx-16gb"),
    ("Orin Nano", "jetson-orin-nano-8gb"),
)
# L4T major -> the module generation it runs on, for a board whose model string names no module
L4T_GENERATION = {"36": "jetson-orin-nano-8gb", "38": "jetson-agx-thor"}
L4T_GENERATION_NAME = {"36": "Orin", "38": "Thor"}
# discrete GPU name (/proc/driver/nvidia/gpus/*/information) -> profile, and what makes it exact
DISCRETE_GPUS = (
    ("RTX 4090", "rtx-4090", ("4090",)),
    ("H100", "h100-sxm", ("SXM", "HBM3")),  # the SXM card reports "NVIDIA H100 80GB HBM3"
)
# (implementer, part) from /proc/cpuinfo -> core name (Linux arch/arm64/include/asm/cputype.h)
ARM_CORES = {
    ("0x41", "0xd42"): "Cortex-A78AE", ("0x41", "0xd83"): "Neoverse-V3AE", ("0x41", "0xd84"): "Neoverse-V3",
    ("0x41", "0xd4f"): "Neoverse-V2", ("0x41", "0xd40"): "Neoverse-V1", ("0x41", "0xd0c"): "Neoverse-N1",
    ("0x41", "0xd08"): "Cortex-A72", ("0x41", "0xd07"): "Cortex-A57", ("0x4e", "0x004"): "NVIDIA Carmel",
}
X86_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")
ARM_FEATURES = ("asimd", "asimddp", "i8mm", "bf16", "sve", "sve2")


@dataclass(frozen=True)
class Cpu:
    model: str | None  # "AMD EPYC 9654", "Cortex-A78AE"
    arch: str | None  # "x86_64" | "aarch64"
    cores: int
    features: tuple[str, ...]  # of X86_FEATURES / ARM_FEATURES, the ones present


@dataclass(frozen=True)
class Memory:
    total_bytes: int | None  # /proc/meminfo MemTotal
    available_bytes: int | None  # MemAvailable


@dataclass(frozen=True)
class Jetson:
    release: str | None  # first line of /etc/nv_tegra_release
    l4t: str | None  # "36.4.3"
    jetpack: str | None  # "6.2", or the family "6.x" for a release not in L4T_TO_JETPACK
    model: str | None  # /proc/device-tree/model without its NUL


@dataclass(frozen=True)
class Gpu:
    name: str  # "NVIDIA GeForce RTX 4090"
    driver: str | None  # from /proc/driver/nvidia/version


@dataclass(frozen=True)
class Cuda:
    version: str | None  # the toolkit's, from version.json / version.txt, or "13" from libcudart.so.13
    runtime: str | None  # the library the loader finds, e.g. "libcudart.so.12"


@dataclass(frozen=True)
class ProfileMatch:
    name: str | None
    match: str  # "exact" | "nearest" | "none"
    reason: str


@dataclass(frozen=True)
class CommandStatus:
    command: str  # "export, quantize, optimize", "build", "--backend ort-cuda", ...
    works: bool
    needs: str  # what it needs, in words
    fix: str | None  # one line: what to install (None when it works)


@dataclass(frozen=True)
class Report:
    root: str
    python: str
    python_ok: bool
    cpu: Cpu
    memory: Memory
    jetson: Jetson | None  # None: not a Jetson (no nv_tegra_release and no Jetson model string)
    gpu: Gpu | None  # a discrete NVIDIA GPU
    cuda: Cuda
    packages: dict[str, str | None]
    tensorrt_library: str | None  # libnvinfer as the loader finds it
    onnxruntime_providers: tuple[str, ...]
    onnxruntime_distribution: str | None
    profile: ProfileMatch
    commands: tuple[CommandStatus, ...]
    schema: int = SCHEMA

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _read(root: Path, rel: str, limit: int = 1 << 20) -> str | None:
    try:
        with open(root / rel, "rb") as fh:
            return fh.read(limit).decode("utf-8", errors="replace")
    except OSError:
        return None


def read_cpu(cpuinfo: str | None, probes: Probes) -> Cpu:
    info = cpuinfo or ""
    values: dict[str, str] = {}
    cores = 0
    for line in info.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip().lower()
        if key == "processor":
            cores += 1
        values.setdefault(key, value.strip())
    if "flags" in values:
        arch, present = "x86_64", set(values["flags"].split())
        features = tuple(f for f in X86_FEATURES if f in present)
        model = values.get("model name")
    elif "features" in values:
        arch, present = "aarch64", set(values["features"].split())
        features = tuple(f for f in ARM_FEATURES if f in present)
        part = (values.get("cpu implementer", "").lower(), values.get("cpu part", "").lower())
        model = ARM_CORES.get(part) or values.get("model name") or (f"ARM part {part[1]}" if part[1] else None)
    else:
        arch, features, model = probes.machine or None, (), values.get("model name")
    return Cpu(model=model, arch=arch, cores=cores or probes.cpu_count, features=features)


def read_memory(meminfo: str | None) -> Memory:
    found: dict[str, int] = {}
    for line in (meminfo or "").splitlines():
        m = re.match(r"(MemTotal|MemAvailable):\s+(\d+)\s*kB", line)
        if m:
            found[m.group(1)] = int(m.group(2)) * 1024
    return Memory(total_bytes=found.get("MemTotal"), available_bytes=found.get("MemAvailable"))


def read_jetson(release_text: str | None, model_text: str | None) -> Jetson | None:
    model = (model_text or "").replace("\x00", "").strip() or None
    release = next((ln.strip() for ln in (release_text or "").splitlines() if ln.strip()), None)
    l4t = jetpack = None
    if release:
        m = _L4T_LINE.search(release)
        if m:
            revision = m.group(2) if m.group(2).count(".") >= 1 else m.group(2) + ".0"
            l4t = f"{m.group(1)}.{revision}"
            jetpack = L4T_TO_JETPACK.get(l4t) or JETPACK_FAMILY.get(m.group(1))
    if release is None and not (model and ("Jetson" in model or any(k in model for k, _ in JETSON_MODULES))):
        return None
    return Jetson(release=release, l4t=l4t, jetpack=jetpack, model=model)


def read_gpu(root: Path) -> Gpu | None:
    gpus = sorted((root / "proc/driver/nvidia/gpus").glob("*/information"))
    for info in gpus:
        text = _read(root, str(info.relative_to(root))) or ""
        m = re.search(r"^Model:\s*(.+)$", text, re.MULTILINE)
        if m:
            version = _read(root, "proc/driver/nvidia/version") or ""
            d = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", version)
            return Gpu(name=m.group(1).strip(), driver=d.group(1) if d else None)
    return None


def read_cuda(root: Path, probes: Probes) -> Cuda:
    version = None
    text = _read(root, "usr/local/cuda/version.json")
    if text:
        import json

        try:
            version = str(json.loads(text)["cuda"]["version"])
        except (ValueError, KeyError, TypeError):
            version = None
    if version is None:
        m = re.search(r"CUDA Version\s+(\d+(?:\.\d+)*)", _read(root, "usr/local/cuda/version.txt") or "")
        version = m.group(1) if m else None
    if version is None:  # a runtime without the toolkit's version file: the soname's major
        majors = sorted({m.group(1) for p in (root / "usr/local/cuda/lib64").glob("libcudart.so.*")
                         if (m := re.match(r"libcudart\.so\.(\d+)", p.name))})
        version = majors[-1] if majors else None
    return Cuda(version=version, runtime=probes.cudart)


# --- which profile ------------------------------------------------------------------------------

def match_profile(jetson: Jetson | None, gpu: Gpu | None, memory: Memory,
                  profiles: Mapping[str, DeviceProfile]) -> ProfileMatch:
    """The device profile made for this machine (`exact`), else the nearest with the reason."""
    total_gib = memory.total_bytes / GIB if memory.total_bytes else None
    if jetson is not None:
        family = next((p for key, p in JETSON_MODULES if jetson.model and key in jetson.model), None)
        if family is None and jetson.l4t:
            family_by_release = L4T_GENERATION.get(jetson.l4t.split(".")[0])
            if family_by_release is None:
                return ProfileMatch(None, "none", f"no device profile for this Jetson ({_what(jetson)}): tokedge's "
                                                  "profiles are for Orin on JetPack 6 and Thor on JetPack 7")
            major = jetson.l4t.split(".")[0]
            return _nearest(family_by_release, total_gib, profiles,
                            f"the device-tree model ({jetson.model or 'unreadable'}) names no module tokedge knows; "
                            f"L4T R{major} is for {L4T_GENERATION_NAME[major]}:", jetson)
        if family is None:
            return ProfileMatch(None, "none", f"no device profile for this Jetson ({_what(jetson)})")
        profile = profiles[family]
        if total_gib is None or _fits(profile.memory_gb, total_gib):
            why = f"{jetson.model}" + (f" with {total_gib:.1f} GiB" if total_gib else " (memory unreadable)")
            return ProfileMatch(family, "exact", why + _jetpack_note(jetson, profile))
        return _nearest(family, total_gib, profiles, f"{jetson.model} with {total_gib:.1f} GiB;", jetson)
    if gpu is not None:
        for key, name, exact_words in DISCRETE_GPUS:
            if key in gpu.name:
                if any(w in gpu.name for w in exact_words):
                    return ProfileMatch(name, "exact", gpu.name)
                return ProfileMatch(name, "nearest", f"{gpu.name} is not the card {name} describes (its memory, "
                                                     "bandwidth and TFLOP/s differ): copy the TOML with this card's numbers")
        return ProfileMatch(None, "none", f"no device profile for {gpu.name}: copy the nearest profile's TOML "
                                          "(`tokedge profiles`) with this card's memory, bandwidth and TFLOP/s")
    return ProfileMatch(None, "none", "no device profile matches: CPU-only machine; export/run on ONNX Runtime CPU work")


def _fits(memory_gb: float, total_gib: float) -> bool:
    """MemTotal is what the kernel keeps after carve-outs: 7.4 GiB on an 8 GB Orin Nano, ~61 on 64 GB."""
    return 0.8 * memory_gb <= total_gib <= 1.05 * memory_gb


def _nearest(family: str, total_gib: float | None, profiles: Mapping[str, DeviceProfile], why: str,
             jetson: Jetson | None = None) -> ProfileMatch:
    """Among the profiles of the same GPU generation (compute capability), the largest whose plan
    this board's memory holds, else the smallest: a plan for less memory than the board has is safe."""
    generation = profiles[family].compute_capability
    same = sorted((p for p in profiles.values() if p.compute_capability == generation), key=lambda p: p.memory_gb)
    if total_gib is None:
        return ProfileMatch(family, "nearest", f"{why} memory unreadable")
    held = [p for p in same if p.memory_gb * 0.8 <= total_gib]
    pick = held[-1] if held else same[0]
    if held:
        reason = f"{why} nearest is {pick.name}, which plans for {pick.memory_gb:g} GB, no more than this board has"
    else:
        reason = (f"{why} nearest is {pick.name}, which plans for {pick.memory_gb:g} GB, more than this board has: "
                  "its memory verdicts are optimistic")
    return ProfileMatch(pick.name, "nearest", reason + (_jetpack_note(jetson, pick) if jetson else ""))


def _what(jetson: Jetson) -> str:
    return ", ".join(x for x in (jetson.model, f"L4T {jetson.l4t}" if jetson.l4t else None) if x) or "unknown board"


def _jetpack_note(jetson: Jetson, profile: DeviceProfile) -> str:
    """The profile names the TensorRT family its engines are planned for; say when JetPack differs."""
    major = jetson.l4t.split(".")[0] if jetson.l4t else None
    if major is None:
        return ""
    if profile.trt_version == "10.3" and major != "36":
        return f"; note: {profile.name} is planned for JetPack 6 (TensorRT 10.3), this board runs JetPack {jetson.jetpack}"
    if profile.trt_version == "10.3" and jetson.jetpack in ("6.0", "6.0 DP"):
        return "; note: JetPack 6.0 ships TensorRT 8.6: upgrade to JetPack 6.1 or later for TensorRT 10.3"
    return ""


# --- which commands -----------------------------------------------------------------------------

def _version_tuple(version: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version or "")[:3])


def commands(probes: Probes, jetson: Jetson | None, gpu: Gpu | None, python_ok: bool) -> tuple[CommandStatus, ...]:
    have = {k: v is not None for k, v in probes.packages.items()}

    def missing(names) -> list[str]:
        return [n for n in names if not have.get(n)]

    has_gpu = jetson is not None or gpu is not None
    base_missing = missing(BASE)
    base_fix = "pip install tokedge (the base install: " + ", ".join("pillow" if n == "PIL" else n for n in base_missing) + ")"
    rows: list[CommandStatus] = []

    def row(command: str, needs: str, blockers: list[str], fix: str) -> None:
        if not python_ok:
            rows.append(CommandStatus(command, False, needs, "Python >= 3.10 (JetPack 6's python3 is 3.10)"))
        elif base_missing:
            rows.append(CommandStatus(command, False, needs, base_fix))
        else:
            rows.append(CommandStatus(command, not blockers, needs, None if not blockers else fix))

    export_missing = missing(EXPORT)
    row("export, quantize, optimize", "the export extra (torch, transformers, onnx, onnxscript, onnx-ir)",
        export_missing, "pip install 'tokedge[export]' (or export on a workstation and copy the artifact)")
    for command in ("run, verify, check", "memory, profile", "build --dry-run"):
        row(command, "the base install", [], "")
    trt = probes.packages.get("tensorrt")
    if not has_gpu:
        build_fix = "needs an NVIDIA GPU: build on the device (build --dry-run works here)"
        build_block = ["gpu"]
    elif trt is None:
        build_fix = ("TensorRT ships with JetPack: sudo apt install python3-libnvinfer (a venv needs "
                     "--system-site-packages)" if jetson is not None else "pip install 'tokedge[tensorrt]'")
        build_block = ["tensorrt"]
    elif trt != "?" and _version_tuple(trt) < (10, 3):
        build_fix = (f"TensorRT {trt} is older than 10.3: " + ("upgrade to JetPack 6.1 or later" if jetson is not None
                                                               else "pip install 'tensorrt>=10.3'"))
        build_block = ["old"]
    else:
        build_fix, build_block = "", []
    row("build", "TensorRT >= 10.3 and an NVIDIA GPU", build_block, build_fix)
    row("serve", "the serve extra (starlette, uvicorn)", missing(("starlette", "uvicorn")), "pip install 'tokedge[serve]'")
    row("run, profile --video", "PyAV (the video extra)", missing(("av",)), "pip install 'tokedge[video]'")
    row("profile plots", "matplotlib (the report extra)", missing(("matplotlib",)), "pip install 'tokedge[report]'")
    gpu_ort = ("pip install onnxruntime-gpu in place of onnxruntime" if jetson is None
               else "install NVIDIA's JetPack build of onnxruntime-gpu in place of onnxruntime")
    for backend, provider in (("ort-cuda", "CUDAExecutionProvider"), ("ort-tensorrt", "TensorrtExecutionProvider")):
        if not has_gpu:
            block, fix = ["gpu"], "needs an NVIDIA GPU"
        elif provider not in probes.ort_providers:
            block, fix = ["provider"], gpu_ort
        else:
            block, fix = [], ""
        if backend == "ort-tensorrt" and not block and trt is None and probes.nvinfer is None:
            block, fix = ["tensorrt"], ("TensorRT's libnvinfer from JetPack: sudo apt install nvidia-tensorrt"
                                        if jetson is not None else "pip install 'tokedge[tensorrt]'")
        row(f"--backend {backend}", f"onnxruntime-gpu with {provider}", block, fix)
    return tuple(rows)


# --- the whole diagnosis ------------------------------------------------------------------------

def diagnose(root: str | Path = "/", probes: Probes | None = None,
             profiles: Mapping[str, DeviceProfile] | None = None) -> Report:
    """Read the machine under `root` and the interpreter's `probes`; never raises for missing files."""
    from tokedge.profiles import list_profiles

    root = Path(root)
    probes = probes if probes is not None else Probes.from_interpreter(system=root.resolve() == Path("/"))
    profiles = profiles if profiles is not None else list_profiles()
    python_ok = tuple(probes.python[:2]) >= MIN_PYTHON
    jetson = read_jetson(_read(root, "etc/nv_tegra_release"), _read(root, "proc/device-tree/model")
                         or _read(root, "sys/firmware/devicetree/base/model"))
    gpu = read_gpu(root)
    memory = read_memory(_read(root, "proc/meminfo"))
    return Report(
        root=str(root), python=".".join(str(x) for x in probes.python), python_ok=python_ok,
        cpu=read_cpu(_read(root, "proc/cpuinfo", 4 << 20), probes), memory=memory, jetson=jetson, gpu=gpu,
        cuda=read_cuda(root, probes), packages=dict(probes.packages),
        tensorrt_library=probes.nvinfer, onnxruntime_providers=tuple(probes.ort_providers),
        onnxruntime_distribution=probes.ort_distribution, profile=match_profile(jetson, gpu, memory, profiles),
        commands=commands(probes, jetson, gpu, python_ok),
    )


# --- the table ----------------------------------------------------------------------------------

def _gib(n: int | None) -> str:
    return f"{n / GIB:.1f} GiB" if n is not None else "?"


def _cpu_meaning(cpu: Cpu) -> str:
    f = set(cpu.features)
    if cpu.arch == "x86_64":
        if "amx_tile" in f:
            return "AMX: int8 MatMulNBits (--accuracy-level 4) at its fastest"
        if f & {"avx512_vnni", "avx_vnni"}:
            return "VNNI: int8 MatMulNBits (--accuracy-level 4) has its fast path"
        if "avx2" in f:
            return "AVX2 without VNNI: int8 MatMulNBits works, without the VNNI speed-up"
        return "no AVX2: ONNX Runtime falls back to its slowest kernels"
    if cpu.arch == "aarch64":
        if "i8mm" in f:
            return "i8mm and dotprod: int8 MatMulNBits (--accuracy-level 4) has its fast paths"
        if "asimddp" in f:
            return "dotprod (asimddp), no i8mm: int8 MatMulNBits uses dot products"
        return "no dotprod: int8 MatMulNBits has no fast path (--accuracy-level 0)"
    return "unknown architecture"


def findings(report: Report) -> list[tuple[str, str]]:
    """(item, what was found and what it means) rows of the table, read off the report."""
    r = report
    rows = [("python", f"{r.python}: " + ("ok (>= 3.10; JetPack 6 ships 3.10)" if r.python_ok
                                          else "too old: tokedge needs Python >= 3.10"))]
    cpu = r.cpu
    feats = ", ".join(cpu.features) or "none of note"
    rows.append(("cpu", f"{cpu.model or 'unknown'} ({cpu.arch or '?'}, {cpu.cores} cores; {feats}): "
                        + _cpu_meaning(cpu)))
    mem = f"{_gib(r.memory.total_bytes)} total, {_gib(r.memory.available_bytes)} available"
    rows.append(("memory", mem + ("; unified: CPU and GPU share it" if r.jetson else "")))
    if r.jetson is None:
        rows.append(("jetson", "not a Jetson (no /etc/nv_tegra_release, no Jetson device-tree model)"))
    else:
        j = r.jetson
        rows.append(("jetson", f"{j.model or 'model unreadable'}; "
                               + (f"L4T {j.l4t} = JetPack {j.jetpack or '?'}" if j.l4t else "L4T release unreadable")))
    if r.gpu is not None:
        rows.append(("gpu", r.gpu.name + (f", driver {r.gpu.driver}" if r.gpu.driver else "")))
    elif r.jetson is not None:
        rows.append(("gpu", "integrated (Jetson)"))
    else:
        rows.append(("gpu", "no NVIDIA GPU found (/proc/driver/nvidia): engines and GPU providers need one"))
    cuda = ", ".join(x for x in (f"toolkit {r.cuda.version}" if r.cuda.version else None,
                                 f"runtime {r.cuda.runtime}" if r.cuda.runtime else None) if x)
    gpu_present = r.gpu is not None or r.jetson is not None
    if not cuda and r.jetson is not None:
        cuda = "not found: JetPack's CUDA comes with sudo apt install nvidia-jetpack"
    rows.append(("cuda", (cuda or "not found") + ("" if gpu_present or not cuda else ": unused without a GPU")))
    trt = r.packages.get("tensorrt")
    lib = f" ({r.tensorrt_library})" if r.tensorrt_library else ""
    rows.append(("tensorrt", f"{trt}{lib}" if trt else f"python module not installed{lib}: `tokedge build` needs it"))
    ort = r.packages.get("onnxruntime")
    providers = ", ".join(p.removesuffix("ExecutionProvider") for p in r.onnxruntime_providers) or "none"
    rows.append(("onnxruntime", f"{ort} ({r.onnxruntime_distribution or 'onnxruntime'}); providers: {providers}"
                 if ort else "not installed: pip install tokedge"))
    extras = [("av", "video"), ("matplotlib", "report"), ("starlette", "serve"), ("uvicorn", "serve")]
    rows.append(("extras", ", ".join(f"{n} {r.packages.get(n) or 'absent'}" for n, _ in extras)))
    export = [n for n in EXPORT if r.packages.get(n)]
    rows.append(("export", ", ".join(f"{n.replace('_', '-')} {r.packages[n]}" for n in export) if export
                 else "none of torch, transformers, onnx, onnx-ir (a device install)"))
    p = r.profile
    rows.append(("profile", f"{p.name} ({p.match}): {p.reason}" if p.name else p.reason))
    return rows


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], width: int) -> list[str]:
    """Columns padded to their widest cell; the last wraps at spaces (never inside a word or at a
    hyphen) with its continuation lines aligned under it. When fewer than 30 columns would be
    left for it, the last cell goes on its own indented lines instead."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header[:-1])]
    indent = sum(widths) + 2 * len(widths)
    if width - 1 - indent < 30:
        indent = 4
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
        for row in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
            lines.extend(textwrap.wrap(row[-1], width=max(20, width - 1), initial_indent=" " * indent,
                                       subsequent_indent=" " * indent, break_long_words=False,
                                       break_on_hyphens=False))
        return lines
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  " + header[-1]]
    for row in rows:
        lead = "".join(c.ljust(w) + "  " for c, w in zip(row, widths))
        wrapped = textwrap.wrap(row[-1], width=width - 1 - indent, break_long_words=False,
                                break_on_hyphens=False) or [""]
        lines.append((lead + wrapped[0]).rstrip())
        lines.extend(" " * indent + w for w in wrapped[1:])
    return lines


def render(report: Report, width: int = 80) -> str:
    """The findings, then the commands: plain text (as the listing commands print), wrapped at spaces
    to `width`. A path is never split, so only a `--root` longer than the terminal overflows its line."""
    rows = findings(report)
    if report.root not in ("/", ""):
        rows.insert(0, ("root", report.root))
    out = ["tokedge doctor" + (" (this machine)" if report.root in ("/", "") else ""), ""]
    out += _table(("item", "found"), rows, width)
    out.append("")
    out += _table(("command", "here", "to make it work"),
                  [(c.command, "yes" if c.works else "no", c.fix or "") for c in report.commands], width)
    return "\n".join(out)
