"""Issue-7 guarantees: locks that a dead holder does not wedge, a killed export leaves nothing at
the target, external data confined to the artifact, pickle weights only on request."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tokedge.artifact import MANIFEST_NAME, sha256_file
from tokedge.cli import main
from tokedge.errors import IntegrityError
from tokedge.locking import LockTimeout, exclusive
from tokedge.runtime.pipeline import Pipeline
from tokedge.verify import verify

HOLD = "import sys, time; from pathlib import Path; from tokedge.locking import exclusive\n" \
       "with exclusive(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(120)\n"


def test_lock_serialises_and_dead_holder_does_not_wedge(tmp_path):
    lock = tmp_path / ".x.lock"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LockTimeout, match="another tokedge process"):
            with exclusive(lock, timeout=0.3):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        start = time.monotonic()
        with exclusive(lock, timeout=5):
            assert time.monotonic() - start < 2
        assert not lock.exists()
    finally:
        holder.kill()


def test_sigkill_mid_export_leaves_no_artifact(tiny_llava_dir, tmp_path):
    out = tmp_path / "art"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tokedge", "export", str(tiny_llava_dir), "--out", str(out),
                             "--method", "cls-attn"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".art.partial-*/vision.onnx")):  # mid-way: a graph written, not renamed
            assert proc.poll() is None and time.monotonic() < deadline, "export ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    assert not out.exists()
    assert main(["export", str(tiny_llava_dir), "--out", str(out), "--method", "cls-attn"]) == 0
    assert (out / MANIFEST_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]  # stale staging and lock cleaned up


@pytest.fixture
def external_copy(artifacts, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(artifacts("none", 576, external_data_threshold=0), art)
    return art


def _rehash(art: Path, rel: str) -> None:
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    manifest["files"][rel] = sha256_file(art / rel)
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))


def _point_external_data(art: Path, location: str) -> None:
    """Rewrite every external-data location of decoder.onnx and update its manifest hash."""
    import onnx

    model = onnx.load(art / "decoder.onnx", load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    (art / "decoder.onnx").write_bytes(model.SerializeToString())
    _rehash(art, "decoder.onnx")


def test_external_data_location_outside_refused_even_with_rehash(external_copy, tmp_path):
    art = external_copy
    shutil.copy(art / "decoder.onnx.data", tmp_path / "outside.data")
    _point_external_data(art, "../outside.data")
    with pytest.raises(IntegrityError, match=r"\.\."):
        Pipeline.load(art)
    with pytest.raises(IntegrityError):
        verify(art)


def test_external_data_pointing_at_unlisted_file_refused(external_copy):
    art = external_copy
    shutil.copy(art / "decoder.onnx.data", art / "other.data")
    _point_external_data(art, "other.data")
    with pytest.raises(IntegrityError, match="not its manifest-listed"):
        Pipeline.load(art)


def test_external_data_symlink_out_refused(external_copy, tmp_path):
    art = external_copy
    outside = tmp_path / "elsewhere.data"
    shutil.move(art / "decoder.onnx.data", outside)
    (art / "decoder.onnx.data").symlink_to(outside)  # same bytes, same hash: only the location is wrong
    with pytest.raises(IntegrityError, match="outside the artifact"):
        Pipeline.load(art)


def test_hard_link_refused(external_copy, tmp_path):
    art = external_copy
    os.link(art / "embed.onnx.data", tmp_path / "linked.data")
    with pytest.raises(IntegrityError, match="hard link"):
        Pipeline.load(art)


def test_flipped_weight_byte_refused_by_run(external_copy, tmp_path, test_images, capsys):
    art = external_copy
    data = bytearray((art / "vision.onnx.data").read_bytes())
    data[100] ^= 0x10
    (art / "vision.onnx.data").write_bytes(bytes(data))
    image = tmp_path / "i.png"
    test_images[0].save(image)
    assert main(["run", str(art), "--image", str(image), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err.strip()
    assert "vision.onnx.data" in err and "sha256" in err and len(err.splitlines()) == 1


def test_pickle_weights_only_on_request(tiny_llava_dir, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llava_dir, ckpt)
    torch.save(load_file(ckpt / "model.safetensors"), ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()
    assert main(["export", str(ckpt), "--out", str(tmp_path / "a")]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--out", str(tmp_path / "a"), "--allow-pickle"]) == 0
    assert verify(tmp_path / "a").ok


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_pickle_is_not_executed(tiny_llava_dir, tmp_path, capsys, monkeypatch):
    import pickle

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llava_dir, ckpt)
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(pickle.dumps({"x": _Payload()}))
    monkeypatch.chdir(tmp_path)
    rc = main(["export", str(ckpt), "--out", str(tmp_path / "a"), "--allow-pickle"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "cannot load the checkpoint" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "a").exists()
