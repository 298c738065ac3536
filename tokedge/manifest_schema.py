"""Validating a manifest once, at load: every key's type from the dataclasses in
`tokedge.artifact` (bool is not an integer, numbers are finite), then the value ranges the
runtime relies on. A malformed manifest ends in one line naming the key, never deeper in the
runtime as an internal error.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any

from tokedge.errors import ArtifactError
from tokedge.safeio import printable

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
TENSOR_DTYPES = frozenset({"float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool"})
MAX_DIM = 1 << 24  # no size in a tokedge manifest is anywhere near this

# Bounds on quantities DERIVED from several fields, checked when any command reads a manifest (run,
# serve, verify, memory, build --dry-run, profile, check) by each layout's `check_record`: each field
# may be legal while their product is a huge allocation. Every model tokedge exports is far inside
# them (docs/safety.md).
MAX_PIXELS = 1 << 25  # pixels of one image after resizing: Qwen max_pixels, an anyres canvas (Qwen3-VL: 16.8 M)
MAX_PINPOINTS = 256  # anyres candidate canvases (OneVision: 36)
MAX_TILES = 256  # tiles of the largest anyres canvas (OneVision anyres_max_9: 36)
MAX_TOKENS_PER_TILE = 1 << 14  # patch_grid squared (OneVision: 729)
MAX_PATCHES = 1 << 18  # vision patches of one image: Qwen max_pixels / patch_size^2, anyres (tiles + 1) * tile tokens
MAX_FRAME_PIXELS = 1 << 24  # video.frame_size squared (OneVision: 384^2)
MAX_VIDEO_PIXELS = 1 << 28  # video.max_frames * frame pixels (OneVision: 64 x 384^2 = 9.4 M)


class ManifestError(ArtifactError):
    def __init__(self, path: str, expected: str, value: Any = dataclasses.MISSING):
        got = "" if value is dataclasses.MISSING else f" (got {printable(repr(value), 60)})"
        super().__init__(f"malformed manifest: {path} must be {expected}{got}; re-export the artifact")


def _describe(tp: Any) -> str:
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is bool:
        return "true or false"
    origin = typing.get_origin(tp)
    if origin is tuple:
        return "a list"
    if origin is dict or tp is dict:
        return "an object"
    if dataclasses.is_dataclass(tp):
        return "an object"
    return "a valid value"


def convert(tp: Any, value: Any, path: str) -> Any:
    """`value` (parsed JSON) as type `tp`, or ManifestError naming `path`."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ManifestError(path, " or ".join(_describe(a) for a in args), value)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, path)
            except ManifestError as exc:
                errors.append(exc)
        raise ManifestError(path, " or ".join(_describe(a) for a in args if a is not type(None)), value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ManifestError(path, "an object", value)
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            sub = f"{path}.{f.name}" if path else f.name
            if f.name not in value:
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                    continue
                raise ManifestError(sub, "present")
            kwargs[f.name] = convert(hints[f.name], value[f.name], sub)
        return tp(**kwargs)
    if tp is bool:
        if not isinstance(value, bool):
            raise ManifestError(path, "true or false", value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ManifestError(path, "an integer", value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ManifestError(path, "a finite number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ManifestError(path, "a string", value)
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ManifestError(path, "a list", value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ManifestError(path, f"a list of {len(args)} items", value)
        return tuple(convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ManifestError(path, "an object", value)
        item = args[1] if args else Any
        return {k: convert(item, v, f"{path}.{k}") for k, v in value.items()}
    raise ManifestError(path, _describe(tp), value)  # pragma: no cover - a type the manifest does not use


def positive(path: str, value: int | None, allow_none: bool = False, high: int = MAX_DIM) -> None:
    if value is None and allow_none:
        return
    if value is None or not 1 <= value <= high:
        raise ManifestError(path, f"an integer between 1 and {high}", value)


def check_ranges(m: Any, format_version: int) -> None:
    """Value ranges the runtime relies on (types are already checked)."""
    if m.format_version < 1:
        raise ManifestError("format_version", "an integer >= 1", m.format_version)
    if m.dtype not in ("fp32", "fp16"):
        raise ManifestError("dtype", '"fp32" or "fp16"', m.dtype)
    for key in ("hidden_size", "num_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size",
                "max_position_embeddings", "image_size", "patch_size", "vision_hidden_size"):
        positive(f"model.{key}", getattr(m.model, key))
    for key in ("image_token_id", "bos_token_id", "pad_token_id"):
        value = getattr(m.model, key)
        if value is not None and not 0 <= value < 1 << 31:
            raise ManifestError(f"model.{key}", "a token id >= 0", value)
    for i, tok in enumerate(m.model.eos_token_ids):
        if not 0 <= tok < 1 << 31:
            raise ManifestError(f"model.eos_token_ids[{i}]", "a token id >= 0", tok)
    red = m.reduction
    positive("reduction.full_tokens", red.full_tokens)
    positive("reduction.budget", red.budget, high=red.full_tokens)
    if red.budget_range is not None:
        lo, hi = red.budget_range
        if not 1 <= lo <= hi <= red.full_tokens:
            raise ManifestError("reduction.budget_range", f"[min, max] with 1 <= min <= max <= {red.full_tokens}",
                                list(red.budget_range))
    if red.keep is not None and not 0.0 < red.keep <= 1.0:
        raise ManifestError("reduction.keep", "a ratio in (0, 1] or null", red.keep)
    positive("prompt.visual_tokens", m.prompt.visual_tokens, high=red.full_tokens)
    if not m.prompt.image_token:
        raise ManifestError("prompt.image_token", "a non-empty string", m.prompt.image_token)
    pre = m.preprocess
    for i, size in enumerate(pre.crop_size):
        positive(f"preprocess.crop_size[{i}]", size, high=16384)
    positive("preprocess.resize_shortest_edge", pre.resize_shortest_edge, allow_none=True, high=16384)
    if pre.resize_size is not None:
        for i, size in enumerate(pre.resize_size):
            positive(f"preprocess.resize_size[{i}]", size, high=16384)
    if pre.resample not in range(6):
        raise ManifestError("preprocess.resample", "a PIL resample value 0..5", pre.resample)
    if any(s == 0 for s in pre.image_std):
        raise ManifestError("preprocess.image_std", "non-zero numbers", list(pre.image_std))
    _check_layout(m.layout, m.format_version)
    if m.video is not None:
        _check_video(m.video, m.graphs)
    for name in ("vision", "embed", "decoder"):
        if name not in m.graphs:
            raise ManifestError(f"graphs.{name}", "present")
    if m.architecture is not None:  # after the graphs it names are known to be there
        _check_architecture(m.architecture, m.graphs)
    for name, graph in m.graphs.items():
        for kind, specs in (("inputs", graph.inputs), ("outputs", graph.outputs)):
            for i, spec in enumerate(specs):
                if spec.dtype not in TENSOR_DTYPES:
                    raise ManifestError(f"graphs.{name}.{kind}[{i}].dtype", f"one of {', '.join(sorted(TENSOR_DTYPES))}",
                                        spec.dtype)
                for j, dim in enumerate(spec.shape):
                    if isinstance(dim, int) and not 0 <= dim <= MAX_DIM:
                        raise ManifestError(f"graphs.{name}.{kind}[{i}].shape[{j}]", "a size or an axis name", dim)
    for rel, digest in m.files.items():
        if not _HEX64.match(digest):
            raise ManifestError(f"files.{rel}", "a sha256 hex digest", digest)
    ref = m.reference
    if not isinstance(ref.get("file"), str):
        raise ManifestError("reference.file", "a string", ref.get("file", dataclasses.MISSING))
    tol = ref.get("tolerance")
    known = {"image_embeds", "logits", "logit_cosine", "top1_agreement", "kl_mean", "text_kl_mean", "text_kl_p99",
             "text_top1", "gated"}
    if not isinstance(tol, dict) or not {"image_embeds", "logits"} <= set(tol) or not set(tol) <= known:
        raise ManifestError("reference.tolerance", 'an object with "image_embeds" and "logits" (and optionally '
                            '"logit_cosine", "top1_agreement", "kl_mean", "text_kl_mean", "text_kl_p99", '
                            '"text_top1", "gated")', tol)
    for key, value in tol.items():
        convert(bool if key == "gated" else float | None, value, f"reference.tolerance.{key}")
    text = ref.get("text")  # quantized artifacts: the fp32 side of the text measure (tokedge.fidelity)
    if text is not None and not (isinstance(text, dict) and isinstance(text.get("file"), str)):
        raise ManifestError("reference.text", 'an object with "file"', text)


def _check_layout(layout: Any, format_version: int) -> None:
    from tokedge.layouts import IMAGE_LAYOUTS

    cls = IMAGE_LAYOUTS.get(layout.kind)
    if cls is None:
        raise ManifestError("layout.kind", " or ".join(f'"{k}"' for k in IMAGE_LAYOUTS), layout.kind)
    if format_version < cls.format_version:  # a reader that ignores `layout` would misread the artifact
        raise ManifestError("format_version", f'{cls.format_version} or more for a "{layout.kind}" layout',
                            format_version)
    cls.check_record(layout, format_version)


def _check_video(video: Any, graphs: dict) -> None:
    if video.graph not in graphs:
        raise ManifestError("video.graph", f"the name of a graph in 'graphs' (one of {', '.join(graphs)})", video.graph)
    if not video.video_token:
        raise ManifestError("video.video_token", "a non-empty string", video.video_token)
    if not 0 <= video.video_token_id < 1 << 31:
        raise ManifestError("video.video_token_id", "a token id >= 0", video.video_token_id)
    from tokedge.layouts import VIDEO_LAYOUTS

    cls = VIDEO_LAYOUTS.get(video.kind)
    if cls is None:
        raise ManifestError("video.kind", " or ".join(f'"{k}"' for k in VIDEO_LAYOUTS), video.kind)
    cls.check_record(video)
    if video.tokens_per_frame != video.pooled_grid * video.pooled_grid:
        raise ManifestError("video.tokens_per_frame", f"pooled_grid squared ({video.pooled_grid ** 2})",
                            video.tokens_per_frame)
    if video.newline not in ("one_per_video", "absent"):
        raise ManifestError("video.newline", '"one_per_video" or "absent"', video.newline)
    if video.resample not in range(6):
        raise ManifestError("video.resample", "a PIL resample value 0..5", video.resample)
    if any(s == 0 for s in video.std):
        raise ManifestError("video.std", "non-zero numbers", list(video.std))
    positive("video.max_frames", video.max_frames, high=4096)
    positive("video.default_frames", video.default_frames, high=video.max_frames)
    if not 0 < video.keep_ratio <= 1:
        raise ManifestError("video.keep_ratio", "a number in (0, 1]", video.keep_ratio)
    if video.sampling not in ("uniform", "linspace"):
        raise ManifestError("video.sampling", '"uniform" or "linspace"', video.sampling)


def bounded(path: str, what: str, value: int, limit: int) -> None:
    """A quantity derived from several fields (the MAX_* bounds above), refused past `limit`;
    each layout's `check_record` names its own (tokedge/layouts)."""
    if value > limit:
        raise ManifestError(path, f"a value whose {what} stays within {limit}", value)


MAX_PARAMETERS = 1 << 42  # 4 T weights: far above any model tokedge exports, small enough for exact float math
MAX_LAYERS = 1024


def _check_architecture(arch: Any, graphs: dict) -> None:
    """The architecture record: counts >= 0 and bounded, so memory/FLOPs arithmetic on a hostile
    manifest stays small (lists are bounded by the layer count, every size by MAX_DIM)."""
    for name, rec in arch.graphs.items():
        if name not in graphs:
            raise ManifestError(f"architecture.graphs.{name}", f"the name of a graph in 'graphs' ({', '.join(graphs)})",
                                name)
        for key in ("parameters", "quantized", "scale_groups", "padded", "other_bytes"):
            value = getattr(rec, key)
            if not 0 <= value <= MAX_PARAMETERS:
                raise ManifestError(f"architecture.graphs.{name}.{key}", f"an integer between 0 and {MAX_PARAMETERS}",
                                    value)
        if rec.quantized > rec.parameters or rec.padded and rec.padded < rec.quantized:
            raise ManifestError(f"architecture.graphs.{name}.quantized", "at most parameters (and padded at least "
                                "quantized)", rec.quantized)
    v, t = arch.vision, arch.text
    positive("architecture.vision.layers", v.layers, high=MAX_LAYERS)
    for key in ("hidden", "intermediate", "heads"):
        positive(f"architecture.vision.{key}", getattr(v, key))
    positive("architecture.vision.patches_per_token", v.patches_per_token, high=4096)
    positive("architecture.vision.score_buffers", v.score_buffers, high=8)
    if not 0 <= v.mask_bytes <= 16:
        raise ManifestError("architecture.vision.mask_bytes", "an integer between 0 and 16", v.mask_bytes)
    for key, values in (("layer_tokens", v.layer_tokens), ("attention_span", v.attention_span)):
        if len(values) not in (0, v.layers):
            raise ManifestError(f"architecture.vision.{key}", f"empty or one entry per layer ({v.layers})", len(values))
        for i, value in enumerate(values):
            if not 0 <= value <= MAX_DIM:
                raise ManifestError(f"architecture.vision.{key}[{i}]", f"an integer between 0 and {MAX_DIM}", value)
    if len(v.projector) > 16 or any(not 1 <= w <= MAX_DIM for w in v.projector):
        raise ManifestError("architecture.vision.projector", "at most 16 widths between 1 and 2^24", list(v.projector))
    positive("architecture.text.layers", t.layers, high=MAX_LAYERS)
    for key in ("hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
        positive(f"architecture.text.{key}", getattr(t, key))
