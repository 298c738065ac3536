"""LLaVA-NeXT (anyres): the tiny preset checkpoint and the family's vision graph, against
transformers' own processor and model (the independent reference)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

SIZES = [(480, 640), (900, 300), (1000, 1000)]  # (height, width): 640x480, 300x900, 1000x1000


def _image(height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(height * 7 + width)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def hf_next(tiny_llava_next_dir):
    import torch
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_llava_next_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_llava_next_dir)


def test_preset_is_a_llava_next_checkpoint(tiny_llava_next_dir, hf_next):
    from tokedge.export.presets import NEXT_PINPOINTS

    model, processor = hf_next
    assert type(processor).__name__ == "LlavaNextProcessor"
    assert [tuple(p) for p in processor.image_processor.image_grid_pinpoints] == list(NEXT_PINPOINTS)
    assert model.config.text_config.max_position_embeddings >= 4096
    assert model.config.vision_config.image_size == 336 and model.config.vision_config.patch_size == 14
    assert (tiny_llava_next_dir / "tokenizer.json").is_file()
    assert float(model.model.image_newline.detach().abs().sum()) > 0  # initialised, not left empty


@pytest.mark.parametrize("size", SIZES)
def test_layout_counts_match_the_processor(hf_next, size):
    """runtime/layout.py's plan for the preset's layout gives the processor's placeholder count and
    its partition count."""
    from tokedge.runtime.layout import AnyresLayout, plan_image

    model, processor = hf_next
    layout = AnyresLayout(tile=336, patch_grid=24,
                          pinpoints=tuple(tuple(p) for p in model.config.image_grid_pinpoints))
    batch = processor(images=[_image(*size)], text=["<image>"], return_tensors="np")
    expected = int((batch["input_ids"][0] == model.config.image_token_id).sum())
    plan = plan_image(layout, *size)
    assert plan.tokens(layout) == expected
    assert plan.partitions == batch["pixel_values"].shape[1]
