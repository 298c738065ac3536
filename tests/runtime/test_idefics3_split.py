"""tokedge.runtime.idefics3 (torch-free SmolVLM splitting) against transformers' own
`SmolVLMImageProcessorPil` (its PIL backend: Lanczos resizes on uint8) and `get_image_prompt_string`:
pixel values bit-exact, the same tiles (rows, cols) and the same prompt text, for the 256M checkpoint's
sizes (longest edge 2048, tiles of 512) and tiny ones, several aspect ratios, splitting on and off."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tokedge.runtime import idefics3

SIZES = [(480, 640), (900, 300), (1000, 1000), (31, 47), (600, 2000), (17, 17)]  # (height, width)
CONFIGS = [(2048, 512, True), (96, 32, True), (64, 32, True), (32, 32, True), (128, 32, False)]


@pytest.mark.parametrize("longest,tile,split", CONFIGS)
def test_views_equal_transformers_pil_processor(longest, tile, split):
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    proc = SmolVLMImageProcessorPil(size={"longest_edge": longest}, max_image_size={"longest_edge": tile},
                                    do_image_splitting=split)
    rng = np.random.default_rng(longest + tile)
    for height, width in SIZES:
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        out = proc(images=[[image]], return_tensors="np", return_row_col_info=True)
        plan = idefics3.plan_split(height, width, longest, tile, split)
        views = [idefics3.normalise(v, 1 / 255, [0.5] * 3, [0.5] * 3)
                 for v in idefics3.split_views(image, plan, tile, Image.Resampling.LANCZOS)]
        assert (plan.rows, plan.cols) == (out["rows"][0][0], out["cols"][0][0]), (height, width)
        assert len(views) == plan.views == out["pixel_values"].shape[1]
        for ours, theirs in zip(views, out["pixel_values"][0]):
            np.testing.assert_array_equal(ours, theirs)


def test_prompt_text_equals_transformers():
    from transformers.models.smolvlm.processing_smolvlm import get_image_prompt_string

    for rows, cols in [(0, 0), (1, 1), (3, 4), (4, 2)]:
        assert idefics3.prompt_text(rows, cols, 5, "<image>") == get_image_prompt_string(
            rows, cols, 5, idefics3.FAKE_TOKEN, "<image>", idefics3.GLOBAL_TOKEN)
