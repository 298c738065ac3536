"""LLaVA-OneVision family, images (llava-hf layout: `LlavaOnevisionForConditionalGeneration`).

Read top to bottom: what is supported, how a checkpoint is inspected (an 'anyres' layout like
LLaVA-NeXT's, plus `anyres_max_M` interpolation and the multi-image rule), how the processor is
loaded without transformers' processor class, and the transformers-side reference for tests.

OneVision is LLaVA-NeXT with three differences that matter here (docs/research/
llava-next-onevision-hired.md, sections 1.2, 2.2, 3.3): a SigLIP tower with no CLS token
(`vision_feature_select_strategy` "full", feature layer -1), feature maps larger than about M tiles
shrunk by bilinear interpolation (`vision_aspect_ratio` "anyres_max_M"), and the images of a prompt
with several images not tiled but padded square with the mean colour (base view + one newline).
All three are data in the `VisualLayout`; the vision graph is LLaVA-NeXT's (a weighted gather does
the interpolation), so `LlavaOnevisionFamily` subclasses `LlavaNextFamily` and the reduction work
done on that graph applies here too. Methods that score by CLS attention are refused: there is no
CLS. divprune (projected embeddings, gathered after the projector as transformers interpolates)
and the in-LLM methods (fastv, pdrop, dart) export as on LLaVA-NeXT.

transformers' `LlavaOnevisionProcessor` cannot be built without torchvision (its video processor),
so `load_processor` reads the image processor, the tokenizer, the processor fields and the chat
template separately, from either file layout: transformers 5 (`processor_config.json` with the
image processor nested, `chat_template.jinja`) or the older hub one (`preprocessor_config.json`,
flat `processor_config.json`, `chat_template.json`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tokedge.artifact import VisualLayout
from tokedge.errors import InputError, UnsupportedModelError, UsageError
from tokedge.export.families import CheckpointSpec, LoadedCheckpoint, register
from tokedge.export.families.llava import check_kind, load_hf_checkpoint, vision_geometry
from tokedge.export.families.llava_next import LlavaNextFamily
from tokedge.export.families.llava_next import check_method as next_check_method
from tokedge.export.families.llava_next import layout_from_config as anyres_layout_from_config
from tokedge.reduce.base import Method, Signal, Stage

SUPPORTED_ARCHITECTURES = ("LlavaOnevisionForConditionalGeneration",)
SUPPORTED_VISION = ("siglip_vision_model",)
SUPPORTED_TEXT = ("qwen2", "llama", "mistral")
# transformers' class defaults, used where a config.json leaves a field out (hub configs write them all)
DEFAULT_PINPOINTS = tuple((h, w) for h in range(384, 2305, 384) for w in range(384, 2305, 384))
DEFAULT_ASPECT_RATIO = "anyres_max_9"
SIGLIP_DEFAULTS = {"image_size": 224, "patch_size": 16}  # SiglipVisionConfig's
ONEVISION_VISION_DEFAULTS = {"image_size": 384, "patch_size": 14}  # LlavaOnevisionConfig without vision_config
CLS_SIGNALS = (Signal.CLS_ATTENTION, Signal.CLS_TOKEN, Signal.CLS_LOGITS)


# --- the config (no weights) ---------------------------------------------------------------------


def max_tiles(aspect_ratio: Any) -> int:
    """M of `vision_aspect_ratio` "anyres_max_M" (the only form transformers implements)."""
    match = re.fullmatch(r"anyres_max_([0-9]+)", aspect_ratio) if isinstance(aspect_ratio, str) else None
    if match is None or int(match.group(1)) < 1:
        raise UnsupportedModelError(
            f"vision_aspect_ratio {aspect_ratio!r} is not supported; LLaVA-OneVision checkpoints use "
            "'anyres_max_<tiles>' (e.g. 'anyres_max_9')"
        )
    return int(match.group(1))


def _with_defaults(cfg: dict) -> dict:
    """`cfg` with transformers' defaults for the fields the layout reads, where the file has none."""
    vc = dict(cfg["vision_config"]) if isinstance(cfg.get("vision_config"), dict) else None
    vision = {**(SIGLIP_DEFAULTS if vc is not None else ONEVISION_VISION_DEFAULTS), **(vc or {})}
    vision.setdefault("model_type", "siglip_vision_model")
    return {**cfg, "vision_config": vision,
            "image_grid_pinpoints": cfg.get("image_grid_pinpoints") or [list(p) for p in DEFAULT_PINPOINTS]}


def check_supported(cfg: dict) -> None:
    check_kind(cfg, family="llava_onevision", architectures=SUPPORTED_ARCHITECTURES, vision=SUPPORTED_VISION,
               text=SUPPORTED_TEXT, default_vision="siglip_vision_model", default_text="qwen2",
               where=" for LLaVA-OneVision")
    strategy = cfg.get("vision_feature_select_strategy", "full")
    if strategy != "full":
        raise UnsupportedModelError(
            f"LLaVA-OneVision with vision_feature_select_strategy {strategy!r} is not supported "
            "(SigLIP has no CLS token to drop; hub checkpoints use 'full')"
        )
    if not isinstance(cfg.get("vision_feature_layer", -1), int):
        raise UnsupportedModelError("multi-layer vision features (list vision_feature_layer) are not supported yet")
    max_tiles(cfg.get("vision_aspect_ratio", DEFAULT_ASPECT_RATIO))


def layout_from_config(cfg: dict, pad_fill: tuple[int, int, int] = (0, 0, 0)) -> VisualLayout:
    """LLaVA-NeXT's anyres layout of the config, plus `max_tiles` and the multi-image square rule
    (`pad_fill`: the image processor's mean as uint8, the colour the square is padded with)."""
    layout = anyres_layout_from_config(_with_defaults(cfg))
    return replace(layout, max_tiles=max_tiles(cfg.get("vision_aspect_ratio", DEFAULT_ASPECT_RATIO)),
                   multi_image_square=True, pad_fill=pad_fill)


def largest_token_count(layout: VisualLayout) -> int:
    """An upper bound on one image's visual tokens: every pinpoint's map and every map unpadding can
    cut from it (rows or columns removed symmetrically), after the `anyres_max_M` shrink, plus the
    base view and a newline per row."""
    p, m, threshold = layout.patch_grid, layout.max_tiles, layout.interpolate_threshold
    best = p * p + 1  # an untiled image: base + newline
    for h, w in layout.pinpoints:
        rows, cols = (h // layout.tile) * p, (w // layout.tile) * p
        for r, c in [(rows - 2 * pad, cols) for pad in range(rows // 2)] + [(rows, cols - 2 * pad)
                                                                          for pad in range(cols // 2)]:
            ratio = math.sqrt(r * c / (m * p * p))
            if ratio > threshold:
                r, c = int(r // ratio), int(c // ratio)
            best = max(best, p * p + r * (c + 1))
    return best


def inspect_config(cfg: dict) -> CheckpointSpec:
    """Check a config.json dict is supported and describe it; `full_tokens` bounds one image's count."""
    check_supported(cfg)
    layout = layout_from_config(cfg)
    full = _with_defaults(cfg)
    full.setdefault("vision_feature_layer", -1)
    layers = (cfg.get("text_config") or {}).get("num_hidden_layers")
    return CheckpointSpec(family="llava_onevision", full_tokens=largest_token_count(layout),
                          geometry=vision_geometry(full), text_layers=int(layers) if layers is not None else None,
                          layout=layout)


WORKING_METHODS = "divprune, fastv, pdrop, dart or none"  # what exports on LLaVA-OneVision


def check_method(method: Method) -> None:
    """In-LLM methods (fastv, pdrop, dart) take LLaVA-NeXT's unreduced vision graph plus the pruning
    prefill; divprune (projected embeddings) selects over an image's candidates as on LLaVA-NeXT.
    Methods ranking by the CLS token can never apply (SigLIP has none); the others are refused
    with what to use instead."""
    if method.keeps_all or method.prunes_in_llm:
        return
    cls = [s.value for s in method.scores_with if s in CLS_SIGNALS]
    if cls:
        raise UsageError(
            f"--method {method.name} scores tokens by the CLS token ({', '.join(cls)}), and LLaVA-OneVision's "
            f"SigLIP tower has none; use --method {WORKING_METHODS}"
        )
    if method.stage is Stage.IN_VIT:
        raise UsageError(f"--method {method.name} merges inside the vision tower, one tile at a time, and has no "
                         f"per-image budget on LLaVA-OneVision; use --method {WORKING_METHODS}")
    if Signal.POSITIONS in method.scores_with:
        raise UsageError(f"--method {method.name} pools one square patch grid and a tiled image has none; "
                         f"use --method {WORKING_METHODS}")
    if method.single_view:
        raise UsageError(f"--method {method.name} is built for one view of a fixed token count and a tiled image's "
                         f"candidate count varies per image; use --method {WORKING_METHODS}")
    if method.takes_instruction:
        raise UsageError(f"--method {method.name} scores with the prompt's text, which tiled layouts do not feed "
                         f"their vision graph yet; use --method {WORKING_METHODS}")
    if method.stage is not Stage.PRE_LLM or not set(method.scores_with) <= {Signal.EMBEDDINGS}:
        raise UsageError(f"--method {method.name} is not available for LLaVA-OneVision; use --method {WORKING_METHODS}")
    next_check_method(method)  # the tiled-image rules shared with LLaVA-NeXT


# --- the processor, without transformers' processor class ---------------------------------------------


@dataclass
class ProcessorParts:
    """A processor's image processor, tokenizer and chat template, for families whose processor class
    cannot be built here (`processor_parts`); subclasses add the fields that decide placeholders."""

    image_processor: Any
    tokenizer: Any
    chat_template: str | None

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template,
                                                  add_generation_prompt=add_generation_prompt, tokenize=False)


@dataclass
class OnevisionProcessor(ProcessorParts):
    """What tokedge needs of `LlavaOnevisionProcessor`: its image processor, tokenizer, chat
    template and the fields that decide placeholder counts (read from processor_config.json)."""

    image_token: str = "<image>"
    video_token: str = "<video>"
    num_image_tokens: int | None = None
    vision_feature_select_strategy: str | None = None
    vision_aspect_ratio: str = DEFAULT_ASPECT_RATIO


def _read_text(where: str, name: str) -> str | None:
    """A file of a local directory or hub repository; None when the checkpoint has none."""
    if Path(where).is_dir():
        path = Path(where) / name
        return path.read_text(encoding="utf-8") if path.is_file() else None
    from transformers.utils import cached_file

    found = cached_file(where, name, _raise_exceptions_for_missing_entries=False,
                        _raise_exceptions_for_connection_errors=False)
    return Path(found).read_text(encoding="utf-8") if found else None


def _read_json(where: str, name: str) -> dict:
    text = _read_text(where, name)
    if text is None:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{name} of '{where}' is not valid JSON ({exc})") from None
    except RecursionError:
        raise InputError(f"{name} of '{where}' is nested too deeply to be a processor config") from None
    if not isinstance(data, dict):
        raise InputError(f"{name} of '{where}' is not a JSON object")
    return data


def processor_parts(where: str, trust_remote_code: bool = False) -> tuple[Any, Any, dict, str | None]:
    """What a processor whose class cannot be built here is made of (OneVision, InternVL, SmolVLM2:
    their classes need torchvision): (PIL image processor (AutoImageProcessor reads both file layouts),
    fast tokenizer, processor fields, the processor-level chat template: chat_template.jinja,
    chat_template.json, then the one in processor_config.json; the tokenizer's only when the processor
    has none)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from tokedge.export.hf import pil_backend

    image_processor = AutoImageProcessor.from_pretrained(where, trust_remote_code=trust_remote_code, **pil_backend())
    tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
    fields = {k: v for k, v in _read_json(where, "processor_config.json").items() if k != "image_processor"}
    template = _read_text(where, "chat_template.jinja") or _read_json(where, "chat_template.json").get("chat_template")
    template = template or fields.get("chat_template") or getattr(tokenizer, "chat_template", None)
    return image_processor, tokenizer, fields, template if isinstance(template, str) else None


def load_processor(where: str, trust_remote_code: bool = False) -> OnevisionProcessor:
    """The processor's parts (`processor_parts`) with the fields that decide placeholder counts."""
    image_processor, tokenizer, fields, template = processor_parts(where, trust_remote_code)
    return OnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=template,
        # transformers' processor takes the tokenizer's own image/video token first
        image_token=getattr(tokenizer, "image_token", None) or fields.get("image_token") or "<image>",
        video_token=getattr(tokenizer, "video_token", None) or fields.get("video_token") or "<video>",
        num_image_tokens=fields.get("num_image_tokens"),
        vision_feature_select_strategy=fields.get("vision_feature_select_strategy"),
        vision_aspect_ratio=fields.get("vision_aspect_ratio") or DEFAULT_ASPECT_RATIO,
    )


def check_processor(processor: OnevisionProcessor, config: dict, layout: VisualLayout) -> None:
    """The processor's counting fields must agree with the model config (transformers counts
    placeholders with the processor's and packs with the config's: a mismatch breaks both)."""
    ip = processor.image_processor
    pinpoints = tuple(tuple(int(v) for v in p) for p in getattr(ip, "image_grid_pinpoints", None) or ())
    image_token_id = config.get("image_token_id", config.get("image_token_index"))
    checks = [
        (f"the tokenizer's id of {processor.image_token!r}", processor.tokenizer.convert_tokens_to_ids(
            processor.image_token), image_token_id),
        ("image processor image_grid_pinpoints", pinpoints, layout.pinpoints),
        ("processor_config vision_aspect_ratio", processor.vision_aspect_ratio,
         config.get("vision_aspect_ratio", DEFAULT_ASPECT_RATIO)),
    ]
    if processor.num_image_tokens is not None:
        checks.append(("processor_config num_image_tokens", processor.num_image_tokens, layout.patch_grid ** 2))
    if processor.vision_feature_select_strategy is not None:
        checks.append(("processor_config vision_feature_select_strategy", processor.vision_feature_select_strategy,
                       config.get("vision_feature_select_strategy", "full")))
    for what, got, want in checks:
        if got != want:
            raise InputError(f"{what} is {got!r} but the model config says {want!r}; the checkpoint is inconsistent")


def pad_fill(processor: OnevisionProcessor) -> tuple[int, int, int]:
    """The square-padding colour of multi-image prompts: the image mean in uint8, as transformers has it."""
    mean = processor.image_processor.image_mean
    mean = [mean] * 3 if isinstance(mean, (int, float)) else list(mean)
    if len(mean) != 3:
        raise InputError(f"the image processor's image_mean {mean} does not have 3 channels")
    return (int(mean[0] * 255), int(mean[1] * 255), int(mean[2] * 255))


def load_llava_onevision(source: str, local: Path | None, *, trust_remote_code: bool = False,
                         allow_pickle: bool = False) -> LoadedCheckpoint:
    """Load model and processor from a llava-hf LLaVA-OneVision directory or hub id."""
    from tokedge.export.families import read_config

    spec = inspect_config(read_config(source, local, trust_remote_code))
    model, processor = load_hf_checkpoint("LlavaOnevisionForConditionalGeneration", source, local,
                                          trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                                          load_processor=load_processor)
    full_config = model.config.to_dict()
    layout = layout_from_config(full_config, pad_fill(processor))
    check_processor(processor, full_config, layout)
    spec = replace(spec, layout=layout, full_tokens=largest_token_count(layout), geometry=vision_geometry(full_config),
                   text_layers=int(model.config.text_config.num_hidden_layers))
    return LoadedCheckpoint(family=FAMILY, source=source, model=model, processor=processor, path=local, spec=spec)


# --- transformers-side reference (tests, and validation once export does anyres cases) ---------------


def hf_processor(loaded: LoadedCheckpoint):
    """transformers' own `LlavaOnevisionProcessor` placeholder counting, without its constructor
    (which needs torchvision): `replace_image_token` and `_get_number_of_features` run unchanged."""
    from transformers import LlavaOnevisionProcessor

    proc = loaded.processor
    hf = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)
    hf.image_processor = proc.image_processor
    hf.num_image_tokens = proc.num_image_tokens if proc.num_image_tokens is not None else \
        loaded.spec.layout.patch_grid ** 2
    hf.vision_aspect_ratio = proc.vision_aspect_ratio
    hf.vision_feature_select_strategy = proc.vision_feature_select_strategy or "full"
    hf.image_token = proc.image_token
    return hf


def reference_batch(loaded: LoadedCheckpoint, images: list[list], texts: list[str]) -> dict[str, torch.Tensor]:
    """transformers' inputs for `model(**batch)` / `model.generate(**batch)`: `texts[i]` is a rendered
    prompt with one image placeholder per image of `images[i]`. The image processor gets the nested
    list, so prompts with several images get `batch_num_images` > 1 (untiled, square-padded images);
    each placeholder is expanded to transformers' own count; left padding."""
    proc = loaded.processor
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} image lists for {len(texts)} prompts")
    batch = proc.image_processor([list(group) for group in images], return_tensors="np")
    hf = hf_processor(loaded)
    expanded, index = [], 0
    for group, text in zip(images, texts):
        pieces = text.split(proc.image_token)
        if len(pieces) - 1 != len(group):
            raise ValueError(f"prompt has {len(pieces) - 1} placeholders for {len(group)} images")
        out = pieces[0]
        for piece in pieces[1:]:
            out += hf.replace_image_token(batch, index) + piece
            index += 1
        expanded.append(out)
    tok = proc.tokenizer
    previous = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(expanded, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = previous
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "pixel_values": torch.from_numpy(np.asarray(batch["pixel_values"], dtype=np.float32)),
        "image_sizes": torch.as_tensor(np.asarray(batch["image_sizes"]), dtype=torch.int64),
        "batch_num_images": torch.as_tensor(batch["batch_num_images"], dtype=torch.int64),
    }


def render_images_prompt(loaded: LoadedCheckpoint, question: str, images: int = 1) -> str:
    """One user turn with `images` image items, as the checkpoint's chat template renders it."""
    content = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": question}]
    return loaded.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


# --- the family ------------------------------------------------------------------------------------


# --- video: the per-frame vision graph and the manifest's video record (issue 13) ---------------------

DEFAULT_VIDEO_FRAMES = 8  # frames sampled when the user gives neither --frames nor --fps
MAX_VIDEO_FRAMES = 64  # most frames a prompt may take (the papers use 32)


class VideoVisionGraph(nn.Module):
    """pixel_values_videos [F, 3, S, S] -> (video_embeds [F, q*q, hidden], newline [1, hidden]).

    transformers' `get_video_features`: every frame through the tower to the feature layer and the
    projector (all p*p rows: SigLIP has no CLS), then `interpolate(size=(q, q), mode="bilinear")`
    with q = ceil(p / 2), here two constant matrices (`W X W^T`, from `runtime.video.pooling_matrix`).
    The video's single `image_newline` is the second output; the runtime appends it after the
    (possibly reduced) frame tokens (`runtime.video.VideoLayout.pack` does the same in numpy).
    """

    def __init__(self, model: nn.Module, needs: frozenset[str] = frozenset()):
        super().__init__()
        from tokedge.export.towers import VisionTower
        from tokedge.runtime.video import pooling_matrix

        m = model.model
        cfg = model.config
        self.needs = needs  # "received_attention": also output it per frame, pooled like the tokens (fastvid)
        self.tower = VisionTower(m.vision_tower, cfg.vision_feature_layer, drop_cls=False, needs=needs)
        self.projector = m.multi_modal_projector
        self.newline = m.image_newline
        self.p = cfg.vision_config.image_size // cfg.vision_config.patch_size
        self.q = math.ceil(self.p / 2)
        self.register_buffer("pool", torch.from_numpy(pooling_matrix(self.p, self.q)), persistent=False)

    def _pool(self, x):
        """[F, p*p, d] -> [F, q*q, d]: the bilinear 27->14 pooling as two constant matrices."""
        f, d = x.shape[0], x.shape[-1]
        pool = self.pool.to(x.dtype)
        rows = torch.einsum("ai,fijd->fajd", pool, x.reshape(f, self.p, self.p, d))
        return torch.einsum("bj,fajd->fabd", pool, rows).reshape(f, self.q * self.q, d)

    def forward(self, pixel_values_videos):
        vf = self.tower(pixel_values_videos)
        feats = self.projector(vf.features)  # [F, p*p, D]
        out = (self._pool(feats), self.newline.to(feats.dtype).reshape(1, feats.shape[-1]))
        if "received_attention" in self.needs:
            out += (self._pool(vf.received_attention[..., None])[..., 0],)
        return out


def video_trace_spec(hidden_size: int, image_size: int, tokens_per_frame: int, dtype=torch.float32,
                     needs: frozenset[str] = frozenset()):
    """The video vision graph's input and outputs, frames dynamic. `pixel_values_videos` stays
    float32 whatever the weights' `dtype` (the tower casts it), as the image graph's pixels do."""
    from tokedge.export.onnx_export import TraceSpec

    outputs = ("video_embeds", "newline")
    axes = {"pixel_values_videos": {0: "frames"}, "video_embeds": {0: "frames"}}
    shapes: dict = {"video_embeds": ("frames", tokens_per_frame, hidden_size), "newline": (1, hidden_size)}
    if "received_attention" in needs:
        outputs += ("received_attention",)
        axes["received_attention"] = {0: "frames"}
        shapes["received_attention"] = ("frames", tokens_per_frame)
    return TraceSpec(inputs=("pixel_values_videos",), outputs=outputs,
                     example=(torch.rand(3, 3, image_size, image_size),), dynamic_axes=axes,
                     output_shapes=shapes)


def video_processor_settings(where: str | None, image_processor: Any) -> dict:
    """The video processor's saved settings, looked up as transformers does (processor_config.json
    "video_processor", then video_preprocessor_config.json), falling back key by key to the image
    processor's (older hub layouts keep one preprocessor_config.json for both)."""
    saved: dict = {}
    if where is not None:
        nested = _read_json(where, "processor_config.json").get("video_processor")
        saved = nested if isinstance(nested, dict) else _read_json(where, "video_preprocessor_config.json")

    def pick(key: str, default):
        return saved[key] if key in saved else getattr(image_processor, key, default)

    return {"resample": pick("resample", 3), "rescale_factor": pick("rescale_factor", 1 / 255),
            "image_mean": pick("image_mean", [0.5] * 3), "image_std": pick("image_std", [0.5] * 3),
            "size": saved.get("size")}


def _triple(value, what: str) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3:
        raise InputError(f"the video processor's {what} {values} does not have 3 channels")
    return (float(values[0]), float(values[1]), float(values[2]))


def video_info(loaded: LoadedCheckpoint, graph_name: str = "video_vision"):
    """The manifest's `video` record for this checkpoint."""
    from tokedge.artifact import VideoInfo

    cfg = loaded.model.config
    proc = loaded.processor
    settings = video_processor_settings(loaded.source if loaded.path is None else str(loaded.path),
                                        proc.image_processor)
    size = cfg.vision_config.image_size
    saved = settings["size"]
    if isinstance(saved, dict) and (saved.get("height", size), saved.get("width", size)) != (size, size):
        raise UnsupportedModelError(f"the video processor resizes frames to {saved}, not the tower's {size}x{size}; "
                                    "tokedge exports video only for square frames of the tower's size")
    p = size // cfg.vision_config.patch_size
    q = math.ceil(p / 2)
    resample = settings["resample"]
    token_id = getattr(cfg, "video_token_id", None)
    if token_id is None:
        token_id = proc.tokenizer.convert_tokens_to_ids(proc.video_token)
    return VideoInfo(graph=graph_name, video_token=proc.video_token, video_token_id=int(token_id), frame_size=size,
                     patch_grid=p, pooled_grid=q, tokens_per_frame=q * q, newline="one_per_video",
                     resample=int(getattr(resample, "value", resample)),
                     rescale_factor=float(settings["rescale_factor"]),
                     mean=_triple(settings["image_mean"], "image_mean"), std=_triple(settings["image_std"], "image_std"),
                     default_frames=DEFAULT_VIDEO_FRAMES, max_frames=MAX_VIDEO_FRAMES)


class LlavaOnevisionFamily(LlavaNextFamily):
    """`LlavaOnevisionForConditionalGeneration`, images: LLaVA-NeXT's graphs, prompt and reference
    (inherited), with OneVision's config, processor loading, layout and method rules."""

    name = "llava_onevision"
    model_types = ("llava_onevision",)
    architectures = SUPPORTED_ARCHITECTURES
    tower_has_cls = False  # SigLIP: every row is a patch ("full")
    temporal_methods = True  # video_reduce.onnx between video_vision.onnx and the newline

    def pack_candidates(self, loaded: LoadedCheckpoint, values: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """values [P, N, F] -> [1, C, F] in candidate order: transformers' OneVision
        `pack_image_features` without newlines, with the `anyres_max_M` bilinear shrink (so values
        must be what transformers interpolates: projected rows, for embeddings)."""
        cfg = loaded.model.config
        packed, _ = loaded.model.model.pack_image_features([values], sizes, image_newline=None,
                                                           vision_aspect_ratio=cfg.vision_aspect_ratio)
        return packed[0][None]

    def inspect(self, config: dict) -> CheckpointSpec:
        return inspect_config(config)

    def load(self, source: str, local: Path | None, *, trust_remote_code: bool = False,
             allow_pickle: bool = False) -> LoadedCheckpoint:
        return load_llava_onevision(source, local, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)

    def check_method(self, method: Method) -> None:
        check_method(method)

    def modules(self, loaded: LoadedCheckpoint, method: Method, k: int, options: dict, plan=None) -> dict[str, nn.Module]:
        check_method(method)  # OneVision's own refusals first (no CLS), then LLaVA-NeXT's graphs
        return super().modules(loaded, method, k, options, plan)

    # --- transformers' side for prompts with several images (beyond the protocol; tests use these)
    def render_images_prompt(self, loaded: LoadedCheckpoint, question: str, images: int = 1) -> str:
        return render_images_prompt(loaded, question, images)

    def reference_batch(self, loaded: LoadedCheckpoint, images: list[list], texts: list[str]) -> dict:
        return reference_batch(loaded, images, texts)

    def hf_processor(self, loaded: LoadedCheckpoint):
        return hf_processor(loaded)

    # --- video (issue 13)
    def video_vision(self, loaded: LoadedCheckpoint, dtype=torch.float32, needs: frozenset[str] = frozenset()):
        """The per-frame video vision graph ([F, 3, S, S] -> [F, q*q, hidden], newline) and its trace spec;
        `needs` {"received_attention"} adds that output ([F, q*q], pooled like the tokens)."""
        cfg = loaded.model.config
        graph = VideoVisionGraph(loaded.model, needs).eval()
        return graph, video_trace_spec(cfg.text_config.hidden_size, cfg.vision_config.image_size, graph.q * graph.q,
                                       dtype, needs)

    def video_case(self, loaded: LoadedCheckpoint, frames: int = 2, seed: int = 0):
        """A validation case for the video graph: (pixel_values_videos [F, 3, S, S] float32 of
        smooth random frames, transformers' `get_video_features` on them [F*q*q + 1, hidden])."""
        cfg = loaded.model.config
        size = cfg.vision_config.image_size
        rng = np.random.default_rng(seed)
        coarse = rng.uniform(-1, 1, (frames, 3, 8, 8)).astype(np.float32)
        pixels = np.ascontiguousarray(np.repeat(np.repeat(coarse, size // 8 + 1, axis=2), size // 8 + 1, axis=3)
                                      [:, :, :size, :size])
        with torch.no_grad():
            ref = loaded.model.model.get_video_features(
                torch.from_numpy(pixels)[None], vision_feature_layer=cfg.vision_feature_layer,
                vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output[0]
        return pixels, ref.float().numpy()

    def video(self, loaded: LoadedCheckpoint, dtype=torch.float32, needs: frozenset[str] = frozenset()):
        """What export writes for video input: (graph name, module, trace spec, manifest VideoInfo)."""
        graph, spec = self.video_vision(loaded, dtype, needs)
        return "video_vision", graph, spec, video_info(loaded, "video_vision")


FAMILY = register(LlavaOnevisionFamily())
