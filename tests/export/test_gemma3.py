"""Gemma 3 against transformers' own classes: `tokedge export tiny-gemma3 --method none`
(Gemma3ForConditionalGeneration with random weights saved as a user's directory, its Gemma3Processor
with the PIL image processor) run through the torch-free runtime equals transformers' processor +
`generate` on three image sizes and a two-image prompt: the same prompt ids (each image's run framed
by `<start_of_image>` ... `<end_of_image>`), prefill logits within 1e-3, greedy tokens equal. The
prompt pass attends bidirectionally within each image and the sliding-window layers see 12 keys
(shorter than the prompts): the tests check that both change the logits, so the match is not vacuous."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.export.test_anyres_methods import textured_image

SIZES = [(480, 640), (900, 300), (1000, 1000)]
QUESTION = "What is shown in this image?"
NEW_TOKENS = 8


def _image(height: int, width: int, seed: int = 3):
    return textured_image(height, width, seed)


@pytest.fixture(scope="module")
def checkpoint(tiny_gemma3_dir):
    return tiny_gemma3_dir


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(checkpoint, backend="pil")


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory):
    from tokedge.export.pipeline import ExportConfig, export

    out = tmp_path_factory.mktemp("gemma3") / "none"
    result = export(ExportConfig(model=str(checkpoint), out=out, method="none"))
    assert result.parity["ok"]
    return out


def _batch(processor, images):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(images=[images], text=[text], return_tensors="pt")


@torch.no_grad()
def transformers_reference(hf, images):
    model, processor = hf
    batch = _batch(processor, images)
    assert "token_type_ids" in batch  # the processor marks image tokens: the model's bidirectional blocks
    logits = model(**batch).logits[0, -1].numpy()
    out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    return batch["input_ids"][0].numpy(), logits, out[0, batch["input_ids"].shape[1]:].tolist()


def tokedge_run(path, images):
    """`Pipeline.generate`, and one prefill through the runtime's own layout, encoder and generate:
    (result, prompt ids, prefill logits)."""
    from tokedge.layouts import layout_of
    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.runtime.pipeline import Pipeline

    with Pipeline.load(path) as pipe:
        result = pipe.generate(images, QUESTION, max_new_tokens=NEW_TOKENS)
        batch = layout_of(pipe.manifest).prepare([images], None, lambda b: pipe.manifest.prompt.visual_tokens)
        enc = pipe.encoder.encode([QUESTION], batch.counts)
        gen = generate(pipe.graphs, batch.inputs, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=1),
                       images_per_row=[len(images)])
    return result, enc.input_ids[0], gen.prefill_logits[0]


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for h, w in SIZES])
def test_none_matches_transformers_generate(size, artifact, hf):
    image = _image(*size)
    ids, logits, tokens = transformers_reference(hf, [image])
    result, got_ids, got_logits = tokedge_run(artifact, [image])
    np.testing.assert_array_equal(got_ids, ids)  # <start_of_image>, the run, <end_of_image> as the processor writes them
    np.testing.assert_allclose(got_logits, logits, atol=1e-3, rtol=0)
    assert result.token_ids[0][: len(tokens)] == tokens
    assert result.visual_tokens == 16


def test_two_image_prompt_matches_transformers(artifact, hf):
    """Two images: two blocks, each bidirectional within itself only."""
    images = [_image(480, 640), _image(300, 900, seed=5)]
    ids, logits, tokens = transformers_reference(hf, images)
    result, got_ids, got_logits = tokedge_run(artifact, images)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got_logits, logits, atol=1e-3, rtol=0)
    assert result.token_ids[0][: len(tokens)] == tokens
    assert result.visual_tokens == 32


@torch.no_grad()
def test_bidirectional_blocks_and_windows_change_the_logits(hf):
    """What the matches above rest on: transformers' prompt pass without token_type_ids (causal image
    tokens), or with windows wider than the prompt, gives other logits; the prompts are longer than the
    12-token window."""
    model, processor = hf
    images = [_image(480, 640), _image(300, 900, seed=5)]
    batch = _batch(processor, images)
    assert batch["input_ids"].shape[1] > 3 * model.config.text_config.sliding_window
    full = model(**batch).logits[0, -1]
    causal = model(**{k: v for k, v in batch.items() if k != "token_type_ids"}).logits[0, -1]
    assert float((full - causal).abs().max()) > 1e-2
    window = model.config.text_config.sliding_window
    for layer in model.model.language_model.layers:
        layer.self_attn.sliding_window = 10_000
    model.config.text_config.sliding_window = 10_000
    try:
        wide = model(**batch).logits[0, -1]
    finally:
        for layer in model.model.language_model.layers:
            layer.self_attn.sliding_window = window if layer.self_attn.is_sliding else None
        model.config.text_config.sliding_window = window
    assert float((full - wide).abs().max()) > 1e-2


def test_vision_graph_equals_transformers_image_features(artifact, hf):
    import onnxruntime as ort

    model, processor = hf
    pixels = processor.image_processor([_image(480, 640), _image(300, 900)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = model.model.get_image_features(pixels).pooler_output
    sess = ort.InferenceSession(str(artifact / "vision.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["image_embeds"], {"pixel_values": pixels.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)


def test_methods_without_the_signals_are_refused_in_one_line(checkpoint, tmp_path, capsys):
    from tokedge.cli import main

    for method in ("cls-attn", "tome"):
        assert main(["export", str(checkpoint), "--method", method, "--out", str(tmp_path / method)]) == 2
        err = capsys.readouterr().err.strip()
        assert "Gemma 3" in err and "divprune, pool" in err and len(err.splitlines()) == 1


# --- in-LLM methods: a loop reference on transformers' Gemma 3 layers ----------------------------------


def gemma_mask(mask, blocks, q_len: int, kind: str, window: int):
    """[b, t] padding -> [b, 1, q, t] additive mask of one Gemma 3 layer, written from transformers'
    mask functions: causal OR (the same image block, `blocks` [b, t] prompt pass only), AND (sliding
    layers) kv > q - window, AND padding."""
    t = mask.shape[1]
    q_idx, k_idx = torch.arange(t - q_len, t)[:, None], torch.arange(t)[None]
    allowed = (k_idx <= q_idx)[None, None]
    if blocks is not None:
        allowed = allowed | ((blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0))[:, None]
    if kind == "sliding_attention":
        allowed = allowed & (k_idx > q_idx - window)[None, None]
    allowed = allowed & mask[:, None, None, :].bool()
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)


def gemma_key_l1(layer, x, cos, sin):
    """DART's key norm on Gemma 3: k_proj, the per-head k_norm, then the rotary (transformers' order)."""
    from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

    attn = layer.self_attn
    h = layer.input_layernorm(x)
    k = attn.k_norm(attn.k_proj(h).view(x.shape[0], x.shape[1], -1, attn.head_dim).transpose(1, 2))
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    return k.abs().sum(dim=(1, 3))


@torch.no_grad()
def gemma_pruned_reference(model, embeds, mask, blocks, image_pos, stages, pivots, steps):
    """Prefill pruning at each stage's layer (FastV/PDrop: the last token's eager attention row of the
    score layer under that layer's own mask; DART: key norms and its pivots), the kept tokens of an
    image still one block; then greedy decode with a full DynamicCache and per-layer masks."""
    from transformers import DynamicCache

    from tests.export.test_in_llm import dart_reference, last_token_attention

    lm, head, cfg = model.model.language_model, model.lm_head, model.config.text_config
    lm.set_attn_implementation("eager")
    window, kinds = cfg.sliding_window, cfg.layer_types
    x, mask, blk = embeds, mask.clone(), blocks.clone()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    img = [list(map(int, row)) for row in image_pos]
    cache, layer_mask, scores = DynamicCache(), [], {}
    for i, layer in enumerate(lm.layers):
        cos, sin = lm.rotary_emb(x, pos, kinds[i])
        for s in stages:
            if s["score_layer"] == i:
                scores[s["prune_layer"]] = (gemma_key_l1(layer, x, cos, sin) if s["rule"] == "llm-key-norm" else
                                            last_token_attention(layer, x, cos, sin,
                                                                 gemma_mask(mask, blk, x.shape[1], kinds[i], window)))
        stage = next((s for s in stages if s["prune_layer"] == i), None)
        if stage is not None:
            if stage["rule"] == "llm-key-norm":
                kept = dart_reference(scores[i], x, img, mask, stage["keep"], pivots)
            else:
                kept = [sorted(sorted(img[b], key=lambda p: -float(scores[i][b, p]))[: stage["keep"]])
                        for b in range(x.shape[0])]
            keep = [sorted([p for p in range(x.shape[1]) if p not in img[b]] + kept[b]) for b in range(x.shape[0])]
            idx = torch.tensor(keep)
            x, mask, pos, blk = (torch.stack([t[b, idx[b]] for b in range(x.shape[0])]) for t in (x, mask, pos, blk))
            img = [[keep[b].index(p) for p in kept[b]] for b in range(x.shape[0])]
            cos, sin = lm.rotary_emb(x, pos, kinds[i])
        layer_mask.append(mask)
        x = layer(x, attention_mask=gemma_mask(mask, blk, x.shape[1], kinds[i], window), position_embeddings=(cos, sin),
                  cache=cache, use_cache=True)
    logits = head(lm.norm(x[:, -1]))
    prefill, tokens = logits, [logits.argmax(-1)]
    last = pos[:, -1:]
    for _ in range(steps):
        last = last + 1
        x = lm.embed_tokens(tokens[-1][:, None])
        layer_mask = [torch.cat([m, torch.ones_like(m[:, :1])], dim=1) for m in layer_mask]
        for i, layer in enumerate(lm.layers):
            cos, sin = lm.rotary_emb(x, last, kinds[i])
            x = layer(x, attention_mask=gemma_mask(layer_mask[i], None, 1, kinds[i], window),
                      position_embeddings=(cos, sin), cache=cache, use_cache=True)
        tokens.append(head(lm.norm(x[:, -1])).argmax(-1))
    lm.set_attn_implementation("sdpa")
    return prefill[0].numpy(), torch.stack(tokens, 1)[0].tolist()


@pytest.fixture(scope="module")
def in_llm(checkpoint, tmp_path_factory):
    from tokedge.export.pipeline import ExportConfig, export

    root = tmp_path_factory.mktemp("gemma3-in-llm")
    made = {}

    def make(method: str):
        if method not in made:
            made[method] = root / method
            export(ExportConfig(model=str(checkpoint), out=made[method], method=method, budget=IN_LLM_BUDGET))
        return made[method]

    return make


IN_LLM_BUDGET = 6  # of each image's 16 tokens
STEPS = 5


@pytest.mark.parametrize("method", ["fastv", "dart", "pdrop"])
@pytest.mark.parametrize("sizes", [[(480, 640)], [(480, 640), (900, 300)]], ids=["one image", "two images"])
def test_in_llm_prunes_and_keeps_the_image_blocks_as_the_reference(method, sizes, in_llm, hf):
    """transformers' processor ids and image features, its own Gemma 3 layers and its block ids
    (`get_block_sequence_ids_for_mask`), pruned by the loop reference above; against the exported
    prefill + decoder through the runtime: prompt ids, prefill logits within 1e-3, greedy tokens."""
    from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

    from tokedge.artifact import load_artifact
    from tokedge.layouts import layout_of
    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.runtime.pipeline import Pipeline

    model, processor = hf
    art = in_llm(method)
    manifest = load_artifact(art)
    images = [_image(*size) for size in sizes]
    batch = _batch(processor, images)
    ids = batch["input_ids"]
    stages = [dict(s, rule=getattr(s["rule"], "value", s["rule"]), keep=s["keep"] * len(images))
              for s in manifest.reduction.stages]
    with torch.no_grad():
        feats = model.model.get_image_features(batch["pixel_values"]).pooler_output
        embeds = model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == model.config.image_token_id).unsqueeze(-1), feats.reshape(-1, feats.shape[-1]))
    blocks = get_block_sequence_ids_for_mask(batch["token_type_ids"])
    image_pos = torch.nonzero(ids[0] == model.config.image_token_id).squeeze(1)[None]
    pivots = int(manifest.reduction.options.get("pivots") or 8)
    exp_prefill, exp_tokens = gemma_pruned_reference(model, embeds, batch["attention_mask"], blocks, image_pos,
                                                     stages, pivots, STEPS)
    with Pipeline.load(art) as pipe:
        prepared = layout_of(pipe.manifest).prepare([images], None, lambda b: pipe.manifest.prompt.visual_tokens)
        enc = pipe.encoder.encode([QUESTION], prepared.counts)
        gen = generate(pipe.graphs, prepared.inputs, enc.input_ids, enc.attention_mask,
                       SamplingConfig(max_new_tokens=STEPS + 1), stop_at_eos=False, images_per_row=[len(images)])
    np.testing.assert_array_equal(enc.input_ids[0], ids[0].numpy())
    np.testing.assert_allclose(gen.prefill_logits[0], exp_prefill, atol=1e-3, rtol=0)
    assert gen.token_ids[0] == exp_tokens
    assert gen.visual_tokens == IN_LLM_BUDGET * len(images)


@pytest.fixture(scope="module")
def pre_llm(checkpoint, tmp_path_factory):
    from tokedge.export.pipeline import ExportConfig, export

    root = tmp_path_factory.mktemp("gemma3-pre-llm")
    made = {}

    def make(method: str, budget: int):
        if (method, budget) not in made:
            made[method, budget] = root / f"{method}-{budget}"
            export(ExportConfig(model=str(checkpoint), out=made[method, budget], method=method, budget=budget,
                                validate=False))
        return made[method, budget]

    return make


@pytest.mark.parametrize("method,budget", [("divprune", 4), ("divprune", 9), ("pool", 4), ("pool", 1)])
def test_pre_llm_methods_on_the_pooled_tokens(method, budget, pre_llm, hf):
    """From transformers' own modules: the tower's last_hidden_state, the projector's AvgPool2d, its
    RMSNorm and projection; then a loop selection written here (divprune: greedy max-min cosine over the
    projected tokens; pool: torch's adaptive_avg_pool2d of the pooled grid, then the projector).
    Prompt ids with `budget` image tokens, the kept embeddings, prefill logits (transformers' LM with
    its bidirectional block over the kept run) and greedy tokens."""
    from tests.export.test_anyres_methods import loop_divprune
    from tokedge.layouts import layout_of
    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.runtime.pipeline import Pipeline

    model, processor = hf
    image = _image(480, 640)
    proj = model.model.multi_modal_projector
    pixels = processor.image_processor([image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = model.model.vision_tower(pixel_values=pixels).last_hidden_state  # [1, 64, d]
        side = proj.patches_per_image
        pooled = proj.avg_pool(hidden.transpose(1, 2).reshape(1, -1, side, side)).flatten(2).transpose(1, 2)[0]
        out_proj = (lambda t: torch.matmul(proj.mm_soft_emb_norm(t), proj.mm_input_projection_weight))
        if method == "divprune":
            projected = out_proj(pooled).numpy()
            expected = projected[loop_divprune(projected, budget)]
        else:
            g, s = int(pooled.shape[0] ** 0.5), int(budget**0.5)
            grid = torch.nn.functional.adaptive_avg_pool2d(pooled.T.reshape(1, -1, g, g), s)
            expected = out_proj(grid.reshape(pooled.shape[1], -1).T).numpy()
    full = processor.image_seq_length
    processor.full_image_sequence = processor.full_image_sequence.replace(processor.tokenizer.image_token * full,
                                                                          processor.tokenizer.image_token * budget)
    try:
        batch = _batch(processor, [image])
    finally:
        processor.full_image_sequence = processor.full_image_sequence.replace(
            processor.tokenizer.image_token * budget, processor.tokenizer.image_token * full)
    ids = batch["input_ids"]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == model.config.image_token_id] = torch.from_numpy(expected)
        types = batch["token_type_ids"]
        out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], token_type_ids=types, use_cache=True)
        logits, cache, mask = out.logits[0, -1], out.past_key_values, batch["attention_mask"]
        tokens = [int(logits.argmax())]  # greedy with transformers' cache (generate takes no inputs_embeds here)
        for _ in range(NEW_TOKENS - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step = model(input_ids=torch.tensor([[tokens[-1]]]), attention_mask=mask, past_key_values=cache,
                         use_cache=True)
            cache = step.past_key_values
            tokens.append(int(step.logits[0, -1].argmax()))
    with Pipeline.load(pre_llm(method, budget)) as pipe:
        result = pipe.generate(image, QUESTION, max_new_tokens=NEW_TOKENS)
        prepared = layout_of(pipe.manifest).prepare([[image]], None, lambda b: pipe.manifest.prompt.visual_tokens)
        enc = pipe.encoder.encode([QUESTION], prepared.counts)
        gen = generate(pipe.graphs, prepared.inputs, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=1))
    np.testing.assert_array_equal(enc.input_ids[0], ids[0].numpy())
    assert result.visual_tokens == budget
    np.testing.assert_allclose(np.asarray(gen.image_embeds[0]).reshape(budget, -1), expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(gen.prefill_logits[0], logits.numpy(), atol=1e-3, rtol=0)
    assert result.token_ids[0][: len(tokens)] == tokens


@pytest.mark.parametrize("method", ["none", "fastv"])
def test_contract_client_runs_framed_view_artifacts_like_tokedge(method, artifact, in_llm):
    """tests/contract_client.py (written from docs/artifact.md alone: "Framed view", `token_blocks`)
    on one image and on a two-image prompt: its prompt ids are tokedge's, its greedy tokens
    `Pipeline.generate`'s and its prefill logits within 1e-4."""
    from tests.contract_client import assert_runs_like_tokedge

    path = artifact if method == "none" else in_llm(method)
    prompts = [[_image(*size) for size in sizes] for sizes in ([(480, 640)], [(480, 640), (300, 900)])]
    assert_runs_like_tokedge(path, tokedge_run, prompts, QUESTION, NEW_TOKENS)
