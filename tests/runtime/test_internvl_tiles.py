"""tokedge.runtime.internvl (torch-free InternVL tiling) against transformers' own
`GotOcr2ImageProcessorPil` with `crop_to_patches` (as `InternVLProcessor` calls it) and
`InternVLProcessor.replace_image_token`: pixel values bit-exact, the same view count, for InternVL3's
sizes (448-px tiles, 1..12 tiles) and tiny ones, many aspect ratios (ties included)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tokedge.runtime import internvl

SIZES = [(480, 640), (900, 300), (1000, 1000), (31, 47), (600, 2000), (17, 17), (448, 896), (64, 32), (100, 300)]
CONFIGS = [(448, 1, 12), (32, 1, 6), (32, 2, 4), (16, 1, 1)]  # tile, min, max
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.mark.parametrize("tile,low,high", CONFIGS)
def test_views_equal_transformers_pil_processor(tile, low, high):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    proc = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, min_patches=low, max_patches=high,
                                    image_mean=MEAN, image_std=STD)
    rng = np.random.default_rng(tile + high)
    for height, width in SIZES:
        image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
        out = proc(images=[image], crop_to_patches=True, return_tensors="np")
        plan = internvl.plan_tiles(height, width, tile, low, high)
        views = [internvl.normalise(v, 1 / 255, MEAN, STD)
                 for v in internvl.tile_views(image, plan, tile, Image.Resampling.BICUBIC)]
        assert plan.views == len(views) == int(out["num_patches"][0]) == out["pixel_values"].shape[0], (height, width)
        for ours, theirs in zip(views, out["pixel_values"]):
            np.testing.assert_array_equal(ours, theirs)


def test_grid_ties_follow_the_area_rule():
    """A 2:1 image ties (2, 1) with (4, 2): the larger grid wins only when the image covers more than
    half of its canvas, as transformers' get_optimal_tiled_canvas."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    for height, width in [(100, 200), (448, 896), (1000, 2000), (3000, 6000)]:
        ours = internvl.best_grid(height, width, 448, 1, 12)
        assert ours == get_optimal_tiled_canvas((height, width), (448, 448), 1, 12)
    assert internvl.best_grid(100, 200, 448, 1, 12) == (2, 1)
    assert internvl.best_grid(3000, 6000, 448, 1, 12) == (4, 2)
