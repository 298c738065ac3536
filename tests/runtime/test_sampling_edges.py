"""`tokedge run` at the edges of the sampling and image-format inputs (issue 22, items 15 and 18):
a denormal temperature samples the greedy token (it once overflowed to NaN probabilities and
picked token 0), and only common image formats reach Pillow (EPS would start Ghostscript)."""

from __future__ import annotations

import json

import numpy as np

from tokedge.cli import main
from tokedge.runtime.generate import SamplingConfig, sample_next


def test_tiny_temperature_picks_the_argmax():
    logits = np.array([[0.5, 3.0, 2.999, -1.0], [7.0, -2.0, 6.5, 0.0]], dtype=np.float32)
    for t in (1e-320, 5e-324, 1e-300, 1e-30):
        for kw in ({}, {"top_p": 0.5}, {"top_k": 2}):
            picked = sample_next(logits, SamplingConfig(temperature=t, **kw), np.random.default_rng(0))
            assert picked.tolist() == [1, 0]


def test_run_with_a_denormal_temperature_equals_greedy(artifacts, tmp_path, test_images, capsys):
    art = artifacts("cls-attn", 64)
    image = tmp_path / "a.png"
    test_images[0].save(image)
    args = ["run", str(art), "--image", str(image), "--prompt", "What is shown?", "--max-new-tokens", "8", "--json"]
    assert main(args) == 0
    greedy = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main([*args, "--temperature", "1e-320", "--seed", "3"]) == 0
    tiny = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert tiny["token_ids"] == greedy["token_ids"] and 0 not in tiny["token_ids"][:1]


def test_run_refuses_an_eps_image_before_pillow_opens_it(artifacts, tmp_path, capsys):
    eps = tmp_path / "x.eps"
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n")
    rc = main(["run", str(artifacts("cls-attn", 64)), "--image", str(eps), "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "accepted format (PNG, JPEG, WEBP, GIF, BMP, TIFF)" in err and "\n" not in err
