"""The preprocessing stage (`make test-preprocess`, run in `.venv-tv`, which has torchvision):
tokedge's numpy preprocessing against BOTH of transformers' image-processor backends (PIL and
torchvision) and against the real video processors (which need torchvision).

Without torchvision (the main `.venv`) every test here is skipped with the reason below. The
measured differences are collected in `DIFFS` and printed as a table at the end of the run
(`pytest_terminal_summary`), the numbers docs/runtime.md quotes."""

from __future__ import annotations

import importlib.util

import pytest

NO_TORCHVISION = ("torchvision is not installed: transformers' torchvision image-processor backend and video "
                  "processors are absent; run `make test-preprocess` (the .venv-tv stage)")
HAVE_TORCHVISION = importlib.util.find_spec("torchvision") is not None

from tests.preprocess.support import DIFFS


def pytest_collection_modifyitems(config, items):
    if HAVE_TORCHVISION:
        return
    skip = pytest.mark.skip(reason=NO_TORCHVISION)
    for item in items:
        if "tests/preprocess/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    if not DIFFS:
        return
    terminalreporter.section("tokedge preprocessing vs transformers' backends (max abs difference)")
    terminalreporter.write_line(f"{'family':<16} {'what':<22} {'size HxW':<12} {'against':<12} {'max diff':>10}  note")
    for family, what, size, against, diff, note in DIFFS:
        terminalreporter.write_line(f"{family:<16} {what:<22} {size:<12} {against:<12} {diff:>10.6f}  {note}")
