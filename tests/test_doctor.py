"""`tokedge doctor` on fixture roots (tests/fixtures/doctor/, sources of every string in its
SOURCES.md): the right profile for each board, what the system files say, which commands work with
a given set of packages, a table that fits 80 columns, and a run that imports no torch."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tokedge.cli import main
from tokedge.doctor import GIB, Probes, diagnose, render

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "doctor"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"

BASE = {"numpy": "1.26.4", "onnxruntime": "1.20.0", "tokenizers": "0.21.0", "PIL": "11.0.0", "jinja2": "3.1.4"}
DEVICE = Probes(python=(3, 10, 12), packages=BASE, ort_providers=("CPUExecutionProvider",),
                ort_distribution="onnxruntime")
GPU_DEVICE = Probes(python=(3, 10, 12), packages={**BASE, "tensorrt": "10.3.0"},
                    ort_providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
                    ort_distribution="onnxruntime-gpu")
EVERYTHING = Probes(python=(3, 11, 7), packages={
    **BASE, "tensorrt": None, "av": "14.0.0", "matplotlib": "3.9.0", "starlette": "0.40.0", "uvicorn": "0.30.0",
    "torch": "2.5.0", "transformers": "4.46.0", "safetensors": "0.4.5", "onnx": "1.17.0", "onnxscript": "0.1.0",
    "onnx_ir": "0.1.10"}, ort_providers=("CPUExecutionProvider",), ort_distribution="onnxruntime")


def _doctor_json(capsys, root: Path) -> dict:
    assert main(["doctor", "--json", "--root", str(root)]) == 0
    return json.loads(capsys.readouterr().out)


# --- the acceptance: the right profile on each fixture root ---------------------------------------

@pytest.mark.parametrize("root,profile,match,l4t,jetpack", [
    ("jetson-orin-nano-super", "jetson-orin-nano-8gb", "exact", "36.4.3", "6.2"),
    ("jetson-agx-orin-64gb", "jetson-agx-orin-64gb", "exact", "36.4.4", "6.2.1"),
    ("jetson-agx-thor", "jetson-agx-thor", "exact", "38.2.0", "7.0"),
    ("x86-rtx-4090", "rtx-4090", "exact", None, None),
])
def test_doctor_json_names_the_profile_of_each_fixture_board(root, profile, match, l4t, jetpack, capsys):
    data = _doctor_json(capsys, FIXTURES / root)
    assert data["profile"]["name"] == profile and data["profile"]["match"] == match
    if l4t is None:
        assert data["jetson"] is None
    else:
        assert (data["jetson"]["l4t"], data["jetson"]["jetpack"]) == (l4t, jetpack)


def test_a_cpu_only_workstation_has_no_profile_and_says_why(capsys):
    data = _doctor_json(capsys, FIXTURES / "x86-workstation-cpu-only")
    assert data["profile"] == {"name": None, "match": "none", "reason": "no device profile matches: CPU-only "
                               "machine; export/run on ONNX Runtime CPU work"}
    assert data["jetson"] is None and data["gpu"] is None


def test_the_json_schema_is_the_documented_one(capsys):
    data = _doctor_json(capsys, FIXTURES / "jetson-orin-nano-super")
    assert list(data) == ["root", "python", "python_ok", "cpu", "memory", "jetson", "gpu", "cuda", "packages",
                          "tensorrt_library", "onnxruntime_providers", "onnxruntime_distribution", "profile", "commands", "schema"]
    assert data["schema"] == 1
    assert list(data["cpu"]) == ["model", "arch", "cores", "features"]
    assert list(data["memory"]) == ["total_bytes", "available_bytes"]
    assert list(data["jetson"]) == ["release", "l4t", "jetpack", "model"]
    assert list(data["cuda"]) == ["version", "runtime"]
    assert list(data["profile"]) == ["name", "match", "reason"]
    assert all(list(c) == ["command", "works", "needs", "fix"] for c in data["commands"])
    docs = DOCS.read_text()
    assert "`tokedge doctor --json`" in docs
    for key in data:
        assert f"`{key}`" in docs, f"docs/cli.md does not document the doctor key {key}"


# --- what the system files say ---------------------------------------------------------------------

def test_the_system_files_of_the_fixture_boards():
    nano = diagnose(FIXTURES / "jetson-orin-nano-super", DEVICE)
    assert nano.jetson is not None
    assert nano.jetson.model == "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"  # NUL gone
    assert nano.jetson.release is not None and nano.jetson.release.startswith("# R36 (release), REVISION: 4.3")
    assert (nano.cpu.model, nano.cpu.arch, nano.cpu.cores) == ("Cortex-A78AE", "aarch64", 6)
    assert "asimddp" in nano.cpu.features and "i8mm" not in nano.cpu.features
    assert nano.memory.total_bytes is not None and 7.3 < nano.memory.total_bytes / GIB < 7.5
    assert nano.cuda.version == "12.6.68"

    thor = diagnose(FIXTURES / "jetson-agx-thor", DEVICE)
    assert (thor.cpu.model, thor.cpu.cores) == ("Neoverse-V3AE", 14)
    assert {"i8mm", "sve", "sve2", "bf16", "asimddp"} <= set(thor.cpu.features)
    assert thor.cuda.version == "13.0.48"

    agx = diagnose(FIXTURES / "jetson-agx-orin-64gb", DEVICE)
    assert agx.cpu.cores == 12 and agx.memory.total_bytes is not None and agx.memory.total_bytes > 60 * GIB

    x86 = diagnose(FIXTURES / "x86-workstation-cpu-only", DEVICE)
    assert (x86.cpu.arch, x86.cpu.cores) == ("x86_64", 8)
    assert x86.cpu.features == ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile")
    assert x86.cuda.version is None and x86.gpu is None

    rtx = diagnose(FIXTURES / "x86-rtx-4090", DEVICE)
    assert rtx.gpu is not None and (rtx.gpu.name, rtx.gpu.driver) == ("NVIDIA GeForce RTX 4090", "550.54.14")


def _board(tmp_path: Path, model: str | None, release: str | None, mem_gib: float | None) -> Path:
    if model is not None:
        (tmp_path / "proc" / "device-tree").mkdir(parents=True)
        (tmp_path / "proc" / "device-tree" / "model").write_bytes(model.encode() + b"\x00")
    if release is not None:
        (tmp_path / "etc").mkdir()
        (tmp_path / "etc" / "nv_tegra_release").write_text(release + "\n")
    if mem_gib is not None:
        (tmp_path / "proc").mkdir(exist_ok=True)
        (tmp_path / "proc" / "meminfo").write_text(f"MemTotal: {int(mem_gib * 2**20)} kB\nMemAvailable: 1024 kB\n")
    return tmp_path


R36_43 = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025"


@pytest.mark.parametrize("model,release,mem,profile,match,says", [
    # Orin NX 8GB (jetson_stats #603): no NX 8GB profile; the 8 GB Orin profile fits its memory
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", R36_43, 7.4, "jetson-orin-nano-8gb", "nearest",
     "no more than this board has"),
    ("NVIDIA Jetson Orin NX Engineering Reference Developer Kit", R36_43, 15.3, "jetson-orin-nx-16gb", "exact", "15.3 GiB"),
    # AGX Orin 32GB (31,433,768 kB): the largest Orin plan it holds
    ("NVIDIA Jetson AGX Orin Developer Kit", R36_43, 29.97, "jetson-orin-nx-16gb", "nearest", "plans for 16 GB"),
    # Orin Nano 4GB: only a larger plan exists, and it says so
    ("NVIDIA Jetson Orin Nano Developer Kit", R36_43, 3.4, "jetson-orin-nano-8gb", "nearest", "optimistic"),
    # JetPack 5 wrote no "Jetson" (jetson_stats #400): still an Orin Nano, on the wrong JetPack
    ("NVIDIA Orin Nano Developer Kit",
     "# R35 (release), REVISION: 3.1, GCID: 32827747, BOARD: t186ref, EABI: aarch64, DATE: Sun Mar 19 15:19:21 UTC 2023",
     7.4, "jetson-orin-nano-8gb", "exact", "planned for JetPack 6 (TensorRT 10.3), this board runs JetPack 5.1.1"),
    ("NVIDIA Jetson Orin Nano Developer Kit", "# R36 (release), REVISION: 3.0, GCID: 36191598, BOARD: generic",
     7.4, "jetson-orin-nano-8gb", "exact", "JetPack 6.0 ships TensorRT 8.6"),
    # a model string naming no module: the L4T major picks the generation
    ("Custom Carrier", R36_43, 15.0, "jetson-orin-nx-16gb", "nearest", "L4T R36 is for Orin: nearest is"),
    ("Jetson-AGX", "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t186ref", 31.0, None, "none",
     "no device profile for this Jetson"),
    (None, None, 62.5, None, "none", "CPU-only machine"),
])
def test_nearest_profile_and_its_reason(tmp_path, model, release, mem, profile, match, says):
    report = diagnose(_board(tmp_path, model, release, mem), DEVICE)
    assert (report.profile.name, report.profile.match) == (profile, match)
    assert says in report.profile.reason


def test_an_unlisted_l4t_release_reads_as_its_family(tmp_path):
    report = diagnose(_board(tmp_path, "NVIDIA Jetson AGX Thor Developer Kit",
                             "# R38 (release), REVISION: 2.2, GCID: 42205042, BOARD: generic", 120.0), DEVICE)
    assert report.jetson is not None and (report.jetson.l4t, report.jetson.jetpack) == ("38.2.2", "7.x")


def test_an_h100_that_is_not_the_sxm_card_is_the_nearest(tmp_path):
    gpus = tmp_path / "proc" / "driver" / "nvidia" / "gpus" / "0000:17:00.0"
    gpus.mkdir(parents=True)
    (gpus / "information").write_text("Model: \t\t NVIDIA H100 PCIe\nIRQ: 10\n")
    report = diagnose(tmp_path, DEVICE)
    assert (report.profile.name, report.profile.match) == ("h100-sxm", "nearest")
    (gpus / "information").write_text("Model: \t\t NVIDIA H100 80GB HBM3\n")
    assert diagnose(tmp_path, DEVICE).profile.match == "exact"


@pytest.mark.parametrize("junk", [b"", b"\x00\xff\xfe garbage", b"MemTotal: lots kB\nflags\n:\n", b"{not json"])
def test_odd_or_missing_files_never_raise(tmp_path, junk):
    for rel in ("etc/nv_tegra_release", "proc/meminfo", "proc/cpuinfo", "proc/device-tree/model",
                "usr/local/cuda/version.json", "usr/local/cuda/version.txt", "proc/driver/nvidia/version"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(junk)
    report = diagnose(tmp_path, DEVICE)
    render(report, 80)
    assert report.memory.total_bytes is None
    assert diagnose(tmp_path / "nothing-here", DEVICE).profile.match == "none"


# --- which commands work, and what to install -------------------------------------------------------

def _commands(report):
    return {c.command: c for c in report.commands}


def test_a_device_install_runs_but_does_not_export():
    cmds = _commands(diagnose(FIXTURES / "jetson-orin-nano-super", DEVICE))
    for command in ("run, verify, check", "memory, profile", "build --dry-run"):
        assert cmds[command].works and cmds[command].fix is None
    assert not cmds["export, quantize, optimize"].works
    assert "pip install 'tokedge[export]'" in (cmds["export, quantize, optimize"].fix or "")
    assert cmds["serve"].fix == "pip install 'tokedge[serve]'"
    assert cmds["run, profile --video"].fix == "pip install 'tokedge[video]'"
    assert cmds["profile plots"].fix == "pip install 'tokedge[report]'"
    assert "python3-libnvinfer" in (cmds["build"].fix or "")  # TensorRT comes from JetPack, not pip
    assert "onnxruntime-gpu" in (cmds["--backend ort-cuda"].fix or "")


def test_a_gpu_device_install_builds_and_has_the_gpu_providers():
    cmds = _commands(diagnose(FIXTURES / "jetson-agx-orin-64gb", GPU_DEVICE))
    assert cmds["build"].works and cmds["--backend ort-cuda"].works and cmds["--backend ort-tensorrt"].works
    old = Probes(python=(3, 10, 12), packages={**BASE, "tensorrt": "8.6.2"}, ort_providers=("CPUExecutionProvider",))
    build = _commands(diagnose(FIXTURES / "jetson-agx-orin-64gb", old))["build"]
    assert not build.works and "older than 10.3" in (build.fix or "")


def test_the_tensorrt_provider_needs_libnvinfer_not_the_python_module():
    ort_gpu = Probes(python=(3, 10, 12), packages=BASE, ort_distribution="onnxruntime-gpu",
                     ort_providers=("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"))
    cmds = _commands(diagnose(FIXTURES / "jetson-orin-nano-super", ort_gpu))
    assert cmds["--backend ort-cuda"].works
    assert not cmds["--backend ort-tensorrt"].works and "nvidia-tensorrt" in (cmds["--backend ort-tensorrt"].fix or "")
    with_lib = dataclasses.replace(ort_gpu, nvinfer="libnvinfer.so.10")
    assert _commands(diagnose(FIXTURES / "jetson-orin-nano-super", with_lib))["--backend ort-tensorrt"].works


def test_a_cpu_only_workstation_exports_but_builds_nothing():
    cmds = _commands(diagnose(FIXTURES / "x86-workstation-cpu-only", EVERYTHING))
    assert cmds["export, quantize, optimize"].works and cmds["serve"].works and cmds["profile plots"].works
    assert not cmds["build"].works and "needs an NVIDIA GPU" in (cmds["build"].fix or "")
    assert not cmds["--backend ort-cuda"].works and not cmds["--backend ort-tensorrt"].works
    gpu = _commands(diagnose(FIXTURES / "x86-rtx-4090", EVERYTHING))
    assert gpu["build"].fix == "pip install 'tokedge[tensorrt]'"


def test_an_old_python_or_a_missing_base_install_is_the_one_fix():
    old = Probes(python=(3, 8, 10), packages=BASE)
    report = diagnose(FIXTURES / "jetson-orin-nano-super", old)
    assert not report.python_ok and all(not c.works and "Python >= 3.10" in (c.fix or "") for c in report.commands)
    no_ort = Probes(python=(3, 10, 12), packages={k: v for k, v in BASE.items() if k != "onnxruntime"})
    cmds = diagnose(FIXTURES / "jetson-orin-nano-super", no_ort).commands
    assert all(not c.works and "onnxruntime" in (c.fix or "") for c in cmds)


# --- the table -------------------------------------------------------------------------------------

@pytest.mark.parametrize("root", sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()))
@pytest.mark.parametrize("width", [80, 60])
def test_the_table_fits_and_keeps_every_word_whole(root, width):
    report = diagnose(FIXTURES / root, DEVICE)
    out = render(report, width)
    assert all(len(line) <= width for line in out.splitlines() if not line.startswith("root ")), out
    flat = " ".join(out.split())
    for text in [report.profile.reason, *(c.fix for c in report.commands if c.fix)]:
        assert " ".join(text.split()) in flat  # wrapped at spaces only: no word or hyphenated name cut
    if report.profile.name:
        assert report.profile.name in flat


def test_the_table_on_this_machine(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tokedge doctor (this machine)") and "command" in out and "profile" in out
    assert all(len(line) <= 80 for line in out.splitlines())


def test_the_interpreter_probes_name_what_is_installed():
    import importlib.metadata

    probes = Probes.from_interpreter()
    assert probes.python == tuple(sys.version_info[:3])
    assert probes.packages["numpy"] == importlib.metadata.version("numpy")
    assert "CPUExecutionProvider" in probes.ort_providers
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None or importlib.util.find_spec("tensorrt").origin is None:
        assert probes.packages["tensorrt"] is None  # tensorrt-stubs' bare .pyi directory is no TensorRT


def test_doctor_imports_no_torch_transformers_onnx_or_onnx_ir():
    code = ("import sys, json\n"
            "from tokedge.cli import main\n"
            "rc = main(['doctor', '--json'])\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'onnx_ir', 'onnx') if m in sys.modules)\n"
            "print(json.dumps({'rc': rc, 'heavy': heavy}), file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stderr.strip().splitlines()[-1])
    assert result == {"rc": 0, "heavy": []}
    assert json.loads(done.stdout)["schema"] == 1
