"""`evs`: Efficient Video Sampling (arXiv 2510.14624; vLLM `vllm/multimodal/evs.py`,
`--video-pruning-rate`): drop the video tokens that barely changed since the same position in the
previous frame.

On the pooled projected tokens of a video, x [F, n, D] (OneVision: n = 196 per frame):
dissimilarity `1 - cos(x[t, j], x[t-1, j])` for t >= 1, the first frame scores 255 (always kept);
the k most dissimilar tokens are kept, in frame-major raster order (ties: the lower flat index,
as vLLM's stable descending argsort and ONNX TopK). k is static for a fixed frame count:
vLLM's `max(n, int(n * F * (1 - q)))` for a pruning rate q (`evs_count`), or a budget.

Not registered as a `--method` yet (issue 13, next session): the function and its count only.
"""

from __future__ import annotations

import torch

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
