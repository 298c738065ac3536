"""Commands that write a new artifact from an old one (quantize, optimize) copy the verified bytes
they read, never the source's paths again; verify checks the tokenizer from its verified bytes
(issue 22, item 3; docs/safety.md, "concurrent local writer")."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

import tokedge.artifact
from tokedge.artifact import MANIFEST_NAME, sha256_file
from tokedge.cli import main

# (command, extra flags, the files it copies unchanged and that the attack targets)
COMMANDS = {
    "quantize": (["--scheme", "int8", "--group-size", "32", "--no-validate"], "embed.onnx"),
    "optimize": (["--passes", "fold"], "reference.npz"),
}


@pytest.fixture(scope="module")
def base_art(artifacts):
    return artifacts("none", 576)


@pytest.fixture
def art(base_art, tmp_path):
    out = tmp_path / "art"
    shutil.copytree(base_art, out)
    return out


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _foreign_tokenizer() -> str:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    return Tokenizer(WordLevel({"<unk>": 0, "hello": 1}, unk_token="<unk>")).to_str()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_source_changed_after_verification_never_reaches_the_output(command, art, tmp_path, monkeypatch, capsys):
    """Right after the source passes its checks, its tokenizer becomes a symlink to a foreign file
    and one of its graphs or its reference is swapped: the output holds the verified bytes."""
    flags, target = COMMANDS[command]
    outside = tmp_path / "outside-tokenizer.json"
    outside.write_text(_foreign_tokenizer())
    good = {rel: (art / rel).read_bytes() for rel in ("tokenizer.json", target)}
    real = tokedge.artifact.verify_files

    def verify_then_tamper(*args, **kwargs):
        blobs = real(*args, **kwargs)
        (art / "tokenizer.json").unlink()
        (art / "tokenizer.json").symlink_to(outside)
        evil = tmp_path / "evil"
        evil.write_bytes(good[target][:-16] + b"\0" * 16)
        os.replace(evil, art / target)
        return blobs

    monkeypatch.setattr(tokedge.artifact, "verify_files", verify_then_tamper)
    out = tmp_path / "out"
    rc = main([command, str(art), "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert rc == 0, err
    for rel, data in good.items():
        assert not (out / rel).is_symlink()
        assert (out / rel).read_bytes() == data, f"{rel}: bytes that were never verified reached the output"
    monkeypatch.undo()
    assert main(["verify", str(out)]) == 0


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_concurrent_writer_never_reaches_the_output(command, art, tmp_path, capsys):
    """A local writer swaps a file of the source every 2 ms while the command runs: each run either
    refuses ('does not match its sha256') or writes the original bytes."""
    flags, target = COMMANDS[command]
    good = (art / target).read_bytes()
    evil = good[:-16] + b"\1" * 16
    stop = threading.Event()

    def swapper() -> None:
        i = 0
        while not stop.is_set():
            staging = tmp_path / f"swap{i % 2}"
            staging.write_bytes(good if i % 2 else evil)
            os.replace(staging, art / target)
            i += 1
            time.sleep(0.002)

    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    outcomes = {"original": 0, "refused": 0}
    try:
        for run in range(3):
            out = tmp_path / f"out{run}"
            rc = main([command, str(art), "--out", str(out), *flags])
            err = capsys.readouterr().err
            if rc == 0:
                assert (out / target).read_bytes() == good, "a swapped file reached the output"
                data = json.loads((out / MANIFEST_NAME).read_text())
                assert data["files"][target] == sha256_file(out / target)
                outcomes["original"] += 1
            else:
                assert rc == 1 and "sha256" in _one_line(err), err
                outcomes["refused"] += 1
    finally:
        stop.set()
        thread.join()
    assert sum(outcomes.values()) == 3


def test_verify_checks_the_tokenizer(art, capsys):
    """A foreign tokenizer.json whose hash was recomputed is refused, not "hashes ok"."""
    (art / "tokenizer.json").write_text(_foreign_tokenizer())
    data = json.loads((art / MANIFEST_NAME).read_text())
    data["files"]["tokenizer.json"] = sha256_file(art / "tokenizer.json")
    (art / MANIFEST_NAME).write_text(json.dumps(data))
    rc = main(["verify", str(art)])
    captured = capsys.readouterr()
    assert rc == 1 and "tokenizer" in _one_line(captured.err)
    assert "hashes ok" not in captured.out + captured.err


def test_verify_passes_a_good_artifact(base_art, capsys):
    assert main(["verify", str(base_art)]) == 0
    assert "hashes ok" in "".join(capsys.readouterr())


def test_quantize_embeddings_keeps_onnxruntime_lines_off_stderr(base_art, tmp_path):
    """Issue 22 item 22: onnxruntime's quantizer logs "The IR version of the input model is 8 ..."
    for the embedding table; stderr stays tokedge's own (shown with --debug)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TOKEDGE_DEBUG"}
    args = [sys.executable, "-m", "tokedge", "quantize", str(base_art), "--quantize-embeddings", "--group-size", "32",
            "--no-validate"]
    proc = subprocess.run([*args, "--out", str(tmp_path / "q")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "onnxruntime" not in proc.stderr and "WARNING" not in proc.stderr, proc.stderr
    debug = subprocess.run([*args, "--out", str(tmp_path / "qd"), "--debug"], capture_output=True, text=True,
                           timeout=300, env=env)
    assert debug.returncode == 0 and "onnxruntime.quantization" in debug.stderr


def test_build_gives_tensorrt_the_verified_bytes(art, tmp_path, monkeypatch, capsys):
    """`tokedge build` (issue 22 item 3, "any other such command"): the graphs TensorRT parses and
    the manifest hash engines.json records are the verified ones, even when the source changes
    right after its check. TensorRT itself is replaced by a recorder here."""
    import hashlib

    import tokedge.build.trt as trt

    good = (art / "decoder.onnx").read_bytes()
    manifest_sha = hashlib.sha256((art / MANIFEST_NAME).read_bytes()).hexdigest()
    real = tokedge.artifact.verify_files
    seen: dict[str, bytes] = {}

    def verify_then_tamper(*args, **kwargs):
        blobs = real(*args, **kwargs)
        evil = tmp_path / "evil"
        evil.write_bytes(good[:-16] + b"\0" * 16)
        os.replace(evil, art / "decoder.onnx")
        data = json.loads((art / MANIFEST_NAME).read_text())
        data["files"]["decoder.onnx"] = sha256_file(art / "decoder.onnx")
        (art / MANIFEST_NAME).write_text(json.dumps(data))
        return blobs

    def record(plan, source, out, timing_cache):
        metas = []
        for engine in plan.engines:
            seen[engine.graph] = (Path(source) / engine.onnx).read_bytes()
            (out / engine.plan).write_bytes(b"plan")
            metas.append({"graph": engine.graph, "plan_sha256": "0" * 64})
        return metas

    monkeypatch.setattr(tokedge.artifact, "verify_files", verify_then_tamper)
    monkeypatch.setattr(trt, "build_all", record)
    engines = tmp_path / "engines"
    rc = main(["build", str(art), "--profile", "jetson-orin-nano-8gb", "--out", str(engines)])
    assert rc == 0, capsys.readouterr().err
    assert seen["decoder"] == good, "TensorRT was given bytes that were never verified"
    assert json.loads((engines / "engines.json").read_text())["artifact_manifest_sha256"] == manifest_sha
    assert not list(tmp_path.glob(".engines.source-*"))
