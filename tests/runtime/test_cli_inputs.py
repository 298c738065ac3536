"""Bad input to `tokedge run`, table-driven through the CLI: exit code, one line on stderr with no
traceback, and nothing created or changed outside (a canary file stays as it was)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokedge.artifact import FORMAT_VERSION, MANIFEST_NAME
from tokedge.cli import main


def _png(path: Path, h=64, w=64):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _missing(d):
    return d / "nope.png"


def _empty(d):
    (d / "empty.png").write_bytes(b"")
    return d / "empty.png"


def _corrupt(d):
    (d / "noise.jpg").write_bytes(np.random.default_rng(1).bytes(3000))
    return d / "noise.jpg"


def _spoofed(d):
    (d / "text.png").write_text("this is not a picture\n" * 20)
    return d / "text.png"


def _truncated(d):
    data = _png(d / "full.png", 200, 200).read_bytes()
    (d / "cut.png").write_bytes(data[: len(data) // 3])
    return d / "cut.png"


def _directory(d):
    (d / "folder.png").mkdir()
    return d / "folder.png"


def _extreme(d):
    return _png(d / "sliver.png", 1, 3000)


IMAGE_CASES = [
    ("missing", _missing, "does not exist"),
    ("empty", _empty, "not an image"),
    ("corrupt", _corrupt, "not an image"),
    ("spoofed", _spoofed, "not an image"),
    ("truncated", _truncated, "cannot be decoded"),
    ("directory", _directory, "is not a file"),
    ("extreme-aspect", _extreme, "too extreme"),
]


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "canary.txt").write_text("untouched")
    return tmp_path


def _run(args, capsys):
    rc = main(["run", *args])
    captured = capsys.readouterr()
    return rc, captured.err.strip(), captured.out


def _assert_clean(workdir, before, err):
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    assert sorted(p.name for p in workdir.iterdir()) == before
    assert (workdir / "canary.txt").read_text() == "untouched"


@pytest.mark.parametrize("case", IMAGE_CASES, ids=[c[0] for c in IMAGE_CASES])
def test_bad_images(case, artifacts, workdir, capsys):
    _, make, fragment = case
    image = make(workdir)
    before = sorted(p.name for p in workdir.iterdir())
    rc, err, out = _run([str(artifacts("cls-attn", 64)), "--image", str(image), "--prompt", "hi"], capsys)
    assert rc == 2 and fragment in err and out == ""
    _assert_clean(workdir, before, err)


def test_decompression_bomb(artifacts, workdir, capsys, monkeypatch):
    image = _png(workdir / "big.png", 300, 300)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # 90,000 px: over the limit, under twice it
    before = sorted(p.name for p in workdir.iterdir())
    rc, err, _ = _run([str(artifacts("cls-attn", 64)), "--image", str(image), "--prompt", "hi"], capsys)
    assert rc == 2 and "too large to decode safely" in err
    _assert_clean(workdir, before, err)


def _newer_format(art: Path):
    m = json.loads((art / MANIFEST_NAME).read_text())
    m["format_version"] = FORMAT_VERSION + 1
    (art / MANIFEST_NAME).write_text(json.dumps(m))


def _no_manifest(art: Path):
    (art / MANIFEST_NAME).unlink()


def _bad_json(art: Path):
    (art / MANIFEST_NAME).write_text("{ not json")


def _missing_graph(art: Path):
    (art / "decoder.onnx").unlink()


def _tokenizer_tampered(art: Path):
    (art / "tokenizer.json").write_text((art / "tokenizer.json").read_text().replace("ASSISTANT", "ASSISTENT"))


ARTIFACT_CASES = [
    ("newer-format", _newer_format, 1, "newer than this tokedge reads"),
    ("not-an-artifact", _no_manifest, 2, "not a tokedge artifact"),
    ("bad-manifest", _bad_json, 1, "not valid JSON"),
    ("missing-graph", _missing_graph, 1, "'decoder.onnx' is missing"),
    ("tampered-tokenizer", _tokenizer_tampered, 1, "tokenizer.json"),
]


@pytest.mark.parametrize("case", ARTIFACT_CASES, ids=[c[0] for c in ARTIFACT_CASES])
def test_bad_artifacts(case, artifacts, workdir, capsys):
    _, spoil, code, fragment = case
    art = workdir / "art"
    shutil.copytree(artifacts("cls-attn", 64), art)
    spoil(art)
    image = _png(workdir / "ok.png")
    before = sorted(p.name for p in workdir.iterdir())
    rc, err, _ = _run([str(art), "--image", str(image), "--prompt", "hi"], capsys)
    assert rc == code and fragment in err
    _assert_clean(workdir, before, err)


@pytest.mark.parametrize("args,fragment", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "   "], "prompt is empty"),
    (["--prompt", "word " * 1200], "limit of 2048"),
    (["--prompt", "hi", "--budget", "0"], "fixed budget"),
    (["--prompt", "hi", "--prompt", "two"], "1 --image for 2 --prompt"),
])
def test_bad_prompts_and_options(args, fragment, artifacts, workdir, capsys):
    image = _png(workdir / "ok.png")
    before = sorted(p.name for p in workdir.iterdir())
    rc, err, _ = _run([str(artifacts("cls-attn", 64)), "--image", str(image), *args], capsys)
    assert rc == 2 and fragment in err
    _assert_clean(workdir, before, err)


def test_artifact_path_is_a_file(workdir, capsys):
    image = _png(workdir / "ok.png")
    rc, err, _ = _run([str(image), "--image", str(image), "--prompt", "hi"], capsys)
    assert rc == 2 and "is a file, not an artifact directory" in err
