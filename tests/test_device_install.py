"""The device install: `make wheel` builds tokedge's wheel and sdist plus its dependencies' wheels
into one folder; `pip install --no-index dist/*.whl` installs them in a fresh venv with no extras
and no index (as on a device without internet). There, on an artifact exported here, `doctor`,
`run`, `serve` (one request with the official openai client), `verify`, `check`, `memory`,
`build --dry-run` and `profile` work, and after each one neither torch nor transformers nor onnx
nor onnx-ir is in `sys.modules`. Commands that need an extra say which one in one line (exit 2)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import venv
from pathlib import Path

import pytest

from tests.serve.conftest import data_url, user_message
from tests.serve.test_cli_serve import free_port

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "onnx", "onnxscript", "onnx_ir")

# runs one command in-process and reports its exit code and which heavy modules it imported
WRAPPER = rf"""
import json, sys
from tokedge.cli import main
rc = main(sys.argv[1:])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
print("@@" + json.dumps({{"rc": rc, "heavy": heavy}}), flush=True)
"""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def device_venv(tmp_path_factory):
    """A fresh venv holding only what `make wheel` put in dist/, installed without an index."""
    root = tmp_path_factory.mktemp("device")
    dist = root / "dist"
    made = subprocess.run(["make", "-s", "-o", ".venv/.tokedge-installed", "wheel", f"DIST={dist}",
                           f"PY={sys.executable}"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert made.returncode == 0, made.stderr[-3000:]
    assert list(dist.glob("tokedge-*.tar.gz")) and list(dist.glob("tokedge-*.whl"))
    venv.create(root / "venv", with_pip=True)
    python = str(root / "venv" / "bin" / "python")
    wheels = [str(p) for p in dist.glob("*.whl")]
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-index", *wheels], capture_output=True,
                             text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    listed = json.loads(subprocess.run([python, "-m", "pip", "list", "--format=json"], capture_output=True,
                                       text=True).stdout)
    names = {p["name"].lower() for p in listed}
    assert {"tokedge", "onnxruntime", "starlette", "uvicorn"} <= names
    assert not names & {"torch", "transformers", "onnx", "onnx-ir", "onnxscript", "matplotlib", "av"}
    return python


def _run(python: str, *args, timeout: int = 600) -> tuple[dict, str]:
    proc = subprocess.run([python, "-c", WRAPPER, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd="/", env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    marker = [line for line in proc.stdout.splitlines() if line.startswith("@@")]
    assert marker, proc.stderr[-2000:]
    return json.loads(marker[-1][2:]), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def exported(artifacts, tmp_path_factory, test_images):
    image = tmp_path_factory.mktemp("img") / "x.png"
    test_images[0].save(image)
    return artifacts("cls-attn", 64), image


def test_device_commands_run_from_the_wheel_without_heavy_imports(device_venv, exported, tmp_path):
    art, image = exported
    commands = {
        "doctor": ["doctor", "--json"],
        "run": ["run", art, "--image", image, "--prompt", "What is this?", "--max-new-tokens", "4", "--json"],
        "verify": ["verify", art],
        "check": ["check", art, "--target", "trt-10.3"],
        "memory": ["memory", art, "--profile", "jetson-orin-nano-8gb"],
        "build --dry-run": ["build", art, "--profile", "jetson-orin-nano-8gb", "--dry-run"],
        "profile": ["profile", art, "--image", image, "--runs", "1", "--warmup", "0", "--max-new-tokens", "2",
                    "--out", tmp_path / "report"],
    }
    for name, argv in commands.items():
        result, output = _run(device_venv, *argv)
        assert result == {"rc": 0, "heavy": []}, (name, output[-1500:])
        if name == "doctor":
            report = json.loads(output.split("@@")[0].strip().splitlines()[-1])
            assert report["packages"]["torch"] is None and report["packages"]["onnxruntime"]
        if name == "profile":  # plots need the report extra, and the report says so
            assert "no plots: matplotlib is not installed" in output
    assert (tmp_path / "report" / "report.json").exists()


def test_serve_from_the_wheel_answers_the_official_client(device_venv, exported, test_images):
    import openai

    art, _ = exported
    port = free_port()
    proc = subprocess.Popen([device_venv, "-c", WRAPPER, "serve", str(art), "--port", str(port)], cwd="/", text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        import httpx

        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(model=model, messages=user_message(data_url(test_images[0]), "What is this?"),
                                               max_tokens=4)
        assert reply.choices[0].message.content and reply.usage.completion_tokens == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    marker = [line for line in out.splitlines() if line.startswith("@@")]
    assert marker, err[-2000:]
    assert json.loads(marker[-1][2:]) == {"rc": 0, "heavy": []}


def test_commands_that_need_an_extra_name_it(device_venv, exported, tmp_path):
    art, _ = exported
    cases = [
        (["export", "tiny-llava", "--method", "cls-attn", "--budget", "64", "--out", tmp_path / "x"], "tokedge[export]"),
        (["quantize", art, "--out", tmp_path / "q"], "tokedge[export]"),
        (["verify", art, "--checkpoint", tmp_path], "tokedge[export]"),
    ]
    for argv, extra in cases:
        result, output = _run(device_venv, *argv)
        lines = [line for line in output.splitlines() if line and not line.startswith("@@")]
        assert result["rc"] == 2, (argv, output)
        assert len(lines) == 1 and extra in lines[0] and "error:" in lines[0], (argv, output)
