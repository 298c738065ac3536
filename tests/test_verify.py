"""`tokedge verify --checkpoint` recomputes the reference from the checkpoint: it passes for fresh
exports of every method, and fails (printing the parity line once) against other weights."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tokedge.cli import main
from tokedge.reduce import METHODS


@pytest.mark.slow
# every image method (video-only temporal methods refuse LLaVA-1.5 exports; their artifacts are OneVision's)
@pytest.mark.parametrize("method", [name for name, m in METHODS.items() if not m.reduces_over_time])
def test_verify_against_checkpoint_passes_for_every_method(method, artifacts, tiny_llava_dir, capsys):
    art = artifacts(method, None)
    assert main(["verify", str(art), "--checkpoint", str(tiny_llava_dir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    # the recomputed reference is the checkpoint's own: logits agree far inside the tolerance
    assert max(max(c["max_abs_prefill_logits"], c["max_abs_step_logits"]) for c in report["cases"]) < 1e-3


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    from tokedge.export.presets import TinyLlavaConfig, build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("ckpt") / "tiny-llava-seed1", replace(TinyLlavaConfig(), seed=1))


@pytest.mark.parametrize("method", ["cls-attn", "fastv", "dart"])
def test_verify_against_other_weights_fails_once(method, artifacts, other_weights, capsys):
    art = artifacts(method, None)
    assert main(["verify", str(art), "--checkpoint", str(other_weights)]) == 1
    captured = capsys.readouterr()
    assert "graphs disagree with a fresh reference" in captured.err
    assert (captured.out + captured.err).count("tolerance") == 1  # the parity line is printed once
