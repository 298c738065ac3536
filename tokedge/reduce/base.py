"""What a reduction method is: a small frozen description plus pure tensor functions.

Pre-LLM and in-ViT methods see `VisionFeatures` (the feature-layer tokens and whatever extras they
declared in `needs`) and return the projected tokens that enter the LLM. In-LLM methods describe
where they prune and score inside the decoder (`tokedge.reduce.in_llm`). Nothing here holds state
or hooks a model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from tokedge.errors import UsageError


class Stage(str, Enum):
    """Where a method acts. A str enum: saved in manifests and JSON as its value."""

    NONE = "none"  # keeps every token
    PRE_LLM = "pre-llm"  # between the vision tower and the LLM (in the vision graph)
    IN_VIT = "in-vit"  # inside the vision tower's layers (in the vision graph)
    IN_LLM = "in-llm"  # inside the decoder's prefill (the vision graph keeps every token)
    TEMPORAL = "temporal"  # video only: across a video's frames, before the LLM (images keep every token)

    def __str__(self) -> str:
        return self.value


class Signal(str, Enum):
    """What a method scores tokens with; families supply these in the layer the method asks for."""

    CLS_ATTENTION = "cls-attention"  # the vision feature layer's CLS-query attention row
    EARLY_CLS_ATTENTION = "early-cls-attention"  # the first ViT layer's CLS-query attention row
    CLS_TOKEN = "cls-token"  # the feature layer's CLS hidden state
    KEYS = "keys"  # the vision feature layer's keys (head mean)
    VIT_KEYS = "vit-keys"  # every ViT layer's keys (token merging)
    FEATURES = "features"  # the feature layer's hidden states (similarity, diversity)
    EMBEDDINGS = "embeddings"  # the projected tokens themselves (so every token is projected)
    POSITIONS = "positions"  # only the patch grid (pooling)
    REGIONS = "regions"  # tiled images: each token's partition and the tile under each base-view token
    LLM_ATTENTION = "llm-attention"  # the last prompt token's attention inside the LLM
    LLM_KEY_NORM = "llm-key-norm"  # L1 norm of the LLM's keys, plus hidden-state similarity
    RECEIVED_ATTENTION = "received-attention"  # mean attention each token receives in the feature layer
    OBJECT_ATTENTION = "object-attention"  # the same in a middle ViT layer (the method's `object_layer`)
    INSTRUCTION = "instruction"  # the prompt's text: mean of its token embeddings (the vision graph's input)
    CLS_LOGITS = "cls-logits"  # the CLS query's pre-softmax logits (head mean) in the layer reading the features
    THUMBNAIL_GUIDE = "thumbnail-guide"  # tiled images: each tile's block of the base view, base map resized onto the tile map

    def __str__(self) -> str:
        return self.value


STAGES = tuple(s.value for s in Stage)
# VisionFeatures extras a vision-side signal asks the tower for
_TOWER_EXTRAS = {Signal.CLS_ATTENTION: "cls_attention", Signal.CLS_TOKEN: "cls_token", Signal.KEYS: "keys",
                 Signal.EARLY_CLS_ATTENTION: "early_cls_attention", Signal.RECEIVED_ATTENTION: "received_attention",
                 Signal.OBJECT_ATTENTION: "object_attention", Signal.CLS_LOGITS: "cls_logits"}


@dataclass
class VisionFeatures:
    """Inputs a vision-side method may use (torch tensors; b = batch, n = patch tokens).

    features:      [b, n, d] feature-layer patch tokens (CLS removed when the model drops it)
    project:       the multimodal projector, [b, m, d] -> [b, m, hidden]
    cls_attention: [b, n] CLS-query attention to each patch in the feature layer, mean over heads
                   (softmax over all keys, CLS included), fp32       -- needs "cls_attention"
    cls_token:     [b, 1, d] the feature layer's CLS hidden state     -- needs "cls_token"
    keys:          [b, n, d_head] the feature layer's keys for the patches, mean over heads
                                                                       -- needs "keys"
    early_cls_attention: [b, n] as cls_attention, in the first encoder layer -- needs "early_cls_attention"

    Tiled images (anyres) give one row of candidates per image (b = 1): the base view's tokens
    first, then the unpadded tile map in raster order, gathered from every partition's tower
    output; cls_attention etc. are each partition's own rows and cls_token is the base view's.
    There, with Signal.REGIONS:
    partition:     [b, n] int64 partition of each token (0 = base view, t + 1 = tile t)
    base_tile:     [b, N] int64 tile under the centre of each base-view token (N = the base's tokens)
    and with Signal.THUMBNAIL_GUIDE (`partition` too):
    base_block:    [b, N, T] one-hot: the tile whose block of the base view's p x p map (an even
                   split by the tile grid, padding ignored: GlobalCom2's) holds each base-view token
    global_guide:  [b, n] each candidate's score from the base view: the base view's `cls_logits`
                   resized bilinearly onto the unpadded tile map (0 for base-view candidates)
    """

    features: Any
    project: Callable[[Any], Any]
    cls_attention: Any = None
    cls_token: Any = None
    keys: Any = None
    early_cls_attention: Any = None
    received_attention: Any = None  # [b, n] feature layer's attention probabilities, mean over heads and queries
    object_attention: Any = None  # [b, n] the same in the layer `Method.object_layer` names -- needs "object_attention"
    instruction: Any = None  # [b, hidden] mean embedding of each image's prompt text (Signal.INSTRUCTION)
    cls_logits: Any = None  # [b, n] CLS-query logits q.k/sqrt(d) before softmax, head mean -- needs "cls_logits"
    partition: Any = None
    base_tile: Any = None
    base_block: Any = None
    global_guide: Any = None
    grid_width: Any = None  # dynamic resolution (Qwen-VL): 0-d int64, columns of the merged grid (raster order)


@dataclass(frozen=True)
class VisionGeometry:
    """What a method's budget check may need to know about the vision tower (from config.json)."""

    patch_tokens: int  # patch tokens entering the tower's layers (CLS not counted)
    layers: int  # encoder layers that run up to the feature layer
    has_cls: bool


@dataclass(frozen=True)
class OptionSpec:
    type: type  # int, float or str
    default: Any  # None: derived from the budget (see help)
    help: str
    check: Callable[[Any], bool] = lambda v: True
    requirement: str = ""  # what `check` demands, for the error message


@dataclass(frozen=True)
class Method:
    name: str
    stage: Stage
    paper: str  # arXiv id(s) of the method's paper
    summary: str
    reference: str = "-"  # the code whose semantics tokedge follows (the authors', or a peer's port)
    scores_with: tuple[Signal, ...] = ()  # what it ranks tokens by (empty: nothing: `none` keeps all, `random` draws)
    static_counts: bool = True  # every token count is known at export time for a fixed budget
    supports_runtime_budget: bool = False  # can export a `budget` graph input (TopK with runtime k)
    # its graph's constants (bands, grid neighbours) are built for one view of a fixed token count, so
    # layouts whose candidate count varies per image (tiled) refuse it
    single_view: bool = False
    budget_meaning: str = "visual tokens that enter the LLM"
    reduce: Callable[..., Any] | None = None  # (VisionFeatures, k, options) -> [b, k, hidden]
    option_specs: dict[str, OptionSpec] = field(default_factory=dict)
    min_budget: int = 1
    budget_check: Callable[[int, int], str | None] | None = None  # (budget, full) -> error or None
    # the same on dynamic-resolution families (a count per image, `reduce_indexed`); None: budget_check
    indexed_budget_check: Callable[[int, int], str | None] | None = None
    plan: Callable[..., Any] | None = None  # in-LLM: (budget, full, n_layers, options) -> in_llm.Plan
    fewest_tokens: Callable[[VisionGeometry], int] | None = None  # smallest budget the method can reach
    # towers without CLS and counts that vary per image (Qwen-VL): (VisionFeatures with b = 1 and
    # cls_attention = the attention each token receives, k a 0-d int64 tensor, options, most = the
    # largest k the graph is built for) -> (tokens [1, k, hidden], kept_index [1, k] int64 ascending:
    # whose position each token takes)
    reduce_indexed: Callable[..., Any] | None = None
    # video-only methods (evs, dycoke, fastvid): act on a whole video's pooled projected tokens
    temporal: Callable[..., Any] | None = None  # (frames.VideoTokens, budget, options) -> ([K, hidden], kept [K])
    temporal_count: Callable[..., int] | None = None  # (frames, n, budget, options) -> K; UsageError if unreachable
    # methods scoring with Signal.OBJECT_ATTENTION: (options, tower depth, has_cls) -> 0-based layer it is read in
    object_layer: Callable[[dict, int, bool], int] | None = None

    @property
    def needs(self) -> frozenset[str]:
        """The `VisionFeatures` extras the vision tower must produce for this method."""
        return frozenset(_TOWER_EXTRAS[s] for s in self.scores_with if s in _TOWER_EXTRAS)

    @property
    def takes_instruction(self) -> bool:
        """Scores with the prompt's text: the vision graph takes an `instruction` input."""
        return Signal.INSTRUCTION in self.scores_with

    @property
    def needs_tiles(self) -> bool:
        """Allocates each image's budget across a thumbnail (base view) and its tiles (tiled layouts only)."""
        return Signal.THUMBNAIL_GUIDE in self.scores_with

    @property
    def needs_attention(self) -> bool:
        """Scores with attention probabilities (so it needs eager attention, no fused kernels)."""
        return Signal.CLS_ATTENTION in self.scores_with or Signal.LLM_ATTENTION in self.scores_with

    @property
    def reduces_over_time(self) -> bool:
        """A temporal (video-only) method: it needs frames, so image exports refuse it."""
        return self.temporal is not None

    def refuse_without_video(self, family: str) -> None:
        """Temporal methods need a family that exports a video graph."""
        if self.reduces_over_time:
            raise UsageError(f"--method {self.name} reduces video tokens across frames and {family} checkpoints take "
                             "no video in tokedge: use an image method (see `tokedge methods`)")

    @property
    def keeps_all(self) -> bool:
        return self.stage is Stage.NONE

    @property
    def prunes_in_llm(self) -> bool:
        return self.stage is Stage.IN_LLM

    @property
    def reduces_in_vision(self) -> bool:
        """The vision graph itself emits fewer tokens (pre-LLM and in-ViT methods)."""
        return self.stage in (Stage.PRE_LLM, Stage.IN_VIT)

    @property
    def merges_in_vit(self) -> bool:
        return self.stage is Stage.IN_VIT

    @property
    def projects_all_tokens(self) -> bool:
        """The projector runs on every token (the method selects among projected embeddings)."""
        return not self.reduces_in_vision or Signal.EMBEDDINGS in self.scores_with

    def vision_tokens(self, budget: int, full_tokens: int) -> int:
        """Tokens the vision graph emits: all of them for in-LLM methods, which prune later."""
        return full_tokens if self.prunes_in_llm else budget

    def default_budget(self, full_tokens: int) -> int:
        return full_tokens if self.keeps_all else min(64, full_tokens)

    def check_budget(self, budget: int, full_tokens: int, geometry: VisionGeometry | None = None,
                     dynamic: bool = False) -> None:
        """`dynamic`: a dynamic-resolution family (each image its own grid and count)."""
        if not 1 <= budget <= full_tokens:
            raise UsageError(f"--budget {budget} is out of range for this model: use 1..{full_tokens} visual tokens")
        if self.keeps_all and budget != full_tokens:
            raise UsageError(
                f"--method none keeps all {full_tokens} visual tokens; pass --budget {full_tokens} "
                "or choose a reduction method (see `tokedge methods`)"
            )
        if budget < self.min_budget:
            raise UsageError(f"--method {self.name} needs --budget >= {self.min_budget} (got {budget})")
        if geometry is not None and self.fewest_tokens is not None:
            fewest = self.fewest_tokens(geometry)
            if budget < fewest:
                raise UsageError(
                    f"--method {self.name} cannot merge down to {budget} tokens in this model's {geometry.layers} "
                    f"vision layers (each merges at most half): use --budget >= {fewest}"
                )
        check = self.indexed_budget_check if dynamic and self.indexed_budget_check else self.budget_check
        problem = check(budget, full_tokens) if check else None
        if problem:
            raise UsageError(f"--method {self.name} --budget {budget}: {problem}")

    def parse_options(self, raw: dict[str, str]) -> dict[str, Any]:
        """`--option key=value` strings -> typed values (defaults filled in); clear errors."""
        unknown = sorted(set(raw) - set(self.option_specs))
        if unknown:
            known = ", ".join(self.option_specs) or "none"
            raise UsageError(f"--method {self.name} has no option '{unknown[0]}' (options: {known})")
        out: dict[str, Any] = {}
        for key, spec in self.option_specs.items():
            if key not in raw:
                out[key] = spec.default
                continue
            try:
                value = spec.type(raw[key])
            except ValueError:
                raise UsageError(f"--option {key}={raw[key]}: expected {spec.type.__name__} ({spec.help})") from None
            if not spec.check(value):
                raise UsageError(f"--option {key}={raw[key]}: {spec.requirement or spec.help}")
            out[key] = value
        return out


def parse_option_pairs(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option '{pair}' is not KEY=VALUE (for example --option layer=3)")
        out[key.strip()] = value.strip()
    return out
