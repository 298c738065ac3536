"""tokedge's numpy preprocessing of every family against transformers' two image-processor backends.

transformers 5 picks the torchvision backend whenever torchvision is installed (every GPU user) and
the PIL one otherwise. tokedge's runtime follows the PIL backend: it must equal it (to float32
rounding) at every size; against the torchvision backend (antialiased bicubic on float tensors,
rounded back to uint8, where PIL resamples in fixed point) it may differ by one grey level where a
resize happens, and by nothing where none does. Each measured difference goes into the table this
run prints (conftest.DIFFS) and into docs/runtime.md ("Which image-processor backend").

Needs torchvision (`.venv-tv`, `make test-preprocess`); skipped with a reason elsewhere.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.preprocess.support import DIFFS, GREY_LEVELS, PIL_ATOL, SHARE, processor_order
from tests.preprocess.support import image as _image
from tests.preprocess.support import levels as _levels

BACKENDS = ("pil", "torchvision")


def _processor(directory, backend: str):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(directory, backend=backend)
    assert ("Pil" in type(processor).__name__) == (backend == "pil"), type(processor).__name__
    return processor


def _record(family: str, size, backend: str, diff: np.ndarray, levels: float, what: str = "pixel_values") -> None:
    share = float(np.mean(diff > PIL_ATOL))
    DIFFS.append((family, what, f"{size[0]}x{size[1]}", backend, float(diff.max()),
                  f"{levels:.2f} grey levels; {share:.1%} of values differ"))


def _check(family: str, size, backend: str, ours: np.ndarray, theirs: np.ndarray, std, resized: bool) -> None:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
    levels = _levels(diff.reshape(-1, 3, *diff.shape[-2:]) if diff.ndim >= 3 else diff, std)
    _record(family, size, backend, diff, levels)
    if backend == "pil" or not resized:
        np.testing.assert_allclose(ours, theirs, atol=PIL_ATOL, rtol=0)
    else:
        share = float(np.mean(diff > PIL_ATOL))
        assert levels <= GREY_LEVELS + 1e-3 and share <= SHARE, \
            f"{family} {size}: torchvision differs by {levels:.2f} grey levels on {share:.1%} of values"


def test_transformers_picks_torchvision_when_it_is_installed(tiny_llava_dir, tiny_qwen2_5_vl_dir):
    """What a GPU user gets: no backend asked for -> the torchvision one."""
    from transformers import AutoImageProcessor

    for directory in (tiny_llava_dir, tiny_qwen2_5_vl_dir):
        assert "Pil" not in type(AutoImageProcessor.from_pretrained(directory)).__name__


# --- LLaVA-1.5 (CLIP: shortest edge 336, centre crop) -----------------------------------------------------

CLIP_SIZES = [(336, 336), (480, 640), (900, 300), (1024, 768)]


@pytest.fixture(scope="module")
def llava_pre(tiny_llava_dir):
    from tokedge.export.families import load_checkpoint

    loaded = load_checkpoint(str(tiny_llava_dir), tiny_llava_dir)
    return loaded.family.preprocess(loaded)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", CLIP_SIZES)
def test_clip_single_view(tiny_llava_dir, llava_pre, size, backend):
    from tokedge.runtime.preprocess import preprocess

    image = _image(*size)
    theirs = _processor(tiny_llava_dir, backend)([image], return_tensors="np")["pixel_values"][0]
    _check("llava-1.5", size, backend, preprocess(image, llava_pre), theirs, llava_pre.image_std,
           resized=size != (336, 336))


# --- LLaVA-NeXT and LLaVA-OneVision (anyres: base view + tiles) -------------------------------------------

ANYRES_SIZES = [(480, 640), (900, 300), (672, 672), (1000, 750)]


@pytest.fixture(scope="module")
def next_loaded(tiny_llava_next_dir):
    from tokedge.export.families import load_checkpoint

    return load_checkpoint(str(tiny_llava_next_dir), tiny_llava_next_dir)


@pytest.fixture(scope="module")
def onevision_loaded(tiny_llava_onevision_dir):
    from tokedge.export.families import load_checkpoint

    return load_checkpoint(str(tiny_llava_onevision_dir), tiny_llava_onevision_dir)


def _anyres(loaded, directory, family: str, size, backend: str) -> None:
    from tokedge.runtime.layout import anyres_inputs

    image = _image(*size)
    pre = loaded.family.preprocess(loaded)
    ours = anyres_inputs(image, loaded.family.layout(loaded).anyres(), pre).pixel_values
    theirs = _processor(directory, backend)([image], return_tensors="np")["pixel_values"][0]
    assert not np.any(theirs[ours.shape[0]:])  # past our partitions: only the batch's zero padding
    _check(family, size, backend, ours, theirs[: ours.shape[0]], pre.image_std, resized=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", ANYRES_SIZES)
def test_llava_next_anyres(next_loaded, tiny_llava_next_dir, size, backend):
    _anyres(next_loaded, tiny_llava_next_dir, "llava-next", size, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", ANYRES_SIZES)
def test_llava_onevision_anyres(onevision_loaded, tiny_llava_onevision_dir, size, backend):
    _anyres(onevision_loaded, tiny_llava_onevision_dir, "llava-onevision", size, backend)


# --- Qwen2.5-VL and Qwen3-VL (dynamic patches: smart_resize to multiples of patch x merge) ---------------

QWEN_SIZES = [(448, 448), (300, 900), (1000, 750), (480, 640)]


@pytest.fixture(scope="module")
def qwen_loaded(tiny_qwen2_5_vl_dir, tiny_qwen3_vl_dir):
    from tokedge.export.families import load_checkpoint

    return {"qwen2.5-vl": (load_checkpoint(str(tiny_qwen2_5_vl_dir), tiny_qwen2_5_vl_dir), tiny_qwen2_5_vl_dir),
            "qwen3-vl": (load_checkpoint(str(tiny_qwen3_vl_dir), tiny_qwen3_vl_dir), tiny_qwen3_vl_dir)}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", QWEN_SIZES)
@pytest.mark.parametrize("family", ["qwen2.5-vl", "qwen3-vl"])
def test_qwen_dynamic_patches(qwen_loaded, family, size, backend):
    from tokedge.runtime.qwen_vl import image_inputs

    loaded, directory = qwen_loaded[family]
    layout, pre = loaded.family.layout(loaded), loaded.family.preprocess(loaded)
    image = _image(*size)
    inputs = image_inputs(image, layout, pre)
    batch = _processor(directory, backend)([image], return_tensors="np")
    assert list(batch["image_grid_thw"][0]) == list(inputs.grid)
    ours = processor_order(inputs, layout)
    theirs = batch["pixel_values"]
    factor = int(layout.patch_size) * int(layout.merge_size)
    resized = size[0] % factor != 0 or size[1] % factor != 0
    # rows are [C][T][P][P]: one grey-level scale per channel
    p, t = int(layout.patch_size), int(layout.temporal_patch_size)
    as_chw = (lambda rows: rows.reshape(-1, 3, t * p, p).transpose(1, 0, 2, 3).reshape(3, -1, p))
    _check(family, size, backend, as_chw(ours), as_chw(theirs), pre.image_std, resized=resized)


# --- SmolVLM (Idefics3: Lanczos to a longest edge, then to tile multiples; tiles + a global view) ---------

SMOLVLM_SIZES = [(480, 640), (900, 300), (1000, 1000), (256, 256)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", SMOLVLM_SIZES)
def test_smolvlm_split_tiles(tiny_smolvlm_dir, size, backend):
    from PIL import Image

    from tokedge.export.presets import TinySmolVLMConfig
    from tokedge.runtime import idefics3

    cfg = TinySmolVLMConfig()
    image = _image(*size)
    plan = idefics3.plan_split(*size, cfg.longest_edge, cfg.image_size)
    ours = np.stack([idefics3.normalise(v, 1 / 255, [0.5] * 3, [0.5] * 3)
                     for v in idefics3.split_views(image, plan, cfg.image_size, Image.Resampling.LANCZOS)])
    out = _processor(tiny_smolvlm_dir, backend)([[image]], return_tensors="np", return_row_col_info=True)
    assert (out["rows"][0][0], out["cols"][0][0]) == (plan.rows, plan.cols)
    _check("smolvlm", size, backend, ours, out["pixel_values"][0], (0.5, 0.5, 0.5), resized=True)


# --- InternVL (GotOcr2: the closest-aspect grid of 1..max tiles, bicubic; a thumbnail last) ---------------

INTERNVL_SIZES = [(480, 640), (900, 300), (1000, 1000), (32, 32)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", INTERNVL_SIZES)
def test_internvl_aspect_tiles(tiny_internvl_dir, size, backend):
    from PIL import Image

    from tokedge.export.presets import TinyInternVLConfig
    from tokedge.runtime import internvl

    cfg = TinyInternVLConfig()
    image = _image(*size)
    plan = internvl.plan_tiles(*size, cfg.image_size, cfg.min_tiles, cfg.max_tiles)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    ours = np.stack([internvl.normalise(v, 1 / 255, mean, std)
                     for v in internvl.tile_views(image, plan, cfg.image_size, Image.Resampling.BICUBIC)])
    out = _processor(tiny_internvl_dir, backend)([image], crop_to_patches=True, return_tensors="np")
    assert int(out["num_patches"][0]) == plan.views
    _check("internvl", size, backend, ours, out["pixel_values"], std, resized=size != (32, 32))


# --- Gemma 3 (one square view, bilinear, no crop) ----------------------------------------------------------

GEMMA3_SIZES = [(480, 640), (900, 300), (1000, 1000), (64, 64)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", GEMMA3_SIZES)
def test_gemma3_view(tiny_gemma3_dir, size, backend):
    from tokedge.export.families import load_checkpoint
    from tokedge.runtime.preprocess import preprocess

    loaded = load_checkpoint(str(tiny_gemma3_dir), tiny_gemma3_dir)
    pre = loaded.family.preprocess(loaded)
    image = _image(*size)
    theirs = _processor(tiny_gemma3_dir, backend)([image], return_tensors="np")["pixel_values"][0]
    _check("gemma3", size, backend, preprocess(image, pre), theirs, pre.image_std, resized=size != (64, 64))
