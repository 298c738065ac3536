"""In-LLM pruning on Qwen3-VL keeps DeepStack aligned (docs/research/qwen-vl.md 8.6): fastv and dart
(TensorRT Edge-LLM's quota per image, at layer 1 and at the embedding level, layer 0), --keep 0.75
and 0.5, two images in one prompt. The exported prefill + decoder graphs (packed DeepStack planes,
interleaved M-RoPE positions from tokedge's numpy rope_index), run by ONNX Runtime, against a
reference built from transformers' own modules: its decoder layers with eager attention (FastV's
attention row), its q/k norms and interleaved rotary embedding, its `get_rope_index`, its
`_deepstack_process` adding each level after layers 0..levels-1 to the image tokens that are still
there, and the selection written as loops (tests/reduce/test_dart_spans.edge_loop). With the tiny
model's two DeepStack levels, pruning before layer 1 leaves level 1 to the survivors only, and
layer 0 prunes before any level is added: both fail if the planes are not gathered with the tokens."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.reduce.test_dart_spans import edge_loop
from tokedge.reduce.in_llm import plan_for
from tokedge.reduce.quota import TokenBudget, dart_quotas
from tokedge.runtime import qwen_vl

STEPS = 3
SIZES = [(256, 256), (320, 224)]  # 8x8 and 7x10 merged tokens at patch 16
CASES = {"fastv-layer1": ("fastv", {"layer": 1}), "dart-layer1": ("dart", {"layer": 1, "pivots": 8}),
         "dart-layer0": ("dart", {"layer": 0, "pivots": 8})}


def _image(width, height, seed):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3_vl_dir):
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_qwen3_vl_dir, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    return model, AutoTokenizer.from_pretrained(tiny_qwen3_vl_dir), tiny_qwen3_vl_dir


@pytest.fixture(scope="module")
def prompt(qwen3):
    """input_ids [1, t], transformers' embeddings with the image features [1, t, h], the DeepStack
    levels (one [image tokens, h] per level), grids [2, 3], tokens per image."""
    from transformers import Qwen2VLImageProcessorPil

    model, tok, ckpt = qwen3
    images = [_image(w, h, seed=i + 3) for i, (w, h) in enumerate(SIZES)]
    proc = Qwen2VLImageProcessorPil.from_pretrained(ckpt)(images=images, return_tensors="pt")
    grids = proc["image_grid_thw"]
    counts = [int(t * h * w) // 4 for t, h, w in grids.tolist()]
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What differs?"}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    parts = text.split("<|image_pad|>")
    text = parts[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, parts[1:]))
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        out = model.model.get_image_features(proc["pixel_values"], grids)
        embeds = model.model.language_model.embed_tokens(ids).clone()
    embeds[ids == model.config.image_token_id] = torch.cat(out.pooler_output)
    levels = [torch.cat(level) for level in out.deepstack_features]
    return ids, embeds, levels, grids, counts


@pytest.fixture(scope="module")
def graphs(qwen3, tmp_path_factory):
    """One prefill + decoder export per case (through the family); the keep ratio is a run-time input."""
    import onnxruntime as ort

    from tokedge.export.families import for_checkpoint
    from tokedge.export.onnx_export import finish, save_graph, trace_to_ir
    from tokedge.reduce import get_method

    model, _, ckpt = qwen3
    family = for_checkpoint(json.loads((ckpt / "config.json").read_text()))
    layers = model.config.text_config.num_hidden_layers
    out = {}
    for case, (name, options) in CASES.items():
        plan = plan_for(get_method(name), 1, 1, layers, options)
        specs, where, sessions = family.pruning_trace_specs(model, plan), tmp_path_factory.mktemp(case), {}
        for graph, module in family.pruning_graph_modules(model, plan).items():
            ir_model = trace_to_ir(module, specs[graph])
            finish(ir_model)
            file, _ = save_graph(ir_model, where, graph, external_threshold=1 << 30)
            sessions[graph] = ort.InferenceSession(str(where / file), providers=["CPUExecutionProvider"])
        out[case] = (plan, sessions)
    return out


def _causal(t: int) -> torch.Tensor:
    return torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None]


@torch.no_grad()
def reference(model, embeds, levels, pos, is_img, rule, layer, quotas, steps):
    """Greedy logits [steps, V]: transformers' layers one by one, DeepStack level l added after layer
    l (`_deepstack_process`) to the image tokens still in the sequence; before layer `layer` the image
    tokens are pruned by a loop-based selection (scores from layer-1's eager attention or keys, or from
    the embeddings at layer 0); survivors keep their M-RoPE columns. Decode steps re-run the whole
    (causal) sequence with the prompt's selection, generated tokens at last + 1."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

    lm, head = model.model.language_model, model.lm_head
    img = [int(p) for p in np.flatnonzero(is_img)]
    rank = {p: r for r, p in enumerate(img)}
    kept = None
    logits, x_all, pos_all = [], embeds, pos
    for _ in range(steps):
        x, p, rows = x_all, pos_all, list(range(x_all.shape[1]))
        score = x[0].abs().sum(-1).numpy() if layer == 0 else None
        for i, block in enumerate(lm.layers):
            if i == layer:
                if kept is None:
                    if rule == "fastv":
                        kept = sorted(sorted(img, key=lambda q: (-float(score[q]), q))[:sum(quotas)])
                    else:
                        kept = edge_loop(x[0].numpy(), np.asarray(is_img)[rows], quotas, pivot_score=score)
                drop = set(img) - set(kept)
                keep_rows = [r for r, orig in enumerate(rows) if orig not in drop]
                rows = [rows[r] for r in keep_rows]
                x, p = x[:, keep_rows], p[:, :, keep_rows]
            cos, sin = lm.rotary_emb(x, p)
            mask = _causal(x.shape[1])
            if i == layer - 1 and kept is None:
                normed = block.input_layernorm(x)
                attn = block.self_attn
                if rule == "fastv":
                    _, weights = attn(hidden_states=normed, position_embeddings=(cos, sin), attention_mask=mask)
                    score = weights[0, :, -1, :].mean(0).numpy()
                else:
                    shape = (1, x.shape[1], -1, attn.head_dim)
                    q = attn.q_norm(attn.q_proj(normed).view(shape)).transpose(1, 2)
                    k = attn.k_norm(attn.k_proj(normed).view(shape)).transpose(1, 2)
                    _, k = apply_rotary_pos_emb(q, k, cos, sin)
                    score = k[0].abs().sum(dim=(0, 2)).numpy()
            x = block(x, attention_mask=mask, position_embeddings=(cos, sin))
            if i < len(levels):
                present = [orig for orig in rows if orig in rank]
                visual = torch.tensor([[orig in rank for orig in rows]])
                x = lm._deepstack_process(x, visual, levels[i][[rank[orig] for orig in present]])
        step = head(lm.norm(x[:, -1:]))[0, -1]
        logits.append(step.numpy())
        nxt = torch.tensor([[int(step.argmax())]])
        x_all = torch.cat([x_all, lm.embed_tokens(nxt)], 1)
        pos_all = torch.cat([pos_all, pos_all[:, :, -1:] + 1], 2)
    return np.stack(logits), kept


def onnx_generate(sessions, embed_weight, packed, pos, is_img, counts, quotas, steps):
    """The runtime's feeds: packed prompt rows, image positions, the per-image span / quota inputs;
    decode steps feed packed token rows (zero planes) at positions last + 1."""
    img = np.flatnonzero(is_img).astype(np.int64)
    span = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
    feed = {"inputs_embeds": packed, "attention_mask": np.ones((1, packed.shape[1]), np.int64), "position_ids": pos,
            "image_positions": img[None], "image_keep": np.array([sum(quotas)], np.int64),
            "image_span": span[None], "image_quota": np.asarray(quotas, np.int64)[span][None]}
    prefill, decoder = sessions["prefill"], sessions["decoder"]
    used = {i.name for i in prefill.get_inputs()}  # fastv does not read image_span / image_quota
    outs = dict(zip([o.name for o in prefill.get_outputs()], prefill.run(None, {k: v for k, v in feed.items()
                                                                                 if k in used})))
    masks = {"attention_mask": feed["attention_mask"], **{n: v for n, v in outs.items() if n.startswith("attention_mask")}}
    past = {n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present")}
    logits, seq_lens = [outs["logits"][0, -1]], {n: v.shape[1] for n, v in masks.items()}
    wanted = {i.name for i in decoder.get_inputs()}
    for _ in range(steps - 1):
        nxt = int(logits[-1].argmax())
        masks = {n: np.ones((1, v.shape[1] + 1), np.int64) for n, v in masks.items()}
        pos = pos[:, :, -1:] + 1
        feed = {"inputs_embeds": embed_weight[[[nxt]]], "position_ids": pos, **masks, **past}
        outs = dict(zip([o.name for o in decoder.get_outputs()],
                        decoder.run(None, {k: v for k, v in feed.items() if k in wanted})))
        past = {n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present")}
        logits.append(outs["logits"][0, -1])
    return np.stack(logits), seq_lens


@pytest.mark.parametrize("keep", [0.75, 0.5])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers_reference_with_deepstack(qwen3, prompt, graphs, case, keep):
    model, _, _ = qwen3
    ids, embeds, levels, grids, counts = prompt
    plan, sessions = graphs[case]
    is_img = (ids[0] == model.config.image_token_id).numpy()
    rule = CASES[case][0]
    budget = TokenBudget(keep=keep)
    quotas = dart_quotas(counts, budget) if rule == "dart" else budget.counts(counts)
    mm = torch.from_numpy(is_img.astype(np.int64))[None]
    ref_pos, _ = model.model.get_rope_index(ids, mm, image_grid_thw=grids)
    ref_logits, kept = reference(model, embeds, levels, ref_pos, is_img, rule, plan.stages[0].prune_layer, quotas,
                                 STEPS)
    pos, _ = qwen_vl.rope_index(mm.numpy(), grids.numpy())
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    packed = np.zeros((*embeds.shape[:2], (1 + len(levels)) * embeds.shape[-1]), np.float32)
    packed[..., :embeds.shape[-1]] = embeds.numpy()
    packed[0, is_img, embeds.shape[-1]:] = torch.cat(levels, dim=-1).numpy()
    weight = model.model.language_model.embed_tokens.weight.detach().numpy()
    weight = np.concatenate([weight, np.zeros((weight.shape[0], packed.shape[-1] - weight.shape[1]), np.float32)], 1)
    logits, seq_lens = onnx_generate(sessions, weight, packed, pos, is_img, counts, quotas, STEPS)
    t, n = ids.shape[1], int(is_img.sum())
    assert seq_lens["attention_mask.1"] == t - n + sum(quotas) == t - n + len(kept)
    if rule == "dart":  # every image keeps its own share
        starts = np.flatnonzero(is_img)[np.cumsum([0, *counts[:-1]])]
        assert [sum(1 for p in kept if s <= p < s + c) for s, c in zip(starts, counts)] == quotas
    assert np.abs(logits[0] - ref_logits[0]).max() < 1e-3  # prefill
    assert logits.argmax(-1).tolist() == ref_logits.argmax(-1).tolist()
    assert np.abs(logits - ref_logits).max() < 1e-3


def test_planes_must_follow_the_kept_tokens(qwen3, prompt, graphs):
    """The same graphs fed planes shifted by one image token (misaligned DeepStack) give logits far
    from the reference: the parity above depends on the planes travelling with their tokens."""
    model, _, _ = qwen3
    ids, embeds, levels, grids, counts = prompt
    _, sessions = graphs["dart-layer0"]
    is_img = (ids[0] == model.config.image_token_id).numpy()
    quotas = dart_quotas(counts, TokenBudget(keep=0.5))
    mm = torch.from_numpy(is_img.astype(np.int64))[None]
    ref_logits, _ = reference(model, embeds, levels, model.model.get_rope_index(ids, mm, image_grid_thw=grids)[0],
                              is_img, "dart", 0, quotas, 1)
    pos, _ = qwen_vl.rope_index(mm.numpy(), grids.numpy())
    packed = np.zeros((*embeds.shape[:2], (1 + len(levels)) * embeds.shape[-1]), np.float32)
    packed[..., :embeds.shape[-1]] = embeds.numpy()
    packed[0, is_img, embeds.shape[-1]:] = np.roll(torch.cat(levels, dim=-1).numpy(), 1, axis=0)
    logits, _ = onnx_generate(sessions, None, packed, pos, is_img, counts, quotas, 1)
    assert np.abs(logits[0] - ref_logits[0]).max() > 1e-2


@pytest.mark.slow
def test_dart_artifact_run_and_verify_match_the_reference(qwen3, tmp_path, capsys):
    """`tokedge export --method dart --keep 0.5` of the Qwen3-VL checkpoint, then `tokedge run` on two
    images: the runtime's own preprocessing, prompt, per-image quotas (image_span / image_quota) and
    packed DeepStack rows give the reference's greedy tokens, prefill and step logits (< 1e-3), ceil(n/2)
    tokens per image; `tokedge verify --checkpoint` recomputes the export's cases from the checkpoint."""
    from transformers import Qwen2VLImageProcessorPil

    from tokedge.cli import main
    from tokedge.export.pipeline import ExportConfig, export
    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.layouts import prompt_inputs
    from tokedge.runtime.pipeline import Pipeline

    model, _, ckpt = qwen3
    art = tmp_path / "dart"
    export(ExportConfig(model=str(ckpt), out=art, method="dart", keep=0.5))
    images = [_image(w, h, seed=i + 3) for i, (w, h) in enumerate(SIZES)]
    proc = Qwen2VLImageProcessorPil.from_pretrained(ckpt)(images=images, return_tensors="pt")
    counts = [int(g.prod()) // 4 for g in proc["image_grid_thw"]]
    with Pipeline.load(art) as pipe:
        inputs = prompt_inputs(pipe.manifest, images)
        enc = pipe.encoder.encode(["What differs?"], [[x.tokens for x in inputs]])
        gen = generate(pipe.graphs, inputs, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=STEPS),
                       stop_at_eos=False, keep_logits=True, images_per_row=[2])
    ids = torch.from_numpy(enc.input_ids)
    is_img = (ids[0] == model.config.image_token_id).numpy()
    assert [x.tokens for x in inputs] == counts and gen.visual_tokens == sum((n + 1) // 2 for n in counts)
    with torch.no_grad():
        out = model.model.get_image_features(proc["pixel_values"], proc["image_grid_thw"])
        embeds = model.model.language_model.embed_tokens(ids).clone()
    embeds[0, is_img] = torch.cat(out.pooler_output)
    levels = [torch.cat(level) for level in out.deepstack_features]
    pos, _ = model.model.get_rope_index(ids, torch.from_numpy(is_img.astype(np.int64))[None],
                                        image_grid_thw=proc["image_grid_thw"])
    ref_logits, _ = reference(model, embeds, levels, pos, is_img, "dart", 2, dart_quotas(counts, TokenBudget(keep=0.5)),
                              STEPS)
    logits = np.stack([gen.prefill_logits[0], *[s[0] for s in gen.step_logits]])[:STEPS]
    assert gen.token_ids[0] == ref_logits.argmax(-1).tolist()
    assert np.abs(logits - ref_logits).max() < 1e-3
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    assert main(["run", str(art), "--image", str(tmp_path / "0.png"), "--image", str(tmp_path / "1.png"),
                 "--prompt", "What differs?", "--max-new-tokens", str(STEPS), "--json"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["visual_tokens"] == gen.visual_tokens and run["token_ids"]  # greedy; stops early only at EOS
    assert run["token_ids"] == gen.token_ids[0][:len(run["token_ids"])]
    assert main(["verify", str(art), "--checkpoint", str(ckpt)]) == 0
    assert "tokens match" in capsys.readouterr().err
