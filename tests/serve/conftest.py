"""A real server (uvicorn + Starlette, the same app `tokedge serve` runs) on 127.0.0.1, in a thread
of the test process, talked to over real sockets."""

from __future__ import annotations

import base64
import io
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tokedge.serve.app import build_server, listen
from tokedge.serve.config import ServeConfig

QUESTION = "What is shown in this image?"


def data_url(image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def user_message(image_url: str | None, text: str) -> list[dict]:
    content: list[dict] = [] if image_url is None else [{"type": "image_url", "image_url": {"url": image_url}}]
    return [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]


def wait_ready(base: str, timeout: float = 120.0, headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=5, headers=headers).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{base} did not become ready in {timeout} s")


@contextmanager
def running_server(cfg: ServeConfig, loader=None, wait: bool = True):
    """Yields (base_url, service) while the server runs in a thread; stops it (draining) after."""
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server, service = build_server(cfg, loader)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        if wait:
            wait_ready(base)
        yield base, service
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


@pytest.fixture(scope="session")
def serve_artifact(artifacts) -> Path:
    return artifacts("cls-attn", 64)


@pytest.fixture(scope="session")
def image_urls(test_images) -> list[str]:
    return [data_url(img) for img in test_images]


@pytest.fixture(scope="session")
def image_files(tmp_path_factory, test_images) -> list[Path]:
    root = tmp_path_factory.mktemp("serve-images")
    paths = []
    for i, img in enumerate(test_images):
        paths.append(root / f"img{i}.png")
        img.save(paths[-1])
    return paths


@pytest.fixture(scope="session")
def slow_artifact(artifacts, tmp_path_factory) -> Path:
    """A wider tiny model (8 decoder layers, 32k vocabulary): a few ms per token on a CPU, so that
    requests stay in flight long enough to be cancelled, queued behind, or drained at SIGTERM."""
    from tokedge.export.presets import TinyLlavaConfig, build_tiny_llava

    ckpt = build_tiny_llava(tmp_path_factory.mktemp("ckpt-slow") / "tiny-llava-wide",
                            TinyLlavaConfig(text_hidden=256, text_layers=8, vocab_size=32000))
    return artifacts("cls-attn", 64, checkpoint=ckpt)


def run_then_serve(artifact, images: list, tmp_path, capsys, key: str = "test-key-123"):
    """`tokedge run --json` on images[0], then one server with the official openai client: the answer to
    images[0] alone and to a request with every image. -> (run's JSON, one-image reply, all-images reply)."""
    import json

    import openai

    from tokedge.cli import main

    path = tmp_path / "photo.png"
    images[0].save(path)
    assert main(["run", str(artifact), "--image", str(path), "--prompt", QUESTION, "--max-new-tokens", "8",
                 "--json"]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = ServeConfig(artifact=artifact, api_key=key, max_batch=2, batch_wait_ms=200, max_prompt_tokens=2000)
    with running_server(cfg) as (base, service):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=300)
        one = client.chat.completions.create(model=service.cfg.served_name,
                                             messages=user_message(data_url(images[0]), QUESTION), max_tokens=8)
        content = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
        every = client.chat.completions.create(model=service.cfg.served_name, max_tokens=8, messages=[
            {"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]}])
    return expected, one, every
