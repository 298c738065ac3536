"""Pre-LLM methods on Qwen3-VL keep DeepStack aligned: `visionzip` (mean received attention in the
last vision block, no CLS), `divprune` and `pool` in the reduced vision graph (run-time count per image,
`kept_index` out), whose packed rows carry each DeepStack level through the same selection (and, for
VisionZip, the same contextual merge). Independent reference: transformers' own tower
(`model.model.visual`, a hook on its last block's attention for q/k, `apply_rotary_pos_emb_vision`,
eager softmax), its DeepStack features, the selections written as loops
(tests/export/test_qwen_pre_llm.py), and transformers' language model on the reduced prompt
(`_deepstack_process` on the kept rows, `get_rope_index`'s kept columns): prefill logits < 1e-3.
Then one `visionzip --keep 0.5` artifact end to end through the runtime (`Pipeline`, the code of
`tokedge run`)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.export.test_qwen_pre_llm import divprune_loop, instruction_of, pool_loop, visionzip_loop
from tests.reduce.test_cdpruner import cdpruner_loop
from tests.reduce.test_hiprune import hiprune_loop
from tests.reduce.test_todre import todre_loop
from tokedge.runtime import qwen_vl

SIZES = [(320, 224), (256, 256)]  # 7x10 and 8x8 merged tokens at patch 16


def _image(width, height, seed):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def hf(tiny_qwen3_vl_dir):
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_qwen3_vl_dir, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    return (model, AutoTokenizer.from_pretrained(tiny_qwen3_vl_dir),
            Qwen2VLImageProcessorPil.from_pretrained(tiny_qwen3_vl_dir))


@pytest.fixture(scope="module")
def graphs(hf, tiny_qwen3_vl_dir, tmp_path_factory):
    """The reduced vision graph of each method and the plain decoder, as ONNX Runtime sessions."""
    import onnxruntime as ort

    from tokedge.export.families import for_checkpoint
    from tokedge.export.onnx_export import finish, save_graph, trace_to_ir
    from tokedge.reduce import get_method

    model = hf[0]
    family = for_checkpoint(json.loads((tiny_qwen3_vl_dir / "config.json").read_text()))
    out = tmp_path_factory.mktemp("qwen3-pre")

    def session(module, spec, name):
        ir_model = trace_to_ir(module.eval(), spec)
        finish(ir_model)
        file, _ = save_graph(ir_model, out, name, external_threshold=1 << 30)
        return ort.InferenceSession(str(out / file), providers=["CPUExecutionProvider"])

    most = max(math.ceil(0.75 * (h // 32) * (w // 32)) for w, h in SIZES)  # the largest count the tests feed
    sessions = {name: session(family.reduced_vision_module(model, get_method(name), get_method(name).parse_options({}), most),
                              family.reduced_vision_trace_spec(model, torch.float32,
                                                                get_method(name).takes_instruction), name) for name in ("visionzip", "divprune", "pool", "hiprune", "cdpruner", "todre")}
    sessions["decoder"] = session(family.graph_modules(model)["decoder"], family.graph_trace_specs(model)["decoder"],
                                  "decoder")
    return sessions


@torch.no_grad()
def tower_signals(model, pixel_values, grid, block: int = -1):
    """transformers' tower on one image: packed rows [n, (1 + levels) * h] (merged tokens, then each
    DeepStack level), the mean attention each merged token receives in the last block [n] and that
    block's pre-rotary keys per merged token [n, d] (patch rows are block-major: 4 per merge unit)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

    visual = model.model.visual
    seen = {}

    def hook(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]
        seen["pe"] = kwargs["position_embeddings"]

    handle = visual.blocks[block].attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = visual(pixel_values, grid_thw=grid)
    finally:
        handle.remove()
    attn = visual.blocks[block].attn
    x = seen["x"]
    qkv = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3)
    q, k = qkv[0], qkv[1]  # [N, H, d]
    keys = k.float().mean(1)
    q, k = apply_rotary_pos_emb_vision(q, k, *seen["pe"])
    qs, ks = q.transpose(0, 1).float(), k.transpose(0, 1).float()
    received = torch.softmax(qs @ ks.transpose(1, 2) * attn.head_dim**-0.5, dim=-1).mean(0).mean(0)  # one image
    packed = torch.cat([out.pooler_output, *out.deepstack_features], dim=-1)
    n = packed.shape[0]
    return packed, received.reshape(n, 4).mean(1), keys.reshape(n, 4, -1).mean(1)


def _lm_reference(model, tok, grids, kept_idx, kept_rows, question="Compare them."):
    """transformers' language model on the reduced prompt: kept tokens at their unreduced M-RoPE
    columns, DeepStack levels of the kept rows at the image positions -> (ids, positions, logits)."""
    hidden = model.config.text_config.hidden_size
    counts = [int(g.prod()) // 4 for g in grids]
    content = [{"type": "image"} for _ in grids] + [{"type": "text", "text": question}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    parts = text.split("<|image_pad|>")
    full = torch.tensor([tok(parts[0] + "".join("<|image_pad|>" * n + r for n, r in zip(counts, parts[1:])))["input_ids"]])
    token = model.config.image_token_id
    is_img = (full[0] == token).numpy()
    img_pos = np.flatnonzero(is_img)
    starts = np.cumsum([0, *counts[:-1]])
    cols = np.sort(np.concatenate([np.flatnonzero(~is_img)] + [img_pos[s + np.asarray(i)]
                                                                for s, i in zip(starts, kept_idx)]))
    pos, _ = model.model.get_rope_index(full, (full == token).long(), image_grid_thw=torch.stack(grids))
    ids, pos = full[:, cols], pos[:, :, cols]
    rows = torch.cat(kept_rows)
    visual = ids == token
    with torch.no_grad():
        embeds = model.model.language_model.embed_tokens(ids).masked_scatter(visual[..., None], rows[:, :hidden])
        levels = [rows[:, (lv + 1) * hidden:(lv + 2) * hidden] for lv in range(rows.shape[1] // hidden - 1)]
        out = model.model.language_model(inputs_embeds=embeds, position_ids=pos, attention_mask=torch.ones_like(ids),
                                         visual_pos_masks=visual, deepstack_visual_embeds=levels)
        logits = model.lm_head(out.last_hidden_state[:, -1])[0].numpy()
    return ids, is_img, cols, logits


@pytest.mark.parametrize(("method", "keep"), [("visionzip", 0.5), ("visionzip", 0.75), ("divprune", 0.5),
                                             ("divprune", 0.75), ("pool", 0.25), ("hiprune", 0.25),
                                             ("hiprune", 0.5), ("cdpruner", 0.25), ("cdpruner", 0.5),
                                             ("todre", 0.25), ("todre", 0.5)])
def test_reduced_vision_and_prefill_match_reference(hf, graphs, method, keep):
    model, tok, processor = hf
    hidden = model.config.text_config.hidden_size
    side = int(model.config.vision_config.num_position_embeddings ** 0.5)
    images = [_image(w, h, seed=i + 11) for i, (w, h) in enumerate(SIZES)]
    kept_idx, kept_ref, kept_onnx, grids = [], [], [], []
    instruction = instruction_of(model, tok, len(images))
    for image in images:
        batch = processor(images=[image], return_tensors="pt")
        grid = batch["image_grid_thw"]
        packed, score, keys = tower_signals(model, batch["pixel_values"], grid)
        k = max(1, math.ceil(keep * packed.shape[0]))
        if method == "visionzip":  # decisions from attention and keys; the same merge on every level
            idx, ref = visionzip_loop(packed, score, keys, k)
        elif method == "pool":  # band pooling of the merged grid, every level averaged alike
            idx, ref = pool_loop(packed, int(grid[0, 2]) // 2, k)
        elif method == "hiprune":  # anchors in the object block: round(depth * 16/32), 1-based
            block = round(len(model.model.visual.blocks) * 0.5) - 1
            obj = tower_signals(model, batch["pixel_values"], grid, block=block)[1]
            idx = hiprune_loop(obj.tolist(), score.tolist(), int(grid[0, 2]) // 2, k, 0.1)
            ref = packed[idx]
        elif method == "todre":  # max-sum over the merger's output from the most-attended token; levels alike
            idx = todre_loop(packed[:, :hidden].double().numpy(), score.tolist(), k)
            ref = packed[idx]
        elif method == "cdpruner":  # DPP over the merger's output and the prompt's text; every level alike
            idx = cdpruner_loop(packed[:, :hidden].double().numpy(), instruction.double().numpy(), k)
            ref = packed[idx]
        else:  # diversity of the merger's output; every level takes the same rows
            idx, _ = divprune_loop(packed[:, :hidden], k)
            ref = packed[idx]
        pixels, g = qwen_vl.preprocess_image(image, qwen_vl.QwenImageSpec(
            patch_size=16, min_pixels=65536, max_pixels=16777216, mean=(0.5,) * 3, std=(0.5,) * 3))
        index, weight = qwen_vl.interpolation_inputs(g[None], side)
        emb, got = graphs[method].run(None, {"pixel_values": pixels, "vision_pos": qwen_vl.vision_positions(g[None]),
                                             "interp_index": index, "interp_weight": weight,
                                             "keep": np.array(k, np.int64),
                                             **({"instruction": instruction.numpy()} if method == "cdpruner" else {})})
        assert got.tolist() == idx  # the same tokens, at the same positions
        assert emb.shape == (k, 3 * hidden)
        np.testing.assert_allclose(emb, ref.numpy(), atol=1e-4, rtol=0)  # features and both DeepStack levels
        kept_idx.append(idx)
        kept_ref.append(ref)
        kept_onnx.append(emb)
        grids.append(grid[0])
    ids, is_img, cols, ref_logits = _lm_reference(model, tok, grids, kept_idx, kept_ref)
    pos, _ = qwen_vl.rope_index(is_img[None].astype(np.int64), torch.stack(grids).numpy())
    x = np.zeros((1, ids.shape[1], 3 * hidden), np.float32)
    x[0, :, :hidden] = model.model.language_model.embed_tokens(ids)[0].detach().numpy()
    x[0, (ids[0] == model.config.image_token_id).numpy()] = np.concatenate(kept_onnx)
    tcfg = model.config.text_config
    past = {f"past_key_values.{i}.{n}": np.zeros((1, tcfg.num_key_value_heads, 0, tcfg.head_dim), np.float32)
            for i in range(tcfg.num_hidden_layers) for n in ("key", "value")}
    (logits, *_) = graphs["decoder"].run(None, {"inputs_embeds": x, "attention_mask": np.ones(ids.shape, np.int64),
                                               "position_ids": pos[:, :, cols], **past})
    assert np.abs(logits[0, -1] - ref_logits).max() < 1e-3


def test_visionzip_artifact_runs_as_the_reference(hf, tiny_qwen3_vl_dir, tmp_path):
    """`tokedge export --method visionzip --keep 0.5`, then the runtime on a two-image prompt: each
    image keeps ceil(n/2) tokens, and the prefill logits equal transformers' LM on the reference's
    reduced prompt (its tower, loop selection, DeepStack on the kept rows, kept M-RoPE columns)."""
    from tokedge.export.pipeline import ExportConfig, export
    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.layouts import prompt_inputs
    from tokedge.runtime.pipeline import Pipeline

    model, tok, processor = hf
    art = tmp_path / "vz"
    result = export(ExportConfig(model=str(tiny_qwen3_vl_dir), out=art, method="visionzip", keep=0.5))
    assert result.parity["ok"] and result.parity["cases"]  # export-time cases: the torch module + transformers LM
    images = [_image(w, h, seed=i + 21) for i, (w, h) in enumerate(SIZES)]
    kept_idx, kept_ref, grids = [], [], []
    for image in images:
        batch = processor(images=[image], return_tensors="pt")
        packed, score, keys = tower_signals(model, batch["pixel_values"], batch["image_grid_thw"])
        idx, ref = visionzip_loop(packed, score, keys, math.ceil(0.5 * packed.shape[0]))
        kept_idx.append(idx)
        kept_ref.append(ref)
        grids.append(batch["image_grid_thw"][0])
    ids, _, _, ref_logits = _lm_reference(model, tok, grids, kept_idx, kept_ref, "What differs?")
    with Pipeline.load(art) as pipe:
        inputs = prompt_inputs(pipe.manifest, images)
        enc = pipe.encoder.encode(["What differs?"], [[x.tokens for x in inputs]])
        gen = generate(pipe.graphs, inputs, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=2),
                       images_per_row=[2])
        result = pipe.generate(images, "What differs?", max_new_tokens=2)
    assert [x.tokens for x in inputs] == [len(i) for i in kept_idx] == [35, 32]
    np.testing.assert_array_equal(enc.input_ids, ids.numpy())
    assert np.abs(gen.prefill_logits[0] - ref_logits).max() < 1e-3
    assert result.token_ids == gen.token_ids and result.visual_tokens == 67
