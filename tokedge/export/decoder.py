"""Decoder-only language models (Llama, Mistral, Qwen2 layouts) with an explicit KV cache.

Weights are transformers' own modules; the forward is written here so the traced graph has the
documented contract: explicit past/present tensors, padding masks over past+seq, caller-supplied
position ids, and logits for the last position only. In-LLM pruning (FastV, PDrop, DART) adds a
prefill graph that shortens the sequence at its pruning layers, and groups of layers whose caches
have their own lengths and masks.
"""

from __future__ import annotations

import torch
from torch import nn

from tokedge.export.primitives import apply_rotary, grouped_attention, merge_heads, repeat_kv, split_heads
from tokedge.reduce.base import Signal
from tokedge.reduce.in_llm import (
    Plan,
    dart_select,
    dart_span_select,
    keep_positions,
    remap_positions,
    select_top_image_tokens,
)


def causal_bias(attention_mask: torch.Tensor, seq: int, blocks: torch.Tensor | None = None,
                window: int | None = None) -> torch.Tensor:
    """[b, total] padding mask -> [b, 1, seq, total] additive fp32 bias (0 or a large negative); the
    new tokens are the last `seq` positions. `blocks` [b, seq] (Gemma 3): the image each new token
    belongs to (-1: text); tokens of one image also see each other ahead (bidirectional; keys before
    the new tokens count as text). `window`: keys more than `window - 1` places back are hidden (a
    sliding-window layer; applied after the image rule, as transformers' masks)."""
    total = attention_mask.shape[1]
    key_pos = torch.arange(total, device=attention_mask.device)
    query_pos = torch.arange(seq, device=attention_mask.device) + (total - seq)
    allowed = (key_pos[None, :] <= query_pos[:, None])[None, None]
    if blocks is not None:
        earlier = torch.zeros_like(attention_mask[:, : total - seq]) - 1
        key_blocks = torch.cat([earlier, blocks.to(attention_mask.dtype)], dim=1)
        same = (blocks[:, :, None].to(key_blocks.dtype) == key_blocks[:, None, :]) & (blocks[:, :, None] >= 0)
        allowed = allowed | same[:, None]
    if window is not None:
        allowed = allowed & (key_pos[None, :] > query_pos[:, None] - window)[None, None]
    allowed = allowed & (attention_mask[:, None, None, :] > 0)
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min / 2)


class _Layers(nn.Module):
    """`levels` > 0 (Qwen3-VL DeepStack): embedding rows are packed `(1 + levels) * hidden` wide, the
    token's embedding then one plane per level (zeros for text); plane l is added to the hidden
    states after layer l, as transformers' `hidden[visual_pos_masks] += deepstack_l` (docs/artifact.md)."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module, levels: int = 0):
        super().__init__()
        cfg = language_model.config
        self.levels = levels
        self.hidden = cfg.hidden_size
        self.layers = language_model.layers
        self.norm = language_model.norm
        self.rotary = language_model.rotary_emb
        self.lm_head = lm_head
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.qk_norm = hasattr(self.layers[0].self_attn, "q_norm")  # Qwen3: RMSNorm on head_dim before rotary

    def unpack(self, inputs_embeds):
        """Packed rows -> (hidden states [b, s, hidden], planes [levels, b, s, hidden] or None).
        Unpacked rows (hidden wide: transformers' own embeddings in references) carry no planes."""
        if not self.levels or inputs_embeds.shape[-1] == self.hidden:
            return inputs_embeds, None
        packed = inputs_embeds.reshape(inputs_embeds.shape[0], inputs_embeds.shape[1], 1 + self.levels, self.hidden)
        packed = packed.permute(2, 0, 1, 3)
        return packed[0], packed[1:]

    def deepstack(self, i, x, planes):
        """After layer i: add DeepStack plane i (zero rows at text positions change nothing)."""
        return x if planes is None or i >= self.levels else x + planes[i].to(x.dtype)

    def qkv(self, layer, x, cos, sin):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q, k = split_heads(attn.q_proj(h), self.head_dim), split_heads(attn.k_proj(h), self.head_dim)
        if self.qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        v = split_heads(attn.v_proj(h), self.head_dim)
        return q, k, v

    def run_layer(self, layer, x, q, k, v, bias):
        o = grouped_attention(q, k, v, self.scale, bias, self.n_kv, self.n_heads // self.n_kv, self.head_dim)
        x = x + layer.self_attn.o_proj(merge_heads(o))
        return x + layer.mlp(layer.post_attention_layernorm(x))

    # hooks for decoders whose layers differ in rotary tables and masks (Gemma 3's sliding layers)
    blocks = False  # the graph takes `token_blocks` [b, s] after `position_ids` (bidirectional images)

    def rope(self, x, position_ids):
        """Rotary tables for every layer (one pair shared by all here); `rope_of` picks layer i's."""
        return self.rotary(x, position_ids)

    def rope_of(self, rope, i: int):
        return rope

    def bias(self, mask, seq: int, blocks=None):
        """The attention biases of every layer (one shared here); `bias_of` picks layer i's."""
        return causal_bias(mask, seq, blocks)

    def bias_of(self, bias, i: int):
        return bias

    def logits(self, x):
        return self.lm_head(self.norm(x[:, -1:, :])).float()


class KVDecoder(_Layers):
    """One decode call. forward(inputs_embeds [b,s,h], *masks, position_ids [b,s], *past) ->
    (logits [b,1,vocab], *present). `masks` holds one padding mask per layer group (one group
    without in-LLM pruning): [b, past_g + s]. past/present alternate key, value per layer, each
    [b, kv_heads, past_g(+s), head_dim]."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module, plan: Plan | None = None, levels: int = 0):
        super().__init__(language_model, lm_head, levels)
        self.group = [plan.group_of(i) if plan else 0 for i in range(len(self.layers))]
        self.n_groups = max(self.group) + 1

    def forward(self, inputs_embeds, *rest):
        masks, position_ids = rest[: self.n_groups], rest[self.n_groups]
        blocks = rest[self.n_groups + 1] if self.blocks else None
        past = rest[self.n_groups + 1 + int(self.blocks):]
        x, planes = self.unpack(inputs_embeds)
        biases = [self.bias(m, x.shape[1], blocks) for m in masks]
        rope = self.rope(x, position_ids)
        presents = []
        for i, layer in enumerate(self.layers):
            q, k, v = self.qkv(layer, x, *self.rope_of(rope, i))
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            x = self.run_layer(layer, x, q, k, v, self.bias_of(biases[self.group[i]], i))
            x = self.deepstack(i, x, planes)
        return (self.logits(x), *presents)


def gather_sequence(position_ids, keep):
    """Keep the columns `keep` [b, k] of position ids [b, t] or M-RoPE position ids [3, b, t]."""
    if position_ids.dim() == 3:
        return torch.gather(position_ids, 2, keep.unsqueeze(0).expand(position_ids.shape[0], -1, -1))
    return torch.gather(position_ids, 1, keep)


class PruningPrefill(_Layers):
    """The prefill of an in-LLM method: forward(inputs_embeds [b,t,h], attention_mask [b,t],
    position_ids [b,t] (or M-RoPE [3,b,t]), image_positions [b,n], image_keep [stages]
    [, image_span [b,n], image_quota [b,n]]) -> (logits, *present, *group_masks).
    `image_positions` are every image token of each row (all images of its prompt; `n` varies per
    call), `image_keep[s]` how many stage `s` keeps (a graph input: the runtime passes the plan's
    per-image keep times the prompt's image count, or the sum of the per-image counts). With
    `spans=True` (dynamic-resolution families) DART keeps `image_quota` tokens of each image span
    (`image_span` = the image each image token belongs to, `dart_span_select`). A stage with
    score_layer -1 prunes before layer 0 on the embeddings themselves (DART's embedding level,
    as TensorRT Edge-LLM). Present tensors of group g have the sequence length after g pruning
    stages; group_masks are the padding masks of groups 1.. (group 0's is the input mask)."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module, plan: Plan, spans: bool = False,
                 levels: int = 0):
        super().__init__(language_model, lm_head, levels)
        self.plan = plan
        self.spans = spans

    def _scores(self, layer, x, cos, sin, bias, rule):
        """Last-token attention row of `layer` over the current sequence (mean over heads; `bias` the
        layer's [b, 1, t, t] attention bias: its last row is the padding mask, and a sliding-window
        layer's window), or for LLM_KEY_NORM (DART) the L1 norm of the layer's keys: [b, t]."""
        q, k, _ = self.qkv(layer, x, cos, sin)
        if rule == Signal.LLM_KEY_NORM:
            return k.float().abs().sum(dim=(1, 3))
        k = repeat_kv(k, self.n_heads // self.n_kv)
        scores = torch.matmul(q[:, :, -1:].float(), k.float().transpose(-1, -2)) * self.scale
        scores = scores + bias[:, :, -1:, :]
        return torch.softmax(scores, dim=-1)[:, :, 0].mean(dim=1)  # indexing, not squeeze: no If in ONNX

    def _select(self, stage, score, x, mask, img, keep, span, quota):
        if stage.rule != Signal.LLM_KEY_NORM:
            return select_top_image_tokens(score, img, keep)
        if self.spans:
            half = self.plan.pivots // 2
            return dart_span_select(score, x, img, span, quota, mask, keep, half, self.plan.pivots - half)
        return dart_select(score, x, img, mask, keep, self.plan.pivots)

    def forward(self, inputs_embeds, attention_mask, position_ids, image_positions, image_keep, *extra):
        """`extra`: `token_blocks` [b, t] first when the decoder takes them (`blocks`), then DART's
        `image_span`, `image_quota` on span families."""
        blocks = extra[0] if self.blocks else None
        image_span, image_quota = (tuple(extra[int(self.blocks):]) + (None, None))[:2]
        (x, planes), mask, pos, img = self.unpack(inputs_embeds), attention_mask, position_ids, image_positions
        by_score = {s.score_layer: s for s in self.plan.stages}
        by_prune = {s.prune_layer: (n, s) for n, s in enumerate(self.plan.stages)}
        scores = {}
        presents, group_masks = [], []
        rope = self.rope(x, pos)
        bias = self.bias(mask, x.shape[1], blocks)
        if -1 in by_score:  # embedding level: L1 norm of the embeddings
            scores[by_score[-1].prune_layer] = x.float().abs().sum(-1)
        for i, layer in enumerate(self.layers):
            if i in by_score:
                stage = by_score[i]
                scores[stage.prune_layer] = self._scores(layer, x, *self.rope_of(rope, i), self.bias_of(bias, i),
                                                         stage.rule)
            if i in by_prune:
                n, stage = by_prune[i]
                kept = self._select(stage, scores[i], x, mask, img, image_keep[n], image_span, image_quota)
                keep = keep_positions(mask, img, kept)
                x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
                if planes is not None:  # DeepStack planes stay with their tokens
                    planes = torch.gather(planes, 2, keep[None, :, :, None].expand(planes.shape[0], -1, -1,
                                                                                   planes.shape[-1]))
                if blocks is not None:  # an image's kept tokens stay one bidirectional block
                    blocks = torch.gather(blocks, 1, keep)
                mask, pos = torch.gather(mask, 1, keep), gather_sequence(pos, keep)
                img = remap_positions(keep, kept)
                group_masks.append(mask)
                rope = self.rope(x, pos)
                bias = self.bias(mask, x.shape[1], blocks)
            q, k, v = self.qkv(layer, x, *self.rope_of(rope, i))
            presents += [k, v]
            x = self.deepstack(i, self.run_layer(layer, x, q, k, v, self.bias_of(bias, i)), planes)
        return (self.logits(x), *presents, *group_masks)

    def image_keep(self, images: int = 1) -> torch.Tensor:
        """The `image_keep` input for a prompt with `images` images: [stages] int64."""
        return torch.tensor([s.keep * images for s in self.plan.stages], dtype=torch.int64)


class TokenEmbedder(nn.Module):
    """input_ids [b, s] int64 -> inputs_embeds [b, s, hidden]."""

    def __init__(self, embed_tokens: nn.Module):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids):
        return self.embed_tokens(input_ids)
