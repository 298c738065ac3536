"""The device path needs only the base install: `tokedge run` imports neither torch nor
transformers (checked in this environment, where both are installed, and in a fresh venv with
`pip install .` only)."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
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


@pytest.mark.slow
def test_fresh_venv_base_install_runs(run_inputs, tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", str(REPO)], capture_output=True, text=True,
                             timeout=900)
    assert install.returncode == 0, install.stderr[-2000:]
    listed = subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True, text=True).stdout
    names = {p["name"].lower() for p in json.loads(listed)}
    assert "onnxruntime" in names and "torch" not in names and "transformers" not in names
    assert _check(python, *run_inputs) == {"rc": 0, "heavy": []}
