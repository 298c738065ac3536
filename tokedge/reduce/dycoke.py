"""`dycoke`: DyCoke's temporal token merging, its first stage (arXiv 2411.15024, CVPR 2025;
authors' code KD-TAO/DyCoke, `dycole_ttm` in `llava/model/llava_arch.py`).

On the pooled projected tokens of a video x [F, n, D], before the newline. The authors' TTM:
- pairs (i, i+1), i = 0, 2, 4, ...: frame i stays whole, frame i+1 keeps the m tokens least
  cosine-similar to the same position in frame i;
- windows of four, i in range(0, F - 4, 4): frame i+2 is pruned the same way against frame i (the
  last window is skipped when F % 4 == 0, as `range(0, F-4, 4)` does);
with m = int((1 - k) * n) for the merging ratio k (0.7 in the paper's runs). "Merging" is pruning in
their code: dropped tokens are not averaged into anything. The optional second stage (decode-time KV
pruning) is not implemented.

tokedge's variants (docs/methods.md):
- `--option prune_ratio=k`: the authors' counts exactly; the budget is what they give.
- `--budget B` (or a keep ratio): the same pairs and windows, m spread so exactly B tokens are kept
  (the first pruned frames get one more). Below what TTM can reach (W whole frames x n), "chained
  anchors", tokedge's extension: every window's first frame 4w (w > 0) is pruned against 4(w-1)
  and the last window's third frame against its first, so only frame 0 stays whole (the floor, n).
- kept tokens in raster order within each frame (the authors': ascending similarity); ties in
  similarity keep the lower position; an odd frame count is refused (the authors drop the last frame).
Static counts for a fixed frame count: one pairwise rank and one TopK, exportable.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokedge.errors import UsageError
from tokedge.reduce.base import Method, OptionSpec, Signal, Stage
from tokedge.reduce.frames import VideoTokens, mask_indices, position_cosine, rank_ascending


@dataclass(frozen=True)
class Schedule:
    """Per frame: the frame it is compared with (None: kept whole) and how many tokens it keeps."""

    anchors: tuple[int | None, ...]
    counts: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.counts)


def authors_anchors(frames: int) -> list[int | None]:
    """The authors' TTM pairs and windows: frame -> the frame it is pruned against."""
    anchors: list[int | None] = [None] * frames
    for i in range(0, frames - 1, 2):
        anchors[i + 1] = i
    for i in range(0, frames - 4, 4):
        anchors[i + 2] = i
    return anchors


def chained_anchors(frames: int) -> list[int | None]:
    """tokedge's extension: every frame but frame 0 is pruned (window starts against the previous one)."""
    anchors: list[int | None] = [None] * frames
    for i in range(0, frames - 1, 2):
        anchors[i + 1] = i
    for i in range(0, frames, 4):
        if i + 2 < frames:
            anchors[i + 2] = i
        if i > 0:
            anchors[i] = i - 4
    return anchors


def merged_count(n: int, prune_ratio: float) -> int:
    """The authors' tokens per pruned frame: `int((1 - k) * n)` (Python float, truncated)."""
    return int((1 - prune_ratio) * n)


def schedule(frames: int, n: int, budget: int | None = None, prune_ratio: float | None = None) -> Schedule:
    """Counts for F frames of n tokens, from the authors' ratio or an exact budget."""
    if frames % 2:
        raise UsageError(f"dycoke pairs frames: use an even frame count (got {frames}; --frames {frames + 1})")
    if frames < 2:
        raise UsageError("dycoke needs at least 2 frames (--frames 2 or more)")
    anchors = authors_anchors(frames)
    if budget is None:
        m = merged_count(n, prune_ratio if prune_ratio is not None else 0.7)
        return Schedule(tuple(anchors), tuple(n if a is None else m for a in anchors))
    whole = sum(a is None for a in anchors)
    if budget < whole * n:
        anchors = chained_anchors(frames)
        whole = 1
    if not n <= budget <= frames * n:
        raise UsageError(f"dycoke keeps the first frame whole: use --budget {n}..{frames * n} "
                         f"for {frames} frames of {n} tokens")
    pruned = [f for f, a in enumerate(anchors) if a is not None]
    m, extra = divmod(budget - whole * n, len(pruned))
    counts = [n] * frames
    for rank, f in enumerate(pruned):
        counts[f] = m + (rank < extra)
    return Schedule(tuple(anchors), tuple(counts))


def keep_mask(x, plan: Schedule):
    """x [F, n, D] -> [F, n] bool: each pruned frame's `count` tokens least similar to its anchor."""
    import torch

    ref = torch.tensor([f if a is None else a for f, a in enumerate(plan.anchors)], dtype=torch.int64)
    sim = position_cosine(x, x[ref])  # whole frames compare with themselves; their count is n anyway
    counts = torch.tensor(plan.counts, dtype=torch.int64)
    return rank_ascending(sim) < counts[:, None]


def select_dycoke(x, plan: Schedule):
    """x [F, n, D] -> [plan.total] int64 flat indices (f * n + j) of the kept tokens, ascending."""
    return mask_indices(keep_mask(x, plan), plan.total)


def reduce_dycoke(video: VideoTokens, budget: int | None, options: dict):
    """[F, n, D] -> ([K, D] kept tokens in frame-major raster order, [K] their flat indices)."""
    x = video.tokens
    frames, n = int(x.shape[0]), int(x.shape[1])  # python ints, also while tracing
    kept = select_dycoke(x, plan_for(frames, n, budget, options))
    return x.reshape(frames * n, -1)[kept], kept


def plan_for(frames: int, n: int, budget: int | None, options: dict) -> Schedule:
    """`--option prune_ratio=k` gives the authors' counts (the budget is then what they keep)."""
    ratio = options.get("prune_ratio")
    return schedule(frames, n, None if ratio is not None else budget, ratio)


def count(frames: int, n: int, budget: int | None, options: dict) -> int:
    return plan_for(frames, n, budget, options).total


METHOD = Method(
    name="dycoke",
    stage=Stage.TEMPORAL,
    scores_with=(Signal.EMBEDDINGS,),
    paper="2411.15024",
    reference="KD-TAO/DyCoke",
    summary="video: pairs/windows of frames keep their tokens least similar to the anchor frame (TTM)",
    budget_meaning="visual tokens per video that enter the LLM",
    option_specs={"prune_ratio": OptionSpec(float, None, "the authors' merging ratio k (0.7): "
                                            "int((1-k)*n) tokens per pruned frame; replaces --budget",
                                            lambda v: 0 <= v < 1, "use 0 <= prune_ratio < 1")},
    temporal=reduce_dycoke,
    temporal_count=count,
)
