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


@pytest.fixture(scope="module")
def next_loaded(tiny_llava_next_dir):
    from tokedge.export.families import load_checkpoint

    return load_checkpoint(str(tiny_llava_next_dir), tiny_llava_next_dir)


@pytest.fixture(scope="module")
def vision_session(next_loaded, tmp_path_factory):
    """The family's vision graph traced to ONNX and opened in ONNX Runtime."""
    import onnxruntime as ort

    from tokedge.export import onnx_export as ox
    from tokedge.reduce import get_method

    family = next_loaded.family
    modules = family.modules(next_loaded, get_method("none"), 0, {})
    model = ox.trace_to_ir(modules["vision"], family.vision_trace_spec(next_loaded))
    ox.finish(model)
    where = tmp_path_factory.mktemp("next-vision")
    file, _ = ox.save_graph(model, where, "vision", 1 << 40)
    return ort.InferenceSession(str(where / file), providers=["CPUExecutionProvider"])


def test_family_is_registered_and_describes_anyres(tiny_llava_next_dir, next_loaded):
    from tokedge.export.families import inspect_checkpoint
    from tokedge.export.presets import NEXT_PINPOINTS

    family, spec = inspect_checkpoint(str(tiny_llava_next_dir), tiny_llava_next_dir)
    assert family.name == "llava_next" and next_loaded.family is family
    assert spec.layout.kind == "anyres" and spec.layout.pinpoints == NEXT_PINPOINTS
    assert spec.layout.tile == 336 and spec.layout.patch_grid == 24 and spec.layout.image_newline
    assert spec.full_tokens == 576 + 48 * 49  # base + the 672x672 map (48 x 48) with a newline per row


def test_reduction_methods_are_refused_with_a_reason(next_loaded):
    from tokedge.errors import UsageError
    from tokedge.reduce import get_method

    with pytest.raises(UsageError, match=r"--method cls-attn .*LLaVA-NeXT.*use --method none"):
        next_loaded.family.modules(next_loaded, get_method("cls-attn"), 64, {})


@pytest.mark.parametrize("size", SIZES)
def test_vision_graph_matches_transformers_features(next_loaded, hf_next, vision_session, size):
    """ONNX Runtime on the runtime's own preprocessing and packing plan == transformers'
    processor + get_image_features (tower, projector, pack_image_features with image_newline)."""
    import torch

    from tokedge.runtime.layout import anyres_inputs

    model, processor = hf_next
    image = _image(*size)
    family = next_loaded.family
    inputs = anyres_inputs(image, family.layout(next_loaded).anyres(), family.preprocess(next_loaded))
    batch = processor.image_processor([image], return_tensors="np")
    np.testing.assert_allclose(inputs.pixel_values, batch["pixel_values"][0, : inputs.pixel_values.shape[0]],
                               atol=1e-6)
    (embeds,) = vision_session.run(None, {"pixel_values": inputs.pixel_values, "pack_index": inputs.pack_index,
                                          "pack_weight": inputs.pack_weight})
    with torch.no_grad():
        out = model.model.get_image_features(torch.from_numpy(batch["pixel_values"]),
                                             torch.from_numpy(batch["image_sizes"]),
                                             vision_feature_layer=-2, vision_feature_select_strategy="default")
    expected = out.pooler_output[0].numpy()
    assert embeds.shape == (1, *expected.shape)
    np.testing.assert_allclose(embeds[0], expected, atol=1e-4, rtol=1e-4)
