"""The numpy anyres layout against transformers' own LLaVA-NeXT / LLaVA-OneVision image processors
(PIL backend), processors' placeholder counts, and models' `pack_image_features`."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tokedge.runtime.layout import AnyresLayout, pack_features, pack_plan, partitions, plan_image

NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
SIZES = [(240, 320), (400, 300), (336, 336), (100, 1000), (1000, 90), (500, 501), (768, 1024), (1600, 1200),
         (3000, 2000), (50, 60), (300, 500), (900, 400), (1, 1), (480, 640)]
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _next_layout():
    return AnyresLayout(tile=336, patch_grid=24, pinpoints=NEXT_PINPOINTS)


def _ov_layout():
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    pins = tuple(tuple(p) for p in LlavaOnevisionImageProcessorPil.image_grid_pinpoints)
    return AnyresLayout(tile=384, patch_grid=27, pinpoints=pins, max_tiles=9, multi_image_square=True,
                        pad_fill=(127, 127, 127))


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed + h * 7 + w)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


def _normalise(img: Image.Image, mean, std) -> np.ndarray:
    chw = np.moveaxis(np.asarray(img), -1, 0).astype(np.float64) / 255.0
    chw = chw.astype(np.float32)
    return (chw - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]


@pytest.mark.parametrize("h,w", SIZES[:10])
def test_next_pixel_values_and_token_count(h, w):
    from transformers import AutoTokenizer  # noqa: F401 - transformers present
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    proc = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                      image_grid_pinpoints=[list(p) for p in NEXT_PINPOINTS], image_mean=CLIP_MEAN,
                                      image_std=CLIP_STD, resample=3)
    image = _image(h, w)
    expected = proc(images=[image], return_tensors="np")["pixel_values"][0]
    layout = _next_layout()
    plan = plan_image(layout, h, w)
    ours = np.stack([_normalise(p, CLIP_MEAN, CLIP_STD) for p in partitions(image, layout, plan, 3)])
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)

    counter = LlavaNextProcessor.__new__(LlavaNextProcessor)
    counter.patch_size, counter.vision_feature_select_strategy = 14, "default"
    counter.num_additional_image_tokens, counter.image_processor = 1, proc
    assert plan.tokens(layout) == counter._get_number_of_features(h, w, 336, 336) - 1  # "default" drops CLS


@pytest.mark.parametrize("h,w", SIZES)
def test_onevision_token_count_and_pixels(h, w):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

    proc = LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    counter = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    counter.image_processor, counter.num_image_tokens = proc, 729
    counter.vision_aspect_ratio, counter.vision_feature_select_strategy = "anyres_max_9", "full"
    layout = _ov_layout()
    plan = plan_image(layout, h, w)
    assert plan.tokens(layout) == counter._get_number_of_features(h, w, 384, 384)
    if h * w <= 1000 * 1000:  # pixels for the smaller sizes (the big ones only add tiles)
        image = _image(h, w, seed=1)
        expected = proc(images=[image], return_tensors="np")["pixel_values"][0]
        ours = np.stack([_normalise(p, (0.5,) * 3, (0.5,) * 3) for p in partitions(image, layout, plan, 3)])
        np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)


def test_onevision_multi_image_square():
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    proc = LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    images = [_image(300, 500, 3), _image(640, 200, 4)]
    expected = proc(images=[images], return_tensors="np")["pixel_values"]
    layout = _ov_layout()
    for i, image in enumerate(images):
        plan = plan_image(layout, image.height, image.width, tiled=False)
        assert plan.partitions == 1 and plan.tokens(layout) == 730
        ours = _normalise(partitions(image, layout, plan, 3)[0], (0.5,) * 3, (0.5,) * 3)
        np.testing.assert_allclose(ours, expected[i][0], atol=1e-6, rtol=0)


def _tiny_model(family: str):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        SiglipVisionConfig,
    )

    text = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1)
    if family == "next":
        vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=8, intermediate_size=16,
                                  num_hidden_layers=1, num_attention_heads=2)
        cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=3,
                              image_grid_pinpoints=[list(p) for p in NEXT_PINPOINTS])
        return LlavaNextForConditionalGeneration(cfg).eval()
    vision = SiglipVisionConfig(image_size=384, patch_size=14, hidden_size=8, intermediate_size=16,
                                num_hidden_layers=1, num_attention_heads=2)
    cfg = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_id=3, video_token_id=4)
    return LlavaOnevisionForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("family", ["next", "onevision"])
def test_pack_plan_matches_pack_image_features(family):
    model = _tiny_model(family)
    layout = _next_layout() if family == "next" else _ov_layout()
    rng = np.random.default_rng(5)
    newline = rng.standard_normal(16).astype(np.float32)
    for h, w in SIZES:
        plan = plan_image(layout, h, w)
        feats = rng.standard_normal((plan.partitions, layout.tokens_per_tile, 16)).astype(np.float32)
        with torch.no_grad():
            kwargs = {"vision_feature_select_strategy": "default"} if family == "next" else {}
            packed, lens = model.model.pack_image_features([torch.from_numpy(feats)], torch.tensor([[h, w]]),
                                                           image_newline=torch.from_numpy(newline), **kwargs)
        expected = packed[0].numpy()
        index, weight = pack_plan(layout, plan)
        ours = pack_features(feats, newline, index, weight)
        assert ours.shape == expected.shape == (plan.tokens(layout), 16), (h, w)
        np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0, err_msg=f"{h}x{w}")
        if plan.packed == plan.unpadded:  # pure gathers: exact
            np.testing.assert_array_equal(ours, expected)
