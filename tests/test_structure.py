"""Code-health invariants from the review, checked on the source: TensorRT is imported in one
module and planning never imports it; one runner protocol (no capability probing); methods are
never told apart by name or stage strings outside their own module; one decode loop."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tokedge"
SOURCES = {p.relative_to(PACKAGE).as_posix(): p.read_text() for p in PACKAGE.rglob("*.py")}


def test_tensorrt_is_imported_only_by_build_trt():
    importers = sorted(name for name, text in SOURCES.items() if re.search(r"^\s*import tensorrt\b", text, re.MULTILINE))
    assert importers == ["build/trt.py"]


def test_build_planning_imports_no_tensorrt_module():
    code = ("import sys, tokedge.build, tokedge.build.plan; "
            "print(sorted(m for m in sys.modules if m in ('tokedge.build.trt', 'tensorrt')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert not re.search(r"^\s*(from|import) tokedge\.(build\.trt|runtime)", SOURCES["build/plan.py"], re.MULTILINE)


def test_one_runner_protocol_without_capability_probing():
    for name, text in SOURCES.items():
        assert "hasattr(runner" not in text, name
        if name not in ("runtime/ort_backend.py", "build/trt.py"):  # their helpers behind infer(..., keep=...)
            assert "infer_bound(" not in text, name


def test_methods_are_not_told_apart_by_name_or_stage_strings():
    from tokedge.reduce import METHODS
    from tokedge.reduce.base import STAGES

    words = "|".join(re.escape(w) for w in [*METHODS, *STAGES])
    compare = re.compile(rf"""([=!]=\s*["']({words})["'])|(["']({words})["']\s*[=!]=)|(in\s*\([^)]*["']({words})["'])""")
    offenders = [f"{name}: {m.group(0)}" for name, text in SOURCES.items() if not name.startswith("reduce/")
                 for m in compare.finditer(text)]
    assert offenders == []


def test_one_decode_loop():
    callers = sorted(name for name, text in SOURCES.items()
                     if text.count("decode_loop(") > text.count("def decode_loop("))
    # generate (run, validation, verify, profile), the transformers references and the baseline (a
    # server may call it too)
    assert {"export/families/llava.py", "export/reference.py", "report/baseline.py", "runtime/generate.py"} <= set(callers)
    assert "def greedy(" not in SOURCES["runtime/graphs.py"]  # validation and verify go through generate
    assert "generate(" in SOURCES["export/validate.py"]
    pickers = sorted(name for name, text in SOURCES.items() if ".argmax(-1)" in text and not name.startswith("reduce/"))
    # tokens are chosen in one place; export/validate.py only compares argmaxes (the quantized
    # artifacts' top-1 agreement metric) and picks no token
    assert pickers == ["export/validate.py", "runtime/generate.py"]
    assert SOURCES["export/validate.py"].count(".argmax(-1)") == 2 and "a.argmax(-1) == b.argmax(-1)" in SOURCES[
        "export/validate.py"]
