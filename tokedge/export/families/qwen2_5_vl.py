"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): dynamic resolution, window attention, M-RoPE.

Read top to bottom: what is supported and how a config is inspected (a "dynamic_patches" visual
layout: patch and merge sizes, the pixel range, the vision window, the M-RoPE sections), how the
processor is loaded without transformers' processor class (it needs torchvision for its video
processor: tokenizer, `Qwen2VLImageProcessorPil` and the chat template are read separately), the
graph modules with their trace specs, what the manifest records, and the transformers-side
reference. `Qwen25VLFamily` at the end gathers these behind the `Family` protocol. `--method none`
only for now; reduction methods on this family come with their own references (issue 11).

Graph contract (docs/artifact.md, "dynamic resolution"; one image per vision run, t = 1):
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

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tokedge.artifact import ModelInfo, PreprocessInfo, PromptInfo, VideoInfo, VisualLayout
from tokedge.errors import InputError, UnsupportedModelError, UsageError
from tokedge.export.decoder import KVDecoder, PruningPrefill, TokenEmbedder
from tokedge.export.families import CheckpointSpec, FamilyBase, LoadedCheckpoint, register
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
from tokedge.reduce.base import Method, VisionFeatures

PATCHES, TOKENS, KEPT = "patches", "image_tokens", "kept_tokens"
MODEL_CLASS = "Qwen2_5_VLForConditionalGeneration"
SUPPORTED_TEXT = ("qwen2_5_vl_text", "qwen2_5_vl")  # the text sub-config (hub 4.x configs keep it at the top)
IMAGE_TOKEN = "<|image_pad|>"
# Qwen2VLImageProcessor's class defaults, used where preprocessor_config.json leaves a field out
DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS = 56 * 56, 28 * 28 * 1280
# the vision graph's attention is dense N x N over an image's patches; beyond this many bytes of
# scores per block the export warns (a Jetson-class device cannot hold it) and suggests --max-pixels
DENSE_ATTENTION_WARN_BYTES = 4 << 30


# --- the config (no weights) ---------------------------------------------------------------------


def _text(cfg: dict) -> dict:
    """The text model's fields: `text_config` (transformers 5), else the top level (hub 4.x files)."""
    return cfg.get("text_config") or cfg


def mrope_section(cfg: dict) -> tuple[int, ...]:
    text = _text(cfg)
    for rope in (text.get("rope_parameters"), text.get("rope_scaling"), cfg.get("rope_scaling")):
        if isinstance(rope, dict) and rope.get("mrope_section"):
            return tuple(int(v) for v in rope["mrope_section"])
    raise UnsupportedModelError("this Qwen2.5-VL config names no mrope_section (rope_parameters); it is not a "
                                "Qwen2.5-VL checkpoint tokedge can export")


def check_supported(cfg: dict) -> None:
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "qwen2_5_vl" or (archs and MODEL_CLASS not in archs):
        raise UnsupportedModelError(f"unsupported architecture {archs or cfg.get('model_type')!r}; the qwen2_5_vl "
                                    f"family reads {MODEL_CLASS} (model_type 'qwen2_5_vl') checkpoints")
    text_type = (cfg.get("text_config") or {}).get("model_type", "qwen2_5_vl_text")
    if text_type not in SUPPORTED_TEXT:
        raise UnsupportedModelError(f"unsupported language model '{text_type}' for Qwen2.5-VL; supported: "
                                    f"{', '.join(SUPPORTED_TEXT)}")
    mrope_section(cfg)


def layout_from_config(cfg: dict, min_pixels: int = DEFAULT_MIN_PIXELS,
                       max_pixels: int = DEFAULT_MAX_PIXELS) -> VisualLayout:
    """The "dynamic_patches" layout a config.json dict describes, with the image processor's pixel range."""
    vc = cfg.get("vision_config") or {}
    return VisualLayout(
        kind="dynamic_patches",
        patch_size=int(vc.get("patch_size", 14)), merge_size=int(vc.get("spatial_merge_size", 2)),
        temporal_patch_size=int(vc.get("temporal_patch_size", 2)),
        min_pixels=int(min_pixels), max_pixels=int(max_pixels),
        window_size=int(vc.get("window_size", 112)),
        fullatt_blocks=tuple(int(i) for i in vc.get("fullatt_block_indexes", (7, 15, 23, 31))),
        mrope_section=mrope_section(cfg), mrope_interleaved=False,
        vision_start_token_id=cfg.get("vision_start_token_id"), vision_end_token_id=cfg.get("vision_end_token_id"),
    )


def most_tokens(layout: VisualLayout) -> int:
    """Visual tokens of the largest image the layout allows (max_pixels in merged patch units)."""
    return int(layout.max_pixels) // (int(layout.patch_size) * int(layout.merge_size)) ** 2


def inspect_config(cfg: dict) -> CheckpointSpec:
    """Check a config.json dict is supported and describe it (pixel range: the class defaults
    until the image processor is loaded)."""
    check_supported(cfg)
    layout = layout_from_config(cfg)
    layers = _text(cfg).get("num_hidden_layers")
    return CheckpointSpec(family="qwen2_5_vl", full_tokens=most_tokens(layout), geometry=None,
                          text_layers=int(layers) if layers is not None else None, layout=layout)


def check_method(method: Method) -> None:
    """In-LLM methods prune merged tokens with their M-RoPE positions; merging inside the tower breaks
    its fixed 2x2 PatchMerger groups and 112-px attention windows."""
    if method.keeps_all or method.prunes_in_llm or (method.reduces_in_vision and method.reduce_indexed):
        return
    if method.merges_in_vit:
        raise UsageError(f"--method {method.name} cannot run on Qwen2.5-VL: its vision tower merges fixed 2x2 patch "
                         "groups (PatchMerger) and attends within fixed 112-px windows, which tokens merged inside "
                         "the tower break; use a method that acts on merged tokens (dart, fastv, pdrop)")
    if method.needs_tiles:
        raise UsageError(f"--method {method.name} shares each image's budget between a thumbnail and its tiles, and "
                         "Qwen2.5-VL sees each image as one view; use cls-attn, hiprune or visionzip")
    if method.single_view:
        raise UsageError(f"--method {method.name} is built for one view of a fixed token count and each Qwen2.5-VL "
                         "image has its own; use hiprune, cls-attn, visionzip, cdpruner, todre, divprune or pool")
    raise UsageError(f"--method {method.name} is not available for Qwen2.5-VL yet; use dart, fastv, pdrop "
                     "(in-LLM), visionzip, divprune, cls-attn, hired, hiprune, cdpruner, todre, pool, vispruner "
                     "(pre-LLM) or none")


def refuse_multistage(method: Method, plan, family: str) -> None:
    """In-LLM plans of more than one stage (pdrop) are refused on M-RoPE families: found by the family
    x method matrix (tests/matrix), their traced prefill disagrees with the reference (logits off by
    0.4-4, Qwen2.5-VL and Qwen3-VL, at every budget and pixel range tried), while one-stage plans and
    LLaVA's multi-stage plans pass; refusing beats an export that fails its own validation."""
    if plan is not None and len(plan.stages) > 1:
        raise UsageError(f"--method {method.name} prunes in {len(plan.stages)} stages, which do not yet export "
                         f"correctly for {family} (validation against the reference fails); use a one-stage "
                         "in-LLM method (fastv, dart)")


def with_max_pixels(loaded: LoadedCheckpoint, max_pixels: int) -> LoadedCheckpoint:
    """The checkpoint with the export's --max-pixels: the largest image (in pixels, after the
    processor's resize) the artifact takes; larger images are resized down to it at run time."""
    layout = loaded.spec.layout
    factor = int(layout.patch_size) * int(layout.merge_size)
    if max_pixels < max(int(layout.min_pixels), factor * factor):
        raise UsageError(f"--max-pixels {max_pixels} is below the image processor's min_pixels "
                         f"({layout.min_pixels}) or one {factor}x{factor} patch unit; pass a larger value")
    from tokedge.manifest_schema import MAX_PATCHES, MAX_PIXELS

    most = min(MAX_PIXELS, MAX_PATCHES * int(layout.patch_size) ** 2)
    if max_pixels > most:  # the manifest readers refuse more (docs/safety.md, "Limits")
        raise UsageError(f"--max-pixels {max_pixels} is beyond any image tokedge takes (at most {most})")
    layout = replace(layout, max_pixels=int(max_pixels))
    return replace(loaded, spec=replace(loaded.spec, layout=layout, full_tokens=most_tokens(layout)))


def dense_attention_warning(loaded: LoadedCheckpoint) -> str | None:
    """A warning when the vision graph's dense attention at max_pixels is beyond a small device."""
    layout, vc = loaded.spec.layout, loaded.model.config.vision_config
    patches = int(layout.max_pixels) // int(layout.patch_size) ** 2
    scores = int(vc.num_heads) * patches * patches * 4
    if scores <= DENSE_ATTENTION_WARN_BYTES:
        return None
    factor = int(layout.patch_size) * int(layout.merge_size)
    fits = int(math.sqrt(DENSE_ATTENTION_WARN_BYTES / 4 / int(vc.num_heads))) * int(layout.patch_size) ** 2
    fits = max(fits // factor**2 * factor**2, factor**2)
    return (f"images up to {layout.max_pixels} pixels give {patches} patches: the vision graph's dense attention "
            f"needs {scores / 2**30:.1f} GiB of scores per block; export with --max-pixels {fits} or less for "
            "devices with less memory")


# --- the processor, without transformers' processor class ---------------------------------------


@dataclass
class QwenProcessor:
    """What tokedge needs of `Qwen2_5_VLProcessor`: its image processor, tokenizer and chat template."""

    image_processor: Any
    tokenizer: Any
    chat_template: str | None
    image_token: str = IMAGE_TOKEN

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template,
                                                  add_generation_prompt=add_generation_prompt, tokenize=False)


def load_processor(where: str, trust_remote_code: bool = False) -> QwenProcessor:
    """`Qwen2VLImageProcessorPil` (it reads every preprocessor_config.json variant: legacy
    min/max_pixels keys or a size dict), the fast tokenizer and the processor-level chat template
    (chat_template.jinja, then chat_template.json, then the tokenizer's)."""
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil

    from tokedge.export.families.llava_onevision import _read_json, _read_text

    image_processor = Qwen2VLImageProcessorPil.from_pretrained(where)
    tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    template = _read_text(where, "chat_template.jinja") or _read_json(where, "chat_template.json").get("chat_template")
    template = template or getattr(tokenizer, "chat_template", None)
    return QwenProcessor(image_processor, tokenizer, template if isinstance(template, str) else None)


def pixel_range(image_processor) -> tuple[int, int]:
    """(min_pixels, max_pixels) of a loaded `Qwen2VLImageProcessorPil` (its size dict)."""
    size = image_processor.size
    get = size.get if isinstance(size, dict) else (lambda key: getattr(size, key, None))
    low = get("shortest_edge") or getattr(image_processor, "min_pixels", None) or DEFAULT_MIN_PIXELS
    high = get("longest_edge") or getattr(image_processor, "max_pixels", None) or DEFAULT_MAX_PIXELS
    return int(low), int(high)


def load_qwen2_5_vl(source: str, local: Path | None, *, trust_remote_code: bool = False,
                    allow_pickle: bool = False) -> LoadedCheckpoint:
    """Load model and processor pieces from a Qwen2.5-VL directory or hub id."""
    from tokedge.export.families import read_config
    from tokedge.export.families.llava import load_hf_checkpoint

    spec = inspect_config(read_config(source, local, trust_remote_code))
    model, processor = load_hf_checkpoint(MODEL_CLASS, source, local, trust_remote_code=trust_remote_code,
                                          allow_pickle=allow_pickle, load_processor=load_processor)
    ip = processor.image_processor
    vc = model.config.vision_config
    checks = [("patch_size", ip.patch_size, vc.patch_size), ("merge_size", ip.merge_size, vc.spatial_merge_size),
              ("temporal_patch_size", ip.temporal_patch_size, vc.temporal_patch_size),
              (f"the tokenizer's id of {IMAGE_TOKEN!r}", processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
               model.config.image_token_id)]
    for what, got, want in checks:
        if got != want:
            raise InputError(f"the image processor's {what} is {got!r} but the model config says {want!r}; "
                             "the checkpoint is inconsistent")
    if processor.chat_template is None:
        raise InputError(f"'{local or source}' has no chat template (chat_template.jinja); Qwen2.5-VL prompts need it")
    layout = layout_from_config(model.config.to_dict(), *pixel_range(ip))
    spec = replace(spec, layout=layout, full_tokens=most_tokens(layout),
                   text_layers=int(model.config.text_config.num_hidden_layers))
    return LoadedCheckpoint(family=FAMILY, source=source, model=model, processor=processor, path=local, spec=spec)


# --- the graph modules ----------------------------------------------------------------------------


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
        self.merge = int(visual.spatial_merge_size)
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


class QwenReducedVisionGraph(QwenVisionGraph):
    """The vision graph of a pre-LLM method on Qwen2.5-VL: forward(..., keep) -> (image_embeds
    [keep, hidden], kept_index [keep]). `keep` (0-d int64) is this image's count (the runtime's
    `TokenBudget.per_image`); `kept_index` are the merged-grid raster indices whose M-RoPE positions
    the tokens take (ascending). No CLS token: methods that rank by CLS attention get the mean
    attention each merged token receives in the last vision block (softmax over the block's keys,
    mean over heads and queries, averaged over the 4 patches of its merge unit) and that block's
    keys before rotary (mean over heads and merge unit): docs/methods.md."""

    def __init__(self, model: nn.Module, method: Method, options: dict, most: int):
        super().__init__(model)
        self.method, self.options, self.most = method, options, most  # most: the largest count fed
        self.scores = bool(method.needs)
        self.object_block = method.object_layer(options, len(self.blocks), False) \
            if "object_attention" in method.needs and method.object_layer else None

    def _signals(self, block, x, cos, sin, bias):
        n = x.shape[0]
        qkv = block.attn.qkv(x).reshape(n, 3, self.heads, self.head_dim).permute(1, 2, 0, 3)
        q, k = qkv[0].float(), qkv[1].float()
        keys = k.mean(0)  # [N, d] before rotary
        q = q * cos[0] + rotate_half(q) * sin[0]
        k = k * cos[0] + rotate_half(k) * sin[0]
        logits = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim**-0.5
        if bias is not None:
            logits = logits + bias[0]
        received = torch.softmax(logits, dim=-1).mean(0).mean(0)  # [N]: mean over heads and queries
        return received, keys

    def forward(self, pixel_values, vision_pos, window_seg, merge_restore, keep, instruction=None):
        h = self.patch_embed(pixel_values)
        cos, sin = self.rotary(h, vision_pos)
        cos, sin = cos.float()[None], sin.float()[None]
        same = window_seg[:, None] == window_seg[None, :]
        window_bias = torch.where(same, 0.0, torch.finfo(torch.float32).min / 2)[None, None]
        received = keys = held = None
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            bias = None if i in self.full else window_bias
            x = block.norm1(h)
            if i == last and self.scores:
                received, keys = self._signals(block, x, cos, sin, bias)
            if i == self.object_block:  # HiPrune's object block: the attention each token receives there
                held = self._signals(block, x, cos, sin, bias)[0]
            h = h + self._attention(block, x, cos, sin, bias)
            h = h + block.mlp(block.norm2(h))
        merged = self.merger(h)[merge_restore]  # [n, hidden], raster order of the merged grid
        n = merged.shape[0]
        vf = VisionFeatures(features=merged[None], project=lambda t: t)
        vf.grid_width = torch.div(vision_pos[:, 1].max(), self.merge, rounding_mode="floor") + 1  # merged columns
        if received is not None:  # window order, 4 rows per merge unit -> raster order of merged tokens
            vf.cls_attention = received.reshape(n, -1).mean(-1)[merge_restore][None]
            vf.keys = keys.reshape(n, -1, keys.shape[-1]).mean(1)[merge_restore][None]
            vf.received_attention = vf.cls_attention
        if held is not None:
            vf.object_attention = held.reshape(n, -1).mean(-1)[merge_restore][None]
        vf.instruction = instruction  # [hidden]: methods scoring with the prompt's text (cdpruner)
        tokens, index = self.method.reduce_indexed(vf, keep, self.options, self.most)
        return tokens[0], index[0]


def reduced_vision_trace_spec(model: nn.Module, dtype: torch.dtype = torch.float32,
                              instruction: bool = False) -> TraceSpec:
    """`QwenReducedVisionGraph`: the none vision spec plus `keep` in, `kept_index` out (and the
    prompt's text `instruction` [hidden] in, for methods that score with it)."""
    base = trace_specs(model, dtype)["vision"]
    hidden = int(model.config.text_config.hidden_size)
    n = base.example[0].shape[0]
    text = (("instruction",), (torch.randn(hidden, dtype=dtype),)) if instruction else ((), ())
    return TraceSpec(
        inputs=(*base.inputs, "keep", *text[0]), outputs=("image_embeds", "kept_index"),
        example=(*base.example, torch.tensor(n // 8, dtype=torch.int64), *text[1]),
        dynamic_axes={**base.dynamic_axes, "image_embeds": {0: KEPT}, "kept_index": {0: KEPT}},
        output_shapes={"image_embeds": (KEPT, hidden), "kept_index": (KEPT,)},
    )


def build_graph_modules(model: nn.Module) -> dict[str, nn.Module]:
    """vision, embed and decoder for `--method none` (the decoder's rotary module takes [3, b, s])."""
    lm = model.model.language_model
    return {"vision": QwenVisionGraph(model).eval(), "embed": TokenEmbedder(lm.embed_tokens).eval(),
            "decoder": KVDecoder(lm, model.lm_head).eval()}


def text_trace_specs(model: nn.Module, dtype: torch.dtype, width: int) -> dict[str, TraceSpec]:
    """`embed` and `decoder` trace specs: embedding rows `width` wide (Qwen3-VL packs DeepStack
    planes after the token's embedding), M-RoPE `position_ids [3, b, s]`, a KV cache per layer."""
    tcfg = model.config.text_config
    hidden, vocab = int(tcfg.hidden_size), int(tcfg.vocab_size)
    layers, kv_heads = int(tcfg.num_hidden_layers), int(tcfg.num_key_value_heads)
    head_dim = getattr(tcfg, "head_dim", None) or hidden // int(tcfg.num_attention_heads)
    b, s, p = 2, 3, 4
    past_in, present = kv_names(layers, "past_key_values"), kv_names(layers, "present")
    decoder_axes = {"inputs_embeds": {0: BATCH, 1: SEQ}, "position_ids": {1: BATCH, 2: SEQ},
                    "attention_mask": {0: BATCH, 1: TOTAL}, "logits": {0: BATCH}}
    decoder_axes.update({name: {0: BATCH, 2: PAST} for name in past_in})
    decoder_axes.update({name: {0: BATCH, 2: TOTAL} for name in present})
    return {
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


def trace_specs(model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, TraceSpec]:
    """Trace specs with a dynamic patch count (vision) and [3, b, s] positions (decoder)."""
    vcfg, tcfg = model.config.vision_config, model.config.text_config
    row = 3 * int(vcfg.temporal_patch_size) * int(vcfg.patch_size) ** 2
    hidden = int(tcfg.hidden_size)
    n = 64  # an 8 x 8 patch example (one full window); the axis is dynamic
    return {
        "vision": TraceSpec(
            inputs=("pixel_values", "vision_pos", "window_seg", "merge_restore"),
            outputs=("image_embeds",),
            example=(torch.randn(n, row), torch.zeros(n, 2, dtype=torch.int64),  # pixel_values stay float32
                     torch.zeros(n, dtype=torch.int64), torch.arange(n // 4, dtype=torch.int64)),
            dynamic_axes={"pixel_values": {0: PATCHES}, "vision_pos": {0: PATCHES}, "window_seg": {0: PATCHES},
                          "merge_restore": {0: TOKENS}, "image_embeds": {0: TOKENS}},
            output_shapes={"image_embeds": (TOKENS, hidden)},
        ),
        **text_trace_specs(model, dtype, hidden),
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


# --- metadata for the manifest --------------------------------------------------------------------


def model_info(loaded: LoadedCheckpoint) -> ModelInfo:
    cfg = loaded.model.config
    tc, vc = cfg.text_config, cfg.vision_config
    tok = loaded.processor.tokenizer
    eos = tc.eos_token_id if tc.eos_token_id is not None else tok.eos_token_id
    eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    gen_eos = getattr(loaded.model.generation_config, "eos_token_id", None)
    for extra in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]):
        if isinstance(extra, int) and extra not in eos_ids:
            eos_ids += (extra,)
    layout = loaded.spec.layout
    return ModelInfo(
        source=loaded.source, family="qwen2_5_vl", vision_model_type=vc.model_type, text_model_type=tc.model_type,
        vision_hidden_size=vc.hidden_size, hidden_size=tc.hidden_size, num_layers=tc.num_hidden_layers,
        num_attention_heads=tc.num_attention_heads, num_key_value_heads=tc.num_key_value_heads,
        head_dim=getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
        vocab_size=tc.vocab_size, max_position_embeddings=tc.max_position_embeddings,
        image_size=int(layout.patch_size) * int(layout.merge_size),  # one merge unit: images vary in size
        patch_size=int(layout.patch_size), bos_token_id=tok.bos_token_id, eos_token_ids=eos_ids,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tc.pad_token_id,
        image_token_id=int(cfg.image_token_id),
        sliding_window=tc.sliding_window if getattr(tc, "use_sliding_window", False) else None,
        vision_layers=int(vc.depth), vision_intermediate_size=int(vc.intermediate_size),
        intermediate_size=int(tc.intermediate_size),
    )


def preprocess_info(loaded: LoadedCheckpoint) -> PreprocessInfo:
    """The per-pixel part of the processor (resizing is the layout's smart_resize, not a fixed size)."""
    ip = loaded.processor.image_processor
    factor = int(loaded.spec.layout.patch_size) * int(loaded.spec.layout.merge_size)
    resample = getattr(ip, "resample", 3)
    return PreprocessInfo(
        do_convert_rgb=bool(getattr(ip, "do_convert_rgb", True)), do_resize=bool(getattr(ip, "do_resize", True)),
        resize_shortest_edge=None, resize_size=None, resample=int(getattr(resample, "value", resample)),
        do_center_crop=False, crop_size=(factor, factor), do_rescale=bool(getattr(ip, "do_rescale", True)),
        rescale_factor=float(getattr(ip, "rescale_factor", 1 / 255)), do_normalize=bool(getattr(ip, "do_normalize", True)),
        image_mean=tuple(float(v) for v in ip.image_mean), image_std=tuple(float(v) for v in ip.image_std),
    )


VIDEO_TOKEN = "<|video_pad|>"
VIDEO_DEFAULT_FRAMES = 8  # frames sampled when neither --frames nor --fps is given
VIDEO_MAX_FRAMES = 768  # Qwen2VLVideoProcessor's max_frames


def video_info(loaded: LoadedCheckpoint) -> VideoInfo:
    """The manifest's `video` record: kind "dynamic_patches" (frames resized and patchified with the
    layout, T frames per temporal group through the image vision graph; docs/artifact.md "video")."""
    cfg = loaded.model.config
    pre = preprocess_info(loaded)
    token_id = getattr(cfg, "video_token_id", None)
    if token_id is None:
        token_id = loaded.processor.tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
    return VideoInfo(graph="vision", video_token=VIDEO_TOKEN, video_token_id=int(token_id), frame_size=0,
                     patch_grid=0, pooled_grid=0, tokens_per_frame=0, newline="absent", resample=pre.resample,
                     rescale_factor=pre.rescale_factor, mean=pre.image_mean, std=pre.image_std,
                     default_frames=VIDEO_DEFAULT_FRAMES, max_frames=VIDEO_MAX_FRAMES, kind="dynamic_patches",
                     tokens_per_second=float(getattr(cfg.vision_config, "tokens_per_second", 4)))


def prompt_info(loaded: LoadedCheckpoint, visual_tokens: int) -> PromptInfo:
    proc = loaded.processor
    return PromptInfo(
        tokenizer_file="tokenizer.json", chat_template=proc.chat_template, image_token=IMAGE_TOKEN,
        image_token_id=int(loaded.model.config.image_token_id), visual_tokens=visual_tokens,
        special_tokens={k: v for k, v in proc.tokenizer.special_tokens_map.items() if isinstance(v, str)},
    )


# --- transformers-side reference -----------------------------------------------------------------


def render_prompt(loaded: LoadedCheckpoint, question: str, images: int = 1) -> str:
    """One user turn with `images` image items, then the question, as the chat template renders it."""
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": question}]
    return loaded.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def image_batch(loaded: LoadedCheckpoint, images: list) -> dict:
    """transformers' image processor (PIL backend) on `images` with the layout's pixel range:
    pixel_values [sum of patches, C*T*P*P] and image_grid_thw [n, 3], torch tensors."""
    layout = loaded.spec.layout
    out = loaded.processor.image_processor(
        images=list(images), size={"shortest_edge": int(layout.min_pixels), "longest_edge": int(layout.max_pixels)},
        return_tensors="pt")
    return {"pixel_values": out["pixel_values"].float(), "image_grid_thw": out["image_grid_thw"]}


def tokenize(loaded: LoadedCheckpoint, prompts: list[str], visual_tokens) -> tuple[np.ndarray, np.ndarray]:
    """Each `<|image_pad|>` expanded to its image's count (an int for every placeholder, or one
    list of counts per prompt) and tokenized, left-padded (as transformers' processor expands)."""
    tok = loaded.processor.tokenizer
    texts = []
    for i, prompt in enumerate(prompts):
        pieces = prompt.split(IMAGE_TOKEN)
        counts = visual_tokens[i] if isinstance(visual_tokens, (list, tuple)) else [visual_tokens] * (len(pieces) - 1)
        if len(counts) != len(pieces) - 1:
            raise ValueError(f"prompt {i} has {len(pieces) - 1} image placeholders for {len(counts)} counts")
        texts.append(pieces[0] + "".join(IMAGE_TOKEN * int(n) + rest for n, rest in zip(counts, pieces[1:])))
    previous = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(texts, padding=True, return_tensors="np")
    finally:
        tok.padding_side = previous
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


@torch.no_grad()
def reference_features(loaded: LoadedCheckpoint, images: list) -> torch.Tensor:
    """transformers' vision tower and merger on the images (its own processor): [1, sum T_i, hidden]."""
    batch = image_batch(loaded, images)
    out = loaded.model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    pooled = out.pooler_output if hasattr(out, "pooler_output") else out
    return torch.cat(list(pooled), dim=0)[None].float()


def embed_prompt(loaded: LoadedCheckpoint, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
    model = loaded.model
    embeds = model.get_input_embeddings()(input_ids)
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1)
    return embeds.masked_scatter(mask, image_features.to(embeds.dtype))


@torch.no_grad()
def kept_positions(loaded: LoadedCheckpoint, input_ids, grids, kept) -> torch.Tensor:
    """transformers' `get_rope_index` on the unreduced prompt (each image run expanded to its full
    count), then the columns of the text and of each image's kept merged-grid indices: the
    positions of a prompt whose runs hold only the kept tokens (one prompt, no padding)."""
    token = int(loaded.model.config.image_token_id)
    row, full, take, i, image = input_ids[0].tolist(), [], [], 0, 0
    while i < len(row):
        if row[i] != token:
            take.append(len(full))
            full.append(row[i])
            i += 1
            continue
        end = i
        while end < len(row) and row[end] == token:
            end += 1
        n = int(grids[image].prod()) // int(loaded.model.config.vision_config.spatial_merge_size) ** 2
        take.extend(len(full) + int(j) for j in kept[image])
        full.extend([token] * n)
        i, image = end, image + 1
    ids = torch.tensor([full])
    positions, _ = loaded.model.model.get_rope_index(ids, mm_token_type_ids=(ids == token).long(), image_grid_thw=grids)
    return positions[:, :, take]


def reference_logits(loaded: LoadedCheckpoint, input_ids, attention_mask, image_features, steps: int = 1,
                     images: list | None = None, kept: list | None = None):
    """transformers' LM on the spliced prompt with transformers' own M-RoPE positions
    (`get_rope_index` with `mm_token_type_ids` and the images' grids; `kept`: per image the
    merged-grid indices a pre-LLM method kept, `kept_positions`), then `steps` greedy steps at
    `last + 1` on all three rows (what `generate` does). -> (prefill logits [b, vocab], tokens
    [b, steps + 1], step logits)."""
    if not images:
        raise InputError("Qwen2.5-VL references need the prompt's images: their grids decide the M-RoPE positions")
    model = loaded.model
    grids = image_batch(loaded, images)["image_grid_thw"]
    mm = (input_ids == model.config.image_token_id).long()
    if kept is not None:
        positions = kept_positions(loaded, input_ids, grids, kept)
    else:
        positions, _ = model.model.get_rope_index(input_ids, mm_token_type_ids=mm, image_grid_thw=grids,
                                                  attention_mask=attention_mask)
    embeds = embed_prompt(loaded, input_ids, image_features)
    out = model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, use_cache=True)
    prefill = out.logits[:, -1].float()
    return (prefill, *greedy_steps(model, prefill, out.past_key_values, attention_mask, positions, steps))


def greedy_steps(model: nn.Module, prefill, past, attention_mask, positions, steps: int):
    """`steps` greedy steps of transformers' model after its prefill (`prefill` logits, `past` cache),
    each at the prompt's last position column + 1 on all three M-RoPE rows, as `generate` does.
    -> (tokens [b, steps + 1], step logits)."""
    from tokedge.runtime.generate import SamplingConfig, decode_loop

    state = {"past": past, "mask": attention_mask, "pos": positions[..., -1:]}

    def step(ids):
        state["mask"] = torch.cat([state["mask"], torch.ones_like(state["mask"][:, :1])], dim=1)
        state["pos"] = state["pos"] + 1
        o = model(input_ids=torch.from_numpy(ids)[:, None], attention_mask=state["mask"], position_ids=state["pos"],
                  past_key_values=state["past"], use_cache=True)
        state["past"] = o.past_key_values
        return o.logits[:, -1].float().numpy()

    decoded = decode_loop(prefill.numpy(), step, SamplingConfig(max_new_tokens=steps + 1), stop_at_eos=False,
                          keep_logits=True)
    tokens = torch.tensor(decoded.tokens, dtype=torch.int64).reshape(prefill.shape[0], -1)
    return tokens, [torch.from_numpy(x) for x in decoded.step_logits]


# --- the family ------------------------------------------------------------------------------------


class Qwen25VLFamily(FamilyBase):
    """`Qwen2_5_VLForConditionalGeneration`: dynamic resolution (one token count per image size),
    window attention in the vision tower, M-RoPE positions in the decoder."""

    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    architectures = (MODEL_CLASS,)

    def inspect(self, config: dict) -> CheckpointSpec:
        return inspect_config(config)

    def check_method(self, method: Method) -> None:
        check_method(method)

    def load(self, source: str, local: Path | None, *, trust_remote_code: bool = False,
             allow_pickle: bool = False) -> LoadedCheckpoint:
        return load_qwen2_5_vl(source, local, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

    def with_max_pixels(self, loaded: LoadedCheckpoint, max_pixels: int) -> LoadedCheckpoint:
        return with_max_pixels(loaded, max_pixels)

    def export_warnings(self, loaded: LoadedCheckpoint) -> list[str]:
        warning = dense_attention_warning(loaded)
        return [warning] if warning else []

    def modules(self, loaded: LoadedCheckpoint, method: Method, k: int, options: dict, plan=None) -> dict[str, nn.Module]:
        check_method(method)
        graphs = build_graph_modules(loaded.model)
        if method.reduces_in_vision:  # a count per image in, the kept tokens and their indices out
            graphs["vision"] = QwenReducedVisionGraph(loaded.model, method, options, k).eval()
        refuse_multistage(method, plan, "Qwen2.5-VL")
        if plan is not None:  # in-LLM: the pruning prefill and a decoder with per-group caches
            graphs.update(pruning_graph_modules(loaded.model, plan))
        return graphs

    def prefill_trace_spec(self, loaded: LoadedCheckpoint, plan, dtype=torch.float32) -> TraceSpec:
        return pruning_trace_specs(loaded.model, plan, dtype)["prefill"]

    def reference_positions(self, loaded: LoadedCheckpoint, input_ids, attention_mask, images) -> torch.Tensor:
        """transformers' M-RoPE positions [3, b, t] (`get_rope_index` with `mm_token_type_ids`)."""
        model = loaded.model
        grids = image_batch(loaded, images)["image_grid_thw"]
        mm = (input_ids == model.config.image_token_id).long()
        positions, _ = model.model.get_rope_index(input_ids, mm_token_type_ids=mm, image_grid_thw=grids,
                                                  attention_mask=attention_mask)
        return positions

    def video(self, loaded: LoadedCheckpoint, dtype=torch.float32, needs: frozenset[str] | None = None):
        """Video reuses the image vision graph (once per temporal group): (graph name, no new module,
        no new trace spec, the manifest's VideoInfo). Temporal methods are refused (not ported yet)."""
        if needs is not None:
            raise UsageError(f"temporal methods are not available for {self.name} video yet; export with "
                             "--method none (video runs unreduced)")
        return "vision", None, None, video_info(loaded)

    def vision_trace_spec(self, loaded: LoadedCheckpoint, dtype=torch.float32, vision=None) -> TraceSpec:
        if isinstance(vision, QwenReducedVisionGraph):
            return reduced_vision_trace_spec(loaded.model, dtype, vision.method.takes_instruction)
        return trace_specs(loaded.model, dtype)["vision"]

    def model_info(self, loaded: LoadedCheckpoint) -> ModelInfo:
        return model_info(loaded)

    def preprocess(self, loaded: LoadedCheckpoint) -> PreprocessInfo:
        return preprocess_info(loaded)

    def layout(self, loaded: LoadedCheckpoint) -> VisualLayout:
        return loaded.spec.layout

    def prompt(self, loaded: LoadedCheckpoint, visual_tokens: int) -> PromptInfo:
        return prompt_info(loaded, visual_tokens)

    def render_prompt(self, loaded: LoadedCheckpoint, question: str) -> str:
        return render_prompt(loaded, question)

    def render_images_prompt(self, loaded: LoadedCheckpoint, question: str, images: int = 1) -> str:
        return render_prompt(loaded, question, images)

    def pixel_values(self, loaded: LoadedCheckpoint, images: list) -> np.ndarray:
        return image_batch(loaded, images)["pixel_values"].numpy()

    def tokenize(self, loaded: LoadedCheckpoint, prompts: list[str], visual_tokens) -> tuple[np.ndarray, np.ndarray]:
        return tokenize(loaded, prompts, visual_tokens)

    def reference_features(self, loaded: LoadedCheckpoint, method: Method, images, k: int,
                           options: dict | None = None):
        """Dynamic resolution: `images` are the PIL images of one prompt -> [1, sum T_i, hidden]."""
        check_method(method)
        return reference_features(loaded, list(images))

    def reference_logits(self, loaded: LoadedCheckpoint, input_ids, attention_mask, image_features, steps: int = 1,
                         images: list | None = None, kept: list | None = None):
        return reference_logits(loaded, input_ids, attention_mask, image_features, steps, images, kept)

    @torch.no_grad()
    def reduced_reference_features(self, loaded: LoadedCheckpoint, method: Method, image, count: int,
                                   options: dict, most: int, instruction=None) -> tuple[torch.Tensor, np.ndarray]:
        """Pre-LLM methods: tokedge's torch reduced vision module (the one exported) on the image's
        runtime inputs -> (kept tokens [1, count, hidden], kept_index). A check of the tracing; the
        independent reference of the selections lives in tests/export/test_qwen_pre_llm.py."""
        from tokedge.runtime.qwen_vl import image_inputs

        x = image_inputs(image, loaded.spec.layout, preprocess_info(loaded))
        module = QwenReducedVisionGraph(loaded.model, method, options, most).eval()
        tokens, index = module(torch.from_numpy(x.pixel_values), torch.from_numpy(x.vision_pos),
                               torch.from_numpy(x.window_seg), torch.from_numpy(x.merge_restore),
                               torch.tensor(count, dtype=torch.int64), instruction)
        return tokens[None].float(), index.numpy()

    def embed_prompt(self, loaded: LoadedCheckpoint, input_ids, image_features):
        return embed_prompt(loaded, input_ids, image_features)

    def image_token_id(self, loaded: LoadedCheckpoint) -> int:
        return int(loaded.model.config.image_token_id)

    # --- the graphs straight from a transformers model (tests/export/test_qwen2_5_vl.py)
    def graph_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return build_graph_modules(model)

    def graph_trace_specs(self, model: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, TraceSpec]:
        return trace_specs(model, dtype)

    def pruning_graph_modules(self, model: nn.Module, plan) -> dict[str, nn.Module]:
        return pruning_graph_modules(model, plan)

    def reduced_vision_module(self, model: nn.Module, method: Method, options: dict, most: int) -> nn.Module:
        return QwenReducedVisionGraph(model, method, options, most).eval()

    def reduced_vision_trace_spec(self, model: nn.Module, dtype: torch.dtype = torch.float32,
                                  instruction: bool = False) -> TraceSpec:
        return reduced_vision_trace_spec(model, dtype, instruction)

    def pruning_trace_specs(self, model: nn.Module, plan, dtype: torch.dtype = torch.float32) -> dict[str, TraceSpec]:
        return pruning_trace_specs(model, plan, dtype)


FAMILY = register(Qwen25VLFamily())
