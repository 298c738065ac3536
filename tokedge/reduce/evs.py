"""`evs`: Efficient Video Sampling (arXiv 2510.14624; vLLM `vllm/multimodal/evs.py`,
`--video-pruning-rate`): drop the video tokens that barely changed since the same position in the
previous frame.

On the pooled projected tokens of a video, x [F, n, D] (OneVision: n = 196 per frame):
dissimilarity `1 - cos(x[t, j], x[t-1, j])` for t >= 1, the first frame scores 255 (always kept);
the k most dissimilar tokens are kept, in frame-major raster order (ties: the lower flat index,
as vLLM's stable descending argsort and ONNX TopK). k is static for a fixed frame count:
vLLM's `max(n, int(n * F * (1 - q)))` for a pruning rate q (`evs_count`), or a budget.

`--budget B` keeps B tokens (at least the first frame: B >= n); `--option pruning_rate=q` keeps
vLLM's count for q instead. The selection is one TopK with a static k and a sort: exportable.
"""

from __future__ import annotations

import torch

from tokedge.errors import UsageError
from tokedge.reduce.base import Method, OptionSpec, Signal, Stage
from tokedge.reduce.frames import VideoTokens

FIRST_FRAME_SCORE = 255.0  # vLLM: the first frame is always kept


def evs_count(tokens_per_frame: int, frames: int, pruning_rate: float) -> int:
    """vLLM's `compute_retained_tokens_count`: Python float, truncated; never below one frame."""
    return max(tokens_per_frame, int(tokens_per_frame * frames * (1 - pruning_rate)))


def evs_dissimilarity(x):
    """x [F, n, D] -> [F, n] float32: 255 for frame 0, else 1 - cosine to the previous frame
    (torch's `cosine_similarity`, eps 1e-8 on each norm)."""
    x = x.float()
    norms = x.norm(dim=-1).clamp_min(1e-8)
    cos = (x[1:] * x[:-1]).sum(dim=-1) / (norms[1:] * norms[:-1])
    first = torch.full_like(x[:1, :, 0], FIRST_FRAME_SCORE)
    return torch.cat([first, 1.0 - cos], dim=0)


def select_evs(x, k: int):
    """x [F, n, D] -> [k] int64 flat indices (t * n + j) of the kept tokens, ascending."""
    score = evs_dissimilarity(x).reshape(-1)
    if k >= score.shape[0]:
        return torch.arange(score.shape[0])
    kept = torch.topk(score, k, largest=True, sorted=True).indices
    return torch.sort(kept).values


def count(frames: int, n: int, budget: int | None, options: dict) -> int:
    """Tokens kept: vLLM's count for `pruning_rate`, else the budget (the first frame is the floor)."""
    rate = options.get("pruning_rate")
    if rate is not None:
        return evs_count(n, frames, rate)
    k = frames * n if budget is None else budget
    if not n <= k <= frames * n:
        raise UsageError(f"evs keeps the first frame whole: use --budget {n}..{frames * n} "
                         f"for {frames} frames of {n} tokens")
    return k


def reduce_evs(video: VideoTokens, budget: int | None, options: dict):
    """[F, n, D] -> ([K, D] kept tokens in frame-major raster order, [K] their flat indices)."""
    x = video.tokens
    frames, n = int(x.shape[0]), int(x.shape[1])  # python ints, also while tracing
    kept = select_evs(x, count(frames, n, budget, options))
    return x.reshape(frames * n, -1)[kept], kept


METHOD = Method(
    name="evs",
    stage=Stage.TEMPORAL,
    scores_with=(Signal.EMBEDDINGS,),
    paper="2510.14624",
    reference="vllm-project/vllm (vllm/multimodal/evs.py)",
    summary="video: keep the tokens that changed most since the same position in the previous frame",
    budget_meaning="visual tokens per video that enter the LLM",
    option_specs={"pruning_rate": OptionSpec(float, None, "vLLM's --video-pruning-rate q: keeps "
                                             "max(n, int(n*F*(1-q))) tokens; replaces --budget",
                                             lambda v: 0 <= v < 1, "use 0 <= pruning_rate < 1")},
    temporal=reduce_evs,
    temporal_count=count,
)
