"""Bad input that used to end as "internal error" (issue 22, item 16; the video cases are in
tests/runtime/test_video_bounds.py): one line and the documented exit code."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from tokedge.artifact import MANIFEST_NAME
from tokedge.cli import main


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert "internal error" not in lines[0], lines[0]
    return lines[0]


def test_checkpoint_config_nested_100000_deep(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"a":' * 100_000 + "1" + "}" * 100_000)
    rc = main(["export", str(ckpt), "--out", str(tmp_path / "art")])
    assert rc == 2 and "config.json" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "art").exists()


@pytest.fixture(scope="module")
def base_art(artifacts):
    return artifacts("none", 576)


def test_quantize_of_an_initializer_whose_dims_lie(base_art, tmp_path, capsys):
    import onnx

    art = tmp_path / "art"
    shutil.copytree(base_art, art)
    model = onnx.load(str(art / "decoder.onnx"))
    weight = next(t for t in model.graph.initializer if len(t.dims) == 2)
    weight.dims[1] *= 2  # the data stays as it was
    onnx.save(model, str(art / "decoder.onnx"))
    data = json.loads((art / MANIFEST_NAME).read_text())
    data["files"]["decoder.onnx"] = hashlib.sha256((art / "decoder.onnx").read_bytes()).hexdigest()
    (art / MANIFEST_NAME).write_text(json.dumps(data))
    for scheme in ("int4", "int8"):
        rc = main(["quantize", str(art), "--out", str(tmp_path / scheme), "--scheme", scheme, "--group-size", "32",
                   "--no-validate"])
        line = _one_line(capsys.readouterr().err)
        assert rc == 1 and "declares dims" in line and weight.name in line
        assert not (tmp_path / scheme).exists()
