"""LLaVA-NeXT family (llava-hf layout: `LlavaNextForConditionalGeneration` + `LlavaNextProcessor`).

Read top to bottom: what is supported, how a checkpoint is inspected and loaded, the vision graph
(tower at the feature layer for every partition, projector, then the anyres packing as a weighted
gather with `image_newline` as the last row), and what the manifest records (an 'anyres' visual
layout: base view + tiles on the config's pinpoints). The packing plan itself (which feature rows
make each visual token) is computed per image from its size alone by `tokedge.runtime.layout`, so
the graph takes it as two inputs and the number of partitions and tokens stays dynamic.

`--method none` packs every token; pre-LLM methods (cls-attn, hired, visionzip, divprune) select
`--budget` tokens per image globally over the image's candidates (its packed tokens without
newlines: `ReducedAnyresVisionGraph`); in-LLM methods (fastv, pdrop, dart) take the unreduced
vision graph plus the pruning prefill; the others are refused with the reason (`check_method`).
`LlavaNextFamily` at the end gathers these behind the `Family` protocol and registers itself under
"llava_next".
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tokedge.artifact import ModelInfo, VisualLayout
from tokedge.errors import UnsupportedModelError, UsageError
from tokedge.export.decoder import KVDecoder, PruningPrefill, TokenEmbedder
from tokedge.export.families import CheckpointSpec, LoadedCheckpoint, register
from tokedge.export.families.llava import (
    LlavaFamily,
    check_kind,
    eager_tower_outputs,
    load_hf_checkpoint,
    model_info,
    vision_geometry,
)
from tokedge.export.towers import VisionTower, layers_to_feature
from tokedge.reduce.base import Method, Signal, Stage, VisionFeatures

SUPPORTED_ARCHITECTURES = ("LlavaNextForConditionalGeneration",)
SUPPORTED_VISION = ("clip_vision_model",)
SUPPORTED_TEXT = ("llama", "mistral", "qwen2")
PARTITIONS = "partitions"  # the vision graph's dynamic axis: base view + tiles of one image
CANDIDATES = "candidates"  # reduced graphs: the image's visual tokens before reduction, newlines left out


# --- the config (no weights) ---------------------------------------------------------------------


def layout_from_config(cfg: dict) -> VisualLayout:
    """The anyres layout a config.json dict describes (tile = vision image_size, pinpoints in order)."""
    vc = cfg.get("vision_config") or {}
    tile, patch = int(vc.get("image_size", 336)), int(vc.get("patch_size", 14))
    pinpoints = cfg.get("image_grid_pinpoints") or [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    pairs = tuple((int(h), int(w)) for h, w in pinpoints)
    if any(h % tile or w % tile for h, w in pairs):
        raise UnsupportedModelError(f"image_grid_pinpoints {list(pairs)} are not multiples of the tile size {tile}")
    return VisualLayout(kind="anyres", tile=tile, patch_grid=tile // patch, pinpoints=pairs, image_newline=True)


def check_supported(cfg: dict) -> None:
    check_kind(cfg, family="llava_next", architectures=SUPPORTED_ARCHITECTURES, vision=SUPPORTED_VISION,
               text=SUPPORTED_TEXT, default_vision="clip_vision_model", default_text="llama")
    if cfg.get("vision_feature_select_strategy", "default") != "default":
        raise UnsupportedModelError("LLaVA-NeXT with vision_feature_select_strategy 'full' is not supported yet")
    if not isinstance(cfg.get("vision_feature_layer", -2), int):
        raise UnsupportedModelError("multi-layer vision features (list vision_feature_layer) are not supported yet")


def inspect_config(cfg: dict) -> CheckpointSpec:
    """Check a config.json dict is supported and describe it. `full_tokens` is the largest count
    one image can give (base view + the largest pinpoint's map with a newline per row)."""
    check_supported(cfg)
    layout = layout_from_config(cfg)
    n = layout.patch_grid * layout.patch_grid
    largest = max((h // layout.tile) * (w // layout.tile) * n + (h // layout.tile) * layout.patch_grid
                  for h, w in layout.pinpoints)
    layers = (cfg.get("text_config") or {}).get("num_hidden_layers")
    return CheckpointSpec(family="llava_next", full_tokens=n + largest, geometry=vision_geometry(cfg),
                          text_layers=int(layers) if layers is not None else None, layout=layout)


# what a tiled image's candidates can supply to a pre-LLM method
CANDIDATE_SIGNALS = frozenset({Signal.CLS_ATTENTION, Signal.EARLY_CLS_ATTENTION, Signal.CLS_TOKEN, Signal.KEYS,
                               Signal.EMBEDDINGS, Signal.REGIONS, Signal.CLS_LOGITS, Signal.THUMBNAIL_GUIDE})
GUIDE_INPUTS = ("base_block", "guide_index", "guide_weight")  # Signal.THUMBNAIL_GUIDE's graph inputs


def check_method(method: Method) -> None:
    """Pre-LLM methods select globally over an image's candidates (base view + unpadded tile map),
    when everything they score with exists for candidates and their counts do not depend on the
    candidate count; in-LLM methods take the unreduced vision graph (every packed token reaches the
    LLM, the prefill prunes); the others are refused with what to use instead."""
    if method.keeps_all or method.prunes_in_llm:
        return
    if method.stage is Stage.IN_VIT:
        raise UsageError(f"--method {method.name} merges inside the vision tower, one tile at a time, and has no "
                         "per-image budget on LLaVA-NeXT; use --method visionzip (merging) or hired")
    if method.stage is not Stage.PRE_LLM:
        raise UsageError(f"--method {method.name} is not available for LLaVA-NeXT yet; use --method cls-attn, "
                         "hired, visionzip, divprune, fastv or dart")
    if Signal.POSITIONS in method.scores_with:
        raise UsageError(f"--method {method.name} pools one square patch grid and a tiled image has none; "
                         "use --method cls-attn or hired")
    if method.takes_instruction:
        raise UsageError(f"--method {method.name} scores with the prompt's text, which tiled layouts do not feed "
                         "their vision graph yet; use --method divprune (diversity) or visionzip")
    if method.single_view:
        raise UsageError(f"--method {method.name} is built for one view of a fixed token count and a tiled image's "
                         "candidate count varies per image; use --method hired, cls-attn or visionzip")
    if not set(method.scores_with) <= CANDIDATE_SIGNALS:
        raise UsageError(f"--method {method.name} is not available for LLaVA-NeXT yet (its rounds depend on the "
                         "token count); use --method divprune (diversity) or visionzip")


def load_llava_next(source: str, local: Path | None, *, trust_remote_code: bool = False,
                    allow_pickle: bool = False) -> LoadedCheckpoint:
    """Load model and processor from a llava-hf LLaVA-NeXT directory or hub id."""
    from tokedge.export.families import read_config

    spec = inspect_config(read_config(source, local, trust_remote_code))
    model, processor = load_hf_checkpoint("LlavaNextForConditionalGeneration", source, local,
                                          trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    full_config = model.config.to_dict()
    spec = replace(spec, layout=layout_from_config(full_config), geometry=vision_geometry(full_config),
                   text_layers=int(model.config.text_config.num_hidden_layers))
    return LoadedCheckpoint(family=FAMILY, source=source, model=model, processor=processor, path=local, spec=spec)


# --- the graph modules ----------------------------------------------------------------------------


class AnyresVisionGraph(nn.Module):
    """pixel_values [P, 3, S, S], pack_index [T, 4] int64, pack_weight [T, 4] float32
    -> image_embeds [1, T, hidden].

    Every partition runs the tower to the feature layer (CLS dropped) and the projector: [P, N, D].
    The rows flattened to [P*N, D], with `image_newline` appended as row P*N, are gathered by
    `pack_index` and summed with `pack_weight`: weights 1/0 give transformers' reshape, unpadding
    and newlines exactly (the plan comes from `tokedge.runtime.layout.pack_plan`).
    """

    k = None  # visual tokens per image: as many as the plan names
    extra_inputs: tuple[str, ...] = ()

    def __init__(self, loaded: LoadedCheckpoint):
        super().__init__()
        m = loaded.model.model
        cfg = loaded.model.config
        self.tower = VisionTower(m.vision_tower, cfg.vision_feature_layer, drop_cls=True, needs=frozenset())
        self.projector = m.multi_modal_projector
        self.image_newline = m.image_newline
        self.schedule = None  # no in-ViT merging

    def forward(self, pixel_values, pack_index, pack_weight):
        feats = self.projector(self.tower(pixel_values).features)  # [P, N, D]
        rows = torch.cat([feats.reshape(-1, feats.shape[-1]), self.image_newline[None].to(feats.dtype)], dim=0)
        taps = rows[pack_index]  # [T, 4, D]
        return (taps * pack_weight.to(feats.dtype)[..., None]).sum(dim=1)[None]


def gather_plan(values, index, weight):
    """values [P, N, ...] per-partition rows -> [1, C, ...]: rows of the flattened [P*N] named by a
    (candidate) plan, weighted (weights 1/0 for LLaVA-NeXT: an exact gather)."""
    rows = values.reshape(values.shape[0] * values.shape[1], -1)
    taps = rows[index]  # [C, 4, F]
    out = (taps * weight.to(rows.dtype)[..., None]).sum(dim=1)
    return out.reshape(1, index.shape[0], *values.shape[2:])


def candidate_features(vf: VisionFeatures, index, weight, project, embeddings: bool,
                       base_tile=None, guide=None) -> VisionFeatures:
    """One tiled image's tower outputs [P, N, ...] -> `VisionFeatures` over its candidates [1, C, ...]
    (base view first, then the unpadded tile map in raster order; no newline rows), so a method's
    `reduce` selects globally over all tiles. EMBEDDINGS methods see projected rows (project is
    then the identity); cls_token is the base view's; with `base_tile` [N] (the tile under each
    base-view token) the partition of every candidate and a one-hot [1, N, P-1] region map; with
    `guide` (base_block [N], guide_index [C, 4], guide_weight [C, 4]: `runtime.layout.thumbnail_guide`)
    the partitions, a one-hot [1, N, P-1] block map and each candidate's base-view logit resized."""
    n = vf.features.shape[1]
    feats = project(vf.features) if embeddings else vf.features
    out = VisionFeatures(features=gather_plan(feats, index, weight), project=(lambda t: t) if embeddings else project)
    if vf.cls_attention is not None:
        out.cls_attention = gather_plan(vf.cls_attention.float(), index, weight)
    if vf.early_cls_attention is not None:
        out.early_cls_attention = gather_plan(vf.early_cls_attention.float(), index, weight)
    if vf.keys is not None:
        out.keys = gather_plan(vf.keys, index, weight)
    if vf.cls_logits is not None:
        out.cls_logits = gather_plan(vf.cls_logits.float(), index, weight)
    if vf.cls_token is not None:
        out.cls_token = vf.cls_token[:1]
    tiles = torch.arange(vf.features.shape[0] - 1, device=index.device)
    if base_tile is not None or guide is not None:
        out.partition = torch.div(index[:, 0], n, rounding_mode="floor")[None]
    if base_tile is not None:
        out.base_tile = (base_tile[:, None] == tiles[None, :]).long()[None]
    if guide is not None:
        base_block, guide_index, guide_weight = guide
        out.base_block = (base_block[:, None] == tiles[None, :]).long()[None]
        thumbnail = vf.cls_logits[0].float()  # [N]: the base view's logits
        out.global_guide = (thumbnail[guide_index] * guide_weight.float()).sum(dim=1)[None]
    return out


class ReducedAnyresVisionGraph(nn.Module):
    """pixel_values [P, 3, S, S], pack_index [C, 4] int64, pack_weight [C, 4] float32 (the image's
    candidate plan: `tokedge.runtime.layout.candidate_plan`), + base_tile [N] int64 for methods
    scoring with REGIONS, + base_block [N] int64, guide_index [C, 4] int64, guide_weight [C, 4]
    float32 for THUMBNAIL_GUIDE (`runtime.layout.thumbnail_guide`) -> image_embeds [1, k, hidden].

    The tower runs every partition with the extras the method needs; the candidates' rows are
    gathered from all partitions and the method's own `reduce` picks k of them globally (hired
    allocates per partition itself). Output in candidate order, no newline tokens."""

    def __init__(self, loaded: LoadedCheckpoint, method: Method, k: int, options: dict):
        super().__init__()
        m = loaded.model.model
        cfg = loaded.model.config
        self.tower = VisionTower(m.vision_tower, cfg.vision_feature_layer, drop_cls=True, needs=method.needs)
        self.projector = m.multi_modal_projector
        self.method, self.k, self.options = method, k, options
        self.embeddings = Signal.EMBEDDINGS in method.scores_with
        self.extra_inputs = (("base_tile",) if Signal.REGIONS in method.scores_with else ()) + \
            (GUIDE_INPUTS if Signal.THUMBNAIL_GUIDE in method.scores_with else ())
        self.schedule = None

    def forward(self, pixel_values, pack_index, pack_weight, *extra):
        named = dict(zip(self.extra_inputs, extra))
        guide = tuple(named[k] for k in GUIDE_INPUTS) if GUIDE_INPUTS[0] in named else None
        vf = candidate_features(self.tower(pixel_values), pack_index, pack_weight, self.projector, self.embeddings,
                                named.get("base_tile"), guide)
        return self.method.reduce(vf, self.k, self.options)


def vision_trace_spec(info: ModelInfo, dtype: torch.dtype = torch.float32, vision: nn.Module | None = None):
    """The anyres vision graph's inputs and dynamic axes: partitions and visual tokens vary per image
    (reduced graphs: the candidates vary, the output count is the budget)."""
    from tokedge.export.onnx_export import TOKENS, TraceSpec

    s, n = info.image_size, (info.image_size // info.patch_size) ** 2
    k = getattr(vision, "k", None)
    if k is None:
        parts = 3
        index = torch.arange(8 * 4, dtype=torch.int64).reshape(8, 4) % (parts * n + 1)
        return TraceSpec(
            inputs=("pixel_values", "pack_index", "pack_weight"),
            outputs=("image_embeds",),
            example=(torch.rand(parts, 3, s, s), index, torch.rand(8, 4)),  # pixel_values stay float32
            dynamic_axes={"pixel_values": {0: PARTITIONS}, "pack_index": {0: TOKENS}, "pack_weight": {0: TOKENS},
                          "image_embeds": {1: TOKENS}},
            output_shapes={"image_embeds": (1, TOKENS, info.hidden_size)},
        )
    # an example with more candidates than k, so no shape branch of a method is traced as "keep all"
    parts = 5
    count = max(k + 8, parts * n)
    gen = torch.Generator().manual_seed(0)
    index = torch.zeros(count, 4, dtype=torch.int64)
    index[:, 0] = torch.randperm(count, generator=gen) % (parts * n)
    weight = torch.zeros(count, 4)
    weight[:, 0] = 1
    examples = {"base_tile": torch.randint(0, parts - 1, (n,), generator=gen),
                "base_block": torch.randint(0, parts - 1, (n,), generator=gen),
                "guide_index": torch.randint(0, n, (count, 4), generator=gen),
                "guide_weight": torch.rand(count, 4, generator=gen)}
    extra = tuple(examples[name] for name in vision.extra_inputs)
    return TraceSpec(
        inputs=("pixel_values", "pack_index", "pack_weight", *vision.extra_inputs),
        outputs=("image_embeds",),
        example=(torch.rand(parts, 3, s, s, generator=gen), index, weight, *extra),
        dynamic_axes={"pixel_values": {0: PARTITIONS}, "pack_index": {0: CANDIDATES},
                      "pack_weight": {0: CANDIDATES},
                      **{name: {0: CANDIDATES} for name in ("guide_index", "guide_weight") if name in vision.extra_inputs}},
        output_shapes={"image_embeds": (1, k, info.hidden_size)},
    )


def build_graph_modules(loaded: LoadedCheckpoint, method: Method, k: int, options: dict,
                        plan=None) -> dict[str, nn.Module]:
    """vision, embed, decoder; with an in-LLM `plan` also the pruning prefill (the vision graph
    then keeps every packed token of every image)."""
    check_method(method)
    lm = loaded.model.model.language_model
    reduced = method.reduces_in_vision
    vision = ReducedAnyresVisionGraph(loaded, method, k, options) if reduced else AnyresVisionGraph(loaded)
    modules = {
        "vision": vision.eval(),
        "embed": TokenEmbedder(lm.embed_tokens).eval(),
    }
    if plan is not None:
        modules["prefill"] = PruningPrefill(lm, loaded.model.lm_head, plan).eval()
    modules["decoder"] = KVDecoder(lm, loaded.model.lm_head, plan).eval()
    return modules


# --- transformers-side reference -----------------------------------------------------------------


def pixel_values_for(loaded: LoadedCheckpoint, images) -> np.ndarray:
    """The processor's pixel_values [n, P_max, 3, S, S] (partitions zero-padded across images)."""
    return loaded.processor.image_processor(images, return_tensors="np")["pixel_values"].astype(np.float32)


@torch.no_grad()
def reference_image_features(loaded: LoadedCheckpoint, images) -> list[torch.Tensor]:
    """transformers' packed image features, one [T_i, hidden] tensor per image."""
    batch = loaded.processor.image_processor(images, return_tensors="pt")
    cfg = loaded.model.config
    out = loaded.model.model.get_image_features(
        batch["pixel_values"].float(), batch["image_sizes"], vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    )
    return list(out.pooler_output)


@torch.no_grad()
def reference_reduced_features(loaded: LoadedCheckpoint, method: Method, image, k: int,
                               options: dict) -> torch.Tensor:
    """One image's reduced features [1, k, hidden] from transformers' own modules: its processor,
    the tower with eager attention (CLS rows of the feature layer and of layer 0, keys from the
    feature layer's k_proj, where the family's tower has a CLS token: `tower_has_cls`), the
    projector, and the family's `pack_candidates` (transformers' `pack_image_features` without
    newlines) to lay every per-token quantity out in candidate order; then the method's selection.
    EMBEDDINGS methods pack projected rows (OneVision's bilinear shrink mixes projected rows)."""
    from tokedge.runtime.layout import base_regions, plan_image, thumbnail_guide

    model, cfg = loaded.model, loaded.model.config
    batch = loaded.processor.image_processor([image], return_tensors="pt")
    sizes = batch["image_sizes"]
    parts = plan_image(loaded.spec.layout.anyres(), int(sizes[0, 0]), int(sizes[0, 1])).partitions
    pixel_values = batch["pixel_values"][0, :parts].float()
    tower = model.model.vision_tower
    out = eager_tower_outputs(tower, pixel_values)
    produced_by = layers_to_feature(cfg.vision_feature_layer, len(out.attentions)) - 1
    has_cls = loaded.family.tower_has_cls
    feats = out.hidden_states[cfg.vision_feature_layer][:, 1 if has_cls else 0:]  # [P, N, d]: CLS dropped
    n = feats.shape[1]

    def pack(values):  # [P, N, F] -> [1, C, F] in candidate order, by transformers' packing
        return loaded.family.pack_candidates(loaded, values, sizes)

    embeddings = Signal.EMBEDDINGS in method.scores_with
    projector = model.model.multi_modal_projector
    vf = VisionFeatures(features=pack(projector(feats) if embeddings else feats),
                        project=(lambda t: t) if embeddings else projector)
    if has_cls:  # the CLS-based signals (a tower without CLS has none; its family refuses such methods)
        vf.cls_attention = pack(out.attentions[produced_by][:, :, 0, 1:].float().mean(dim=1)[..., None])[..., 0]
        vf.early_cls_attention = pack(out.attentions[0][:, :, 0, 1:].float().mean(dim=1)[..., None])[..., 0]
        vf.cls_token = out.hidden_states[cfg.vision_feature_layer][:1, :1]
        enc_layer = getattr(tower, "vision_model", tower).encoder.layers[produced_by]
        keys = enc_layer.self_attn.k_proj(enc_layer.layer_norm1(out.hidden_states[produced_by]))
        keys = keys.view(keys.shape[0], keys.shape[1], cfg.vision_config.num_attention_heads, -1).mean(dim=2)[:, 1:]
        vf.keys = pack(keys)
    if has_cls and Signal.CLS_LOGITS in method.scores_with:  # the CLS query's logits in the layer reading the features
        read = min(produced_by + 1, len(out.attentions) - 1)  # the layer after the feature layer (or the last)
        reader = getattr(tower, "vision_model", tower).encoder.layers[read]
        h = reader.layer_norm1(out.hidden_states[read])  # that layer's input
        heads = cfg.vision_config.num_attention_heads
        q = reader.self_attn.q_proj(h[:, :1]).view(parts, 1, heads, -1).transpose(1, 2)
        k_ = reader.self_attn.k_proj(h).view(parts, h.shape[1], heads, -1).transpose(1, 2)
        logits = (q @ k_.transpose(-1, -2) * q.shape[-1] ** -0.5).mean(dim=1)[:, 0, 1:]  # [P, N]
        vf.cls_logits = pack(logits.float()[..., None])[..., 0]
    plan = plan_image(loaded.spec.layout.anyres(), int(sizes[0, 0]), int(sizes[0, 1]))
    if Signal.REGIONS in method.scores_with or Signal.THUMBNAIL_GUIDE in method.scores_with:
        partition = torch.arange(parts)[:, None, None].expand(parts, n, 1).float()
        vf.partition = pack(partition)[..., 0].long()
    if Signal.REGIONS in method.scores_with:
        tile = torch.from_numpy(base_regions(loaded.spec.layout.anyres(), plan))
        vf.base_tile = (tile[:, None] == torch.arange(parts - 1)[None, :]).long()[None]
    if Signal.THUMBNAIL_GUIDE in method.scores_with:
        block, guide_index, guide_weight = thumbnail_guide(loaded.spec.layout.anyres(), plan)
        vf.base_block = (torch.from_numpy(block)[:, None] == torch.arange(parts - 1)[None, :]).long()[None]
        thumbnail = vf.cls_logits[0, :n]  # candidates start with the base view's N tokens in raster order
        vf.global_guide = (thumbnail[torch.from_numpy(guide_index)] * torch.from_numpy(guide_weight)).sum(dim=1)[None]
    if vf.features.shape[1] < k:
        raise UsageError(f"the example image gives {vf.features.shape[1]} candidate tokens, fewer than --budget {k}")
    return method.reduce(vf, k, options)


# --- the family ------------------------------------------------------------------------------------


class LlavaNextFamily(LlavaFamily):
    """`LlavaNextForConditionalGeneration`: anyres tiles, one variable-length token block per image.
    Preprocessing record, layout, prompt info and rendering, reference logits and prompt embedding
    are LLaVA's (inherited); what differs is below."""

    name = "llava_next"
    model_types = ("llava_next",)
    architectures = SUPPORTED_ARCHITECTURES
    tower_has_cls = True  # CLIP: the references drop it and may score with it

    def pack_candidates(self, loaded: LoadedCheckpoint, values: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """values [P, N, F] of one image (every partition's rows) -> [1, C, F] in candidate order:
        transformers' `pack_image_features` without newlines (the references' layout)."""
        cfg = loaded.model.config
        packed, _ = loaded.model.model.pack_image_features([values], sizes, cfg.vision_feature_select_strategy, None)
        return packed[0][None]

    def inspect(self, config: dict) -> CheckpointSpec:
        return inspect_config(config)

    def load(self, source: str, local: Path | None, *, trust_remote_code: bool = False,
             allow_pickle: bool = False) -> LoadedCheckpoint:
        return load_llava_next(source, local, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

    def check_method(self, method: Method) -> None:
        check_method(method)

    def modules(self, loaded: LoadedCheckpoint, method: Method, k: int, options: dict, plan=None) -> dict[str, nn.Module]:
        return build_graph_modules(loaded, method, k, options, plan)

    def vision_trace_spec(self, loaded: LoadedCheckpoint, dtype: torch.dtype = torch.float32,
                          vision: nn.Module | None = None):
        """How to trace this family's vision graph `vision` (its inputs differ from the single-view one)."""
        return vision_trace_spec(self.model_info(loaded), dtype, vision)

    def model_info(self, loaded: LoadedCheckpoint) -> ModelInfo:
        return replace(model_info(loaded), family=self.name)

    def pixel_values(self, loaded: LoadedCheckpoint, images: list) -> np.ndarray:
        return pixel_values_for(loaded, images)

    def reference_features(self, loaded: LoadedCheckpoint, method: Method, images, k: int,
                           options: dict | None = None):
        """Anyres: `images` are the PIL images themselves (each has its own partitions); one image
        -> [1, T, hidden] (every packed token) or [1, k, hidden] (reduced)."""
        if len(images) != 1:
            raise UnsupportedModelError("anyres references take one image at a time (token counts differ)")
        if method.keeps_all:
            return reference_image_features(loaded, images)[0][None]
        return reference_reduced_features(loaded, method, images[0], k, options or {})


FAMILY = register(LlavaNextFamily())
