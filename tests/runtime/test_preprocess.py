"""Torch-free preprocessing against transformers' image processor, across Pillow modes, sizes,
aspect ratios and EXIF orientation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tokedge.artifact import load_artifact
from tokedge.runtime.preprocess import load_image, preprocess


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _modes():
    base = Image.fromarray(_rgb(250, 310))
    rgba = np.dstack([_rgb(250, 310), np.random.default_rng(1).integers(0, 256, (250, 310), dtype=np.uint8)])
    p_trans = base.convert("P")
    p_trans.info["transparency"] = 0
    return {
        "RGB": base,
        "L": base.convert("L"),
        "LA": Image.fromarray(rgba, "RGBA").convert("LA"),
        "RGBA": Image.fromarray(rgba, "RGBA"),
        "P": base.convert("P"),
        "P-transparency": p_trans,
        "CMYK": base.convert("CMYK"),
        "1": base.convert("1"),
    }


@pytest.fixture(scope="module")
def pre(artifacts):
    return load_artifact(artifacts("none", 576)).preprocess


@pytest.mark.parametrize("mode", list(_modes()))
def test_modes_match_transformers(mode, pre, hf_tiny):
    _, processor = hf_tiny
    image = _modes()[mode]
    expected = processor.image_processor(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(preprocess(image, pre), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("hw", [(1, 1), (13, 7), (336, 336), (337, 335), (100, 900), (900, 100), (1024, 768)])
def test_sizes_match_transformers(hw, pre, hf_tiny):
    _, processor = hf_tiny
    image = Image.fromarray(_rgb(*hw, seed=hw[0]))
    expected = processor.image_processor(image, return_tensors="np")["pixel_values"][0]
    got = preprocess(image, pre)
    assert got.shape == (3, 336, 336)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_sixteen_bit_scaled_not_clipped(pre, hf_tiny):
    _, processor = hf_tiny
    arr16 = (np.random.default_rng(3).integers(0, 65536, size=(200, 260))).astype(np.uint16)
    image16 = Image.fromarray(arr16)
    assert image16.mode == "I;16"
    as8 = Image.fromarray((arr16 >> 8).astype(np.uint8), "L")
    expected = processor.image_processor(as8, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(preprocess(image16, pre), expected, atol=1e-5, rtol=0)


def test_exif_orientation_applied(tmp_path, pre, hf_tiny):
    from transformers.image_utils import load_image as hf_load_image

    _, processor = hf_tiny
    image = Image.fromarray(_rgb(120, 200, seed=5))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    ours = load_image(path)
    assert ours.size == (120, 200)
    expected = processor.image_processor(hf_load_image(str(path)), return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(preprocess(ours, pre), expected, atol=1e-5, rtol=0)


def test_siglip_fixed_resize(tmp_path_factory, artifacts, test_images):
    from transformers import AutoProcessor

    from tokedge.export.presets import TinyLlavaConfig, build_tiny_llava

    ckpt = build_tiny_llava(tmp_path_factory.mktemp("ckpt") / "siglip", TinyLlavaConfig(vision="siglip", text="qwen2",
                                                                                            image_size=224, seed=3))
    info = load_artifact(artifacts("none", checkpoint=ckpt)).preprocess
    processor = AutoProcessor.from_pretrained(ckpt)
    for image in test_images:
        expected = processor.image_processor(image, return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(preprocess(image, info), expected, atol=1e-5, rtol=0)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(1, 64), w=st.integers(1, 64), mode=st.sampled_from(["RGB", "L", "RGBA", "P", "CMYK", "LA", "1",
                                                                           "I;16", "I", "F"]))
def test_property_any_mode_and_size_gives_finite_pixels(h, w, mode, pre):
    image = Image.fromarray(_rgb(h, w, seed=h * w)).convert("RGBA" if mode == "LA" else "RGB")
    if mode in ("I;16", "I", "F"):
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        image = Image.fromarray(np.full((h, w), 0.5 if mode == "F" else 40000, dtype=dtype))
        assert image.mode == mode
    else:
        image = image.convert(mode)
    out = preprocess(image, pre)
    assert out.shape == (3, 336, 336) and out.dtype == np.float32 and np.isfinite(out).all()
