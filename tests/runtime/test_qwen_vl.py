"""The torch-free Qwen-VL pieces (tokedge/runtime/qwen_vl.py) against transformers' own functions:
the PIL image processor, the vision index helpers and Qwen2_5_VLModel.get_rope_index."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tokedge.errors import InputError
from tokedge.runtime import qwen_vl

# (width, height): the acceptance sizes, a tiny one that is scaled up, and a half-to-even rounding case
SIZES = [(448, 448), (300, 900), (1000, 750), (20, 30), (70, 70), (42, 98)]


def _image(width, height, seed=0):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("factor,lo,hi", [(28, 3136, 12845056), (28, 3136, 1003520), (32, 65536, 16777216)])
def test_smart_resize_equals_transformers(factor, lo, hi):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    for h, w in [(70, 70), (42, 98), (10, 10), (448, 448), (900, 300), (750, 1000), (3000, 4000), (8000, 6000),
                 (28, 5600), (29, 57), (1, 150)]:
        assert qwen_vl.smart_resize(h, w, factor, lo, hi) == tuple(smart_resize(h, w, factor, lo, hi)), (h, w)
    assert qwen_vl.smart_resize(70, 70, 28, 3136, 12845056) == (56, 56)  # round half to even
    with pytest.raises(InputError, match="aspect ratio"):
        qwen_vl.smart_resize(10, 2500, factor, lo, hi)


@pytest.mark.parametrize("size", SIZES)
def test_pixels_and_grid_equal_the_pil_processor(size):
    from transformers import Qwen2VLImageProcessorPil

    image = _image(*size)
    ref = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12845056)(images=[image], return_tensors="np")
    pixels, grid = qwen_vl.preprocess_image(image, qwen_vl.QwenImageSpec())
    np.testing.assert_array_equal(grid, ref["image_grid_thw"][0])
    assert pixels.shape == ref["pixel_values"].shape and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, ref["pixel_values"], atol=2e-6, rtol=0)


def test_qwen3_geometry_pixels_equal_the_pil_processor():
    from transformers import Qwen2VLImageProcessorPil

    image = _image(300, 900, seed=3)
    ip = Qwen2VLImageProcessorPil(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                  size={"shortest_edge": 65536, "longest_edge": 16777216})
    ref = ip(images=[image], return_tensors="np")
    spec = qwen_vl.QwenImageSpec(patch_size=16, min_pixels=65536, max_pixels=16777216, mean=(0.5,) * 3,
                                 std=(0.5,) * 3)
    pixels, grid = qwen_vl.preprocess_image(image, spec)
    np.testing.assert_array_equal(grid, ref["image_grid_thw"][0])
    np.testing.assert_allclose(pixels, ref["pixel_values"], atol=2e-6, rtol=0)


GRIDS = [[1, 8, 12], [1, 16, 16], [1, 16, 20], [1, 64, 22], [1, 54, 72], [1, 32, 32], [1, 2, 2], [2, 8, 8]]


@pytest.mark.parametrize("grid", GRIDS)
def test_vision_positions_and_windows_equal_transformers(grid):
    import torch
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    g = torch.tensor([grid])
    np.testing.assert_array_equal(qwen_vl.vision_positions(np.array([grid])), get_vision_position_ids(g, 2).numpy())
    ref_index, ref_cu = get_vision_window_index(g, 2, 112, 14)
    index, cu = qwen_vl.window_index(np.array([grid]))
    np.testing.assert_array_equal(index, ref_index.numpy())
    np.testing.assert_array_equal(cu, ref_cu.numpy())


def test_window_index_over_several_images_equals_transformers():
    import torch
    from transformers.vision_utils import get_vision_window_index

    grids = [[1, 8, 12], [1, 16, 20], [1, 4, 4]]
    ref_index, ref_cu = get_vision_window_index(torch.tensor(grids), 2, 112, 14)
    index, cu = qwen_vl.window_index(np.array(grids))
    np.testing.assert_array_equal(index, ref_index.numpy())
    np.testing.assert_array_equal(cu, ref_cu.numpy())


@pytest.mark.parametrize("grid", [[1, 8, 12], [1, 16, 16], [1, 54, 72]])
def test_vision_index_inputs_reproduce_the_window_permutation(grid):
    """The graph's index inputs say what transformers' forward does with window_index/cu_window_seqlens:
    rows permuted per merge unit, window ids constant between cu boundaries, argsort restores."""
    import torch
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    g = torch.tensor([grid])
    ref_index, ref_cu = (t.numpy() for t in get_vision_window_index(g, 2, 112, 14))
    n = grid[0] * grid[1] * grid[2]
    rows = torch.arange(n).reshape(n // 4, 4)[torch.from_numpy(ref_index)].reshape(-1).numpy()
    got = qwen_vl.qwen2_5_vision_inputs(np.array([grid]))
    np.testing.assert_array_equal(got.patch_order, rows)
    np.testing.assert_array_equal(got.vision_pos, get_vision_position_ids(g, 2).numpy()[rows])
    for w, (a, b) in enumerate(itertools.pairwise(ref_cu)):
        assert (got.window_seg[a:b] == w).all()
    assert len(got.window_seg) == n
    np.testing.assert_array_equal(got.merge_restore, torch.argsort(torch.from_numpy(ref_index)).numpy())


def _reference_model(tiny_qwen2_5_vl_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_qwen2_5_vl_dir).eval()


def _prompt_ids(tok, counts, image_token_id):
    content = []
    for i, _ in enumerate(counts):
        content += [{"type": "image"}, {"type": "text", "text": f"picture {i}"}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                   tokenize=False)
    parts = text.split("<|image_pad|>")
    assert len(parts) == len(counts) + 1
    text = parts[0] + "".join("<|image_pad|>" * n + p for n, p in zip(counts, parts[1:]))
    return np.asarray(tok(text)["input_ids"], np.int64)


def test_rope_index_equals_transformers_single_multi_and_padded(tiny_qwen2_5_vl_dir):
    import torch
    from transformers import AutoTokenizer

    model = _reference_model(tiny_qwen2_5_vl_dir)
    tok = AutoTokenizer.from_pretrained(tiny_qwen2_5_vl_dir)
    img = model.config.image_token_id
    grids = np.array([[1, 32, 32], [1, 64, 22], [1, 54, 72]])
    one = _prompt_ids(tok, [256], img)
    two = _prompt_ids(tok, [352, 972], img)
    # a left-padded batch: row 0 holds the first grid, row 1 the other two (grids consumed in order)
    length = max(len(one), len(two))
    ids = np.full((2, length), tok.pad_token_id, np.int64)
    mask = np.zeros((2, length), np.int64)
    ids[0, length - len(one):], mask[0, length - len(one):] = one, 1
    ids[1, length - len(two):], mask[1, length - len(two):] = two, 1
    mm = (ids == img).astype(np.int64)
    ref_pos, ref_delta = model.model.get_rope_index(torch.from_numpy(ids), torch.from_numpy(mm),
                                                    image_grid_thw=torch.from_numpy(grids),
                                                    attention_mask=torch.from_numpy(mask))
    pos, delta = qwen_vl.rope_index(mm, grids, attention_mask=mask)
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy().reshape(2, 1))
    single = (one == img)[None].astype(np.int64)
    ref_pos, ref_delta = model.model.get_rope_index(torch.from_numpy(one[None]), torch.from_numpy(single),
                                                    image_grid_thw=torch.from_numpy(grids[:1]))
    pos, delta = qwen_vl.rope_index(single, grids[:1])
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy().reshape(1, 1))


def test_rope_index_refuses_a_run_that_does_not_match_its_grid():
    mm = np.array([[0, 1, 1, 1, 0]])
    with pytest.raises(InputError, match="does not match"):
        qwen_vl.rope_index(mm, np.array([[1, 4, 4]]))
    with pytest.raises(InputError, match="more image-token runs"):
        qwen_vl.rope_index(mm, np.zeros((0, 3), np.int64))


def test_mrope_axis_maps():
    np.testing.assert_array_equal(qwen_vl.mrope_axis_map([2, 3, 3], 16), [0, 0, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(qwen_vl.mrope_axis_map([6, 5, 5], 32, interleaved=True),
                                  [0, 1, 2] * 5 + [0])


def test_qwen_runtime_pieces_are_torch_free(tmp_path):
    """The numpy Qwen-VL pieces run the whole input preparation without importing torch or transformers."""
    import json
    import subprocess
    import sys

    code = r"""
import json, sys
import numpy as np
from PIL import Image
from tokedge.runtime import qwen_vl
img = Image.fromarray(np.zeros((750, 1000, 3), np.uint8))
pixels, grid = qwen_vl.preprocess_image(img, qwen_vl.QwenImageSpec())
idx = qwen_vl.qwen2_5_vision_inputs(grid[None])
pos, delta = qwen_vl.rope_index(np.array([[0] * 3 + [1] * int(grid.prod() // 4) + [0] * 2]), grid[None])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx"))
print(json.dumps({"grid": grid.tolist(), "delta": int(delta[0, 0]), "heavy": heavy}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    # 1000x750 -> 1008x756 -> 54 x 72 patches; positions end at 3 + 36 + 2 - 1 = 40 over 977 tokens
    assert json.loads(proc.stdout) == {"grid": [1, 54, 72], "delta": 41 - 977, "heavy": []}


def test_preset_tokenizer_and_template_render_as_the_hub(tiny_qwen2_5_vl_dir):
    """The preset's tokenizer is a real Qwen2Tokenizer (no BOS, atomic vision tokens, EOS <|im_end|>)
    and its chat template renders the hub Qwen2.5-VL prompt (research doc section 6)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    tok = AutoTokenizer.from_pretrained(tiny_qwen2_5_vl_dir)
    assert type(tok).__name__ == "Qwen2Tokenizer" and tok.eos_token == "<|im_end|>"
    turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}
    text = tok.apply_chat_template([turn], add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n<|im_start|>assistant\n")
    ids = tok("<|vision_start|><|image_pad|><|image_pad|><|vision_end|>hi")["input_ids"]
    assert ids[:4] == tok.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|image_pad|>",
                                                 "<|vision_end|>"])
    ip = Qwen2VLImageProcessorPil.from_pretrained(tiny_qwen2_5_vl_dir)
    assert (ip.patch_size, ip.merge_size, ip.size["shortest_edge"], ip.size["longest_edge"]) == (14, 2, 3136, 12845056)
