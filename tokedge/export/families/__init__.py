"""Model families: one file per family, one small protocol, one registry.

A family owns everything that differs between checkpoint kinds: reading the config (sizes, token
counts, vision geometry, the visual layout), loading the weights, the graph modules to trace, the
preprocessing, prompt rendering and the transformers-side reference. Everything outside this
package talks to a family only through `Family`, found with `for_checkpoint(config)`; no other
module imports a family module, and nothing outside asks which family it holds.

Optional capabilities are declared on `FamilyBase` (None = the family has none; export asks
`family.video is not None`, never `hasattr`): `video(loaded, dtype) -> (graph name, torch module,
TraceSpec, artifact.VideoInfo)` (the per-frame video graph and the manifest's `video` record),
`video_case(loaded) -> (pixel_values_videos, transformers' video tokens)` (what export validates
that graph against), `prefill_trace_spec` (a family's own prefill inputs), `reference_positions`
(M-RoPE positions in the transformers reference) and `export_warnings`.

A family registers itself under the checkpoint's `model_type` at the bottom of its module
(`register(LlavaFamily())`); the built-in family modules are imported on first use of the
registry, so importing this package stays cheap and torch-free.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from tokedge.errors import InputError, UnsupportedModelError

if TYPE_CHECKING:
    import numpy as np

    from tokedge.artifact import ModelInfo, PreprocessInfo, PromptInfo, VisualLayout
    from tokedge.reduce.base import Method, VisionGeometry

# modules that call register() when imported; listed here, imported by name on first use
BUILTIN = ("tokedge.export.families.llava", "tokedge.export.families.llava_next",
           "tokedge.export.families.llava_onevision", "tokedge.export.families.qwen2_5_vl",
           "tokedge.export.families.qwen3_vl", "tokedge.export.families.smolvlm",
           "tokedge.export.families.internvl", "tokedge.export.families.gemma3")


@dataclass(frozen=True)
class CheckpointSpec:
    """What a checkpoint's config.json says, before any weights load."""

    family: str  # registry name of the family that read it
    full_tokens: int  # visual tokens per image before reduction
    geometry: VisionGeometry | None  # the tower's token/layer counts; None when the config leaves defaults
    text_layers: int | None  # decoder layers; None when the config leaves the class default
    layout: VisualLayout  # how one image becomes visual tokens (saved in the manifest)


@dataclass
class LoadedCheckpoint:
    """A loaded checkpoint and the family that loaded it; family methods take it back."""

    family: Family
    source: str  # what the user gave: hub id, directory or preset name
    model: Any  # the transformers model, eval mode, fp32
    processor: Any  # its processor (tokenizer + image processor)
    path: Path | None  # local directory, when there is one
    spec: CheckpointSpec

    @property
    def full_tokens(self) -> int:
        return self.spec.full_tokens


class FamilyBase:
    """The optional capabilities every family declares (a family that has one defines the method)."""

    video: Any = None  # (loaded, dtype, needs) -> (graph name, module | None, TraceSpec, VideoInfo)
    video_case: Any = None  # (loaded) -> (pixel_values_videos, transformers' video tokens)
    prefill_trace_spec: Any = None  # (loaded, plan, dtype) -> TraceSpec of the family's own prefill inputs
    reference_positions: Any = None  # (loaded, input_ids, attention_mask, images) -> M-RoPE positions
    temporal_methods: bool = False  # its video graph takes the temporal (video-only) methods
    image_blocks: bool = False  # its decoder takes `token_blocks` (bidirectional attention within an image)
    with_max_tiles: Any = None  # (loaded, most) -> loaded with at most `most` tiles per image (aspect tiles)
    fp16_refusal: str | None = None  # why --dtype fp16 is refused for this family (None: fp16 exports)

    def image_placeholders(self, loaded: Any, image: Any, count: int) -> int:
        """One image's placeholders in a reference prompt, given its `count` visual tokens (a layout
        with text between runs returns `layouts.Placeholders` with that text)."""
        return count

    def export_warnings(self, loaded: Any) -> list[str]:
        """Lines export prints after writing (e.g. memory the vision graph needs at --max-pixels)."""
        return []


@runtime_checkable
class Family(Protocol):
    """Everything family-specific. Methods taking `loaded` receive what this family's `load` returned."""

    name: str  # registry key and manifest `model.family`, e.g. "llava"
    model_types: tuple[str, ...]  # config.json `model_type` values this family reads
    architectures: tuple[str, ...]  # config.json `architectures` entries it accepts

    # --- config only (cheap: errors come before any weights load)
    def inspect(self, config: dict) -> CheckpointSpec:
        """Check the config is supported (UnsupportedModelError otherwise) and describe it."""
        ...

    def check_method(self, method: Method) -> None:
        """Refuse (UsageError, one line) a reduction method this family cannot export yet."""
        ...

    # --- weights
    def load(self, source: str, local: Path | None, *, trust_remote_code: bool = False,
             allow_pickle: bool = False) -> LoadedCheckpoint: ...

    def modules(self, loaded: LoadedCheckpoint, method: Method, k: int, options: dict,
                plan: Any = None) -> dict[str, Any]:
        """torch modules to trace: vision, embed, decoder (+ prefill when `plan` prunes in the LLM).
        The vision module has a `schedule` attribute: tokens merged per ViT layer (in-ViT methods)
        or None; the manifest records it for FLOPs."""
        ...

    def vision_trace_spec(self, loaded: LoadedCheckpoint, dtype: Any, vision: Any = None) -> Any:
        """How to trace the vision module `vision` (what `modules` built) when its inputs are not
        the single-view default (`pixel_values` [b, 3, H, W]); None for the default."""
        ...

    # --- what the manifest records
    def model_info(self, loaded: LoadedCheckpoint) -> ModelInfo: ...

    def preprocess(self, loaded: LoadedCheckpoint) -> PreprocessInfo: ...

    def layout(self, loaded: LoadedCheckpoint) -> VisualLayout: ...

    def prompt(self, loaded: LoadedCheckpoint, visual_tokens: int) -> PromptInfo: ...

    # --- export references (transformers' own outputs)
    def render_prompt(self, loaded: LoadedCheckpoint, question: str) -> str:
        """One user turn with one image, as the checkpoint's chat template renders it."""
        ...

    def pixel_values(self, loaded: LoadedCheckpoint, images: list) -> np.ndarray:
        """The checkpoint's own image processor on `images`: float32 pixel_values."""
        ...

    def tokenize(self, loaded: LoadedCheckpoint, prompts: list[str],
                 visual_tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """Placeholders expanded to `visual_tokens` each, left-padded: (input_ids, attention_mask)."""
        ...

    def reference_features(self, loaded: LoadedCheckpoint, method: Method, pixel_values: Any, k: int,
                           options: dict | None = None) -> Any:
        """Image features [b, k, hidden] from transformers' tower and projector, reduced by `method`.
        Tiled layouts take the images themselves, one at a time (`pixel_values` = [image]) -> [1, T, hidden]."""
        ...

    def reference_logits(self, loaded: LoadedCheckpoint, input_ids: Any, attention_mask: Any,
                         image_features: Any, steps: int = 1, images: list | None = None) -> tuple[Any, Any, list]:
        """transformers' LM on the spliced prompt: (prefill logits, greedy tokens, step logits).
        `images`: the prompt's images, for families whose positions depend on them (M-RoPE)."""
        ...

    def embed_prompt(self, loaded: LoadedCheckpoint, input_ids: Any, image_features: Any) -> Any:
        """Token embeddings with the image features spliced into the placeholder positions."""
        ...

    def image_token_id(self, loaded: LoadedCheckpoint) -> int: ...

    # Dynamic-resolution families (a layout with `max_pixels`) also provide
    # `with_max_pixels(loaded, max_pixels) -> LoadedCheckpoint` (export's --max-pixels, verify's
    # replay) and may provide `export_warnings(loaded) -> list[str]` (printed after export).


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Add `family` to the registry under its name (a module calls this when imported)."""
    if family.name in FAMILIES and FAMILIES[family.name] is not family:
        raise ValueError(f"model family '{family.name}' is registered twice")
    FAMILIES[family.name] = family
    return family


def families() -> dict[str, Family]:
    """Every registered family, the built-in ones imported on first use."""
    for module in BUILTIN:
        importlib.import_module(module)
    return FAMILIES


def supported() -> str:
    """One line naming each family with its architectures, for error messages (a family still in
    progress sets `exportable = False` and is left out)."""
    return "; ".join(f"{f.name} ({', '.join(f.architectures)}, model_type {'/'.join(f.model_types)})"
                     for f in families().values() if getattr(f, "exportable", True))


def families_for(method: Method) -> list[str]:
    """The families `tokedge export` accepts `method` for, from the rules that need no weights:
    temporal methods need a family whose video graph takes them; the rest ask `check_method`
    (a method may still refuse particular options or budgets later, e.g. pdrop's multi-stage plans on
    M-RoPE families)."""
    from tokedge.errors import UsageError

    out = []
    for family in families().values():
        if not getattr(family, "exportable", True):
            continue
        if method.reduces_over_time:
            if family.video is not None and family.temporal_methods:
                out.append(family.name)
            continue
        try:
            family.check_method(method)
        except UsageError:
            continue
        out.append(family.name)
    return out


def for_checkpoint(config: dict) -> Family:
    """The family that reads this config.json dict (keyed by `model_type`, then `architectures`)."""
    model_type = config.get("model_type")
    archs = [a for a in (config.get("architectures") or []) if isinstance(a, str)]
    registered = families().values()
    family = next((f for f in registered if model_type in f.model_types), None)
    if family is None and model_type is None:
        family = next((f for f in registered if set(archs) & set(f.architectures)), None)
    if family is None or (archs and not set(archs) & set(family.architectures)):
        given = f"{', '.join(archs)} (model_type {model_type!r})" if archs else f"model_type {model_type!r}"
        raise UnsupportedModelError(f"unsupported architecture {given}; tokedge exports: {supported()}")
    return family


def read_config(source: str, local: Path | None, trust_remote_code: bool = False) -> dict:
    """config.json of a local directory, or of a hub id through transformers (no weights)."""
    if local is not None:
        cfg_path = local / "config.json"
        if not cfg_path.is_file():
            raise InputError(f"'{local}' has no config.json; pass a transformers checkpoint directory or a hub id")
        try:
            data = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise InputError(f"{cfg_path} is not valid JSON ({exc})") from None
        except RecursionError:
            raise InputError(f"{cfg_path} is nested too deeply to be a transformers config") from None
        if not isinstance(data, dict):
            raise InputError(f"{cfg_path} is not a JSON object; it is not a transformers config")
        return data
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code).to_dict()
    except OSError as exc:
        raise InputError(
            f"cannot load '{source}': not a local directory and not reachable on the hub ({exc.__class__.__name__}); "
            "check the id or download the checkpoint and pass its directory"
        ) from exc


def inspect_checkpoint(source: str, local: Path | None,
                       trust_remote_code: bool = False) -> tuple[Family, CheckpointSpec]:
    """Read the config, find its family and let it check and describe the checkpoint."""
    config = read_config(source, local, trust_remote_code)
    family = for_checkpoint(config)
    return family, family.inspect(config)


def load_checkpoint(source: str, local: Path | None, *, trust_remote_code: bool = False,
                    allow_pickle: bool = False) -> LoadedCheckpoint:
    """Inspect, then load with the checkpoint's family (what verify and the baseline need)."""
    family, _ = inspect_checkpoint(source, local, trust_remote_code)
    return family.load(source, local, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)


__all__ = [
    "BUILTIN",
    "FAMILIES",
    "CheckpointSpec",
    "Family",
    "LoadedCheckpoint",
    "families",
    "families_for",
    "for_checkpoint",
    "inspect_checkpoint",
    "load_checkpoint",
    "read_config",
    "register",
    "supported",
]
