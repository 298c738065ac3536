"""`layout_bounds`: the partitions and visual tokens any image can give under a tiled layout, from
the layout alone, against transformers' own counting (the processors' `_get_number_of_features`
and `image_size_to_num_patches`) swept over image sizes."""

from __future__ import annotations

import functools
import itertools
from types import SimpleNamespace

import pytest

from tokedge.runtime.layout import TYPICAL_IMAGE, AnyresLayout, layout_bounds

SIDES = list(range(16, 2400, 41))  # heights and widths swept: thin, square, wide, small and large


def _sizes():
    return itertools.product(SIDES, SIDES)


@pytest.fixture(scope="module")
def next_processor(tiny_llava_next_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_llava_next_dir)


def test_llava_next_bounds_are_transformers_extremes(next_processor):
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    proc = next_processor
    pins = tuple(tuple(p) for p in proc.image_processor.image_grid_pinpoints)
    layout = AnyresLayout(tile=336, patch_grid=24, pinpoints=pins)
    drop_cls = 1 if proc.vision_feature_select_strategy == "default" else 0

    def count(h, w):
        return proc._get_number_of_features(h, w, 336, 336) - drop_cls

    counts = [count(h, w) for h, w in _sizes()]
    parts = [image_size_to_num_patches((h, w), [list(p) for p in pins], 336) for h, w in _sizes()]
    bounds = layout_bounds(layout)
    assert bounds.tokens[2] == max(counts) == 2928  # reached: an image of the 672x672 pinpoint's shape
    assert bounds.tokens[0] <= min(counts)
    assert (bounds.partitions[0], bounds.partitions[2]) == (min(parts), max(parts)) == (3, 5)
    typical_parts = image_size_to_num_patches(TYPICAL_IMAGE, [list(p) for p in pins], 336)
    assert bounds.tokens[1] == count(*TYPICAL_IMAGE) and bounds.partitions[1] == typical_parts


def test_onevision_bound_covers_every_image_and_is_tight():
    """OneVision's `anyres_max_9` interpolation makes the largest count depend on the unpadded
    shape; the bound must hold for every image and stay close to what images reach."""
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    pins = [[a * 384, b * 384] for a in range(1, 7) for b in range(1, 7)]  # the processor's default 36
    fake = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=pins), num_image_tokens=729,
                           vision_aspect_ratio="anyres_max_9")
    fake._get_unpadded_features = functools.partial(LlavaOnevisionProcessor._get_unpadded_features, fake)
    count = functools.partial(LlavaOnevisionProcessor._get_number_of_features, fake)
    counts = [count(h, w, 384, 384) for h, w in _sizes()]
    layout = AnyresLayout(tile=384, patch_grid=27, pinpoints=tuple(map(tuple, pins)), max_tiles=9)
    bounds = layout_bounds(layout)
    assert max(counts) <= bounds.tokens[2] <= 1.02 * max(counts)
    assert bounds.tokens[0] <= min(counts) and bounds.tokens[1] == count(*TYPICAL_IMAGE, 384, 384)
    parts = [image_size_to_num_patches((h, w), pins, 384) for h, w in _sizes()]
    assert bounds.partitions[2] == max(parts) == 37 and bounds.partitions[0] == min(parts) == 2
    square = layout_bounds(AnyresLayout(tile=384, patch_grid=27, pinpoints=layout.pinpoints, max_tiles=9,
                                        multi_image_square=True))
    assert square.partitions[0] == 1  # images of multi-image prompts: one untiled view
