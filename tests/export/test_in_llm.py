"""In-LLM methods (fastv, pdrop, dart) against a PyTorch reference that prunes at layer K, built
from transformers' own decoder layers (eager attention supplies the attention scores) and a
DynamicCache with per-layer lengths, written here per the papers with loops over samples. The
exported prefill + decoder graphs, run by the docs-only contract client, must match its logits
across several decode steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tests.contract_client import ContractClient
from tests.export.test_parity import hf_inputs

STEPS = 5
QUESTIONS = ["Hi?", "Describe the picture in detail, please, with the colours."]


def additive(mask_rows: torch.Tensor, q_len: int) -> torch.Tensor:
    """[b, t] padding mask -> [b, 1, q, t] additive mask, causal over the last q positions."""
    b, t = mask_rows.shape
    allowed = torch.ones(q_len, t, dtype=torch.bool).tril(diagonal=t - q_len)
    allowed = allowed[None, None] & mask_rows[:, None, None, :].bool()
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min)


def last_token_attention(layer, x, cos, sin, mask4d):
    """transformers' eager attention probabilities of the last token, mean over heads: [b, t]."""
    _, weights = layer.self_attn(hidden_states=layer.input_layernorm(x), position_embeddings=(cos, sin),
                                 attention_mask=mask4d)
    return weights[:, :, -1, :].mean(dim=1)


def key_l1(layer, x, cos, sin):
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    k = attn.k_proj(h).view(x.shape[0], x.shape[1], -1, attn.head_dim).transpose(1, 2)
    q = attn.q_proj(h).view(x.shape[0], x.shape[1], -1, attn.head_dim).transpose(1, 2)
    _, k = apply_rotary_pos_emb(q, k, cos, sin)
    return k.abs().sum(dim=(1, 3))


def dart_reference(norms, hidden, img, mask, keep, pivots):
    """Per sample: pivots by key L1 norm (half image, half real text), least-similar picks."""
    out = []
    for b in range(hidden.shape[0]):
        img_b = [int(p) for p in img[b]]
        text_b = [p for p in range(hidden.shape[1]) if p not in img_b and mask[b, p] > 0]
        piv = sorted(img_b, key=lambda p: -float(norms[b, p]))[: pivots // 2]
        piv += sorted(text_b, key=lambda p: -float(norms[b, p]))[: pivots - pivots // 2]
        h = torch.nn.functional.normalize(hidden[b].float(), dim=-1)
        pool, chosen = list(img_b), []
        for i, p in enumerate(piv):
            count = keep // pivots + (1 if i < keep % pivots else 0)
            ranked = sorted(pool, key=lambda q: float(h[p] @ h[q]))[:count]
            chosen += ranked
            pool = [q for q in pool if q not in ranked]
        out.append(sorted(chosen))
    return out


@torch.no_grad()
def pruned_reference(model, embeds, mask, image_pos, stages, pivots, steps):
    """Prefill with pruning, then greedy decode: (prefill logits [b, V], step logits [b, steps, V], tokens)."""
    lm, head = model.model.language_model, model.lm_head
    lm.set_attn_implementation("eager")
    x, mask = embeds, mask.clone()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    img = [list(map(int, row)) for row in image_pos]
    cache = DynamicCache()
    layer_mask = []
    scores = {}
    for i, layer in enumerate(lm.layers):
        cos, sin = lm.rotary_emb(x, pos)
        for s in stages:
            if s["score_layer"] == i:
                if s["rule"] == "llm-key-norm":
                    scores[s["prune_layer"]] = key_l1(layer, x, cos, sin)
                else:
                    scores[s["prune_layer"]] = last_token_attention(layer, x, cos, sin, additive(mask, x.shape[1]))
        stage = next((s for s in stages if s["prune_layer"] == i), None)
        if stage is not None:
            if stage["rule"] == "llm-key-norm":
                kept = dart_reference(scores[i], x, img, mask, stage["keep"], pivots)
            else:
                kept = [sorted(sorted(img[b], key=lambda p: -float(scores[i][b, p]))[: stage["keep"]])
                        for b in range(x.shape[0])]
            keep = [sorted([p for p in range(x.shape[1]) if p not in img[b]] + kept[b]) for b in range(x.shape[0])]
            idx = torch.tensor(keep)
            x = torch.stack([x[b, idx[b]] for b in range(x.shape[0])])
            mask = torch.stack([mask[b, idx[b]] for b in range(x.shape[0])])
            pos = torch.stack([pos[b, idx[b]] for b in range(x.shape[0])])
            img = [[keep[b].index(p) for p in kept[b]] for b in range(x.shape[0])]
            cos, sin = lm.rotary_emb(x, pos)
        layer_mask.append(mask)
        x = layer(x, attention_mask=additive(mask, x.shape[1]), position_embeddings=(cos, sin),
                  past_key_values=cache, use_cache=True)
    logits = head(lm.norm(x[:, -1]))
    prefill, tokens, step_logits = logits, [logits.argmax(-1)], []
    last = pos[:, -1:]
    for _ in range(steps):
        last = last + 1
        x = lm.embed_tokens(tokens[-1][:, None])
        cos, sin = lm.rotary_emb(x, last)
        layer_mask = [torch.cat([m, torch.ones_like(m[:, :1])], dim=1) for m in layer_mask]
        for i, layer in enumerate(lm.layers):
            x = layer(x, attention_mask=additive(layer_mask[i], 1), position_embeddings=(cos, sin),
                      past_key_values=cache, use_cache=True)
        step_logits.append(head(lm.norm(x[:, -1])))
        tokens.append(step_logits[-1].argmax(-1))
    lm.set_attn_implementation("sdpa")
    return prefill.numpy(), torch.stack(step_logits, 1).numpy(), torch.stack(tokens, 1).numpy()


@pytest.mark.parametrize("method,budget,options", [
    ("fastv", 64, {}),
    ("fastv", 100, {"layer": "1"}),
    ("pdrop", 64, {}),
    ("dart", 64, {}),
    ("dart", 37, {"pivots": "4"}),
])
def test_in_llm_matches_pruning_reference(artifacts, hf_tiny, test_images, method, budget, options):
    model, processor = hf_tiny
    art = artifacts(method, budget, options=tuple(options.items()))
    client = ContractClient(art)
    stages = client.manifest["reduction"]["stages"]
    assert stages and stages[-1]["keep"] == budget
    pixel_values, ids, mask = hf_inputs(processor, test_images[:2], QUESTIONS, 576)
    with torch.no_grad():
        feats = model.model.multi_modal_projector(
            model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:])
        embeds = model.get_input_embeddings()(ids)
        embeds = embeds.masked_scatter((ids == model.config.image_token_id).unsqueeze(-1), feats)
    image_pos = torch.stack([torch.nonzero(r == model.config.image_token_id).squeeze(1) for r in ids])
    pivots = int(client.manifest["reduction"]["options"].get("pivots") or 8)
    exp_prefill, exp_steps, exp_tokens = pruned_reference(model, embeds, mask, image_pos, stages, pivots, STEPS)
    prefill, tokens = client.generate(pixel_values.numpy(), ids.numpy(), mask.numpy(), STEPS + 1)
    np.testing.assert_allclose(prefill, exp_prefill, atol=1e-3, rtol=0)
    assert tokens.tolist() == exp_tokens.tolist()


def test_in_llm_pruning_changes_the_answer_path(artifacts, hf_tiny, test_images):
    """Sanity: the pruned prefill differs from the full model's (the reference is not a no-op)."""
    _, processor = hf_tiny
    pixel_values, ids, mask = hf_inputs(processor, test_images[:1], QUESTIONS[:1], 576)
    full, _ = ContractClient(artifacts("none", 576)).generate(pixel_values.numpy(), ids.numpy(), mask.numpy(), 1)
    pruned, _ = ContractClient(artifacts("fastv", 16)).generate(pixel_values.numpy(), ids.numpy(), mask.numpy(), 1)
    assert np.abs(full - pruned).max() > 1e-3


def test_in_llm_options_validated(tiny_llava_dir, tmp_path, capsys):
    from tokedge.cli import main

    assert main(["export", str(tiny_llava_dir), "--method", "fastv", "--option", "layer=3", "--out",
                 str(tmp_path / "a")]) == 2
    assert "within 1..2" in capsys.readouterr().err
    assert main(["export", str(tiny_llava_dir), "--method", "pdrop", "--option", "layers=2,1", "--out",
                 str(tmp_path / "a")]) == 2
    assert "increasing layers" in capsys.readouterr().err
    assert main(["export", str(tiny_llava_dir), "--method", "dart", "--option", "pivots=3", "--out",
                 str(tmp_path / "a")]) == 2
    assert "even number" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
