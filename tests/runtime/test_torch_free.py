"""The device path needs only the base install: `tokedge run` imports neither torch nor
transformers (checked in this environment, where both are installed; tests/test_device_install.py
checks every device command in a fresh venv holding only the wheel)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CHECK = r"""
import json, sys
from tokedge.cli import main
rc = main(["run", sys.argv[1], "--image", sys.argv[2], "--prompt", "What is this?", "--max-new-tokens", "4", "--json"])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx", "onnxscript", "onnx_ir"))
print(json.dumps({"rc": rc, "heavy": heavy}))
"""


@pytest.fixture(scope="module")
def run_inputs(artifacts, tmp_path_factory, test_images):
    image = tmp_path_factory.mktemp("img") / "x.png"
    test_images[0].save(image)
    return str(artifacts("cls-attn", 64)), str(image)


def _check(python: str, artifact: str, image: str) -> dict:
    proc = subprocess.run([python, "-c", CHECK, artifact, image], capture_output=True, text=True, timeout=300,
                          cwd="/")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[0])["visual_tokens"] == 64
    return json.loads(lines[-1])


def test_run_imports_no_torch_or_transformers(run_inputs):
    result = _check(sys.executable, *run_inputs)
    assert result == {"rc": 0, "heavy": []}
