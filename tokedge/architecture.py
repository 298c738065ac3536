"""Architecture numbers from a checkpoint's config.json, torch-free: what `tokedge memory` and
FLOPs need for a model that has not been exported (a named geometry, a checkpoint directory, a hub
id), and the vision/text records the export writes into the manifest (`architecture`).

An exported artifact carries exact parameter counts of its written graphs (counted by
`tokedge.export.architecture`); here they come from formulas over the config, one per tower and
decoder style, checked against transformers' own parameter counts and against the counts of
exported graphs (tests/test_memory.py). Named geometries are data (`tokedge/data/geometries.json`:
each published checkpoint's config.json keys and the source they were read from), read by the
same `from_config` as a checkpoint directory.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from tokedge.artifact import (
    Architecture,
    GraphParameters,
    ModelInfo,
    TextArchitecture,
    VisionArchitecture,
    VisualLayout,
)
from tokedge.errors import InputError, UnsupportedModelError, UsageError

GEOMETRIES_FILE = Path(__file__).parent / "data" / "geometries.json"

# the tower a config's vision_config describes, by its model_type; when the vision_config names
# none, by the checkpoint's model_type (transformers' class defaults)
TOWER_OF_VISION_TYPE = {"clip_vision_model": "clip_vision_model", "siglip_vision_model": "siglip_vision_model",
                        "qwen2_5_vl": "qwen2_5_vl_vision", "qwen2_5_vl_vision": "qwen2_5_vl_vision",
                        "qwen3_vl": "qwen3_vl_vision", "qwen3_vl_vision": "qwen3_vl_vision",
                        "idefics3_vision": "idefics3_vision", "smolvlm_vision": "idefics3_vision",
                        "internvl_vision": "internvl_vision", "idefics3": "idefics3_vision"}  # hub SmolVLM: "idefics3"
DEFAULT_TOWER = {"llava": "clip_vision_model", "llava_next": "clip_vision_model",
                 "llava_onevision": "siglip_vision_model", "qwen2_5_vl": "qwen2_5_vl_vision",
                 "qwen3_vl": "qwen3_vl_vision", "idefics3": "idefics3_vision", "smolvlm": "idefics3_vision",
                 "internvl": "internvl_vision", "gemma3": "gemma3_vision"}
# towers a checkpoint's model_type decides whatever its vision_config names (Gemma 3: SigLIP read
# through its post-layernorm, pooled by the projector)
TOWER_OF_MODEL = {"gemma3": "gemma3_vision"}
# decoder styles: (q/k/v biases, per-head q/k RMSNorm)
TEXT_STYLES = {"llama": (False, False), "mistral": (False, False), "qwen2": (True, False),
               "qwen2_5_vl": (True, False), "qwen2_5_vl_text": (True, False), "qwen3": (False, True),
               "qwen3_vl": (False, True), "qwen3_vl_text": (False, True), "gemma3_text": (False, True)}
SANDWICH_NORMS = {"gemma3_text"}  # four RMSNorms per layer (before and after attention and MLP), not two
DEFAULT_TEXT = {"llava": "llama", "llava_next": "llama", "llava_onevision": "qwen2", "qwen2_5_vl": "qwen2_5_vl_text",
                "qwen3_vl": "qwen3_vl_text", "idefics3": "llama", "smolvlm": "llama", "internvl": "qwen2",
                "gemma3": "gemma3_text"}
DEFAULT_FEATURE_LAYER = {"llava": -2, "llava_next": -2}  # transformers' class defaults (OneVision: -1)
MAX_CONFIG_BYTES = 4 << 20  # a config.json is a few kB


@dataclass(frozen=True)
class Geometry:
    """A model described by its config alone: the manifest-like records memory and FLOPs read,
    with parameter counts from formulas (`architecture.counted` = "config-formulas")."""

    name: str
    model: ModelInfo
    layout: VisualLayout
    full_tokens: int  # visual tokens of the largest image, before reduction
    architecture: Architecture
    matrices: dict[str, int]  # per graph, the parameters held in MatMul weights (what --quantize converts)
    lm_head: int  # of the decoder's matrices, the logits projection (float unless --quantize-lm-head)


# --- parameter formulas ----------------------------------------------------------------------------


def _linear(k: int, n: int, bias: bool = True) -> tuple[int, int]:
    """(parameters, of which matrix) of a Linear k -> n."""
    return k * n + (n if bias else 0), k * n


def _sum(*parts: tuple[int, int]) -> tuple[int, int]:
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def _clip_like(vc: dict, layers: int, cls: bool, patch_bias: bool, pre_norm: bool) -> tuple[int, int]:
    d, ff = int(vc["hidden_size"]), int(vc["intermediate_size"])
    p, image = int(vc["patch_size"]), int(vc["image_size"])
    n = (image // p) ** 2 + (1 if cls else 0)
    # q, k, v, o with biases, fc1/fc2 with biases, two LayerNorms
    layer = _sum(*(_linear(d, d),) * 4, _linear(d, ff), _linear(ff, d), (4 * d, 0))
    embed = 3 * p * p * d + (d if patch_bias else 0) + (d if cls else 0) + n * d + (2 * d if pre_norm else 0)
    return layers * layer[0] + embed, layers * layer[1]


def _tower_clip(vc: dict, layers: int) -> tuple[int, int]:
    return _clip_like(vc, layers, cls=True, patch_bias=False, pre_norm=True)


def _tower_siglip(vc: dict, layers: int) -> tuple[int, int]:
    return _clip_like(vc, layers, cls=False, patch_bias=True, pre_norm=False)


def _tower_qwen2_5(vc: dict, layers: int) -> tuple[int, int]:
    """Qwen2.5-VL: bias-free Conv3d patches, RMSNorm blocks with a SwiGLU MLP (biases), PatchMerger
    (RMSNorm, 4d -> 4d -> out)."""
    d, ff, out = int(vc["hidden_size"]), int(vc["intermediate_size"]), int(vc["out_hidden_size"])
    p, t, m = int(vc.get("patch_size", 14)), int(vc.get("temporal_patch_size", 2)), int(vc.get("spatial_merge_size", 2))
    layer = _sum(_linear(d, 3 * d), _linear(d, d), _linear(d, ff), _linear(d, ff), _linear(ff, d), (2 * d, 0))
    w = d * m * m
    merger = _sum((d, 0), _linear(w, w), _linear(w, out))
    return layers * layer[0] + 3 * t * p * p * d + merger[0], layers * layer[1] + merger[1]


def _tower_qwen3(vc: dict, layers: int) -> tuple[int, int]:
    """Qwen3-VL: Conv3d patches with bias, a learned position table, LayerNorm blocks with a GELU
    MLP, the merger (LayerNorm over d) and one DeepStack merger per level (LayerNorm over 4d)."""
    d, ff, out = int(vc["hidden_size"]), int(vc["intermediate_size"]), int(vc["out_hidden_size"])
    p, t, m = int(vc.get("patch_size", 16)), int(vc.get("temporal_patch_size", 2)), int(vc.get("spatial_merge_size", 2))
    layer = _sum(_linear(d, 3 * d), _linear(d, d), _linear(d, ff), _linear(ff, d), (4 * d, 0))
    w = d * m * m
    merger = _sum((2 * d, 0), _linear(w, w), _linear(w, out))
    deepstack = _sum((2 * w, 0), _linear(w, w), _linear(w, out))
    levels = len(vc.get("deepstack_visual_indexes", ()))
    embed = 3 * t * p * p * d + d + int(vc.get("num_position_embeddings", 2304)) * d
    return (layers * layer[0] + embed + merger[0] + levels * deepstack[0],
            layers * layer[1] + merger[1] + levels * deepstack[1])


def _tower_idefics3(vc: dict, layers: int) -> tuple[int, int]:
    """Idefics3 / SmolVLM: SigLIP's blocks with its post-layernorm (the connector is counted as the projector)."""
    d = int(vc["hidden_size"])
    tower = _clip_like(vc, layers, cls=False, patch_bias=True, pre_norm=False)
    return tower[0] + 2 * d, tower[1]


def _tower_internvl(vc: dict, layers: int) -> tuple[int, int]:
    """InternViT (InternVL): patch convolution with bias, CLS token and position table, blocks of q/k/v
    (biases per `attention_bias`, optional per-width q/k RMSNorm), a biased output projection, a GELU
    MLP, two norms (LayerNorm: weight and bias; RMSNorm: weight) and two layer scales; a final
    LayerNorm without mean pooling (the projector is counted as the projector)."""
    d, ff = int(vc["hidden_size"]), int(vc["intermediate_size"])
    p, image = int(vc["patch_size"]), int(vc["image_size"])
    bias = bool(vc.get("attention_bias", False))
    norm = 2 * d if vc.get("norm_type", "layer_norm") == "layer_norm" else d
    qk = 2 * d if vc.get("use_qk_norm", False) else 0
    layer = _sum(*(_linear(d, d, bias),) * 3, _linear(d, d), _linear(d, ff), _linear(ff, d), (2 * norm + qk + 2 * d, 0))
    positions = ((image // p) ** 2 + 1) * d if vc.get("use_absolute_position_embeddings", True) else 0
    embed = 3 * p * p * d + d + d + positions + (0 if vc.get("use_mean_pooling", True) else 2 * d)
    return layers * layer[0] + embed, layers * layer[1]


def _tower_gemma3(vc: dict, layers: int) -> tuple[int, int]:
    """Gemma 3: SigLIP's blocks with its post-layernorm (no pooling head; the projector is counted as
    the projector)."""
    d = int(vc["hidden_size"])
    tower = _clip_like(vc, layers, cls=False, patch_bias=True, pre_norm=False)
    return tower[0] + 2 * d, tower[1]


TOWERS = {"gemma3_vision": _tower_gemma3, "clip_vision_model": _tower_clip, "siglip_vision_model": _tower_siglip,
          "qwen2_5_vl_vision": _tower_qwen2_5, "qwen3_vl_vision": _tower_qwen3, "idefics3_vision": _tower_idefics3,
          "internvl_vision": _tower_internvl}


def _decoder_layer(tc: dict, style: tuple[bool, bool], norms: int = 2) -> tuple[int, int]:
    h, ff = int(tc["hidden_size"]), int(tc["intermediate_size"])
    heads, kv = int(tc["num_attention_heads"]), int(tc.get("num_key_value_heads") or tc["num_attention_heads"])
    hd = int(tc.get("head_dim") or h // heads)
    bias, qk_norm = style
    attn = _sum(_linear(h, heads * hd, bias), _linear(h, kv * hd, bias), _linear(h, kv * hd, bias),
                _linear(heads * hd, h, False))
    mlp = _sum(_linear(h, ff, False), _linear(h, ff, False), _linear(ff, h, False))
    return _sum(attn, mlp, (norms * h + (2 * hd if qk_norm else 0), 0))


# --- reading a config ------------------------------------------------------------------------------


def _text(cfg: dict) -> dict:
    """The text model's fields: `text_config` (transformers 5, LLaVA), else the top level (hub Qwen2.5-VL)."""
    tc = cfg.get("text_config")
    return tc if isinstance(tc, dict) and tc.get("hidden_size") else cfg


def _square_sizes(vc: dict) -> dict:
    """vision_config with image_size / patch_size as ints (transformers 5 writes InternVL's as [h, w] pairs)."""
    out = dict(vc)
    for key in ("image_size", "patch_size"):
        value = out.get(key)
        if isinstance(value, (list, tuple)):
            if len(value) != 2 or value[0] != value[1] or not isinstance(value[0], int):
                raise UnsupportedModelError(f"vision_config.{key} {list(value)} is not a square size")
            out[key] = value[0]
    return out


def _need(d: dict, key: str, where: str):
    if key not in d or d[key] is None:
        raise InputError(f"the config names no {where}{key}; tokedge memory needs the checkpoint's full config.json")
    return d[key]


def _feature_layers(cfg: dict, total: int) -> int:
    feature = cfg.get("vision_feature_layer", DEFAULT_FEATURE_LAYER.get(cfg.get("model_type"), -1))
    if not isinstance(feature, int):
        raise UnsupportedModelError("multi-layer vision features (a list vision_feature_layer) are not supported")
    index = feature if feature >= 0 else total + 1 + feature
    if not 1 <= index <= total:
        raise InputError(f"vision_feature_layer {feature} is outside 1..{total}")
    return index


def _mrope(cfg: dict, tc: dict) -> tuple[tuple[int, ...], bool]:
    for rope in (tc.get("rope_parameters"), tc.get("rope_scaling"), cfg.get("rope_scaling")):
        if isinstance(rope, dict) and rope.get("mrope_section"):
            return tuple(int(v) for v in rope["mrope_section"]), bool(rope.get("mrope_interleaved", False))
    return (), False


def _layout(cfg: dict, vc: dict, tc: dict, tower: str, processor: dict, max_pixels: int | None) -> VisualLayout:
    """The visual layout the config describes: merged patches with a pixel range (a vision_config
    with spatial_merge_size), tiles on pinpoints (image_grid_pinpoints), else one fixed view."""
    if "spatial_merge_size" in vc:
        section, interleaved = _mrope(cfg, tc)
        lo = int(processor.get("min_pixels") or 0)
        hi = int(max_pixels or processor.get("max_pixels") or 0)
        if not lo or not hi:
            raise InputError("the checkpoint's pixel range is unknown (no preprocessor_config.json with "
                             "min_pixels/max_pixels or size.shortest_edge/longest_edge): pass --max-pixels")
        window = vc.get("window_size") if "fullatt_block_indexes" in vc else None
        return VisualLayout(
            kind="dynamic_patches", patch_size=int(vc.get("patch_size", 14)), merge_size=int(vc["spatial_merge_size"]),
            temporal_patch_size=int(vc.get("temporal_patch_size", 2)), min_pixels=lo, max_pixels=hi,
            window_size=int(window) if window else None,
            fullatt_blocks=tuple(int(i) for i in vc.get("fullatt_block_indexes", ())),
            mrope_section=section, mrope_interleaved=interleaved,
            position_table=math.isqrt(int(vc["num_position_embeddings"])) if "num_position_embeddings" in vc else None,
            deepstack_levels=len(vc.get("deepstack_visual_indexes", ())),
        )
    if max_pixels is not None:
        raise UsageError("--max-pixels applies to dynamic-resolution models (Qwen-VL); this model has a fixed "
                         "image geometry")
    if tower == "idefics3_vision":  # tiles of the view size under the processor's longest edge + a global view
        side, patch, scale = int(vc.get("image_size", 224)), int(vc.get("patch_size", 32)), int(cfg.get("scale_factor", 2))
        return VisualLayout(kind="split_tiles", tile=side, patch_size=patch, merge_size=scale,
                            longest_edge=int(processor.get("longest_edge") or 4 * side),
                            view_tokens=(side // patch) ** 2 // (scale * scale),
                            split_image=bool(processor.get("do_image_splitting", True)))
    if tower == "gemma3_vision":  # one square view, pooled to mm_tokens_per_image, framed in the prompt
        return VisualLayout(kind="framed_view", tile=int(vc.get("image_size", 224)),
                            patch_size=int(vc.get("patch_size", 14)),
                            view_tokens=int(cfg.get("mm_tokens_per_image", 256)),
                            frame_before="\n\n<start_of_image>", frame_after="<end_of_image>\n\n",
                            run_token="<image_soft_token>")
    if tower == "internvl_vision":  # aspect-ratio tiles of the view size + a thumbnail
        side, patch = int(vc.get("image_size", 448)), int(vc.get("patch_size", 14))
        merge = round(1 / float(cfg.get("downsample_ratio", 0.5)))
        return VisualLayout(kind="aspect_tiles", tile=side, patch_size=patch, merge_size=merge,
                            view_tokens=(side // patch) ** 2 // (merge * merge),
                            min_tiles=int(processor.get("min_tiles") or 1), max_tiles=int(processor.get("max_tiles") or 12))
    pinpoints = cfg.get("image_grid_pinpoints")
    if not pinpoints:
        return VisualLayout(kind="single")
    tile, patch = int(vc["image_size"]), int(vc["patch_size"])
    ratio = cfg.get("vision_aspect_ratio")
    match = re.fullmatch(r"anyres_max_(\d+)", ratio) if isinstance(ratio, str) else None
    return VisualLayout(kind="anyres", tile=tile, patch_grid=tile // patch,
                        pinpoints=tuple((int(h), int(w)) for h, w in pinpoints),
                        max_tiles=int(match.group(1)) if match else None, multi_image_square=match is not None,
                        image_newline=True)


def _full_tokens(layout: VisualLayout, vc: dict, per_image: bool) -> int:
    if not per_image:
        return (int(vc["image_size"]) // int(vc["patch_size"])) ** 2
    from tokedge.layouts import record_bounds

    return record_bounds(layout).tokens[2]


def from_config(cfg: dict, processor: dict | None = None, *, name: str = "", source: str = "",
                max_pixels: int | None = None) -> Geometry:
    """The geometry a config.json dict describes (`processor`: the image processor's pixel range,
    {"min_pixels", "max_pixels"}, for dynamic-resolution models)."""
    if not isinstance(cfg, dict):
        raise InputError("config.json is not a JSON object")
    model_type = cfg.get("model_type")
    vc = _square_sizes(cfg.get("vision_config") or {})
    tc = _text(cfg)
    vision_type = vc.get("model_type")
    tower = TOWER_OF_MODEL.get(model_type) or (TOWER_OF_VISION_TYPE.get(vision_type) if vision_type
                                                else DEFAULT_TOWER.get(model_type))
    if tower is None:
        raise UnsupportedModelError(f"tokedge memory does not know the vision tower of model_type {model_type!r} "
                                    f"(vision {vision_type!r}); known: {', '.join(sorted(DEFAULT_TOWER))}")
    text_type = tc.get("model_type") if tc is not cfg else DEFAULT_TEXT.get(model_type)
    style = TEXT_STYLES.get(text_type or DEFAULT_TEXT.get(model_type, ""))
    if style is None:
        raise UnsupportedModelError(f"tokedge memory does not know the decoder {text_type!r}; known: "
                                    f"{', '.join(sorted(TEXT_STYLES))}")
    total_layers = int(_need(vc, "depth" if "depth" in vc else "num_hidden_layers", "vision_config."))
    layers = _feature_layers(cfg, total_layers) if tower in ("clip_vision_model", "siglip_vision_model") else total_layers
    h, heads = int(_need(tc, "hidden_size", "text ")), int(_need(tc, "num_attention_heads", "text "))
    n_layers, vocab = int(_need(tc, "num_hidden_layers", "text ")), int(_need(tc, "vocab_size", "text "))
    kv = int(tc.get("num_key_value_heads") or heads)
    hd = int(tc.get("head_dim") or h // heads)
    ff = int(_need(tc, "intermediate_size", "text "))
    layout = _layout(cfg, vc, tc, tower, processor or {}, max_pixels)
    dynamic = "spatial_merge_size" in vc  # merged patches over an image-sized grid (what _layout read)
    tiled = not dynamic and (bool(cfg.get("image_grid_pinpoints"))
                             or tower in ("idefics3_vision", "internvl_vision", "gemma3_vision"))

    vision, vision_matrices = TOWERS[tower](vc, layers)
    if tower in ("clip_vision_model", "siglip_vision_model"):  # LLaVA's two-layer projector (+ newline row)
        d = int(vc["hidden_size"])
        proj = _sum(_linear(d, h), _linear(h, h))
        vision += proj[0] + (h if tiled else 0)  # the image_newline row
        vision_matrices += proj[1]
        projector: tuple[int, ...] = (d, h, h)
    elif tower == "idefics3_vision":  # pixel shuffle, then one bias-free linear
        w = int(vc["hidden_size"]) * int(cfg.get("scale_factor", 2)) ** 2
        vision += w * h
        vision_matrices += w * h
        projector = (w, h)
    elif tower == "gemma3_vision":  # average pooling, then RMSNorm (weight) and one bias-free matrix
        d = int(vc["hidden_size"])
        vision += d + d * h
        vision_matrices += d * h
        projector = (d, h)
    elif tower == "internvl_vision":  # pixel shuffle, then LayerNorm -> linear -> GELU -> linear
        w = int(vc["hidden_size"]) * round(1 / float(cfg.get("downsample_ratio", 0.5))) ** 2
        proj = _sum((2 * w, 0), _linear(w, h), _linear(h, h))
        vision += proj[0]
        vision_matrices += proj[1]
        projector = (w, h, h)
    else:
        w = int(vc["hidden_size"]) * int(vc.get("spatial_merge_size", 2)) ** 2
        projector = (w, w, int(vc.get("out_hidden_size", h)))
    layer, layer_matrices = _decoder_layer(tc, style, 4 if text_type in SANDWICH_NORMS else 2)
    decoder = n_layers * layer + h + vocab * h  # layers, final norm, lm_head (its own copy: graphs never share)
    graphs = {"vision": GraphParameters(parameters=vision), "embed": GraphParameters(parameters=vocab * h),
              "decoder": GraphParameters(parameters=decoder)}
    matrices = {"vision": vision_matrices, "embed": 0, "decoder": n_layers * layer_matrices + vocab * h}
    d = int(vc["hidden_size"])
    merge = int(vc.get("spatial_merge_size", 1)) ** 2 if dynamic else \
        int(cfg.get("scale_factor", 1)) ** 2 if tower == "idefics3_vision" else \
        round(1 / float(cfg.get("downsample_ratio", 0.5))) ** 2 if tower == "internvl_vision" else \
        (int(vc["image_size"]) // int(vc["patch_size"])) ** 2 // int(cfg.get("mm_tokens_per_image", 256)) \
        if tower == "gemma3_vision" else 1
    cls = tower in ("clip_vision_model", "internvl_vision")
    fixed = 0 if dynamic else (int(vc["image_size"]) // int(vc["patch_size"])) ** 2 + (1 if cls else 0)
    arch = Architecture(
        graphs=graphs,
        vision=vision_architecture(vc, tower, layers, projector, merge, fixed),
        text=TextArchitecture(layers=n_layers, hidden=h, heads=heads, kv_heads=kv, head_dim=hd, intermediate=ff,
                              vocab=vocab),
        counted="config-formulas",
    )
    eos = tc.get("eos_token_id", cfg.get("eos_token_id"))
    info = ModelInfo(
        source=source or name, family=str(model_type), vision_model_type=tower, text_model_type=str(text_type),
        vision_hidden_size=d, hidden_size=h, num_layers=n_layers, num_attention_heads=heads,
        num_key_value_heads=kv, head_dim=hd, vocab_size=vocab,
        max_position_embeddings=int(tc.get("max_position_embeddings") or cfg.get("max_position_embeddings") or 4096),
        image_size=int(vc.get("image_size") or int(vc.get("patch_size", 14)) * int(vc.get("spatial_merge_size", 1))),
        patch_size=int(vc.get("patch_size", 14)), bos_token_id=tc.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ()),
        pad_token_id=cfg.get("pad_token_id"),
        image_token_id=int(cfg.get("image_token_id", cfg.get("image_token_index", 0)) or 0),
        vision_layers=layers, vision_intermediate_size=int(vc.get("intermediate_size") or 4 * d),
        intermediate_size=ff,
    )
    return Geometry(name=name or source, model=info, layout=layout, full_tokens=_full_tokens(layout, vc, dynamic or tiled),
                    architecture=arch, matrices=matrices, lm_head=vocab * h)


def vision_architecture(vc: dict, tower: str, layers: int, projector: tuple[int, ...], patches_per_token: int,
                        fixed_tokens: int, merge_schedule: tuple[int, ...] = ()) -> VisionArchitecture:
    """The vision record: `fixed_tokens` tokens per partition enter the first block (0: the count
    follows the image), minus ToMe's merges layer by layer. Every block's scores are dense over the
    partition's tokens (span 0): CLIP/SigLIP and Qwen3-VL attend fully; Qwen2.5-VL's window blocks
    mask a dense N x N score matrix in tokedge's graph (the memory and FLOPs of full attention), which
    holds the float32 mask and its bool comparison (5 bytes per N x N position) and the masked scores
    beside the scores (measured with ONNX Runtime: tests/test_memory.py)."""
    d = int(vc["hidden_size"])
    tokens: tuple[int, ...] = ()
    if fixed_tokens:
        n, counts = fixed_tokens, []
        schedule = list(merge_schedule) + [0] * layers
        for i in range(layers):
            counts.append(n)
            n -= schedule[i]
        tokens = tuple(counts)
    masked = bool(vc.get("window_size")) and bool(vc.get("fullatt_block_indexes"))  # windows as a dense mask
    return VisionArchitecture(
        layers=layers, hidden=d, intermediate=int(vc.get("intermediate_size") or 4 * d),
        heads=int(vc.get("num_attention_heads") or vc.get("num_heads") or max(1, d // 64)),
        gated_mlp=tower == "qwen2_5_vl_vision", layer_tokens=tokens, attention_span=(0,) * layers,
        patches_per_token=patches_per_token, projector=projector, score_buffers=2 if masked else 1,
        mask_bytes=5 if masked else 0,
    )


# --- where a geometry comes from ------------------------------------------------------------------


def named_geometries() -> dict[str, dict]:
    data = json.loads(GEOMETRIES_FILE.read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _read_json(path: Path, what: str) -> dict:
    from tokedge.safeio import printable

    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read {what} {printable(str(path))}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise InputError(f"{what} {printable(str(path))} is over {MAX_CONFIG_BYTES >> 20} MiB; it is not a config")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{what} {printable(str(path))} is not valid JSON ({printable(exc, 120)})") from None
    if not isinstance(data, dict):
        raise InputError(f"{what} {printable(str(path))} is not a JSON object")
    return data


def pixel_range(pre: dict) -> dict:
    """min/max pixels of a preprocessor_config.json (Qwen2.5-VL names them; Qwen3-VL's `size` holds
    shortest_edge/longest_edge as pixel counts)."""
    size = pre.get("size") if isinstance(pre.get("size"), dict) else {}
    if isinstance(pre.get("max_image_size"), dict):  # Idefics3 / SmolVLM: a longest edge in pixels, tiles of the view
        return {"longest_edge": size.get("longest_edge"), "do_image_splitting": pre.get("do_image_splitting", True)}
    if "max_patches" in pre or "crop_to_patches" in pre:  # GotOcr2 (InternVL): the tile range of an image's grid
        return {"min_tiles": pre.get("min_patches", 1), "max_tiles": pre.get("max_patches", 12)}
    lo = pre.get("min_pixels") or size.get("shortest_edge")
    hi = pre.get("max_pixels") or size.get("longest_edge")
    return {"min_pixels": lo, "max_pixels": hi} if isinstance(lo, int) and isinstance(hi, int) else {}


def from_directory(path: Path, max_pixels: int | None = None) -> Geometry:
    """A checkpoint directory: its config.json (and preprocessor_config.json), never its weights."""
    cfg = _read_json(path / "config.json", "config.json")
    pre = path / "preprocessor_config.json"
    processor = pixel_range(_read_json(pre, "preprocessor_config.json")) if pre.is_file() else {}
    return from_config(cfg, processor, name=path.name, source=str(path), max_pixels=max_pixels)


def from_hub(repo_id: str, max_pixels: int | None = None) -> Geometry:
    """A hub id: config.json (and preprocessor_config.json) downloaded through huggingface_hub, no weights."""
    import logging

    from tokedge.errors import require

    hub = require("huggingface_hub", "export")
    log = logging.getLogger("huggingface_hub")
    level = log.level
    log.setLevel(logging.ERROR)  # its retry warnings would break the one-line error
    try:
        try:
            config = Path(hub.hf_hub_download(repo_id, "config.json"))
        except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated, any hub error: one line
            raise InputError(f"cannot download config.json of '{repo_id}' from the hub ({type(exc).__name__}); check "
                             "the id and the network, or pass a local checkpoint directory or a named geometry") from None
        try:
            processor = pixel_range(_read_json(Path(hub.hf_hub_download(repo_id, "preprocessor_config.json")),
                                               "preprocessor_config.json"))
        except Exception:  # noqa: BLE001 - no image processor file: only dynamic resolution needs it (then --max-pixels)
            processor = {}
    finally:
        log.setLevel(level)
    return from_config(_read_json(config, "config.json"), processor, name=repo_id, source=repo_id,
                       max_pixels=max_pixels)


def named(name: str, max_pixels: int | None = None) -> Geometry:
    entry = named_geometries()[name]
    return from_config(entry["config"], entry.get("processor"), name=name, source=entry["source"],
                       max_pixels=max_pixels)
