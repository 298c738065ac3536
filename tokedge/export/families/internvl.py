"""InternVL family (InternVL3 / 3.5 in transformers' `InternVLForConditionalGeneration`), read top to
bottom: the config, loading (the processor's parts without transformers' processor class, which needs
torchvision for its video processor), the vision graph (InternViT on each view: patch convolution,
CLS token and position table, pre-norm blocks with layer scale, the CLS dropped, pixel shuffle by
1 / downsample_ratio, the MLP projector: [views, 3, S, S] -> [1, views * view_tokens, hidden]), and the
manifest's "aspect_tiles" layout (tokedge.layouts.aspect_tiles: tiles of the grid closest to the
image's aspect ratio, a thumbnail last, one `<img>...</img>` run per image). The language model is
Qwen2 (InternVL3), Qwen3 (InternVL3.5) or Llama, exported as for LLaVA. Methods: none; in-LLM fastv, pdrop, dart over
every image's run; pre-LLM methods that need only the view's tokens (divprune, pool, random) keep
`--budget` tokens of every view (tile or thumbnail).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from tokedge.artifact import ModelInfo, PreprocessInfo, VisualLayout
from tokedge.errors import InputError, UnsupportedModelError, UsageError
from tokedge.export.decoder import KVDecoder, PruningPrefill, TokenEmbedder
from tokedge.export.families import CheckpointSpec, LoadedCheckpoint, register
from tokedge.export.families.llava import LlavaFamily, load_hf_checkpoint, square_view_preprocess
from tokedge.export.families.llava import model_info as llava_model_info
from tokedge.export.families.llava_onevision import ProcessorParts
from tokedge.export.families.smolvlm import check_view_method, view_features
from tokedge.export.primitives import attention, merge_heads, split_heads
from tokedge.export.towers import layers_to_feature
from tokedge.reduce.base import Method, VisionGeometry

SUPPORTED_ARCHITECTURES = ("InternVLForConditionalGeneration",)
MODEL_TYPES = ("internvl",)
SUPPORTED_TEXT = ("qwen2", "qwen3", "llama")  # InternVL3, InternVL3.5 (1B-8B), older InternVL
DEFAULT_TILES = (1, 12)  # GotOcr2ImageProcessor's min_patches / max_patches defaults


# --- the config (no weights) ---------------------------------------------------------------------


def _side(value, default: int) -> int:
    """image_size / patch_size: an int or a square [h, w] pair (transformers 5 stores pairs)."""
    if value is None:
        return default
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise UnsupportedModelError(f"non-square vision size {list(value)} is not supported")
        return int(value[0])
    return int(value)


def _sizes(cfg: dict) -> tuple[int, int, int]:
    """(view side S, patch size, merge m = 1 / downsample_ratio) from config.json."""
    vc = cfg.get("vision_config") or {}
    ratio = float(cfg.get("downsample_ratio", 0.5))
    merge = round(1 / ratio) if ratio > 0 else 0
    if merge < 1 or abs(merge * ratio - 1) > 1e-9:
        raise UnsupportedModelError(f"downsample_ratio {ratio} is not 1 / an integer")
    return _side(vc.get("image_size"), 448), _side(vc.get("patch_size"), 14), merge


def check_supported(cfg: dict) -> None:
    archs = cfg.get("architectures") or []
    if archs and not set(archs) & set(SUPPORTED_ARCHITECTURES):
        raise UnsupportedModelError(f"architecture {archs[0]} is not transformers' InternVL one "
                                    f"({', '.join(SUPPORTED_ARCHITECTURES)}); convert a remote-code InternVL "
                                    "checkpoint with transformers' convert_internvl_weights_to_hf, or use its -hf release")
    text = (cfg.get("text_config") or {}).get("model_type", "qwen2")
    if text not in SUPPORTED_TEXT:
        raise UnsupportedModelError(f"InternVL with a {text} language model is not supported yet "
                                    f"({', '.join(SUPPORTED_TEXT)} are)")
    if cfg.get("vision_feature_select_strategy", "default") != "default":
        raise UnsupportedModelError("vision_feature_select_strategy 'full' keeps the CLS token, which breaks "
                                    "InternVL's pixel shuffle; only 'default' is supported")
    if not isinstance(cfg.get("vision_feature_layer", -1), int):
        raise UnsupportedModelError("multi-layer vision features (a list vision_feature_layer) are not supported")
    side, patch, merge = _sizes(cfg)
    if side % patch or (side // patch) % merge:
        raise UnsupportedModelError(f"vision image_size {side} / patch_size {patch} is not a multiple of "
                                    f"1 / downsample_ratio {merge}")


def view_tokens(cfg: dict) -> int:
    side, patch, merge = _sizes(cfg)
    return (side // patch) ** 2 // (merge * merge)


def layout_record(cfg: dict, tiles: tuple[int, int] = DEFAULT_TILES) -> VisualLayout:
    side, patch, merge = _sizes(cfg)
    return VisualLayout(kind="aspect_tiles", tile=side, patch_size=patch, merge_size=merge, view_tokens=view_tokens(cfg),
                        min_tiles=int(tiles[0]), max_tiles=int(tiles[1]))


def inspect_config(cfg: dict, tiles: tuple[int, int] = DEFAULT_TILES) -> CheckpointSpec:
    """`full_tokens`: the most one image gives (its largest grid plus the thumbnail). The tile range is
    the image processor's (read at load; transformers' defaults 1..12 until then)."""
    from tokedge.layouts import record_bounds

    check_supported(cfg)
    side, patch, _ = _sizes(cfg)
    vc = cfg.get("vision_config") or {}
    layers = (cfg.get("text_config") or {}).get("num_hidden_layers")
    layout = layout_record(cfg, tiles)
    geometry = VisionGeometry(patch_tokens=(side // patch) ** 2, layers=int(vc.get("num_hidden_layers", 24)),
                              has_cls=False)  # the CLS is dropped before the shuffle: methods see none
    return CheckpointSpec(family="internvl", full_tokens=record_bounds(layout).tokens[2], geometry=geometry,
                          text_layers=int(layers) if layers is not None else None, layout=layout)


WORKING = "divprune, pool, random (per view), fastv, pdrop, dart or none"


def check_method(method: Method) -> None:
    """`none`; the in-LLM methods (they prune every image's run in the prefill); pre-LLM methods that
    score with what a view supplies keep `--budget` tokens of every view; the rest are refused."""
    check_view_method(method, "InternVL's pixel shuffle needs the full patch grid of every view",
                      "InternVL's shuffled view tokens do not supply yet (the CLS is dropped before the shuffle, "
                      "no attention signals)", WORKING)


# --- the processor, without transformers' processor class ----------------------------------------


@dataclass
class InternVLParts(ProcessorParts):
    """What tokedge needs of `InternVLProcessor` (whose construction needs torchvision for its video
    processor): the image processor, the fast tokenizer, the chat template and the token fields."""

    image_token: str = "<IMG_CONTEXT>"
    image_seq_length: int = 256


def load_processor(where: str, trust_remote_code: bool = False) -> InternVLParts:
    from tokedge.export.families.llava_onevision import processor_parts
    from tokedge.runtime.internvl import END_TOKEN, START_TOKEN

    image_processor, tokenizer, fields, template = processor_parts(where, trust_remote_code)
    start, end = getattr(tokenizer, "start_image_token", None), getattr(tokenizer, "end_image_token", None)
    if (start, end) != (START_TOKEN, END_TOKEN):
        raise UnsupportedModelError(f"the tokenizer's image markers are {start!r} / {end!r}, not InternVL's "
                                    f"{START_TOKEN!r} / {END_TOKEN!r}")
    return InternVLParts(image_processor=image_processor, tokenizer=tokenizer, chat_template=template,
                         image_token=getattr(tokenizer, "context_image_token", None) or "<IMG_CONTEXT>",
                         image_seq_length=int(fields.get("image_seq_length", 256)))


def processor_tiles(ip) -> tuple[int, int]:
    """(min, max) tiles of the image processor (InternVLProcessor crops on every call); max 1: one
    squashed view per image."""
    low, high = int(getattr(ip, "min_patches", 1)), int(getattr(ip, "max_patches", 12))
    return (low, high) if high > 1 else (1, 1)


def load_internvl(source: str, local: Path | None, *, trust_remote_code: bool = False,
                  allow_pickle: bool = False) -> LoadedCheckpoint:
    from tokedge.export.families import read_config

    cfg = read_config(source, local, trust_remote_code)
    inspect_config(cfg)
    model, processor = load_hf_checkpoint("InternVLForConditionalGeneration", source, local,
                                          trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                                          load_processor=load_processor)
    full = model.config.to_dict()
    ip = processor.image_processor
    side, _, _ = _sizes(full)
    size = getattr(ip, "size", None)
    get = size.get if isinstance(size, dict) else (lambda key: getattr(size, key, None))
    if (get("height"), get("width")) != (side, side):
        raise UnsupportedModelError(f"the image processor's size {get('height')}x{get('width')} is not the vision "
                                    f"image_size {side}")
    if processor.image_seq_length != view_tokens(full):
        raise InputError(f"the processor's image_seq_length {processor.image_seq_length} is not the model's "
                         f"{view_tokens(full)} tokens per view")
    spec = inspect_config(full, processor_tiles(ip))
    spec = replace(spec, text_layers=int(model.config.text_config.num_hidden_layers))
    return LoadedCheckpoint(family=FAMILY, source=source, model=model, processor=processor, path=local, spec=spec)


def with_max_tiles(loaded: LoadedCheckpoint, most: int) -> LoadedCheckpoint:
    """The checkpoint with export's --max-tiles: images are cut into at most `most` tiles (the image
    processor's max_patches set to it, so that the reference and the artifact agree)."""
    from tokedge.layouts.aspect_tiles import MOST_TILES

    low = int(loaded.spec.layout.min_tiles or 1)
    if not low <= most <= MOST_TILES:
        raise UsageError(f"--max-tiles {most} must be within {low}..{MOST_TILES} (the image processor's min_patches is "
                         f"{low})")
    loaded.processor.image_processor.max_patches = int(most)
    spec = inspect_config(loaded.model.config.to_dict(), processor_tiles(loaded.processor.image_processor))
    return replace(loaded, spec=replace(spec, text_layers=loaded.spec.text_layers))


# --- the graph modules ----------------------------------------------------------------------------


def pixel_shuffle(x, merge: int):
    """[v, n, d] (no CLS) -> [v, n / m^2, d m^2], as transformers' InternVL `pixel_shuffle` at ratio 1/m:
    m neighbouring columns are joined first, then m neighbouring rows of those; tokens row-major."""
    v, n, d = x.shape
    side = math.isqrt(n)
    x = x.reshape(v, side, side // merge, d * merge)  # [v, row, col', m cols x d]
    x = x.permute(0, 2, 1, 3).reshape(v, side // merge, side // merge, d * merge * merge)  # [v, col', row', ...]
    return x.permute(0, 2, 1, 3).reshape(v, (side // merge) ** 2, d * merge * merge)


class InternViT(nn.Module):
    """transformers' InternVL vision tower re-run block by block up to the feature layer: every view
    at the tower's own size (its position table as is), the features without the CLS token."""

    def __init__(self, tower: nn.Module, feature_layer: int):
        super().__init__()
        emb = tower.embeddings
        self.patch = emb.patch_embeddings.projection
        self.cls_token = emb.cls_token
        self.position = emb.position_embeddings
        run = layers_to_feature(feature_layer, len(tower.encoder.layer))
        self.layers = nn.ModuleList(tower.encoder.layer[:run])
        # last_hidden_state passes the tower's final norm (an Identity with mean pooling); hidden_states do not
        self.final = tower.layernorm if run == len(tower.encoder.layer) and feature_layer == -1 else nn.Identity()
        cfg = tower.config
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads

    def _block(self, layer: nn.Module, x):
        att = layer.attention
        h = layer.layernorm_before(x)
        q = split_heads(att.q_norm(att.q_proj(h)), self.head_dim)
        k = split_heads(att.k_norm(att.k_proj(h)), self.head_dim)
        v = split_heads(att.v_proj(h), self.head_dim)
        x = x + layer.lambda_1 * att.projection_layer(merge_heads(attention(q, k, v, att.scale)))
        return x + layer.lambda_2 * layer.mlp(layer.layernorm_after(x))

    def forward(self, pixel_values):
        x = self.patch(pixel_values.to(self.patch.weight.dtype)).flatten(2).transpose(1, 2)  # [v, n, d]; fp32 input
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.position is not None:
            x = x + self.position
        for layer in self.layers:
            x = self._block(layer, x)
        return self.final(x)[:, 1:]


class TileVisionGraph(nn.Module):
    """pixel_values [views, 3, S, S] -> image_embeds [1, views * k, hidden] in prompt order: every view's
    view_tokens, or with a pre-LLM method its `k` kept tokens (the method's `reduce` on each view)."""

    schedule = None  # no in-ViT merging

    def __init__(self, loaded: LoadedCheckpoint, method: Method | None = None, k: int | None = None,
                 options: dict | None = None):
        super().__init__()
        inner = loaded.model.model
        self.tower = InternViT(inner.vision_tower, int(loaded.model.config.vision_feature_layer))
        self.proj = inner.multi_modal_projector
        self.merge = _sizes(loaded.model.config.to_dict())[2]
        reduces = method is not None and method.reduces_in_vision
        self.method, self.k, self.options = (method, k, options or {}) if reduces else (None, None, {})

    def forward(self, pixel_values):
        feats = pixel_shuffle(self.tower(pixel_values), self.merge)  # [v, t, d m^2]
        if self.method is None:
            tokens = self.proj(feats)
        else:
            tokens = self.method.reduce(view_features(self.method, feats, self.proj), self.k, self.options)
        return tokens.reshape(1, -1, tokens.shape[-1])


def vision_trace_spec(loaded: LoadedCheckpoint, dtype=torch.float32):
    from tokedge.export.families.llava_next import PARTITIONS
    from tokedge.export.onnx_export import TOKENS, TraceSpec

    side = _sizes(loaded.model.config.to_dict())[0]
    hidden = int(loaded.model.config.text_config.hidden_size)
    return TraceSpec(inputs=("pixel_values",), outputs=("image_embeds",), example=(torch.rand(3, 3, side, side),),
                     dynamic_axes={"pixel_values": {0: PARTITIONS}, "image_embeds": {1: TOKENS}},
                     output_shapes={"image_embeds": (1, TOKENS, hidden)})


# --- transformers-side reference -----------------------------------------------------------------


def processor_pixels(loaded: LoadedCheckpoint, image) -> torch.Tensor:
    """transformers' image processor on one image, cropping as InternVLProcessor asks: [views, 3, S, S]."""
    out = loaded.processor.image_processor(images=[image], crop_to_patches=True, return_tensors="pt")
    return out["pixel_values"].float()


@torch.no_grad()
def reference_image_features(loaded: LoadedCheckpoint, image, method: Method | None = None, k: int | None = None,
                             options: dict | None = None) -> torch.Tensor:
    """transformers' own image processor and `get_image_features` on one image -> [1, T, hidden]; with a
    pre-LLM method, transformers' tower (its last_hidden_state), CLS dropped, its `pixel_shuffle`, then
    the method's `reduce` on every view -> [1, views * k, hidden]."""
    pixels = processor_pixels(loaded, image)
    inner = loaded.model.model
    if method is not None and method.reduces_in_vision:
        cfg = loaded.model.config
        hidden = inner.vision_tower(pixel_values=pixels, output_hidden_states=True, return_dict=True)
        feats = hidden.last_hidden_state if cfg.vision_feature_layer == -1 else \
            hidden.hidden_states[cfg.vision_feature_layer]
        feats = feats[:, 1:]
        side = math.isqrt(feats.shape[1])
        grid = inner.pixel_shuffle(feats.reshape(feats.shape[0], side, side, -1), scale_factor=cfg.downsample_ratio)
        feats = grid.reshape(feats.shape[0], -1, grid.shape[-1])
        tokens = method.reduce(view_features(method, feats, inner.multi_modal_projector), k, options or {})
        return tokens.reshape(1, -1, tokens.shape[-1])
    out = inner.get_image_features(pixels, vision_feature_layer=loaded.model.config.vision_feature_layer,
                                   vision_feature_select_strategy="default")
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    return feats.reshape(1, -1, feats.shape[-1])


def image_placeholders(loaded: LoadedCheckpoint, image, count: int):
    """One image's placeholder count with its prompt text (`<img>` + the run + `</img>`)."""
    from tokedge.layouts import Placeholders
    from tokedge.runtime.internvl import prompt_text

    return Placeholders(count, prompt_text(count, loaded.processor.image_token))


# --- the family ------------------------------------------------------------------------------------


class InternVLFamily(LlavaFamily):
    """InternVL3 / 3.5: aspect-ratio tiles and a thumbnail per image, one `<img>...</img>` run each."""

    name = "internvl"
    model_types = MODEL_TYPES
    architectures = SUPPORTED_ARCHITECTURES
    tower_has_cls = False

    def inspect(self, config: dict) -> CheckpointSpec:
        return inspect_config(config)

    def load(self, source: str, local: Path | None, *, trust_remote_code: bool = False,
             allow_pickle: bool = False) -> LoadedCheckpoint:
        return load_internvl(source, local, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

    def check_method(self, method: Method) -> None:
        check_method(method)

    def with_max_tiles(self, loaded: LoadedCheckpoint, most: int) -> LoadedCheckpoint:
        return with_max_tiles(loaded, most)

    def modules(self, loaded: LoadedCheckpoint, method: Method, k: int, options: dict, plan=None) -> dict[str, nn.Module]:
        check_method(method)
        per_view = loaded.spec.layout.view_tokens
        if method.reduces_in_vision and not 1 <= k <= per_view:
            raise UsageError(f"--budget is visual tokens per view on InternVL (each tile and the thumbnail): "
                             f"use 1..{per_view}")
        lm = loaded.model.model.language_model
        modules = {"vision": TileVisionGraph(loaded, method, k, options).eval(),
                   "embed": TokenEmbedder(lm.embed_tokens).eval()}
        if plan is not None:  # in-LLM methods: the pruning prefill over every image-token position
            modules["prefill"] = PruningPrefill(lm, loaded.model.lm_head, plan).eval()
        modules["decoder"] = KVDecoder(lm, loaded.model.lm_head, plan).eval()
        return modules

    def vision_trace_spec(self, loaded: LoadedCheckpoint, dtype=torch.float32, vision=None):
        return vision_trace_spec(loaded, dtype)

    def model_info(self, loaded: LoadedCheckpoint) -> ModelInfo:
        side, patch, _ = _sizes(loaded.model.config.to_dict())
        return replace(llava_model_info(loaded), family=self.name, image_size=side, patch_size=patch)

    def preprocess(self, loaded: LoadedCheckpoint) -> PreprocessInfo:
        return square_view_preprocess(loaded.processor.image_processor, _sizes(loaded.model.config.to_dict())[0], 3)

    def tokenize(self, loaded: LoadedCheckpoint, prompts: list[str], visual_tokens):
        """Each image placeholder -> the image's prompt text (`visual_tokens`: its Placeholders)."""
        import numpy as np

        from tokedge.runtime.internvl import prompt_text

        tok = loaded.processor.tokenizer
        token = loaded.processor.image_token
        text = getattr(visual_tokens, "text", None) or prompt_text(int(visual_tokens), token)
        previous = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok([p.replace(token, text) for p in prompts], padding=True, return_tensors="np")
        finally:
            tok.padding_side = previous
        return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)

    def pixel_values(self, loaded: LoadedCheckpoint, images: list):
        return torch.cat([processor_pixels(loaded, image) for image in images]).numpy()

    def image_placeholders(self, loaded: LoadedCheckpoint, image, count: int):
        return image_placeholders(loaded, image, count)

    def reference_features(self, loaded: LoadedCheckpoint, method: Method, images, k: int,
                           options: dict | None = None, instruction=None):
        if len(images) != 1:
            raise UnsupportedModelError("InternVL references take one image at a time (token counts differ)")
        return reference_image_features(loaded, images[0], method, k, options)


FAMILY = register(InternVLFamily())
