"""Reduction methods on tiled images (LLaVA-NeXT anyres) at 20% of the full token count (divprune 5%).

The independent reference: transformers' own processor, vision tower (eager attention, so the CLS
rows and keys are transformers'), `pack_image_features` (without newlines: the candidate order),
projector and language model (`generate` on inputs_embeds), and a selection written here in plain
Python loops from the papers / docs/methods.md ("tiled images"). The artifact runs through the
torch-free runtime (`Pipeline`, ONNX Runtime) on the same images; greedy tokens must be equal,
prefill logits within 1e-3 and the kept tokens (their projected embeddings) the same.
"""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

SIZES = [(480, 640), (900, 300), (1000, 1000)]  # (height, width): 640x480, 300x900, 1000x1000
METHODS = ["hired", "cls-attn", "visionzip", "divprune"]
# budgets as shares of the full count: 20% (585), divprune 5% (146): its greedy unrolls one step per
# kept token over every candidate (585 steps took ~50 s of CI to export, load and run for what 146 show)
SHARE = {"divprune": 0.05}


def budget_of(method: str, full_tokens: int) -> int:
    return int(SHARE.get(method, 0.2) * full_tokens)
QUESTION = "What is shown in this image?"
NEW_TOKENS = 8
DATA_DEPENDENT = {"NonZero", "Unique", "Compress", "Loop", "If", "Scan"}


def textured_image(height: int, width: int, seed: int = 7) -> Image.Image:
    """A smooth gradient plus noise (attention and diversity have something to rank), deterministic
    in (height * seed + width)."""
    rng = np.random.default_rng(height * seed + width)
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = np.stack([xx / width, yy / height, (xx + yy) / (width + height)], axis=-1) * 180
    return Image.fromarray((smooth + rng.integers(0, 75, (height, width, 3))).astype(np.uint8))


@pytest.fixture(scope="module")
def hf_next(tiny_llava_next_dir):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_llava_next_dir, dtype=torch.float32).eval()
    model.model.vision_tower.set_attn_implementation("eager")  # attention probabilities for the scores
    return model, AutoProcessor.from_pretrained(tiny_llava_next_dir)


@pytest.fixture(scope="module")
def full_tokens(tiny_llava_next_dir):
    """The full token count (the largest image: base + 48 x 48 map + 48 newlines = 2928); budgets
    here are 20% of it."""
    from tokedge.export.families import inspect_checkpoint

    return inspect_checkpoint(str(tiny_llava_next_dir), tiny_llava_next_dir)[1].full_tokens


@pytest.fixture(scope="module")
def artifact(tiny_llava_next_dir, tmp_path_factory, full_tokens):
    from tokedge.export.pipeline import ExportConfig, export

    root = tmp_path_factory.mktemp("anyres-methods")
    made: dict[str, object] = {}

    def get(method: str):
        if method not in made:
            out = root / method
            result = export(ExportConfig(model=str(tiny_llava_next_dir), out=out, method=method,
                                         budget=budget_of(method, full_tokens)))
            made[method] = (out, result)
        return made[method]

    return get


@pytest.fixture(scope="module")
def pipelines(artifact):
    """One open Pipeline per method for the module (divprune's unrolled graph takes a while to load)."""
    from tokedge.runtime.pipeline import Pipeline

    opened: dict[str, Pipeline] = {}

    def get(method: str) -> Pipeline:
        if method not in opened:
            opened[method] = Pipeline.load(artifact(method)[0])
        return opened[method]

    yield get
    for pipe in opened.values():
        pipe.close()


# --- the reference: transformers' modules + loop selections ---------------------------------------


def _ranked(scores, members):
    return sorted(members, key=lambda c: (-float(scores[c]), c))


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def loop_cls_attn(cand, k):
    return sorted(_ranked(cand["score"], range(len(cand["score"])))[:k])


def loop_hired(cand, k, alpha=0.5):
    """HiRED, deployment variant (docs/methods.md): base budget, tile quotas by first-layer votes
    (largest remainder, caps), top per partition, fill with the best remaining."""
    part, score, n, tiles = cand["partition"], cand["score"], cand["n"], cand["tiles"]
    b0 = min(int(k * alpha), n)
    votes = sorted(range(n), key=lambda i: (-float(cand["early"][i]), i))[: int(n * (1 - alpha))]
    weights = [0] * tiles
    for i in votes:
        weights[cand["base_tile"][i]] += 1
    caps = [sum(1 for p in part if p == t + 1) for t in range(tiles)]
    remaining, total = k - b0, sum(weights)
    quota = [0] * tiles
    if total:
        exact = [Fraction(remaining * w, total) for w in weights]
        quota = [int(e) for e in exact]
        for t in sorted(range(tiles), key=lambda t: (-(exact[t] - quota[t]), t))[: remaining - sum(quota)]:
            quota[t] += 1
    quota = [b0] + [min(q, c) for q, c in zip(quota, caps)]
    kept = []
    for p in range(tiles + 1):
        kept += _ranked(score, [c for c in range(len(part)) if part[c] == p])[: quota[p]]
    kept += _ranked(score, [c for c in range(len(part)) if c not in set(kept)])[: k - len(kept)]
    return sorted(kept)


def loop_divprune(x, k):
    """Greedy max-min cosine distance over projected tokens; picked tokens are excluded."""
    n = len(x)
    unit = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=-1, keepdims=True)
    dist = 1 - unit @ unit.T  # [n, n] cosine distance (float64)
    nearest = [float(np.partition(row, 1)[1]) for row in dist]  # to the nearest other token
    picks = [int(np.argmax(nearest))]
    picked = {picks[0]}
    min_dist = dist[picks[0]].tolist()
    for _ in range(k - 1):
        best, best_val = -1, -2.0
        for j in range(n):
            if j not in picked and min_dist[j] > best_val:
                best, best_val = j, min_dist[j]
        picks.append(best)
        picked.add(best)
        row = dist[best]
        min_dist = [min(a, float(b)) for a, b in zip(min_dist, row)]
    return sorted(picks)


def loop_visionzip(cand, k):
    """CLS (base view) + dominant by CLS attention + contextual merged by key similarity."""
    k_c = max(1, round(k * 10 / 64))
    dominant = k - 1 - k_c
    order = _ranked(cand["score"], range(len(cand["score"])))
    dom, rest = sorted(order[:dominant]), sorted(order[dominant:])
    step = max(1, len(rest) // k_c)
    targets = rest[::step][:k_c]
    keys = cand["keys"]
    keys = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
    assigned = {t: [] for t in targets}
    for o in rest:
        if o not in assigned:
            assigned[targets[int(np.argmax(keys[targets] @ keys[o]))]].append(o)
    feats = cand["features"]
    ctx = [feats[t] + (feats[assigned[t]].mean(axis=0) if assigned[t] else 0) for t in targets]
    return np.concatenate([cand["cls_token"][None], feats[dom], np.stack(ctx)])


@torch.no_grad()
def candidates(hf_next, image):
    """Everything per candidate, from transformers' modules, in transformers' packing order."""
    from transformers.image_processing_utils import select_best_resolution

    model, processor = hf_next
    cfg = model.config
    batch = processor.image_processor([image], return_tensors="pt")
    sizes = batch["image_sizes"]
    parts = int((batch["pixel_values"][0].abs().flatten(1).sum(-1) > 0).sum())  # batch padding is all zeros
    out = model.model.vision_tower(batch["pixel_values"][0, :parts], output_hidden_states=True,
                                   output_attentions=True)
    layer = len(out.attentions) + 1 + cfg.vision_feature_layer - 1  # the layer whose output is the feature
    feats = out.hidden_states[cfg.vision_feature_layer]
    n = feats.shape[1] - 1
    ident = torch.stack([torch.full((n,), p, dtype=torch.float32) for p in range(parts)])[..., None]
    ident = torch.cat([ident, torch.arange(n, dtype=torch.float32).expand(parts, n)[..., None]], dim=-1)
    packed, _ = model.model.pack_image_features([ident], sizes, "default", None)
    where = [(int(p), int(t)) for p, t in packed[0].tolist()]
    attn = out.attentions[layer][:, :, 0, 1:].mean(dim=1)  # [P, N]
    early = out.attentions[0][:, :, 0, 1:].mean(dim=1)
    tower = model.model.vision_tower
    enc = getattr(tower, "vision_model", tower).encoder.layers[layer]
    keys = enc.self_attn.k_proj(enc.layer_norm1(out.hidden_states[layer]))
    keys = keys.view(parts, n + 1, cfg.vision_config.num_attention_heads, -1).mean(dim=2)[:, 1:]
    # the tile under the centre of each base-view token (spatial region on the processor's canvas)
    h, w = int(sizes[0, 0]), int(sizes[0, 1])
    bh, bw = select_best_resolution((h, w), cfg.image_grid_pinpoints)
    s = cfg.vision_config.image_size
    if bw / w < bh / h:
        nw, nh = bw, min(-(-h * bw // w), bh)
    else:
        nh, nw = bh, min(-(-w * bh // h), bw)
    top, left, p = (bh - nh) // 2, (bw - nw) // 2, int(n ** 0.5)
    base_tile = []
    for r in range(p):
        for c in range(p):
            y, x = top + (r + 0.5) / p * nh, left + (c + 0.5) / p * nw
            base_tile.append(int(y // s) * (bw // s) + int(x // s))
    projector = model.model.multi_modal_projector
    return {
        "where": where,
        "partition": [pt for pt, _ in where],
        "score": [float(attn[pt, t]) for pt, t in where],
        "early": [float(early[0, t]) for t in range(n)],
        "keys": np.stack([keys[pt, t].numpy() for pt, t in where]),
        "features": np.stack([feats[pt, 1 + t].numpy() for pt, t in where]),
        "projected": np.stack([projector(feats[pt, 1 + t]).numpy() for pt, t in where]),
        "cls_token": feats[0, 0].numpy(),
        "base_tile": base_tile,
        "tiles": parts - 1,
        "n": n,
        "project": lambda x: projector(torch.from_numpy(np.asarray(x, dtype=np.float32))).detach().numpy(),
    }


def reference_tokens(hf_next, method, image, k):
    cand = candidates(hf_next, image)
    if method == "cls-attn":
        return cand["project"](cand["features"][loop_cls_attn(cand, k)])
    if method == "hired":
        return cand["project"](cand["features"][loop_hired(cand, k)])
    if method == "divprune":
        return cand["projected"][loop_divprune(cand["projected"], k)]
    return cand["project"](loop_visionzip(cand, k))


@torch.no_grad()
def reference_generate(hf_next, image_embeds):
    """transformers' LM: prefill logits and greedy `generate` on the spliced prompt embeddings."""
    model, processor = hf_next
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    text = text.replace("<image>", "<image>" * len(image_embeds))
    ids = processor.tokenizer([text], return_tensors="pt")["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    embeds[ids == model.config.image_token_id] = torch.from_numpy(image_embeds).float()
    mask = torch.ones_like(ids)
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits[0, -1].numpy()
    tokens = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                            pad_token_id=processor.tokenizer.pad_token_id)[0]
    return ids[0].numpy(), logits, tokens.tolist()


# --- the tests --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", SIZES)
def test_method_on_tiled_images_matches_transformers_and_the_loop(method, size, pipelines, hf_next, full_tokens):
    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.runtime.layout import anyres_inputs

    k = budget_of(method, full_tokens)
    image = textured_image(*size)
    expected_embeds = reference_tokens(hf_next, method, image, k)
    ids, expected_logits, expected_tokens = reference_generate(hf_next, expected_embeds)
    pipe = pipelines(method)
    result = pipe.generate(image, QUESTION, max_new_tokens=NEW_TOKENS)
    inputs = [anyres_inputs(image, pipe.manifest.layout.anyres(), pipe.manifest.preprocess, budget=k)]
    enc = pipe.encoder.encode([QUESTION], [k])
    gen = generate(pipe.graphs, inputs, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=1))
    np.testing.assert_array_equal(enc.input_ids[0], ids)
    assert result.visual_tokens == k
    np.testing.assert_allclose(gen.image_embeds[0], expected_embeds, atol=1e-4, rtol=1e-4)  # the same kept tokens
    np.testing.assert_allclose(gen.prefill_logits[0], expected_logits, atol=1e-3, rtol=0)
    assert result.token_ids[0] == expected_tokens


@pytest.mark.slow
@pytest.mark.parametrize("share", [0.03, 0.05])
def test_todre_pivots_on_the_base_view_and_matches_the_loop(share, tiny_llava_next_dir, tmp_path, hf_next,
                                                            full_tokens):
    """ToDRE's pivot comes from the thumbnail (the base view, partition 0), the max-sum greedy runs
    over every candidate (tests/reduce/test_todre.py's loop); one size at 3% and 5% (87 and 146
    tokens: its greedy unrolls one step per kept token; the matrix exports it at 64 with export's own
    validation)."""
    from tests.reduce.test_todre import todre_loop
    from tokedge.export.pipeline import ExportConfig, export
    from tokedge.runtime.pipeline import Pipeline

    k = int(share * full_tokens)
    export(ExportConfig(model=str(tiny_llava_next_dir), out=tmp_path / "todre", method="todre", budget=k,
                        validate=False))
    image = textured_image(*SIZES[0])
    cand = candidates(hf_next, image)
    base = [i for i, part in enumerate(cand["partition"]) if part == 0]
    assert int(np.argmax(cand["score"])) not in base  # the highest CLS attention is in a tile: the rule matters
    expected_embeds = cand["projected"][todre_loop(cand["projected"].astype(np.float64), cand["score"], k, base)]
    _, expected_logits, expected_tokens = reference_generate(hf_next, expected_embeds)
    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.runtime.layout import anyres_inputs

    with Pipeline.load(tmp_path / "todre") as pipe:
        result = pipe.generate(image, QUESTION, max_new_tokens=NEW_TOKENS)
        inputs = [anyres_inputs(image, pipe.manifest.layout.anyres(), pipe.manifest.preprocess, budget=k)]
        enc = pipe.encoder.encode([QUESTION], [k])
        gen = generate(pipe.graphs, inputs, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=1))
    assert result.visual_tokens == k and result.token_ids[0] == expected_tokens
    np.testing.assert_allclose(gen.image_embeds[0], expected_embeds, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(gen.prefill_logits[0], expected_logits, atol=1e-3, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_artifact_records_and_passes_its_anyres_validation(method, artifact, full_tokens):
    """Export validated against transformers on its example images; verify replays them; the
    manifest states the per-image budget and the graph is static (no data-dependent ops)."""
    from tokedge.verify import verify

    path, result = artifact(method)
    assert result.parity["ok"] and len(result.parity["cases"]) == 2
    assert verify(path).ok
    manifest = json.loads((path / "tokedge.json").read_text())
    assert manifest["reduction"]["budget"] == budget_of(method, full_tokens) == manifest["prompt"]["visual_tokens"]
    vision = onnx.load(path / manifest["graphs"]["vision"]["file"])
    assert not {n.op_type for n in vision.graph.node} & DATA_DEPENDENT
    inputs = [i.name for i in vision.graph.input]
    assert inputs[:3] == ["pixel_values", "pack_index", "pack_weight"]
    assert ("base_tile" in inputs) == (method == "hired")


def test_candidate_plan_is_transformers_packing_without_newlines(hf_next):
    """runtime/layout.candidate_plan == the pack plan minus its newline rows == transformers'
    pack_image_features with image_newline=None, for each size."""
    from tokedge.runtime.layout import AnyresLayout, candidate_plan, pack_plan, plan_image

    model, _ = hf_next
    layout = AnyresLayout(tile=336, patch_grid=24, pinpoints=tuple(tuple(p) for p in model.config.image_grid_pinpoints))
    for size in SIZES:
        plan = plan_image(layout, *size)
        index, weight = candidate_plan(layout, plan, *pack_plan(layout, plan))
        ident = torch.arange(plan.partitions * 576, dtype=torch.float32).reshape(plan.partitions, 576, 1)
        packed, _ = model.model.pack_image_features([ident], torch.tensor([size]), "default", None)
        np.testing.assert_array_equal(index[:, 0], packed[0][:, 0].long().numpy())
        assert np.all(weight[:, 0] == 1) and np.all(weight[:, 1:] == 0)
        assert len(index) == plan.tokens(layout) - plan.packed[0]  # one newline per map row left out


def test_image_with_fewer_candidates_than_the_budget_is_refused(artifact, tmp_path, capsys):
    """A very wide image keeps no tile rows after unpadding: only the base view's 576 candidates."""
    from tokedge.cli import main

    path, _ = artifact("cls-attn")
    thin = tmp_path / "thin.png"
    textured_image(5, 900).save(thin)
    assert main(["run", str(path), "--image", str(thin), "--prompt", "hi"]) != 0
    err = capsys.readouterr().err.strip()
    assert "gives 576 visual tokens, fewer than this artifact's budget of 585" in err
    assert len(err.splitlines()) == 1 and "--budget <= 576" in err
