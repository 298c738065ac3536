"""`tokedge verify --checkpoint` recomputes the reference from the checkpoint: it passes for fresh
exports of every method, and fails (printing the parity line once) against other weights."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tokedge.cli import main

# `verify --checkpoint` passing for every method: the family x method matrix runs it on every tiny-llava
# pair (tests/matrix/matrix_support.py, "checkpoint"), on the artifact it exports anyway


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
