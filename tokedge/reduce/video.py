"""Per-video reduction stages: what a method does to ONE video's pooled tokens before they reach
the LLM, in numpy (the device runtime runs them; no torch).

A stage is a pure function `select(tokens [F, n, D], keep, options) -> indices [keep] int64`:
flat indices into the video's F*n tokens (frame-major raster order: index = frame * n + position),
sorted ascending, so kept tokens stay in frame order and raster order within a frame. The runtime
appends the video's newline after the kept tokens (it is never a candidate). `keep` is the
per-video budget: visual tokens of the whole video that reach the LLM, newline not counted.

Stages are registered by method name (`register`); `stage_for(name)` is how the runtime finds
one. Image methods that select among projected tokens apply to a video as one token set over all
frames (docs/research/video.md 4.5); temporal methods (EVS, DyCoke, ...) register here too and see
the frame axis. In-LLM methods (fastv, pdrop, dart) need no stage: the prefill graph prunes the
video's positions with a per-video keep (`tokedge.runtime.video_pipeline.video_plan`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Select = Callable[[np.ndarray, int, dict], np.ndarray]


@dataclass(frozen=True)
class VideoStage:
    name: str  # the method's registry name (`tokedge methods`)
    select: Select  # (tokens [F, n, D], keep, options) -> sorted flat indices [keep] int64
    summary: str


STAGES: dict[str, VideoStage] = {}


def register(stage: VideoStage) -> VideoStage:
    if stage.name in STAGES and STAGES[stage.name] is not stage:
        raise ValueError(f"video stage '{stage.name}' is registered twice")
    STAGES[stage.name] = stage
    return stage


def stage_for(method: str) -> VideoStage | None:
    """The per-video stage of `method`, or None when it has none."""
    return STAGES.get(method)


# --- divprune over all frames -------------------------------------------------------------------------


def select_divprune(tokens: np.ndarray, keep: int, options: dict | None = None) -> np.ndarray:
    """DivPrune (arXiv 2503.02175) on a video's pooled projected tokens as one set.

    tokens [F, n, D] -> sorted flat indices [keep]. Distance = 1 - cosine similarity (float32).
    First pick: the token whose nearest other token is farthest; each next pick maximises its
    minimum distance to the picked set, picked tokens excluded (tokedge's image divprune rule,
    `tokedge.reduce.divprune.select_divprune`). Ties: the lowest index wins (numpy argmax)."""
    x = tokens.reshape(-1, tokens.shape[-1]).astype(np.float32)
    total = x.shape[0]
    if keep >= total:
        return np.arange(total, dtype=np.int64)
    norms = np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))
    xn = x / norms
    dist = xn @ xn.T  # [N, N] cosine similarity, turned into the distance in place
    np.subtract(np.float32(1), dist, out=dist)
    nearest = _second_smallest(dist)  # distance to the nearest other token
    first = int(np.argmax(nearest))
    picks = [first]
    chosen = np.zeros(total, dtype=bool)
    chosen[first] = True
    min_dist = dist[first].copy()
    for _ in range(keep - 1):
        score = np.where(chosen, np.float32(-1), min_dist)
        nxt = int(np.argmax(score))
        picks.append(nxt)
        chosen[nxt] = True
        np.minimum(min_dist, dist[nxt], out=min_dist)
    return np.sort(np.asarray(picks, dtype=np.int64))


def _second_smallest(dist: np.ndarray) -> np.ndarray:
    """Each row's second smallest value ([N, N] -> [N]), as a sort would give it: the smallest
    off-diagonal value when the row's own (diagonal) value is not above it, else the smaller of the
    diagonal and the second smallest off-diagonal value (without partitioning every row)."""
    diag = dist.diagonal().copy()
    np.fill_diagonal(dist, np.inf)
    try:
        first = dist.min(axis=1)
        out = first.copy()
        odd = np.flatnonzero(diag > first)
        if odd.size:
            out[odd] = np.minimum(diag[odd], np.partition(dist[odd], 1, axis=-1)[:, 1])
    finally:
        np.fill_diagonal(dist, diag)
    return out


DIVPRUNE = register(VideoStage("divprune", select_divprune,
                               "greedy max-min diverse subset of all frames' pooled tokens (cosine distance)"))
