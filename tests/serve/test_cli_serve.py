"""`tokedge serve` as a process: SIGTERM drains in-flight requests and exits 0; the API key from
the environment; refusals (public bind without a key, a taken port, a tampered artifact) are one
line and an exit code; the serve path imports neither torch nor transformers."""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.serve.conftest import QUESTION, user_message, wait_ready
from tokedge.cli import main
from tokedge.runtime.pipeline import Pipeline
from tokedge.serve.config import ServeConfig, is_loopback

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cli(args: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tokedge.cli", "serve", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})})


def test_sigterm_lets_in_flight_requests_finish(slow_artifact, test_images, image_urls):
    port = free_port()
    proc = start_cli([str(slow_artifact), "--port", str(port), "--max-batch", "2"], env={"TOKEDGE_API_KEY": "k-env"})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base)
        assert httpx.get(f"{base}/v1/models").status_code == 401  # the key came from TOKEDGE_API_KEY
        model = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer k-env"}).json()["data"][0]["id"]
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="k-env", max_retries=0, timeout=300)
        cases = [(0, QUESTION), (1, "Describe the picture."), (2, "Hi?")]
        with Pipeline.load(slow_artifact) as pipe:
            expected = [pipe.generate(test_images[i], p, max_new_tokens=200).text for i, p in cases]

        def ask(n: int) -> str:
            img, prompt = cases[n]
            if n == 2:  # one of them streamed
                stream = client.chat.completions.create(model=model, messages=user_message(image_urls[img], prompt),
                                                        max_tokens=200, stream=True)
                return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            resp = client.chat.completions.create(model=model, messages=user_message(image_urls[img], prompt),
                                                  max_tokens=200)
            assert resp.choices[0].finish_reason == "length"
            return resp.choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(ask, n) for n in range(3)]
            deadline = time.monotonic() + 60
            while True:  # all three in the server: two decoding, one queued
                text = httpx.get(f"{base}/metrics", headers={"Authorization": "Bearer k-env"}).text
                values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                          if line and not line.startswith("#")}
                if values["tokedge_running_requests"] + values["tokedge_queue_depth"] == 3:
                    break
                assert time.monotonic() < deadline, "requests never reached the server"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            answers = [f.result(timeout=300) for f in futures]
        assert answers == expected
        assert proc.wait(timeout=120) == 0
        err = proc.stderr.read()
        assert "ready on http://127.0.0.1" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_tampered_artifact_exits_with_one_line(serve_artifact, tmp_path):
    bad = tmp_path / "tampered"
    shutil.copytree(serve_artifact, bad)
    victim = next(p for p in sorted(bad.rglob("*.onnx")))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    proc = start_cli([str(bad), "--port", str(free_port())])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "sha256" in lines[0], err


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "robot.local"])
def test_refuses_a_public_bind_without_a_key(serve_artifact, host, capsys, monkeypatch):
    monkeypatch.delenv("TOKEDGE_API_KEY", raising=False)
    rc = main(["serve", str(serve_artifact), "--host", host])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--insecure" in err and host in err
    ServeConfig(artifact=serve_artifact, host=host, insecure=True).check()  # explicitly allowed
    ServeConfig(artifact=serve_artifact, host=host, api_key="k").check()


def test_loopback_addresses():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.2", "example.com", ""))


def test_taken_port_is_one_line(serve_artifact, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        rc = main(["serve", str(serve_artifact), "--port", str(taken.getsockname()[1])])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "cannot listen on 127.0.0.1" in err


@pytest.mark.parametrize("args,fragment", [
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--port", "70000"], "--port 70000"),
    (["--api-key", " "], "API key is empty"),
    (["--allow-local-images", "/nonexistent-dir"], "not a directory"),
])
def test_bad_flags_are_one_line(serve_artifact, capsys, args, fragment):
    rc = main(["serve", str(serve_artifact), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and fragment in err


SERVE_WITHOUT_TORCH = r"""
import json, sys, threading, urllib.request, base64, io
from PIL import Image
from tokedge.serve.app import build_server, listen
from tokedge.serve.config import ServeConfig
sock = listen("127.0.0.1", 0)
server, service = build_server(ServeConfig(artifact=sys.argv[1]))
threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
service.ready.wait(120)
buf = io.BytesIO(); Image.new("RGB", (50, 40), (1, 2, 3)).save(buf, "PNG")
url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
body = {"model": service.cfg.served_name, "max_tokens": 3, "messages": [{"role": "user", "content": [
    {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}]}
req = urllib.request.Request(f"http://127.0.0.1:{sock.getsockname()[1]}/v1/chat/completions",
                             data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
answer = json.loads(urllib.request.urlopen(req, timeout=60).read())
server.should_exit = True
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx", "onnxscript"))
print(json.dumps({"tokens": answer["usage"]["completion_tokens"], "heavy": heavy}))
"""


def test_serve_path_imports_no_torch_or_transformers(serve_artifact):
    proc = subprocess.run([sys.executable, "-c", SERVE_WITHOUT_TORCH, str(serve_artifact)], capture_output=True,
                          text=True, timeout=300, cwd="/", check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"tokens": 3, "heavy": []}
