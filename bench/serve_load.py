"""Load test for `tokedge serve`: N concurrent streaming clients against one artifact, once per
--max-batch value: the server runs as its own process (`tokedge serve`), the clients are threads
using the official `openai` client, and everything is measured from the client side.

    python bench/serve_load.py ARTIFACT [--clients 8] [--max-tokens 64] [--batches 1,4,8]

Prints one JSON line per --max-batch with wall time, completed requests per second, generated
tokens per second, the server's mean TTFT (`tokedge_ttft_seconds`: request body in -> first token)
and the client-side time to the first visible text, median / p90 (later than the first token when
the first tokens decode to no text, as the wide random model's out-of-vocabulary ids do). Every request is
greedy with a distinct prompt; the answers are checked equal across --max-batch values.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def image_url(seed: int) -> str:
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (240, 320, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run(artifact: Path, max_batch: int, clients: int, max_tokens: int) -> tuple[dict, list[str]]:
    """Start `tokedge serve` as its own process (so the clients do not share its interpreter)."""
    import httpx
    import openai

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tokedge.cli", "serve", str(artifact), "--port", str(port),
                             "--max-batch", str(max_batch), "--max-queue", str(clients)], cwd=HERE.parent)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            if httpx.get(f"{base}/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit("the server did not become ready")
        time.sleep(0.1)
    model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="-", max_retries=0)
    urls = [image_url(i % 3) for i in range(clients)]

    def one(i: int) -> tuple[float, int, str]:
        start, first, pieces, tokens = time.perf_counter(), None, [], 0
        stream = client.chat.completions.create(
            model=model, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[i]}},
                                                   {"type": "text", "text": f"Question {i}: what is this?"}]}])
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return (first or time.perf_counter()) - start, tokens, "".join(pieces)

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    wall = time.perf_counter() - t0
    metrics = {line.split()[0]: float(line.split()[1]) for line in httpx.get(f"{base}/metrics").text.splitlines()
               if line and not line.startswith("#")}
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"max_batch": max_batch, "clients": clients, "max_tokens": max_tokens, "wall_s": round(wall, 3),
            "requests_per_s": round(clients / wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "server_ttft_mean_ms": round(1e3 * metrics["tokedge_ttft_seconds_sum"] / metrics["tokedge_ttft_seconds_count"], 1),
            "first_text_p50_ms": round(1e3 * ttft[len(ttft) // 2], 1),
            "first_text_p90_ms": round(1e3 * ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))], 1)}, [r[2] for r in results]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,4,8")
    args = ap.parse_args()
    answers = None
    for b in (int(x) for x in args.batches.split(",")):
        row, texts = run(args.artifact, b, args.clients, args.max_tokens)
        if answers is not None and texts != answers:
            raise SystemExit(f"answers at --max-batch {b} differ from the first run")
        answers = texts
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
