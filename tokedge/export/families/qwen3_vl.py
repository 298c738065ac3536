"""Qwen3-VL (`Qwen3VLForConditionalGeneration`): dynamic resolution, a learned position table
resampled to each grid, interleaved M-RoPE and DeepStack.

Graph contract (docs/research/qwen-vl.md sections 3.4, 4 and 5.4; one image per vision run, t = 1).
DeepStack travels PACKED with the embeddings: every embedding row is `(1 + levels) * hidden` wide,
the token's embedding followed by one DeepStack plane per level (zeros for text tokens). Splicing
image rows into the prompt, batching, in-LLM pruning gathers and decode steps then carry the planes
along with the tokens they belong to, and the runtime needs nothing Qwen3-specific.
- vision: `pixel_values [patches, C*T*P*P]` in processor (block-major) order, `vision_pos [patches, 2]`
  (row, col) of each patch, `interp_index [patches, 4]` / `interp_weight [patches, 4]` the bilinear
  taps into the flattened learned position table (tokedge/runtime/qwen_vl.py `interpolation_inputs`)
  -> `image_embeds [tokens, (1 + levels) * hidden]` in raster order of the merged grid: the merger's
  output, then the outputs of the configured intermediate blocks (`deepstack_visual_indexes`)
  through their own mergers. Full attention over the image (no windows).
- embed: `input_ids [b, s]` -> `inputs_embeds [b, s, (1 + levels) * hidden]` (zero planes).
- decoder: as the Qwen2.5-VL decoder (`position_ids [3, b, s]`, M-RoPE rows t, h, w) with the rotary
  frequencies taken from the axes INTERLEAVED (`t h w t h w ... t`) and q/k RMS norms; it splits
  `inputs_embeds` into the hidden states and the planes and adds plane l after decoder layer l, which
  is exactly transformers' `hidden[visual_pos_masks] += ds_l` (zeros elsewhere).
"""

from __future__ import annotations

import torch
from torch import nn

from tokedge.errors import UnsupportedModelError
from tokedge.export.decoder import KVDecoder, TokenEmbedder, causal_bias
from tokedge.export.families import register
from tokedge.export.onnx_export import BATCH, PAST, SEQ, TOTAL, TraceSpec, kv_names
from tokedge.export.primitives import attention, rotate_half
from tokedge.runtime.qwen_vl import mrope_axis_map

PATCHES, TOKENS = "patches", "image_tokens"
MODEL_CLASS = "Qwen3VLForConditionalGeneration"


class Qwen3VisionGraph(nn.Module):
    """Qwen3-VL's tower, merger and DeepStack mergers on one image, the grid-derived rotary
    positions and interpolation taps as inputs (no `.tolist()` on grids)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        visual = model.model.visual
        self.patch_embed = visual.patch_embed
        self.pos_embed = visual.pos_embed
        self.rotary = visual.rotary_pos_emb
        self.blocks = visual.blocks
        self.merger = visual.merger
        self.deepstack = {int(b): i for i, b in enumerate(visual.deepstack_visual_indexes)}
        self.deepstack_mergers = visual.deepstack_merger_list
        self.heads = int(visual.config.num_heads)
        self.head_dim = int(visual.config.hidden_size) // self.heads
        self.schedule = None  # no in-ViT merging

    def _attention(self, block, x, cos, sin):
        n = x.shape[0]
        qkv = block.attn.qkv(x).reshape(n, 3, self.heads, self.head_dim).permute(1, 2, 0, 3)  # [3, H, N, d]
        q, k, v = qkv[0], qkv[1], qkv[2]
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        o = attention(q[None], k[None], v[None], self.head_dim**-0.5)  # [1, H, N, d], one image: no mask
        return block.attn.proj(o[0].transpose(0, 1).reshape(n, -1))

    def forward(self, pixel_values, vision_pos, interp_index, interp_weight):
        h = self.patch_embed(pixel_values)
        h = h + (self.pos_embed(interp_index) * interp_weight[:, :, None]).sum(1).to(h.dtype)
        cos, sin = self.rotary(h, vision_pos)  # [N, d]
        cos, sin = cos.float()[None], sin.float()[None]  # broadcast over heads
        levels = [None] * len(self.deepstack)
        for i, block in enumerate(self.blocks):
            h = h + self._attention(block, block.norm1(h), cos, sin)
            h = h + block.mlp(block.norm2(h))
            if i in self.deepstack:
                levels[self.deepstack[i]] = self.deepstack_mergers[self.deepstack[i]](h)
        return torch.cat([self.merger(h), *levels], dim=-1)  # [T, (1 + levels) * hidden]


class PackedEmbedder(TokenEmbedder):
    """input_ids [b, s] -> inputs_embeds [b, s, (1 + levels) * hidden]: the token embedding, then
    zero DeepStack planes (text tokens receive no DeepStack features)."""

    def __init__(self, embed_tokens: nn.Module, levels: int):
        super().__init__(embed_tokens)
        self.levels = levels

    def forward(self, input_ids):
        x = self.embed_tokens(input_ids)
        zeros = torch.zeros_like(x).repeat(1, 1, self.levels)
        return torch.cat([x, zeros], dim=-1)


class InterleavedMRope(nn.Module):
    """Qwen3-VL's text rotary: position_ids [3, b, s] (t, h, w) -> cos, sin [b, s, head_dim].
    Frequency j rotates with axis `axes[j]` (`mrope_axis_map(..., interleaved=True)`), as
    transformers' `Qwen3VLTextRotaryEmbedding`; one GatherElements instead of strided writes."""

    def __init__(self, rotary: nn.Module, mrope_section, head_dim: int):
        super().__init__()
        self.register_buffer("inv_freq", rotary.inv_freq.detach().float().clone(), persistent=False)
        axes = torch.from_numpy(mrope_axis_map(mrope_section, head_dim, interleaved=True))
        self.register_buffer("axes", axes.view(1, 1, 1, -1), persistent=False)
        self.scaling = float(getattr(rotary, "attention_scaling", 1.0))

    def forward(self, x, position_ids):
        freqs = position_ids[..., None].float() * self.inv_freq  # [3, b, s, d/2]
        index = self.axes.expand(1, freqs.shape[1], freqs.shape[2], freqs.shape[3])
        picked = torch.gather(freqs, 0, index)[0]  # [b, s, d/2]
        emb = torch.cat((picked, picked), dim=-1)
        return (emb.cos() * self.scaling).to(x.dtype), (emb.sin() * self.scaling).to(x.dtype)


def _text_rotary(model: nn.Module) -> InterleavedMRope:
    tcfg = model.config.text_config
    head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // tcfg.num_attention_heads
    section = (tcfg.rope_parameters or {}).get("mrope_section", [24, 20, 20])
    return InterleavedMRope(model.model.language_model.rotary_emb, section, head_dim)


def split_planes(inputs_embeds: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, s, (1 + levels) * hidden] -> (hidden states [b, s, hidden], planes [levels, b, s, hidden])."""
    packed = inputs_embeds.reshape(inputs_embeds.shape[0], inputs_embeds.shape[1], 1 + levels, -1)
    packed = packed.permute(2, 0, 1, 3)
    return packed[0], packed[1:]


class DeepStackDecoder(KVDecoder):
    """One decode call with DeepStack: forward(inputs_embeds [b,s,(1+levels)*h], attention_mask
    [b,past+s], position_ids [3,b,s], *past) -> (logits, *present)."""

    def __init__(self, model: nn.Module):
        lm = model.model.language_model
        super().__init__(lm, model.lm_head)
        self.rotary = _text_rotary(model)
        self.levels = len(model.config.vision_config.deepstack_visual_indexes)

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        x, deepstack_embeds = split_planes(inputs_embeds, self.levels)
        bias = causal_bias(attention_mask, x.shape[1])
        cos, sin = self.rotary(x, position_ids)
        presents = []
        for i, layer in enumerate(self.layers):
            q, k, v = self.qkv(layer, x, cos, sin)
            k = torch.cat([past[2 * i], k], dim=2)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            presents += [k, v]
            x = self.run_layer(layer, x, q, k, v, bias)
            if i < self.levels:
                x = x + deepstack_embeds[i].to(x.dtype)
        return (self.logits(x), *presents)


def build_graph_modules(model: nn.Module) -> dict[str, nn.Module]:
    """vision, embed and decoder for `--method none`."""
    lm = model.model.language_model
    levels = len(model.config.vision_config.deepstack_visual_indexes)
    return {"vision": Qwen3VisionGraph(model).eval(), "embed": PackedEmbedder(lm.embed_tokens, levels).eval(),
            "decoder": DeepStackDecoder(model).eval()}


def trace_specs(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, TraceSpec]:
    """Trace specs with a dynamic patch count (vision), packed (1 + levels) * hidden embeddings and
    [3, b, s] positions (decoder)."""
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    row = int(vcfg.in_channels) * int(vcfg.temporal_patch_size) * int(vcfg.patch_size) ** 2
    hidden, vocab = int(tcfg.hidden_size), int(tcfg.vocab_size)
    layers, kv_heads = int(tcfg.num_hidden_layers), int(tcfg.num_key_value_heads)
    head_dim = getattr(tcfg, "head_dim", None) or hidden // int(tcfg.num_attention_heads)
    levels = len(vcfg.deepstack_visual_indexes)
    width = (1 + levels) * hidden  # packed embedding rows
    table = int(vcfg.num_position_embeddings)
    n = 16  # a 4 x 4 patch example; the axis is dynamic
    b, s, p = 2, 3, 4
    past_in, present = kv_names(layers, "past_key_values"), kv_names(layers, "present")
    decoder_axes = {"inputs_embeds": {0: BATCH, 1: SEQ}, "position_ids": {1: BATCH, 2: SEQ},
                    "attention_mask": {0: BATCH, 1: TOTAL},
                    "logits": {0: BATCH}}
    decoder_axes.update({name: {0: BATCH, 2: PAST} for name in past_in})
    decoder_axes.update({name: {0: BATCH, 2: TOTAL} for name in present})
    return {
        "vision": TraceSpec(
            inputs=("pixel_values", "vision_pos", "interp_index", "interp_weight"),
            outputs=("image_embeds",),
            example=(torch.randn(n, row, dtype=dtype), torch.zeros(n, 2, dtype=torch.int64),
                     torch.randint(0, table, (n, 4), dtype=torch.int64), torch.rand(n, 4, dtype=torch.float32)),
            dynamic_axes={"pixel_values": {0: PATCHES}, "vision_pos": {0: PATCHES}, "interp_index": {0: PATCHES},
                          "interp_weight": {0: PATCHES}, "image_embeds": {0: TOKENS}},
            output_shapes={"image_embeds": (TOKENS, width)},
        ),
        "embed": TraceSpec(
            inputs=("input_ids",), outputs=("inputs_embeds",), example=(torch.ones(b, 5, dtype=torch.int64),),
            dynamic_axes={"input_ids": {0: BATCH, 1: SEQ}, "inputs_embeds": {0: BATCH, 1: SEQ}},
            output_shapes={"inputs_embeds": (BATCH, SEQ, width)},
        ),
        "decoder": TraceSpec(
            inputs=("inputs_embeds", "attention_mask", "position_ids", *past_in),
            outputs=("logits", *present),
            example=(torch.randn(b, s, width, dtype=dtype), torch.ones(b, p + s, dtype=torch.int64),
                     torch.arange(p, p + s).expand(3, b, s).contiguous(),
                     *[torch.zeros(b, kv_heads, p, head_dim, dtype=dtype) for _ in past_in]),
            dynamic_axes=decoder_axes,
            output_shapes={"logits": (BATCH, 1, vocab),
                           **{name: (BATCH, kv_heads, TOTAL, head_dim) for name in present}},
        ),
    }


class Qwen3VLFamily:
    """Qwen3-VL, recognised by the registry; export is refused until the artifact path lands."""

    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
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


FAMILY = register(Qwen3VLFamily())
