"""Decoder-only language models (Llama, Mistral, Qwen2 layouts) with an explicit KV cache.

Weights are transformers' own modules; the forward is written here so the traced graph has the
documented contract: explicit past/present tensors, a padding mask over past+seq, caller-supplied
position ids, and logits for the last position only.
"""

from __future__ import annotations

import torch
from torch import nn

from tokedge.export.primitives import apply_rotary, attention, merge_heads, repeat_kv, split_heads


class KVDecoder(nn.Module):
    """forward(inputs_embeds [b,s,h], attention_mask [b,p+s], position_ids [b,s], *past) ->
    (logits [b,1,vocab], *present); past/present alternate key, value per layer, each
    [b, kv_heads, past(+s), head_dim]."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module):
        super().__init__()
        cfg = language_model.config
        self.layers = language_model.layers
        self.norm = language_model.norm
        self.rotary = language_model.rotary_emb
        self.lm_head = lm_head
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5

    def causal_bias(self, attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
        """[b, total] padding mask -> [b, 1, seq, total] additive fp32 bias (0 or a large negative)."""
        total = attention_mask.shape[1]
        key_pos = torch.arange(total, device=attention_mask.device)
        query_pos = torch.arange(seq, device=attention_mask.device) + (total - seq)
        allowed = (key_pos[None, :] <= query_pos[:, None])[None, None] & (attention_mask[:, None, None, :] > 0)
        return torch.where(allowed, 0.0, torch.finfo(torch.float32).min / 2)

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        x = inputs_embeds
        bias = self.causal_bias(attention_mask, x.shape[1])
        cos, sin = self.rotary(x, position_ids)
        presents = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = apply_rotary(split_heads(attn.q_proj(h), self.head_dim), cos, sin)
            k = apply_rotary(split_heads(attn.k_proj(h), self.head_dim), cos, sin)
            v = split_heads(attn.v_proj(h), self.head_dim)
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            groups = self.n_heads // self.n_kv
            o = attention(q, repeat_kv(k, groups), repeat_kv(v, groups), self.scale, bias)
            x = x + attn.o_proj(merge_heads(o))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.lm_head(self.norm(x[:, -1:, :])).float()
        return (logits, *presents)


class TokenEmbedder(nn.Module):
    """input_ids [b, s] int64 -> inputs_embeds [b, s, hidden]."""

    def __init__(self, embed_tokens: nn.Module):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)
