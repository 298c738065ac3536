"""Qwen3-VL `--method none`: the graphs of tokedge/export/families/qwen3_vl.py exported to ONNX and run
with ONNX Runtime on the torch-free numpy inputs (tokedge/runtime/qwen_vl.py) equal transformers'
Qwen3VLForConditionalGeneration: the learned position interpolation, the DeepStack features, the
interleaved M-RoPE decoder with DeepStack injection; greedy tokens and prefill logits (< 1e-3)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tokedge.runtime import qwen_vl

STEPS = 8
QUESTION = "Describe the picture."
SPEC = qwen_vl.QwenImageSpec(patch_size=16, min_pixels=65536, max_pixels=16777216, mean=(0.5, 0.5, 0.5),
                             std=(0.5, 0.5, 0.5))


def _image(width, height, seed):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3_vl_dir, tmp_path_factory):
    """(reference model, tokenizer, {graph: ORT session}) from one export of the tiny checkpoint."""
    import onnxruntime as ort
    import torch
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    from tokedge.export.families import for_checkpoint
    from tokedge.export.onnx_export import finish, save_graph, trace_to_ir

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_qwen3_vl_dir, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    out = tmp_path_factory.mktemp("qwen3-graphs")
    family = for_checkpoint(json.loads((tiny_qwen3_vl_dir / "config.json").read_text()))
    specs = family.graph_trace_specs(model)
    sessions = {}
    for name, module in family.graph_modules(model).items():
        ir_model = trace_to_ir(module, specs[name])
        finish(ir_model)
        file, _ = save_graph(ir_model, out, name, external_threshold=1 << 30)
        sessions[name] = ort.InferenceSession(str(out / file), providers=["CPUExecutionProvider"])
    return model, AutoTokenizer.from_pretrained(tiny_qwen3_vl_dir), sessions


def _vision_feed(pixels, grid, side):
    index, weight = qwen_vl.interpolation_inputs(grid[None], side)
    return {"pixel_values": pixels, "vision_pos": qwen_vl.vision_positions(grid[None]), "interp_index": index,
            "interp_weight": weight}


def _prompt(tok, counts):
    content = [{"type": "image"} for _ in counts] + [{"type": "text", "text": QUESTION}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                   tokenize=False)
    parts = text.split("<|image_pad|>")
    text = parts[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, parts[1:]))
    return np.asarray([tok(text)["input_ids"]], np.int64)


def _onnx_generate(model, tok, sessions, images):
    """The torch-free path: numpy preprocessing and indices, one vision run per image, packed rows
    (features + DeepStack planes) spliced at the image positions, M-RoPE positions from rope_index,
    greedy decode with positions last + 1 (the embed graph gives text tokens zero planes)."""
    side = int(model.config.vision_config.num_position_embeddings ** 0.5)
    embeds, grids = [], []
    for image in images:
        pixels, grid = qwen_vl.preprocess_image(image, SPEC)
        (feat,) = sessions["vision"].run(None, _vision_feed(pixels, grid, side))
        embeds.append(feat)
        grids.append(grid)
    ids = _prompt(tok, [len(e) for e in embeds])
    image = ids == model.config.image_token_id
    (x,) = sessions["embed"].run(None, {"input_ids": ids})
    x[image] = np.concatenate(embeds)
    pos, delta = qwen_vl.rope_index(image.astype(np.int64), np.stack(grids))
    tcfg = model.config.text_config
    kv = (1, tcfg.num_key_value_heads, 0, tcfg.head_dim)
    past = {f"past_key_values.{i}.{k}": np.zeros(kv, np.float32)
            for i in range(tcfg.num_hidden_layers) for k in ("key", "value")}
    mask = np.ones((1, ids.shape[1]), np.int64)
    tokens, step_logits = [], []
    for _ in range(STEPS):
        outs = sessions["decoder"].run(None, {"inputs_embeds": x, "attention_mask": mask, "position_ids": pos,
                                              **past})
        logits, presents = outs[0], outs[1:]
        step_logits.append(logits[0, -1])
        nxt = int(logits[0, -1].argmax())
        tokens.append(nxt)
        past = {name: value for name, value in zip(past, presents)}
        (x,) = sessions["embed"].run(None, {"input_ids": np.array([[nxt]], np.int64)})
        mask = np.ones((1, mask.shape[1] + 1), np.int64)
        pos = pos[:, :, -1:] + 1
    return ids, delta, tokens, np.stack(step_logits)


def _processor():
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=16, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                    size={"shortest_edge": 65536, "longest_edge": 16777216})


def _reference(model, images, ids):
    """transformers' own image processor and generate (mm_token_type_ids passed: M-RoPE): greedy
    tokens and the logits of every step (prefill first)."""
    import torch

    proc = _processor()(images=images, return_tensors="pt")
    input_ids = torch.from_numpy(ids)
    mm = (input_ids == model.config.image_token_id).long()
    kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "mm_token_type_ids": mm,
              "pixel_values": proc["pixel_values"], "image_grid_thw": proc["image_grid_thw"]}
    with torch.no_grad():
        out = model.generate(**kwargs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:].tolist(), torch.cat(out.logits).numpy()


@pytest.mark.parametrize("sizes", [[(448, 448)], [(300, 900)], [(1000, 750)], [(448, 448), (300, 900)]],
                         ids=["448x448", "300x900", "1000x750", "two-images"])
def test_onnx_greedy_and_prefill_equal_transformers(qwen3, sizes):
    model, tok, sessions = qwen3
    images = [_image(w, h, seed=i + 1) for i, (w, h) in enumerate(sizes)]
    ids, delta, tokens, logits = _onnx_generate(model, tok, sessions, images)
    ref_tokens, ref_logits = _reference(model, images, ids)
    assert np.abs(logits[0] - ref_logits[0]).max() < 1e-3  # prefill
    assert tokens == ref_tokens
    assert np.abs(logits - ref_logits).max() < 1e-3  # every decode step, with positions last + 1
    assert int(delta[0, 0]) < 0  # the image span compresses positions: M-RoPE, not 1-D positions


def test_vision_graph_equals_transformers_tower(qwen3):
    """The vision graph alone on a non-square grid (1000x750 -> 46 x 62 patches): merged features
    and every DeepStack level equal transformers' `get_image_features`."""
    import torch

    model, _, sessions = qwen3
    image = _image(1000, 750, seed=9)
    proc = _processor()(images=[image], return_tensors="pt")
    with torch.no_grad():
        ref = model.model.get_image_features(proc["pixel_values"], proc["image_grid_thw"])
    pixels, grid = qwen_vl.preprocess_image(image, SPEC)
    np.testing.assert_allclose(pixels, proc["pixel_values"].numpy(), atol=1e-5, rtol=0)
    side = int(model.config.vision_config.num_position_embeddings ** 0.5)
    (packed,) = sessions["vision"].run(None, _vision_feed(pixels, grid, side))
    hidden = model.config.text_config.hidden_size
    assert packed.shape == (23 * 31, 3 * hidden)  # features, then two DeepStack levels
    np.testing.assert_allclose(packed[:, :hidden], ref.pooler_output[0].numpy(), atol=1e-4, rtol=0)
    assert len(ref.deepstack_features) == 2
    for level, plane in enumerate(ref.deepstack_features):
        got = packed[:, (level + 1) * hidden:(level + 2) * hidden]
        np.testing.assert_allclose(got, plane[0].numpy(), atol=1e-4, rtol=0)  # one image


def test_deepstack_planes_and_interleaved_axes_change_the_logits(qwen3):
    """The parity above could not hold by accident: dropping the DeepStack planes, or feeding positions
    that differ only on the h/w axes (which interleaving spreads over all frequencies), moves the
    prefill logits far beyond the 1e-3 tolerance."""
    model, tok, sessions = qwen3
    pixels, grid = qwen_vl.preprocess_image(_image(448, 448, seed=3), SPEC)
    side = int(model.config.vision_config.num_position_embeddings ** 0.5)
    (feat,) = sessions["vision"].run(None, _vision_feed(pixels, grid, side))
    ids = _prompt(tok, [len(feat)])
    image = ids == model.config.image_token_id
    (x,) = sessions["embed"].run(None, {"input_ids": ids})
    hidden = model.config.text_config.hidden_size
    assert x.shape[-1] == 3 * hidden and not x[..., hidden:].any()  # text rows: zero planes
    x[image] = feat
    pos, _ = qwen_vl.rope_index(image.astype(np.int64), grid[None])
    tcfg = model.config.text_config
    past = {f"past_key_values.{i}.{k}": np.zeros((1, tcfg.num_key_value_heads, 0, tcfg.head_dim), np.float32)
            for i in range(tcfg.num_hidden_layers) for k in ("key", "value")}
    mask = np.ones(ids.shape, np.int64)

    def prefill(embeds, positions):
        return sessions["decoder"].run(None, {"inputs_embeds": embeds, "attention_mask": mask,
                                              "position_ids": positions, **past})[0][0, -1]

    base = prefill(x, pos)
    flat = x.copy()
    flat[..., hidden:] = 0  # no DeepStack planes
    assert np.abs(prefill(flat, pos) - base).max() > 1e-2
    swapped = pos[[0, 2, 1]]  # h and w exchanged: only the h/w frequencies see it
    assert np.abs(prefill(x, swapped) - base).max() > 1e-2
