"""GlobalCom2 on LLaVA-NeXT tiles against a loop reference written from the authors' code
(xuyang-liu16/GlobalCom2 `llava/model/llava_arch.py`: `generate_scale_for_crop_features`,
`interpolate_and_split_cls_attn_scores`, `select_topk_crop_features`, `compress_crops`; docs/methods.md):

- scores: transformers' own CLIP modules; the last layer's `layer_norm1`, `q_proj` and `k_proj`
  on its input (hidden_states[-2], LLaVA's features), q.k * scale before softmax, mean over heads,
  the CLS row without the CLS column (the authors' CustomCLIPAttention);
- crop shares: the authors' loop over the thumbnail's 24 x 24 scores into an even block split
  (float64), softmax at temperature 10 with their +1e-8, r_j = R (1 + p_j - mean p) capped at 1;
- in-crop scores: the crop's valid tokens (transformers' own unpadding, `pack_image_features`),
  torch's bilinear `interpolate` of the thumbnail scores onto the unpadded map, both L2-normalised
  over the crop, summed;
- counts: floor of each share (the authors'), then tokedge's documented exact-count step written as
  a loop: one token at a time to the partition with the largest share left (or from the one with
  the smallest, when the floors overshoot);
- output: the thumbnail's kept tokens by descending score, the crops' scattered onto the canvas
  and read in raster order (newlines left out).

The artifact runs through the torch-free runtime; kept embeddings within 1e-4 (the same tokens in
the same order), prefill logits within 1e-3 and greedy tokens equal to transformers' LM, at two
budgets.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.export.test_anyres_methods import QUESTION, candidates, reference_generate, textured_image

BUDGETS = (0.1, 0.25)  # of the largest image's full count (2928): 292 and 732 tokens per image
SIZE = (480, 640)  # 640x480: a 2 x 2 grid whose top and bottom rows are partly padding


@pytest.fixture(scope="module")
def hf_next(tiny_llava_next_dir):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_llava_next_dir, dtype=torch.float32).eval()
    model.model.vision_tower.set_attn_implementation("eager")
    return model, AutoProcessor.from_pretrained(tiny_llava_next_dir)


@torch.no_grad()
def cls_logits(hf_next, image) -> np.ndarray:
    """[P, N]: the authors' `attn_maps[-1][:, 0, 1:]` from transformers' modules."""
    model, processor = hf_next
    batch = processor.image_processor([image], return_tensors="pt")
    parts = int((batch["pixel_values"][0].abs().flatten(1).sum(-1) > 0).sum())
    tower = model.model.vision_tower
    out = tower(batch["pixel_values"][0, :parts], output_hidden_states=True)
    last = getattr(tower, "vision_model", tower).encoder.layers[-1]
    h = last.layer_norm1(out.hidden_states[-2])
    heads = model.config.vision_config.num_attention_heads
    d = h.shape[-1] // heads
    q = (last.self_attn.q_proj(h) * d**-0.5).view(parts, -1, heads, d).transpose(1, 2)
    k = last.self_attn.k_proj(h).view(parts, -1, heads, d).transpose(1, 2)
    return (q @ k.transpose(-1, -2)).mean(dim=1)[:, 0, 1:].double().numpy()


def globalcom2_loop(cand, logits, grid, k, temperature=10.0):
    """-> candidate indices in output order."""
    side = math.isqrt(cand["n"])
    gh, gw = grid
    where, part = cand["where"], cand["partition"]
    thumb = logits[0]
    count = len(where)
    ratio = k / count
    # crop shares: the authors' generate_scale_for_crop_features
    patch_h, patch_w = max(side // gh, 1), max(side // gw, 1)
    sums = np.zeros(gh * gw)
    for idx, score in enumerate(thumb):
        i, j = divmod(idx, side)
        sums[min(i // patch_h, gh - 1) * gw + min(j // patch_w, gw - 1)] += float(score)
    e = np.exp((sums - sums.max()) / temperature)
    soft = e / (e.sum() + 1e-8)
    scales = np.minimum(ratio * (1 + soft - soft.mean()), 1.0)
    # each candidate's place on the stitched canvas
    pos = {}
    for c, (p, t) in enumerate(where):
        if p > 0:
            tr, tc = divmod(p - 1, gw)
            r, col = divmod(t, side)
            pos[c] = (tr * side + r, tc * side + col)
    top, left = min(y for y, _ in pos.values()), min(x for _, x in pos.values())
    rows, cols = max(y for y, _ in pos.values()) - top + 1, max(x for _, x in pos.values()) - left + 1
    guide = torch.nn.functional.interpolate(torch.from_numpy(thumb).view(1, 1, side, side), size=(rows, cols), mode="bilinear",
                                            align_corners=False)[0, 0].numpy()
    members = [[c for c in range(count) if part[c] == p] for p in range(gh * gw + 1)]
    score = {c: float(thumb[where[c][1]]) for c in members[0]}
    for p in range(1, gh * gw + 1):
        if not members[p]:
            continue
        local = np.array([logits[p, where[c][1]] for c in members[p]])
        glob = np.array([guide[pos[c][0] - top, pos[c][1] - left] for c in members[p]])
        combined = local / max(np.linalg.norm(local), 1e-12) + glob / max(np.linalg.norm(glob), 1e-12)
        score.update(zip(members[p], combined.tolist()))
    share = [len(members[0]) * k / count] + [len(members[p]) * scales[p - 1] for p in range(1, gh * gw + 1)]
    quota = [math.floor(s) for s in share]  # the authors' int(N * scale)
    while sum(quota) < k:  # tokedge's exact count: largest share left first, ties to the lower partition
        room = [p for p in range(len(share)) if quota[p] < len(members[p])]
        quota[max(room, key=lambda p: (share[p] - quota[p], -p))] += 1
    while sum(quota) > k:
        held = [p for p in range(len(share)) if quota[p] > 0]
        quota[min(held, key=lambda p: (share[p] - quota[p] + 1, -p))] -= 1
    ranked = [sorted(m, key=lambda c: (-score[c], c)) for m in members]
    thumbnail = ranked[0][: quota[0]]
    crops = [c for p in range(1, len(share)) for c in ranked[p][: quota[p]]]
    return thumbnail + sorted(crops, key=lambda c: pos[c]), [math.floor(s) for s in share]


@pytest.fixture(scope="module")
def artifacts(tiny_llava_next_dir, tmp_path_factory):
    from tokedge.export.families import inspect_checkpoint
    from tokedge.export.pipeline import ExportConfig, export

    full = inspect_checkpoint(str(tiny_llava_next_dir), tiny_llava_next_dir)[1].full_tokens
    root = tmp_path_factory.mktemp("globalcom2")
    out = {}
    for i, share in enumerate(BUDGETS):
        k = int(share * full)
        # export validates one budget against transformers' modules with the method's own selection;
        # this file's loop is the independent check of both
        export(ExportConfig(model=str(tiny_llava_next_dir), out=root / str(k), method="globalcom2", budget=k,
                            validate=i == 0))
        out[k] = root / str(k)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("budget", range(len(BUDGETS)))
def test_globalcom2_matches_the_authors_loop_and_transformers(budget, artifacts, hf_next):
    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.runtime.layout import anyres_inputs, plan_image
    from tokedge.runtime.pipeline import Pipeline

    k, path = list(artifacts.items())[budget]
    image = textured_image(*SIZE)
    cand = candidates(hf_next, image)
    logits = cls_logits(hf_next, image)
    with Pipeline.load(path) as pipe:
        layout = pipe.manifest.layout.anyres()
        grid = plan_image(layout, *SIZE).grid
        kept, floors = globalcom2_loop(cand, logits, grid, k)
        expected_embeds = cand["project"](cand["features"][kept])
        _, expected_logits, expected_tokens = reference_generate(hf_next, expected_embeds)
        result = pipe.generate(image, QUESTION, max_new_tokens=8)
        inputs = [anyres_inputs(image, layout, pipe.manifest.preprocess, budget=k)]
        enc = pipe.encoder.encode([QUESTION], [k])
        gen = generate(pipe.graphs, inputs, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=1))
    assert len(kept) == k == result.visual_tokens
    np.testing.assert_allclose(gen.image_embeds[0], expected_embeds, atol=1e-4, rtol=1e-4)  # same tokens, same order
    np.testing.assert_allclose(gen.prefill_logits[0], expected_logits, atol=1e-3, rtol=0)
    assert result.token_ids[0] == expected_tokens
    # not vacuous: the crops' shares differ, and the thumbnail's kept tokens are not in raster order
    assert len(set(floors[1:])) > 1, floors
    thumb = [c for c in kept if cand["partition"][c] == 0]
    assert thumb != sorted(thumb)


def test_thumbnail_guide_is_torch_interpolate_and_the_authors_blocks():
    """runtime/layout.thumbnail_guide (numpy, the device path) == torch's bilinear interpolate of a
    p x p map onto the tile map, and the authors' block loop, for several grids and unpaddings."""
    from tokedge.runtime.layout import AnyresLayout, candidate_plan, pack_plan, plan_image, thumbnail_guide

    layout = AnyresLayout(tile=336, patch_grid=24, pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336),
                                                              (336, 1008)))
    rng = np.random.default_rng(0)
    for size in [(480, 640), (900, 300), (1000, 1000), (200, 1000), (336, 300)]:
        plan = plan_image(layout, *size)
        block, index, weight = thumbnail_guide(layout, plan)
        cand, _ = candidate_plan(layout, plan, *pack_plan(layout, plan))
        assert len(index) == len(cand)
        thumb = rng.standard_normal(576).astype(np.float32)
        rows, cols = plan.unpadded
        want = torch.nn.functional.interpolate(torch.from_numpy(thumb).view(1, 1, 24, 24), size=(rows, cols),
                                               mode="bilinear", align_corners=False)[0, 0].reshape(-1).numpy()
        got = (thumb[index] * weight).sum(-1)
        assert np.all(weight[:576] == 0)
        np.testing.assert_allclose(got[576:], want, atol=1e-5)  # float32 weights: ~3e-6 from torch's
        gh, gw = plan.grid
        ph, pw = max(24 // gh, 1), max(24 // gw, 1)
        for idx in range(576):
            i, j = divmod(idx, 24)
            assert block[idx] == min(i // ph, gh - 1) * gw + min(j // pw, gw - 1)
