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

import math
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from tokedge.artifact import ModelInfo, VisualLayout
from tokedge.errors import InputError, UnsupportedModelError
from tokedge.export.decoder import KVDecoder, PruningPrefill, TokenEmbedder
from tokedge.export.families import CheckpointSpec, LoadedCheckpoint, register
from tokedge.export.families import qwen2_5_vl as q25
from tokedge.export.onnx_export import TraceSpec
from tokedge.export.primitives import attention, rotate_half
from tokedge.reduce.base import Method, Signal, VisionFeatures
from tokedge.runtime.qwen_vl import mrope_axis_map

PATCHES, TOKENS = "patches", "image_tokens"
MODEL_CLASS = "Qwen3VLForConditionalGeneration"
SUPPORTED_TEXT = ("qwen3_vl_text",)
# Qwen2VLImageProcessor's class defaults (patch 14) do not fit Qwen3-VL; its hub processor config
# gives 256^2 .. 4096^2 pixels, used where preprocessor_config.json leaves the range out
DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS = 65536, 16777216


# --- the config (no weights) ---------------------------------------------------------------------


def check_supported(cfg: dict) -> None:
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "qwen3_vl" or (archs and MODEL_CLASS not in archs):
        raise UnsupportedModelError(f"unsupported architecture {archs or cfg.get('model_type')!r}; the qwen3_vl "
                                    f"family reads {MODEL_CLASS} (model_type 'qwen3_vl') checkpoints")
    text = cfg.get("text_config") or {}
    text_type = text.get("model_type", "qwen3_vl_text")
    if text_type not in SUPPORTED_TEXT:
        raise UnsupportedModelError(f"unsupported language model '{text_type}' for Qwen3-VL; supported: "
                                    f"{', '.join(SUPPORTED_TEXT)}")
    vc = cfg.get("vision_config") or {}
    levels = list(vc.get("deepstack_visual_indexes", (8, 16, 24)))
    depth, layers = int(vc.get("depth", 27)), int(text.get("num_hidden_layers", 32))
    if not levels or any(not 0 <= int(i) < depth for i in levels) or len(levels) > layers:
        raise UnsupportedModelError(f"Qwen3-VL deepstack_visual_indexes {levels} must name 1..{layers} of the "
                                    f"{depth} vision blocks; this config is not one tokedge can export")
    table = int(vc.get("num_position_embeddings", 2304))
    if math.isqrt(table) ** 2 != table:
        raise UnsupportedModelError(f"Qwen3-VL num_position_embeddings {table} is not a square table; this "
                                    "config is not one tokedge can export")


def layout_from_config(cfg: dict, min_pixels: int = DEFAULT_MIN_PIXELS,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> VisualLayout:
    """The "dynamic_patches" layout of a Qwen3-VL config.json dict: full attention (no windows),
    interleaved M-RoPE, the learned position table's side and the DeepStack level count."""
    vc = cfg.get("vision_config") or {}
    return VisualLayout(
        kind="dynamic_patches",
        patch_size=int(vc.get("patch_size", 16)), merge_size=int(vc.get("spatial_merge_size", 2)),
        temporal_patch_size=int(vc.get("temporal_patch_size", 2)),
        min_pixels=int(min_pixels), max_pixels=int(max_pixels), window_size=None, fullatt_blocks=(),
        mrope_section=q25.mrope_section(cfg), mrope_interleaved=True,
        position_table=math.isqrt(int(vc.get("num_position_embeddings", 2304))),
        deepstack_levels=len(vc.get("deepstack_visual_indexes", (8, 16, 24))),
        vision_start_token_id=cfg.get("vision_start_token_id"), vision_end_token_id=cfg.get("vision_end_token_id"),
    )


def inspect_config(cfg: dict) -> CheckpointSpec:
    """Check a config.json dict is supported and describe it (pixel range: the hub defaults until
    the image processor is loaded)."""
    check_supported(cfg)
    layout = layout_from_config(cfg)
    layers = (cfg.get("text_config") or {}).get("num_hidden_layers")
    return CheckpointSpec(family="qwen3_vl", full_tokens=q25.most_tokens(layout), geometry=None,
                          text_layers=int(layers) if layers is not None else None, layout=layout)


def check_method(method: Method) -> None:
    """In-LLM methods prune merged tokens with their M-RoPE positions and DeepStack planes; merging
    inside the tower breaks its fixed 2x2 PatchMerger groups."""
    from tokedge.errors import UsageError

    if Signal.FEATURES in method.scores_with and method.reduces_in_vision:
        raise UsageError(f"--method {method.name} ranks by feature similarity, which on Qwen3-VL would mix the "
                         "DeepStack levels packed with each token and is not defined yet; use divprune (diversity of "
                         "the merger's output), visionzip, cls-attn or pool")
    if method.keeps_all or method.prunes_in_llm or (method.reduces_in_vision and method.reduce_indexed):
        return
    if method.merges_in_vit:
        raise UsageError(f"--method {method.name} cannot run on Qwen3-VL: its vision tower merges fixed 2x2 patch "
                         "groups (PatchMerger, also for each DeepStack level), which tokens merged inside the tower "
                         "break; use a method that acts on merged tokens (dart, fastv, pdrop)")
    if method.needs_tiles:
        raise UsageError(f"--method {method.name} shares each image's budget between a thumbnail and its tiles, and "
                         "Qwen3-VL sees each image as one view; use cls-attn, hiprune or visionzip")
    if method.single_view:
        raise UsageError(f"--method {method.name} is built for one view of a fixed token count and each Qwen3-VL "
                         "image has its own; use hiprune, cls-attn, visionzip, cdpruner, todre, divprune or pool")
    raise UsageError(f"--method {method.name} is not available for Qwen3-VL yet; use dart, fastv, pdrop (in-LLM), "
                     "visionzip, divprune, cls-attn, hired, hiprune, cdpruner, todre, pool (pre-LLM) or none")


def load_qwen3_vl(source: str, local: Path | None, *, trust_remote_code: bool = False,
                  allow_pickle: bool = False) -> LoadedCheckpoint:
    """Load model and processor pieces (tokenizer, `Qwen2VLImageProcessorPil`, chat template: the
    processor class needs torchvision) from a Qwen3-VL directory or hub id."""
    from tokedge.export.families import read_config
    from tokedge.export.families.llava import load_hf_checkpoint

    spec = inspect_config(read_config(source, local, trust_remote_code))
    model, processor = load_hf_checkpoint(MODEL_CLASS, source, local, trust_remote_code=trust_remote_code,
                                          allow_pickle=allow_pickle, load_processor=q25.load_processor)
    ip = processor.image_processor
    vc = model.config.vision_config
    checks = [("patch_size", ip.patch_size, vc.patch_size), ("merge_size", ip.merge_size, vc.spatial_merge_size),
              ("temporal_patch_size", ip.temporal_patch_size, vc.temporal_patch_size),
              (f"the tokenizer's id of {q25.IMAGE_TOKEN!r}",
               processor.tokenizer.convert_tokens_to_ids(q25.IMAGE_TOKEN), model.config.image_token_id)]
    for what, got, want in checks:
        if got != want:
            raise InputError(f"the image processor's {what} is {got!r} but the model config says {want!r}; "
                             "the checkpoint is inconsistent")
    if processor.chat_template is None:
        raise InputError(f"'{local or source}' has no chat template (chat_template.jinja); Qwen3-VL prompts need it")
    layout = layout_from_config(model.config.to_dict(), *q25.pixel_range(ip))
    spec = replace(spec, layout=layout, full_tokens=q25.most_tokens(layout),
                   text_layers=int(model.config.text_config.num_hidden_layers))
    return LoadedCheckpoint(family=FAMILY, source=source, model=model, processor=processor, path=local, spec=spec)


# --- the graph modules ----------------------------------------------------------------------------


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
        self.merge = int(visual.spatial_merge_size)
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


class Qwen3ReducedVisionGraph(Qwen3VisionGraph):
    """The vision graph of a pre-LLM method on Qwen3-VL: forward(..., keep) -> (image_embeds
    [keep, (1 + levels) * hidden], kept_index [keep]), as Qwen2.5-VL's (`keep` this image's run-time
    count, `kept_index` the merged-grid raster indices whose M-RoPE positions the tokens take). No CLS:
    methods ranking by CLS attention get the mean attention each merged token receives in the last
    vision block (full attention; mean over heads and queries, then over the 4 patches of its merge
    unit) and that block's keys before rotary (mean over heads and merge unit). DeepStack: the method
    acts on the packed rows, so every level gets the same operation as the features (a selection
    gathers the same rows; VisionZip's contextual tokens merge each level with the same assignment);
    a method that ranks by the embeddings themselves (divprune) ranks by the merger's output only."""

    def __init__(self, model: nn.Module, method: Method, options: dict, most: int):
        super().__init__(model)
        self.method, self.options, self.most = method, options, most  # most: the largest count fed
        self.scores = bool(method.needs)
        self.by_embeddings = Signal.EMBEDDINGS in method.scores_with
        self.object_block = method.object_layer(options, len(self.blocks), False) \
            if "object_attention" in method.needs and method.object_layer else None

    def _signals(self, block, x, cos, sin):
        n = x.shape[0]
        qkv = block.attn.qkv(x).reshape(n, 3, self.heads, self.head_dim).permute(1, 2, 0, 3)
        q, k = qkv[0].float(), qkv[1].float()
        keys = k.mean(0)  # [N, d] before rotary
        q = q * cos[0] + rotate_half(q) * sin[0]
        k = k * cos[0] + rotate_half(k) * sin[0]
        received = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.head_dim**-0.5, dim=-1)
        return received.mean(0).mean(0), keys  # [N]: mean over heads and queries

    def forward(self, pixel_values, vision_pos, interp_index, interp_weight, keep, instruction=None):
        h = self.patch_embed(pixel_values)
        h = h + (self.pos_embed(interp_index) * interp_weight[:, :, None]).sum(1).to(h.dtype)
        cos, sin = self.rotary(h, vision_pos)
        cos, sin = cos.float()[None], sin.float()[None]
        levels = [None] * len(self.deepstack)
        received = keys = held = None
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block.norm1(h)
            if i == last and self.scores:
                received, keys = self._signals(block, x, cos, sin)
            if i == self.object_block:  # HiPrune's object block: the attention each token receives there
                held = self._signals(block, x, cos, sin)[0]
            h = h + self._attention(block, x, cos, sin)
            h = h + block.mlp(block.norm2(h))
            if i in self.deepstack:
                levels[self.deepstack[i]] = self.deepstack_mergers[self.deepstack[i]](h)
        merged = self.merger(h)  # [n, hidden], raster order of the merged grid (block-major patches)
        packed = torch.cat([merged, *levels], dim=-1)
        n = merged.shape[0]
        vf = VisionFeatures(features=(merged if self.by_embeddings else packed)[None], project=lambda t: t)
        vf.grid_width = torch.div(vision_pos[:, 1].max(), self.merge, rounding_mode="floor") + 1  # merged columns
        if received is not None:  # 4 consecutive patch rows per merge unit
            vf.cls_attention = received.reshape(n, -1).mean(-1)[None]
            vf.keys = keys.reshape(n, -1, keys.shape[-1]).mean(1)[None]
            vf.received_attention = vf.cls_attention
        if held is not None:
            vf.object_attention = held.reshape(n, -1).mean(-1)[None]
        vf.instruction = instruction  # [hidden]: methods scoring with the prompt's text (cdpruner)
        tokens, index = self.method.reduce_indexed(vf, keep, self.options, self.most)
        if self.by_embeddings:  # ranked by the features: the same rows of every level
            tokens = packed[index[0]][None]
        return tokens[0], index[0]


def reduced_vision_trace_spec(model: nn.Module, dtype: torch.dtype = torch.float32,
                              instruction: bool = False) -> TraceSpec:
    """`Qwen3ReducedVisionGraph`: the none vision spec plus `keep` in, `kept_index` out (and the
    prompt's text `instruction` [hidden] in, for methods that score with it)."""
    base = trace_specs(model, dtype)["vision"]
    width = base.output_shapes["image_embeds"][-1]
    n = base.example[0].shape[0]
    hidden = int(model.config.text_config.hidden_size)
    text = (("instruction",), (torch.randn(hidden, dtype=dtype),)) if instruction else ((), ())
    return TraceSpec(
        inputs=(*base.inputs, "keep", *text[0]), outputs=("image_embeds", "kept_index"),
        example=(*base.example, torch.tensor(n // 4, dtype=torch.int64), *text[1]),
        dynamic_axes={**base.dynamic_axes, "image_embeds": {0: q25.KEPT}, "kept_index": {0: q25.KEPT}},
        output_shapes={"image_embeds": (q25.KEPT, width), "kept_index": (q25.KEPT,)},
    )


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


def build_graph_modules(model: nn.Module) -> dict[str, nn.Module]:
    """vision, embed and decoder for `--method none`."""
    lm = model.model.language_model
    levels = len(model.config.vision_config.deepstack_visual_indexes)
    return {"vision": Qwen3VisionGraph(model).eval(), "embed": PackedEmbedder(lm.embed_tokens, levels).eval(),
            "decoder": _with_rotary(KVDecoder(lm, model.lm_head, levels=levels), model).eval()}


def _with_rotary(module: nn.Module, model: nn.Module) -> nn.Module:
    """A decoder / prefill module with Qwen3-VL's interleaved M-RoPE in place of transformers' module."""
    module.rotary = _text_rotary(model)
    return module


def pruning_graph_modules(model: nn.Module, plan) -> dict[str, nn.Module]:
    """In-LLM methods (fastv, pdrop, dart): Qwen2.5-VL's pruning prefill (M-RoPE columns kept, DART's
    quota per image span) and per-group decoder, with DeepStack planes packed in the embedding rows:
    the prefill's keep gather shortens the planes with the hidden states, so layers l < levels after
    the pruning layer add plane l to the surviving image tokens only (research doc 8.6)."""
    lm = model.model.language_model
    levels = len(model.config.vision_config.deepstack_visual_indexes)
    return {"prefill": _with_rotary(PruningPrefill(lm, model.lm_head, plan, spans=True, levels=levels), model).eval(),
            "decoder": _with_rotary(KVDecoder(lm, model.lm_head, plan, levels=levels), model).eval()}


def pruning_trace_specs(model: nn.Module, plan, dtype: torch.dtype = torch.float32) -> dict[str, TraceSpec]:
    """Qwen2.5-VL's prefill / decoder trace specs with packed (1 + levels) * hidden embedding rows."""
    hidden = int(model.config.text_config.hidden_size)
    width = (1 + len(model.config.vision_config.deepstack_visual_indexes)) * hidden
    specs = q25.pruning_trace_specs(model, plan, dtype)
    for name, spec in specs.items():
        embeds = spec.example[0]
        specs[name] = replace(spec, example=(torch.randn(*embeds.shape[:-1], width, dtype=embeds.dtype),
                                             *spec.example[1:]))
    return specs


def trace_specs(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, TraceSpec]:
    """Trace specs with a dynamic patch count (vision), packed (1 + levels) * hidden embeddings and
    [3, b, s] positions (decoder)."""
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    row = int(vcfg.in_channels) * int(vcfg.temporal_patch_size) * int(vcfg.patch_size) ** 2
    levels = len(vcfg.deepstack_visual_indexes)
    width = (1 + levels) * int(tcfg.hidden_size)  # packed embedding rows
    table = int(vcfg.num_position_embeddings)
    n = 16  # a 4 x 4 patch example; the axis is dynamic
    return {
        "vision": TraceSpec(
            inputs=("pixel_values", "vision_pos", "interp_index", "interp_weight"),
            outputs=("image_embeds",),
            example=(torch.randn(n, row), torch.zeros(n, 2, dtype=torch.int64),  # pixel_values stay float32
                     torch.randint(0, table, (n, 4), dtype=torch.int64), torch.rand(n, 4, dtype=torch.float32)),
            dynamic_axes={"pixel_values": {0: PATCHES}, "vision_pos": {0: PATCHES}, "interp_index": {0: PATCHES},
                          "interp_weight": {0: PATCHES}, "image_embeds": {0: TOKENS}},
            output_shapes={"image_embeds": (TOKENS, width)},
        ),
        **q25.text_trace_specs(model, dtype, width),
    }


# --- metadata for the manifest --------------------------------------------------------------------


def model_info(loaded: LoadedCheckpoint) -> ModelInfo:
    return replace(q25.model_info(loaded), family="qwen3_vl")


# --- transformers-side reference -----------------------------------------------------------------


def split_features(features: torch.Tensor, levels: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Packed rows [..., (1 + levels) * hidden] -> (features [..., hidden], one [..., hidden] per level)."""
    parts = features.chunk(1 + levels, dim=-1)
    return parts[0], list(parts[1:])


@torch.no_grad()
def reference_features(loaded: LoadedCheckpoint, images: list) -> torch.Tensor:
    """transformers' tower, merger and DeepStack mergers on the images (its own processor), packed
    as the artifact packs them: [1, sum T_i, (1 + levels) * hidden]."""
    batch = q25.image_batch(loaded, images)
    out = loaded.model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    pooled = torch.cat(list(out.pooler_output), dim=0)
    levels = [torch.cat(list(level), dim=0) for level in out.deepstack_features]
    return torch.cat([pooled, *levels], dim=-1)[None].float()


def embed_prompt(loaded: LoadedCheckpoint, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
    """Packed prompt rows [b, s, (1 + levels) * hidden], as the artifact's embed graph and splice give
    them: transformers' token embeddings with zero planes, the packed image features at the image
    positions."""
    model = loaded.model
    embeds = model.get_input_embeddings()(input_ids)
    packed = torch.cat([embeds, embeds.new_zeros(*embeds.shape[:-1], image_features.shape[-1] - embeds.shape[-1])],
                       dim=-1)
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1)
    return packed.masked_scatter(mask, image_features.to(packed.dtype))


@torch.no_grad()
def reference_logits(loaded: LoadedCheckpoint, input_ids, attention_mask, image_features, steps: int = 1,
                     images: list | None = None, kept: list | None = None):
    """transformers' language model (its layers and `_deepstack_process`) on the spliced prompt with
    its own M-RoPE positions (`get_rope_index` with `mm_token_type_ids` and the images' grids; `kept`:
    per image the merged-grid indices a pre-LLM method kept, their unreduced columns) and the
    DeepStack levels at the image positions, then `steps` greedy steps at `last + 1` on all three
    rows, as `generate` does. -> (prefill logits [b, vocab], tokens [b, steps + 1], step logits)."""
    if not images:
        raise InputError("Qwen3-VL references need the prompt's images: their grids decide the M-RoPE positions")
    model = loaded.model
    grids = q25.image_batch(loaded, images)["image_grid_thw"]
    image = input_ids == model.config.image_token_id
    if kept is not None:
        positions = q25.kept_positions(loaded, input_ids, grids, kept)
    else:
        positions, _ = model.model.get_rope_index(input_ids, mm_token_type_ids=image.long(), image_grid_thw=grids,
                                                  attention_mask=attention_mask)
    features, levels = split_features(image_features, len(model.config.vision_config.deepstack_visual_indexes))
    embeds = model.get_input_embeddings()(input_ids).masked_scatter(image[..., None], features)
    lm = model.model.language_model
    out = lm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, use_cache=True,
             visual_pos_masks=image, deepstack_visual_embeds=[level.reshape(-1, level.shape[-1]) for level in levels])
    prefill = model.lm_head(out.last_hidden_state[:, -1]).float()
    return (prefill, *q25.greedy_steps(model, prefill, out.past_key_values, attention_mask, positions, steps))


# --- the family ------------------------------------------------------------------------------------


class Qwen3VLFamily(q25.Qwen25VLFamily):
    """`Qwen3VLForConditionalGeneration`: dynamic resolution as Qwen2.5-VL (the processor pieces,
    prompt, tokenization, --max-pixels, M-RoPE reference positions are shared), full attention with a
    learned position table in the tower, interleaved M-RoPE and DeepStack packed with the embeddings.
    Every method that builds or describes a graph is overridden here (a Qwen2.5-VL graph must never
    be inherited by accident)."""

    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    video = None  # Qwen3-VL video (timestamps in the text, no temporal M-RoPE steps) is not exported yet
    architectures = (MODEL_CLASS,)

    def inspect(self, config: dict) -> CheckpointSpec:
        return inspect_config(config)

    def check_method(self, method: Method) -> None:
        check_method(method)

    def load(self, source: str, local: Path | None, *, trust_remote_code: bool = False,
             allow_pickle: bool = False) -> LoadedCheckpoint:
        return load_qwen3_vl(source, local, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

    def modules(self, loaded: LoadedCheckpoint, method: Method, k: int, options: dict, plan=None) -> dict[str, nn.Module]:
        check_method(method)
        graphs = build_graph_modules(loaded.model)
        if method.reduces_in_vision:  # a count per image in, the kept packed rows and their indices out
            graphs["vision"] = Qwen3ReducedVisionGraph(loaded.model, method, options, k).eval()
        q25.refuse_multistage(method, plan, "Qwen3-VL")
        if plan is not None:  # in-LLM: the pruning prefill and a decoder with per-group caches
            graphs.update(pruning_graph_modules(loaded.model, plan))
        return graphs

    def prefill_trace_spec(self, loaded: LoadedCheckpoint, plan, dtype=torch.float32) -> TraceSpec:
        return pruning_trace_specs(loaded.model, plan, dtype)["prefill"]

    def vision_trace_spec(self, loaded: LoadedCheckpoint, dtype=torch.float32, vision=None) -> TraceSpec:
        if isinstance(vision, Qwen3ReducedVisionGraph):
            return reduced_vision_trace_spec(loaded.model, dtype, vision.method.takes_instruction)
        return trace_specs(loaded.model, dtype)["vision"]

    def model_info(self, loaded: LoadedCheckpoint) -> ModelInfo:
        return model_info(loaded)

    def reference_features(self, loaded: LoadedCheckpoint, method: Method, images, k: int,
                           options: dict | None = None):
        """Dynamic resolution: `images` are the PIL images of one prompt -> [1, sum T_i, (1 + levels) * hidden]."""
        check_method(method)
        return reference_features(loaded, list(images))

    def reference_logits(self, loaded: LoadedCheckpoint, input_ids, attention_mask, image_features, steps: int = 1,
                         images: list | None = None, kept: list | None = None):
        return reference_logits(loaded, input_ids, attention_mask, image_features, steps, images, kept)

    @torch.no_grad()
    def reduced_reference_features(self, loaded: LoadedCheckpoint, method: Method, image, count: int,
                                   options: dict, most: int, instruction=None):
        """Pre-LLM methods: tokedge's torch reduced vision module (the one exported) on the image's
        runtime inputs -> (kept packed rows [1, count, (1 + levels) * hidden], kept_index). A check of
        the tracing; the independent reference lives in tests/export/test_qwen3_pre_llm.py."""
        from tokedge.runtime.qwen_vl import image_inputs

        x = image_inputs(image, loaded.spec.layout, self.preprocess(loaded))
        module = Qwen3ReducedVisionGraph(loaded.model, method, options, most).eval()
        tokens, index = module(torch.from_numpy(x.pixel_values), torch.from_numpy(x.vision_pos),
                               torch.from_numpy(x.interp_index), torch.from_numpy(x.interp_weight),
                               torch.tensor(count, dtype=torch.int64), instruction)
        return tokens[None].float(), index.numpy()

    def embed_prompt(self, loaded: LoadedCheckpoint, input_ids, image_features):
        return embed_prompt(loaded, input_ids, image_features)

    def graph_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return build_graph_modules(model)

    def graph_trace_specs(self, model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, TraceSpec]:
        return trace_specs(model, dtype)

    def pruning_graph_modules(self, model: nn.Module, plan) -> dict[str, nn.Module]:
        return pruning_graph_modules(model, plan)

    def pruning_trace_specs(self, model: nn.Module, plan, dtype: torch.dtype = torch.float32) -> dict[str, TraceSpec]:
        return pruning_trace_specs(model, plan, dtype)

    def reduced_vision_module(self, model: nn.Module, method: Method, options: dict, most: int) -> nn.Module:
        return Qwen3ReducedVisionGraph(model, method, options, most).eval()

    def reduced_vision_trace_spec(self, model: nn.Module, dtype: torch.dtype = torch.float32,
                                  instruction: bool = False) -> TraceSpec:
        return reduced_vision_trace_spec(model, dtype, instruction)


FAMILY = register(Qwen3VLFamily())
