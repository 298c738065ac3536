"""Pre-LLM methods on Qwen2.5-VL (no CLS token): `visionzip` and `cls-attn` scoring by the mean
attention each merged token receives in the last vision block, `divprune`, `pool` (band windows of the merged grid)
`vispruner` (important by received attention + diverse rounds) and `hiprune` (anchors by the
attention received in the object block, the rest by the last block's), in the reduced vision graph with a
run-time count per image (`keep`) and the kept merged-grid indices (`kept_index`), against an
independent reference: transformers' own vision tower (`model.model.visual`, a hook on its last
block's attention for q/k, `apply_rotary_pos_emb_vision`, eager softmax per `cu_seqlens` segment,
`get_vision_window_index`), the selections written as loops, and transformers' language model on
the reduced prompt with the kept columns of `get_rope_index` (prefill logits < 1e-3), two images
at --keep 0.5 and 0.75."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.reduce.test_cdpruner import cdpruner_loop
from tests.reduce.test_hiprune import hiprune_loop
from tests.reduce.test_todre import todre_loop
from tokedge.runtime import qwen_vl

SIZES = [(300, 200), (224, 224)]


def _image(width, height, seed):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def graphs(hf_qwen2_5_vl, tiny_qwen2_5_vl_dir, tmp_path_factory):
    """The reduced vision graph of each method and the plain decoder, as ONNX Runtime sessions."""
    import onnxruntime as ort

    from tokedge.export.families import for_checkpoint
    from tokedge.export.onnx_export import finish, save_graph, trace_to_ir
    from tokedge.reduce import get_method

    model = hf_qwen2_5_vl[0]
    family = for_checkpoint(json.loads((tiny_qwen2_5_vl_dir / "config.json").read_text()))
    out = tmp_path_factory.mktemp("qwen-pre")

    def session(module, spec, name):
        ir_model = trace_to_ir(module.eval(), spec)
        finish(ir_model)
        file, _ = save_graph(ir_model, out, name, external_threshold=1 << 30)
        return ort.InferenceSession(str(out / file), providers=["CPUExecutionProvider"])

    sessions = {name: session(family.reduced_vision_module(model, get_method(name), get_method(name).parse_options({}), 64),
                              family.reduced_vision_trace_spec(model, torch.float32,
                                                                get_method(name).takes_instruction), name)
                for name in ("visionzip", "divprune", "cls-attn", "pool", "vispruner", "hired", "hiprune", "cdpruner", "todre")}
    sessions["decoder"] = session(family.graph_modules(model)["decoder"], family.graph_trace_specs(model)["decoder"],
                                  "decoder")
    return sessions


@torch.no_grad()
def tower_signals(model, pixel_values, grid, block: int = -1):
    """transformers' tower on one image: merged tokens [n, h] (raster), the mean attention each merged
    token receives in `block` (default the last) [n] and that block's pre-rotary keys per merged token
    [n, d]."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
    from transformers.vision_utils import get_vision_window_index

    visual = model.model.visual
    seen = {}

    def hook(module, args, kwargs):
        seen["x"], seen["cu"], seen["pe"] = args[0] if args else kwargs["hidden_states"], kwargs["cu_seqlens"], \
            kwargs["position_embeddings"]

    handle = visual.blocks[block].attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        merged = visual(pixel_values, grid_thw=grid).pooler_output
    finally:
        handle.remove()
    attn = visual.blocks[block].attn
    x = seen["x"]
    qkv = attn.qkv(x).reshape(x.shape[0], 3, attn.num_heads, -1).permute(1, 0, 2, 3)
    q, k = qkv[0], qkv[1]  # [N, H, d]
    keys = k.float().mean(1)
    cos, sin = seen["pe"]
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    received = torch.zeros(x.shape[0])
    cu = seen["cu"].tolist()
    for a, b in itertools.pairwise(cu):  # eager attention inside each segment
        qs, ks = q[a:b].transpose(0, 1).float(), k[a:b].transpose(0, 1).float()
        p = torch.softmax(qs @ ks.transpose(1, 2) * attn.head_dim**-0.5, dim=-1)  # [H, n, n]
        received[a:b] = p.mean(0).mean(0)
    window_index, _ = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                              window_size=visual.window_size, patch_size=visual.patch_size)
    restore = torch.argsort(window_index)
    n = merged.shape[0]
    return merged, received.reshape(n, 4).mean(1)[restore], keys.reshape(n, 4, -1).mean(1)[restore]


@torch.no_grad()
def instruction_of(model, tok, images: int, question: str = "Compare them.") -> torch.Tensor:
    """The prompt's text as docs/artifact.md defines the vision input `instruction`: the mean of
    transformers' input embeddings over the rendered prompt's tokens that are not image placeholders."""
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": question}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor(tok(text)["input_ids"])
    return model.get_input_embeddings()(ids[ids != model.config.image_token_id]).float().mean(0)


def visionzip_loop(x, score, keys, k):
    c = max(1, round(k * 10 / 64))
    order = sorted(range(len(x)), key=lambda i: (-float(score[i]), i))
    dom, rest = sorted(order[: k - c]), sorted(order[k - c:])
    step = max(1, len(rest) // c)
    targets = [rest[j * step] for j in range(c)]
    kn = torch.nn.functional.normalize(keys.float(), dim=-1)
    members = {t: [] for t in targets}
    for r in rest:
        if r in members:
            continue
        sims = [float(kn[r] @ kn[t]) for t in targets]
        members[targets[sims.index(max(sims))]].append(r)
    out = [(i, x[i]) for i in dom]
    out += [(t, x[t] + (torch.stack([x[m] for m in members[t]]).mean(0) if members[t] else 0)) for t in targets]
    out.sort(key=lambda pair: pair[0])
    return [i for i, _ in out], torch.stack([v for _, v in out])


def received_top_loop(x, score, k):
    """cls-attn on a tower without CLS: the k tokens receiving the most attention, raster order."""
    picks = sorted(sorted(range(len(x)), key=lambda i: (-float(score[i]), i))[:k])
    return picks, x[picks]


def divprune_loop(x, k):
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    dist = (1 - xn @ xn.T).tolist()
    n = len(dist)
    nearest = [sorted(row)[1] for row in dist]
    picks = [max(range(n), key=lambda i: (nearest[i], -i))]
    closest = list(dist[picks[0]])
    for _ in range(k - 1):
        nxt = max((j for j in range(n) if j not in picks), key=lambda j: (closest[j], -j))
        picks.append(nxt)
        closest = [min(a, b) for a, b in zip(closest, dist[nxt])]
    picks.sort()
    return picks, x[picks]


def pool_loop(x, width, k):
    """`pool` on an H x W merged grid (raster rows of x) to exactly k tokens, from the rule in
    docs/methods.md: h bands (h*h*W <= k*H maximal, clamped to [ceil(k/W), min(H, k)]), band i holds
    floor((i+1)k/h) - floor(ik/h) windows; adaptive (floor/ceil) row and column ranges; each token
    the window mean at its top-left cell."""
    height = len(x) // width
    h = max(b for b in range(1, k + 1) if b * b * width <= k * height) if k * height >= width else 1
    h = max(1, min(max(h, -(-k // width)), height, k))
    picks, out = [], []
    for band in range(h):
        rows = range(band * height // h, -(-(band + 1) * height // h))
        w = (band + 1) * k // h - band * k // h
        for c in range(w):
            cols = range(c * width // w, -(-(c + 1) * width // w))
            cells = [r * width + q for r in rows for q in cols]
            picks.append(cells[0])
            out.append(torch.stack([x[i] for i in cells]).mean(0))
    assert len(picks) == k
    return picks, torch.stack(out)


def test_pool_takes_any_count_on_dynamic_resolution_only():
    """LLaVA's pool needs a perfect-square budget; on Qwen each image pools to its own count."""
    from tokedge.errors import UsageError
    from tokedge.export.pipeline import ExportConfig, check_request
    from tokedge.reduce import get_method

    pool = get_method("pool")
    cfg = ExportConfig(model="tiny-qwen2.5-vl", out=Path("unused"), method="pool", budget=7)
    assert check_request(cfg, pool, 16384, None, dynamic=True)[0] == 7
    with pytest.raises(UsageError, match="perfect square"):
        check_request(cfg, pool, 576, None)


@pytest.mark.parametrize(("height", "width"), [(4, 6), (6, 4), (5, 7), (1, 9), (8, 8)])
def test_pool_bands_follow_the_definition(height, width):
    """Every count 1..n on grids that divide and grids that don't: exactly k windows, ascending
    top-left positions, the loop's means; an even split is adaptive_avg_pool2d."""
    from tokedge.reduce.base import VisionFeatures
    from tokedge.reduce.pool import reduce_pool_indexed

    x = torch.randn(height * width, 3, generator=torch.Generator().manual_seed(height * width))
    for k in range(1, height * width + 1):
        vf = VisionFeatures(features=x[None], project=lambda t: t)
        vf.grid_width = torch.tensor(width)
        tokens, index = reduce_pool_indexed(vf, torch.tensor(k), {})
        picks, ref = pool_loop(x, width, k)
        assert index[0].tolist() == picks == sorted(set(picks))
        torch.testing.assert_close(tokens[0], ref, atol=1e-6, rtol=0)
    if height % 2 == 0 and width % 2 == 0:  # a quarter of an even grid: 2x2 windows
        k = height * width // 4
        vf = VisionFeatures(features=x[None], project=lambda t: t)
        vf.grid_width = torch.tensor(width)
        tokens, _ = reduce_pool_indexed(vf, torch.tensor(k), {})
        grid = x.T.reshape(1, 3, height, width)
        pooled = torch.nn.functional.adaptive_avg_pool2d(grid, (height // 2, width // 2))
        torch.testing.assert_close(tokens[0], pooled.reshape(3, -1).T, atol=1e-6, rtol=0)


def vispruner_loop(x, score, k, ratio=0.5):
    """VisPruner without CLS: the round(k * ratio) tokens receiving the most attention, then rounds over
    the rest (raster order): A = even places, B = odd places, drop the min(|A|, left - target) A tokens
    whose most similar B token (cosine) is closest, ties to the lower index; kept in raster order."""
    n_imp = min(k, round(k * ratio))
    order = sorted(range(len(x)), key=lambda i: (-float(score[i]), i))
    important, rest = order[:n_imp], sorted(order[n_imp:])
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    while len(rest) > k - n_imp:
        a, b = rest[0::2], rest[1::2]
        best = {i: max((float(xn[i] @ xn[j]) for j in b), default=0.0) for i in a}
        drop = set(sorted(a, key=lambda i: (-best[i], i))[:min(len(a), len(rest) - (k - n_imp))])
        rest = [i for i in rest if i not in drop]
    picks = sorted(important + rest)
    return picks, x[picks]


@pytest.mark.parametrize(("method", "keep"), [
    *((m, keep) for m in ("visionzip", "divprune", "cls-attn", "pool", "vispruner") for keep in (0.5, 0.75)),
    ("hired", 0.5), ("hiprune", 0.25), ("hiprune", 0.75), ("cdpruner", 0.25), ("cdpruner", 0.5), ("todre", 0.25),
    ("todre", 0.5)])
def test_reduced_vision_and_prefill_match_reference(hf_qwen2_5_vl, graphs, method, keep):
    model, tok, processor = hf_qwen2_5_vl
    images = [_image(w, h, seed=i + 11) for i, (w, h) in enumerate(SIZES)]
    kept_idx, kept_ref, kept_onnx, grids = [], [], [], []
    instruction = instruction_of(model, tok, len(images))
    for image in images:
        batch = processor(images=[image], return_tensors="pt")
        grid = batch["image_grid_thw"]
        merged, score, keys = tower_signals(model, batch["pixel_values"], grid)
        k = max(1, math.ceil(keep * merged.shape[0]))
        if method == "visionzip":
            idx, ref = visionzip_loop(merged, score, keys, k)
        elif method == "divprune":
            idx, ref = divprune_loop(merged, k)
        elif method == "pool":
            idx, ref = pool_loop(merged, int(grid[0, 2]) // 2, k)
        elif method == "vispruner":
            idx, ref = vispruner_loop(merged, score, k)
        elif method == "todre":  # max-sum diversity from the token receiving the most attention
            idx = todre_loop(merged.double().numpy(), score.tolist(), k)
            ref = merged[idx]
        elif method == "cdpruner":  # greedy DPP over the merged tokens, relevance to the prompt's text
            idx = cdpruner_loop(merged.double().numpy(), instruction.double().numpy(), k)
            ref = merged[idx]
        elif method == "hiprune":  # anchors in the object block (round(4 * 16/32) = 2: blocks[1], full attention)
            obj = tower_signals(model, batch["pixel_values"], grid, block=1)[1]
            idx = hiprune_loop(obj.tolist(), score.tolist(), int(grid[0, 2]) // 2, k, 0.1)
            ref = merged[idx]
        else:  # cls-attn, and hired: one view per image (HiRED's single-view rule)
            idx, ref = received_top_loop(merged, score, k)
        pixels, g = qwen_vl.preprocess_image(image, qwen_vl.QwenImageSpec())
        inputs = qwen_vl.qwen2_5_vision_inputs(g[None])
        text = {"instruction": instruction.numpy()} if method == "cdpruner" else {}
        emb, index = graphs[method].run(None, {
            "pixel_values": pixels[inputs.patch_order], "vision_pos": inputs.vision_pos,
            "window_seg": inputs.window_seg, "merge_restore": inputs.merge_restore, "keep": np.array(k, np.int64),
            **text})
        assert index.tolist() == idx  # the same tokens, at the same positions
        np.testing.assert_allclose(emb, ref.numpy(), atol=1e-4, rtol=0)
        kept_idx.append(idx)
        kept_ref.append(ref)
        kept_onnx.append(emb)
        grids.append(grid[0])
    # the language model on the reduced prompt: kept tokens at their own M-RoPE columns
    counts = [int(g.prod()) // 4 for g in grids]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "Compare them."}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    parts = text.split("<|image_pad|>")
    full_ids = torch.tensor([tok(parts[0] + "".join("<|image_pad|>" * n + r for n, r in zip(counts, parts[1:])))["input_ids"]])
    image_token = model.config.image_token_id
    is_img = (full_ids[0] == image_token).numpy()
    img_pos = np.flatnonzero(is_img)
    starts = np.cumsum([0, *counts[:-1]])
    keep_cols = np.sort(np.concatenate([np.flatnonzero(~is_img)] + [img_pos[s + np.asarray(i)]
                                                                      for s, i in zip(starts, kept_idx)]))
    grid_t = torch.stack(grids)
    ref_pos, _ = model.model.get_rope_index(full_ids, (full_ids == image_token).long(), image_grid_thw=grid_t)
    ids = full_ids[:, keep_cols]
    with torch.no_grad():
        embeds = model.model.language_model.embed_tokens(ids).clone()
        embeds[ids == image_token] = torch.cat(kept_ref)
        ref_logits = model(inputs_embeds=embeds, position_ids=ref_pos[:, :, keep_cols],
                           attention_mask=torch.ones_like(ids)).logits[0, -1].numpy()
    pos, _ = qwen_vl.rope_index(is_img[None].astype(np.int64), grid_t.numpy())
    x = embeds.numpy().copy()
    x[0, (ids[0] == image_token).numpy()] = np.concatenate(kept_onnx)
    tcfg = model.config.text_config
    kv = (1, tcfg.num_key_value_heads, 0, tcfg.hidden_size // tcfg.num_attention_heads)
    past = {f"past_key_values.{i}.{n}": np.zeros(kv, np.float32) for i in range(tcfg.num_hidden_layers)
            for n in ("key", "value")}
    (logits, *_) = graphs["decoder"].run(None, {"inputs_embeds": x, "attention_mask": np.ones(ids.shape, np.int64),
                                               "position_ids": pos[:, :, keep_cols], **past})
    assert np.abs(logits[0, -1] - ref_logits).max() < 1e-3
    assert len(keep_cols) == len(full_ids[0]) - sum(counts) + sum(len(i) for i in kept_idx)
