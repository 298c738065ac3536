"""The README's command blocks run verbatim on the presets (issue 28, acceptance).

Every `sh` block of README.md is read line by line (a trailing backslash joins lines). Each command
either runs here, exactly as written, in one working directory, in README order (so the artifacts
a block runs on are the ones an earlier block exported, as for a reader following the README), or
is listed in NOT_HERE with the reason it cannot run on this machine. A command line in neither
fails the test, so a new README line must be classified. Inputs the README assumes the reader has
(photo.jpg, a.jpg, b.jpg, c.jpg, clip.mp4, and a few POPE questions in coco_pope_random.json's
format about images in val2014/) are made first. The exit code must be the one the line's
comment names ("exit 3") or 0; every command that shows output or numbers from a preset's artifact
(export, run, verify, profile) says once that its weights are random. `serve` lines run as a server
process that must become ready and answer a chat request before SIGTERM stops it (exit 0).

The quantization block is covered on its own (tests/test_readme_quickstart.py) and the Python
example by tests/test_public_api.py; both run verbatim there.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tokedge.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
NOTICE = "weights are random"

# substring of a command line -> why it cannot run verbatim on this machine
NOT_HERE = {
    "make demo": "a Makefile target: `make demo` is tests/test_demo.py's subject, `make test` is this suite",
    "make test": "a Makefile target: this suite is what it runs",
    "make wheel": "builds the wheels: tests/test_device_install.py builds and installs them",
    "pip install": "installs packages (tests/test_device_install.py installs the wheel into a fresh venv)",
    "llava-hf/llava-1.5-7b-hf": "a hub id: model hubs are unreachable here (hub loading is tested on local dirs)",
    "./my-llava ": "a reader's own llava-hf directory",
    "./Qwen2.5-VL-3B-Instruct": "a 3B checkpoint the reader downloads; not available offline",
    "tokedge export CHECKPOINT": "CHECKPOINT is a placeholder",
    "tokedge quantize A ": "A is a placeholder (the line above)",
    "--backend tensorrt": "TensorRT cannot be installed on this machine (no GPU)",
    "# on the Jetson": "builds TensorRT engines: on the Jetson only",
    "--api-key-file /etc/tokedge/key": "names the reader's key file",
}
QUANT_BLOCK = "--quantize int4 --out ./tiny-int4"  # tests/test_readme_quickstart.py runs that block


def sh_blocks() -> list[list[str]]:
    """The README's sh blocks as lists of logical command lines (continuations joined)."""
    blocks = []
    for body in re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S):
        lines: list[str] = []
        pending = ""
        for raw in body.splitlines():
            if raw.lstrip().startswith("#") or not raw.strip():
                continue
            if raw.rstrip().endswith("\\"):
                pending += raw.rstrip()[:-1] + " "
                continue
            lines.append(pending + raw.strip())
            pending = ""
        blocks.append(lines)
    return blocks


def _make_inputs(root: Path) -> None:
    import av
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, size in (("photo.jpg", (640, 480)), ("a.jpg", (500, 375)), ("b.jpg", (300, 400)), ("c.jpg", (256, 256))):
        base = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
        Image.fromarray(np.kron(base, np.ones((16, 16, 1), np.uint8))).save(root / name, quality=92)
    (root / "val2014").mkdir()
    pope = []
    for i in range(2):  # POPE's own layout: JSON lines naming COCO val2014 images, yes/no labels
        name = f"COCO_val2014_{i:012d}.jpg"
        Image.fromarray(np.kron(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8),
                                np.ones((16, 16, 1), np.uint8))).save(root / "val2014" / name)
        for j, (thing, label) in enumerate((("dog", "yes"), ("car", "no"))):
            pope.append({"question_id": 2 * i + j + 1, "image": name, "text": f"Is there a {thing} in the image?",
                         "label": label})
    (root / "coco_pope_random.json").write_text("".join(json.dumps(r) + "\n" for r in pope))
    with av.open(str(root / "clip.mp4"), "w") as container:  # 40 frames: `--frames 32` takes 32 of them
        stream = container.add_stream("mpeg4", rate=8)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        for i in range(40):
            frame = np.kron(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))
            frame = np.roll(frame, i, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _expected_exit(comment: str) -> int:
    m = re.search(r"exit (\d+)", comment)
    return int(m.group(1)) if m else 0


def _serve(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """`tokedge serve ...` as a process: ready, one chat request answered, SIGTERM -> (exit code, stderr)."""
    import base64

    import openai

    proc = subprocess.Popen([sys.executable, "-m", "tokedge.cli", *args], env={**os.environ, **env}, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while not any("ready on http://" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        port = args[args.index("--port") + 1] if "--port" in args else "8000"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=env.get("TOKEDGE_API_KEY", "none"),
                               max_retries=0, timeout=120)
        photo = "data:image/jpeg;base64," + base64.b64encode(Path("photo.jpg").read_bytes()).decode()
        reply = client.chat.completions.create(model=Path(args[1]).name, max_tokens=4, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": photo}},
                                         {"type": "text", "text": "What is shown in this image?"}]}])
        assert reply.usage.completion_tokens >= 1
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=90)
        reader.join(timeout=10)
    return code, "".join(lines)


@pytest.mark.slow
def test_readme_command_blocks_run_verbatim(tmp_path, monkeypatch, capsys):
    pytest.importorskip("av")
    monkeypatch.chdir(tmp_path)
    _make_inputs(tmp_path)
    ran, skipped, timings = [], [], []
    for block in sh_blocks():
        if any(QUANT_BLOCK in line for line in block):
            continue
        for line in block:
            command, _, comment = line.partition(" #")
            reason = next((why for key, why in NOT_HERE.items() if key in line), None)
            if reason is not None:
                skipped.append((command, reason))
                continue
            words = shlex.split(command)
            env = {}
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                key, _, value = words.pop(0).partition("=")
                env[key] = value
            assert words[0] == "tokedge", f"README line neither runs here nor is listed in NOT_HERE: {line}"
            capsys.readouterr()
            started = time.perf_counter()
            if words[1] == "serve":
                code, err = _serve(words[1:], env)
            else:
                assert not env, line
                code = main(words[1:])
                err = capsys.readouterr().err
            assert code == _expected_exit(comment), (line, err[-2000:])
            shows_preset_output = words[1] in ("export", "run", "verify", "profile", "serve", "eval") and "tiny" in command \
                or words[1] in ("run", "profile") and ("./ov-" in command or "./qwen-" in command)
            notices = " ".join(err.split()).count(NOTICE)
            assert notices == (1 if shows_preset_output else 0), (line, err[-2000:])
            ran.append(command)
            timings.append((time.perf_counter() - started, command))
    with capsys.disabled():  # where the time goes (shown with -s)
        for seconds, command in sorted(timings, reverse=True)[:8]:
            print(f"{seconds:6.1f} s  {command}")
    # what the README promises exists after its commands
    assert (tmp_path / "report" / "report.md").read_text().splitlines()[2].startswith("> **Random weights.**")
    assert (tmp_path / "report-video" / "latency.png").exists()
    results = {p.name for p in (tmp_path / "tokedge-eval").glob("*.json")}
    assert results == {"tiny-llava-random-64-pope-coco_pope_random.json", "tiny-llava-cls-attn-64-pope-coco_pope_random.json"}
    comparison = json.loads((tmp_path / "tokedge-eval" / "comparison" / "report.json").read_text())
    assert {r["method"] for r in comparison["rows"]} == {"random", "cls-attn"}
    assert len(ran) >= 20 and {c.split()[1] for c in ran} >= {"export", "run", "verify", "methods", "doctor", "serve",
                                                               "profile", "check", "build", "optimize", "eval"}
    assert all("tokedge" in c or "make" in c or "pip" in c for c, _ in skipped)
