"""LLaVA-NeXT family (llava-hf layout: `LlavaNextForConditionalGeneration` + `LlavaNextProcessor`).

Read top to bottom: what is supported, how a checkpoint is inspected and loaded, the vision graph
(tower at the feature layer for every partition, projector, then the anyres packing as a weighted
gather with `image_newline` as the last row), and what the manifest records (an 'anyres' visual
layout: base view + tiles on the config's pinpoints). The packing plan itself (which feature rows
make each visual token) is computed per image from its size alone by `tokedge.runtime.layout`, so
the graph takes it as two inputs and the number of partitions and tokens stays dynamic.

`--method none` and the in-LLM methods (fastv, pdrop, dart: the unreduced vision graph plus the
pruning prefill) export; pre-LLM reduction methods are refused with the reason.
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
    load_hf_checkpoint,
    model_info,
    vision_geometry,
)
from tokedge.export.towers import VisionTower
from tokedge.reduce.base import Method

SUPPORTED_ARCHITECTURES = ("LlavaNextForConditionalGeneration",)
SUPPORTED_VISION = ("clip_vision_model",)
SUPPORTED_TEXT = ("llama", "mistral", "qwen2")
SUPPORTED_METHODS = ("none",)
PARTITIONS = "partitions"  # the vision graph's dynamic axis: base view + tiles of one image


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
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llava_next" or (archs and not set(archs) & set(SUPPORTED_ARCHITECTURES)):
        raise UnsupportedModelError(
            f"unsupported architecture {archs or cfg.get('model_type')!r}; the llava_next family reads "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (model_type 'llava_next') checkpoints"
        )
    vision = (cfg.get("vision_config") or {}).get("model_type", "clip_vision_model")
    text = (cfg.get("text_config") or {}).get("model_type", "llama")
    if vision not in SUPPORTED_VISION:
        raise UnsupportedModelError(f"unsupported vision tower '{vision}'; supported: {', '.join(SUPPORTED_VISION)}")
    if text not in SUPPORTED_TEXT:
        raise UnsupportedModelError(f"unsupported language model '{text}'; supported: {', '.join(SUPPORTED_TEXT)}")
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


def check_method(method: Method) -> None:
    """Only the unreduced vision graph exports for anyres so far; in-LLM methods use it as it is
    (every packed token reaches the LLM, the prefill prunes)."""
    if method.name not in SUPPORTED_METHODS and not method.prunes_in_llm:
        raise UsageError(
            f"--method {method.name} is not available for LLaVA-NeXT yet (anyres reduction is not implemented); "
            "use --method none"
        )


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


def vision_trace_spec(info: ModelInfo, dtype: torch.dtype = torch.float32):
    """The anyres vision graph's inputs and dynamic axes: partitions and visual tokens vary per image."""
    from tokedge.export.onnx_export import TOKENS, TraceSpec

    s, n = info.image_size, (info.image_size // info.patch_size) ** 2
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


def build_graph_modules(loaded: LoadedCheckpoint, method: Method, k: int, options: dict,
                        plan=None) -> dict[str, nn.Module]:
    """vision, embed, decoder; with an in-LLM `plan` also the pruning prefill (the vision graph
    then keeps every packed token of every image)."""
    check_method(method)
    lm = loaded.model.model.language_model
    modules = {
        "vision": AnyresVisionGraph(loaded).eval(),
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


# --- the family ------------------------------------------------------------------------------------


class LlavaNextFamily(LlavaFamily):
    """`LlavaNextForConditionalGeneration`: anyres tiles, one variable-length token block per image.
    Preprocessing record, layout, prompt info and rendering, reference logits and prompt embedding
    are LLaVA's (inherited); what differs is below."""

    name = "llava_next"
    model_types = ("llava_next",)
    architectures = SUPPORTED_ARCHITECTURES

    def inspect(self, config: dict) -> CheckpointSpec:
        return inspect_config(config)

    def load(self, source: str, local: Path | None, *, trust_remote_code: bool = False,
             allow_pickle: bool = False) -> LoadedCheckpoint:
        return load_llava_next(source, local, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

    def check_method(self, method: Method) -> None:
        check_method(method)

    def modules(self, loaded: LoadedCheckpoint, method: Method, k: int, options: dict, plan=None) -> dict[str, nn.Module]:
        return build_graph_modules(loaded, method, k, options, plan)

    def vision_trace_spec(self, loaded: LoadedCheckpoint, dtype: torch.dtype = torch.float32):
        """How to trace this family's vision graph (its inputs differ from the single-view one)."""
        return vision_trace_spec(self.model_info(loaded), dtype)

    def model_info(self, loaded: LoadedCheckpoint) -> ModelInfo:
        return replace(model_info(loaded), family=self.name)

    def pixel_values(self, loaded: LoadedCheckpoint, images: list) -> np.ndarray:
        return pixel_values_for(loaded, images)

    def tokenize(self, loaded: LoadedCheckpoint, prompts: list[str], visual_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        raise UnsupportedModelError("anyres prompts have a token count per image; expand them from the image plan")

    def reference_features(self, loaded: LoadedCheckpoint, method: Method, pixel_values, k: int,
                           options: dict | None = None):
        raise UnsupportedModelError("anyres references need the images, not stacked pixel_values; "
                                    "use reference_image_features")


FAMILY = register(LlavaNextFamily())
