"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): dynamic resolution, window attention, M-RoPE.

Status (issue 11, first step): the graph modules and their trace specs, `--method none` only.
The family is registered so that checkpoints are recognised, but `inspect` still refuses them
with a one-line reason: the loader, manifest records (dynamic-resolution layout, M-RoPE
positions) and the runtime pipeline come next. tests/export/test_qwen2_5_vl.py exports these
graphs (reached through the registry) and runs them with ONNX Runtime and the numpy inputs of
tokedge/runtime/qwen_vl.py against transformers.

Graph contract (docs/research/qwen-vl.md section 3.6; one image per vision run, t = 1):
- vision: `pixel_values [patches, C*T*P*P]` already in window order (`patch_order`),
  `vision_pos [patches, 2]` (row, col) of each permuted patch, `window_seg [patches]` window id per
  permuted patch, `merge_restore [tokens]` = argsort(window_index) -> `image_embeds [tokens, hidden]`
  in raster order of the merged grid. Window blocks attend inside equal `window_seg`; full blocks
  attend over the whole image. The patch count is a dynamic axis.
- embed: `input_ids [b, s]` -> `inputs_embeds [b, s, hidden]`.
- decoder: as the LLaVA decoder but `position_ids [3, b, s]` (temporal, height, width M-RoPE rows;
  the runtime computes them with `rope_index`, decode steps continue at `last + 1` on all rows).
"""

from __future__ import annotations

import torch
from torch import nn

from tokedge.errors import UnsupportedModelError
from tokedge.export.decoder import KVDecoder, PruningPrefill, TokenEmbedder
from tokedge.export.families import register
from tokedge.export.onnx_export import (
    BATCH,
    IMAGE_TOKENS,
    PAST,
    SEQ,
    TOTAL,
    TraceSpec,
    axis,
    kv_names,
    mask_name,
)
from tokedge.export.primitives import attention, rotate_half

PATCHES, TOKENS = "patches", "image_tokens"
MODEL_CLASS = "Qwen2_5_VLForConditionalGeneration"


class QwenVisionGraph(nn.Module):
    """Qwen2.5-VL's vision tower + merger on one image's window-ordered patches, with the
    grid-derived indices as inputs (no `.tolist()` on grids, no per-window Python loop)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        visual = model.model.visual
        self.patch_embed = visual.patch_embed
        self.rotary = visual.rotary_pos_emb
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.full = {int(i) for i in visual.fullatt_block_indexes}
        self.heads = int(visual.config.num_heads)
        self.head_dim = int(visual.config.hidden_size) // self.heads
        self.schedule = None  # no in-ViT merging

    def _attention(self, block, x, cos, sin, bias):
        n = x.shape[0]
        qkv = block.attn.qkv(x).reshape(n, 3, self.heads, self.head_dim).permute(1, 2, 0, 3)  # [3, H, N, d]
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        o = attention(q[None], k[None], v[None], self.head_dim**-0.5, bias)  # [1, H, N, d]
        return block.attn.proj(o[0].transpose(0, 1).reshape(n, -1))

    def forward(self, pixel_values, vision_pos, window_seg, merge_restore):
        h = self.patch_embed(pixel_values)
        cos, sin = self.rotary(h, vision_pos)  # [N, d], rows already in window order
        cos, sin = cos.float()[None], sin.float()[None]  # broadcast over heads
        same = window_seg[:, None] == window_seg[None, :]
        window_bias = torch.where(same, 0.0, torch.finfo(torch.float32).min / 2)[None, None]
        for i, block in enumerate(self.blocks):
            bias = None if i in self.full else window_bias
            h = h + self._attention(block, block.norm1(h), cos, sin, bias)
            h = h + block.mlp(block.norm2(h))
        return self.merger(h)[merge_restore]


def build_graph_modules(model: nn.Module) -> dict[str, nn.Module]:
    """vision, embed and decoder for `--method none` (the decoder's rotary module takes [3, b, s])."""
    lm = model.model.language_model
    return {"vision": QwenVisionGraph(model).eval(), "embed": TokenEmbedder(lm.embed_tokens).eval(),
            "decoder": KVDecoder(lm, model.lm_head).eval()}


def trace_specs(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, TraceSpec]:
    """Trace specs with a dynamic patch count (vision) and [3, b, s] positions (decoder)."""
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    row = 3 * int(vcfg.temporal_patch_size) * int(vcfg.patch_size) ** 2
    hidden, vocab = int(tcfg.hidden_size), int(tcfg.vocab_size)
    layers, kv_heads = int(tcfg.num_hidden_layers), int(tcfg.num_key_value_heads)
    head_dim = getattr(tcfg, "head_dim", None) or hidden // int(tcfg.num_attention_heads)
    n = 64  # an 8 x 8 patch example (one full window); the axis is dynamic
    b, s, p = 2, 3, 4
    past_in, present = kv_names(layers, "past_key_values"), kv_names(layers, "present")
    decoder_axes = {"inputs_embeds": {0: BATCH, 1: SEQ}, "position_ids": {1: BATCH, 2: SEQ},
                    "attention_mask": {0: BATCH, 1: TOTAL}, "logits": {0: BATCH}}
    decoder_axes.update({name: {0: BATCH, 2: PAST} for name in past_in})
    decoder_axes.update({name: {0: BATCH, 2: TOTAL} for name in present})
    return {
        "vision": TraceSpec(
            inputs=("pixel_values", "vision_pos", "window_seg", "merge_restore"),
            outputs=("image_embeds",),
            example=(torch.randn(n, row, dtype=dtype), torch.zeros(n, 2, dtype=torch.int64),
                     torch.zeros(n, dtype=torch.int64), torch.arange(n // 4, dtype=torch.int64)),
            dynamic_axes={"pixel_values": {0: PATCHES}, "vision_pos": {0: PATCHES}, "window_seg": {0: PATCHES},
                          "merge_restore": {0: TOKENS}, "image_embeds": {0: TOKENS}},
            output_shapes={"image_embeds": (TOKENS, hidden)},
        ),
        "embed": TraceSpec(
            inputs=("input_ids",), outputs=("inputs_embeds",), example=(torch.ones(b, 5, dtype=torch.int64),),
            dynamic_axes={"input_ids": {0: BATCH, 1: SEQ}, "inputs_embeds": {0: BATCH, 1: SEQ}},
            output_shapes={"inputs_embeds": (BATCH, SEQ, hidden)},
        ),
        "decoder": TraceSpec(
            inputs=("inputs_embeds", "attention_mask", "position_ids", *past_in),
            outputs=("logits", *present),
            example=(torch.randn(b, s, hidden, dtype=dtype), torch.ones(b, p + s, dtype=torch.int64),
                     torch.arange(p, p + s).expand(3, b, s).contiguous(),
                     *[torch.zeros(b, kv_heads, p, head_dim, dtype=dtype) for _ in past_in]),
            dynamic_axes=decoder_axes,
            output_shapes={"logits": (BATCH, 1, vocab),
                           **{name: (BATCH, kv_heads, TOTAL, head_dim) for name in present}},
        ),
    }


def pruning_graph_modules(model: nn.Module, plan) -> dict[str, nn.Module]:
    """In-LLM methods (fastv, pdrop, dart): a prefill that prunes with M-RoPE positions [3, b, t]
    (survivors keep their columns) and DART's quota per image span, and a decoder whose layer groups
    have their own cache lengths and masks."""
    lm = model.model.language_model
    return {"prefill": PruningPrefill(lm, model.lm_head, plan, spans=True).eval(),
            "decoder": KVDecoder(lm, model.lm_head, plan).eval()}


def pruning_trace_specs(model: nn.Module, plan, dtype: torch.dtype = torch.float32) -> dict[str, TraceSpec]:
    """Trace specs of `pruning_graph_modules`: prefill inputs `inputs_embeds [b, t, h]`,
    `attention_mask [b, t]`, `position_ids [3, b, t]`, `image_positions [b, n]`, `image_keep [stages]`,
    `image_span [b, n]` (which image each image token belongs to), `image_quota [b, n]` (its image's
    count); decoder inputs `inputs_embeds`, one mask per layer group, `position_ids [3, b, s]`, past."""
    tcfg = model.config.text_config
    hidden, vocab = int(tcfg.hidden_size), int(tcfg.vocab_size)
    layers, kv_heads = int(tcfg.num_hidden_layers), int(tcfg.num_key_value_heads)
    head_dim = getattr(tcfg, "head_dim", None) or hidden // int(tcfg.num_attention_heads)
    groups = [plan.group_of(i) for i in range(layers)]
    n_groups = max(groups) + 1
    masks = [mask_name(g) for g in range(n_groups)]
    past_in, present = kv_names(layers, "past_key_values"), kv_names(layers, "present")
    layer_of = [i for i in range(layers) for _ in range(2)]
    b, s, p, n = 2, 3, 4, 24
    t = n + 12
    dec_axes = {"inputs_embeds": {0: BATCH, 1: SEQ}, "position_ids": {1: BATCH, 2: SEQ}, "logits": {0: BATCH}}
    dec_axes.update({m: {0: BATCH, 1: axis(TOTAL, g)} for g, m in enumerate(masks)})
    dec_axes.update({name: {0: BATCH, 2: axis(PAST, groups[layer_of[j]])} for j, name in enumerate(past_in)})
    dec_axes.update({name: {0: BATCH, 2: axis(TOTAL, groups[layer_of[j]])} for j, name in enumerate(present)})
    mask_example = torch.ones(b, t, dtype=torch.int64)
    mask_example[1, :2] = 0
    span = (torch.arange(n) >= n // 2).to(torch.int64).expand(b, n).contiguous()
    pre_axes = {"inputs_embeds": {0: BATCH, 1: SEQ}, "attention_mask": {0: BATCH, 1: SEQ},
                "position_ids": {1: BATCH, 2: SEQ}, "image_positions": {0: BATCH, 1: IMAGE_TOKENS},
                "image_span": {0: BATCH, 1: IMAGE_TOKENS}, "image_quota": {0: BATCH, 1: IMAGE_TOKENS},
                "logits": {0: BATCH}}
    pre_axes.update({name: {0: BATCH, 2: axis(SEQ, groups[layer_of[j]])} for j, name in enumerate(present)})
    pre_axes.update({m: {0: BATCH, 1: axis(SEQ, g + 1)} for g, m in enumerate(masks[1:])})
    return {
        "prefill": TraceSpec(
            inputs=("inputs_embeds", "attention_mask", "position_ids", "image_positions", "image_keep",
                    "image_span", "image_quota"),
            outputs=("logits", *present, *masks[1:]),
            example=(torch.randn(b, t, hidden, dtype=dtype), mask_example,
                     torch.arange(t).expand(3, b, t).contiguous(),
                     torch.arange(6, 6 + n).expand(b, n).contiguous(),
                     torch.tensor([st.keep for st in plan.stages], dtype=torch.int64),
                     span, torch.full((b, n), 6, dtype=torch.int64)),
            dynamic_axes=pre_axes,
            output_shapes={"logits": (BATCH, 1, vocab),
                           **{name: (BATCH, kv_heads, axis(SEQ, groups[layer_of[j]]), head_dim)
                              for j, name in enumerate(present)},
                           **{m: (BATCH, axis(SEQ, g + 1)) for g, m in enumerate(masks[1:])}},
        ),
        "decoder": TraceSpec(
            inputs=("inputs_embeds", *masks, "position_ids", *past_in),
            outputs=("logits", *present),
            example=(torch.randn(b, s, hidden, dtype=dtype),
                     *[torch.ones(b, p + g + s, dtype=torch.int64) for g in range(n_groups)],
                     torch.arange(p, p + s).expand(3, b, s).contiguous(),
                     *[torch.zeros(b, kv_heads, p + groups[layer_of[j]], head_dim, dtype=dtype)
                       for j in range(len(past_in))]),
            dynamic_axes=dec_axes,
            output_shapes={"logits": (BATCH, 1, vocab),
                           **{name: (BATCH, kv_heads, axis(TOTAL, groups[layer_of[j]]), head_dim)
                              for j, name in enumerate(present)}},
        ),
    }


class Qwen25VLFamily:
    """Qwen2.5-VL, recognised by the registry; export is refused until the artifact path lands."""

    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    architectures = (MODEL_CLASS,)
    exportable = False  # left out of `supported()` until the artifact path lands

    def inspect(self, config: dict):
        raise UnsupportedModelError(
            f"{MODEL_CLASS} is recognised but its export is not finished yet (issue 11: graphs exist, the "
            "artifact and `tokedge run` path do not); use a LLaVA-family checkpoint for now")

    def graph_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return build_graph_modules(model)

    def graph_trace_specs(self, model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, TraceSpec]:
        return trace_specs(model, dtype)

    def pruning_graph_modules(self, model: nn.Module, plan) -> dict[str, nn.Module]:
        return pruning_graph_modules(model, plan)

    def pruning_trace_specs(self, model: nn.Module, plan, dtype: torch.dtype = torch.float32) -> dict[str, TraceSpec]:
        return pruning_trace_specs(model, plan, dtype)


FAMILY = register(Qwen25VLFamily())
