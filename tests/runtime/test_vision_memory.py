"""Issue 22 item 8: a dynamic-resolution image within --max-pixels whose dense vision attention
would exhaust memory is refused in one line before the vision graph runs (run, profile; serve takes
the same layout path), from the patch limit `memory.vision_patch_limit` derives for the budget."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image


@pytest.fixture()
def big_image(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(np.full((1764, 1764, 3), 90, np.uint8)).save(path)
    return path


def test_run_refuses_an_image_whose_attention_exceeds_the_budget(qwen2_5_vl_artifact, big_image, tmp_path,
                                                                monkeypatch, capsys):
    from tokedge.artifact import read_manifest
    from tokedge.cli import main
    from tokedge.memory import target_of, vision_patch_limit, vision_working_set

    manifest = read_manifest(qwen2_5_vl_artifact)
    budget = 0.2e9
    limit = vision_patch_limit(manifest, budget)
    assert limit is not None and 0 < limit < (1764 // 14) ** 2
    # the limit is the largest patch count whose working set fits (an independent evaluation of both sides)
    target = target_of(manifest)
    row = 3 * 2 * 14 * 14
    assert vision_working_set(target.architecture.vision, limit, 4.0, row) <= budget
    assert vision_working_set(target.architecture.vision, limit + 4, 4.0, row) > budget

    monkeypatch.setenv("TOKEDGE_VISION_MEMORY_GB", "0.2")
    capsys.readouterr()
    rc = main(["run", str(qwen2_5_vl_artifact), "--image", str(big_image), "--prompt", "hi", "--max-new-tokens", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"more than the {limit}" in err and "--max-pixels" in err and "TOKEDGE_VISION_MEMORY_GB" in err
    rc = main(["profile", str(qwen2_5_vl_artifact), "--image", str(big_image), "--runs", "1", "--warmup", "0",
               "--out", str(tmp_path / "prof")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "more than the" in err.splitlines()[-1], err

    small = tmp_path / "small.png"
    Image.fromarray(np.full((200, 300, 3), 90, np.uint8)).save(small)
    assert main(["run", str(qwen2_5_vl_artifact), "--image", str(small), "--prompt", "hi", "--max-new-tokens", "1"]) == 0


def test_a_bad_budget_is_a_one_line_error(qwen2_5_vl_artifact, big_image, monkeypatch, capsys):
    from tokedge.cli import main

    monkeypatch.setenv("TOKEDGE_VISION_MEMORY_GB", "-1")
    capsys.readouterr()
    assert main(["run", str(qwen2_5_vl_artifact), "--image", str(big_image), "--prompt", "hi"]) == 2
    assert "TOKEDGE_VISION_MEMORY_GB" in capsys.readouterr().err
