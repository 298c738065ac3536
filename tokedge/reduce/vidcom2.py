"""`vidcom2`: Video Compression Commander (arXiv 2505.14454, EMNLP 2025; authors' code
xuyang-liu16/VidCom2 `token_compressor/vidcom2/vidcom2.py`; vLLM `vllm/multimodal/video_prune/vidcom2.py`).

On the pooled projected tokens of one video x [F, n, D] (OneVision: n = 196 per frame), before the
newline, as the authors' code does it:
1. Channels: the D // 2 channels (at least one) with the lowest variance over all F * n tokens
   (population variance) are the only ones scored.
2. Tokens are L2-normalised in those channels; the video centre is the mean of all of them, each
   frame's centre the mean of its own (neither centre is normalised).
3. Similarity to a centre c: the sum of five Gaussian kernels exp(-|x - c|^2 / (2a)), a in
   {1/8, 1/4, 1/2, 1, 2} (in (0, 5]); v = to the video centre, f = to the frame centre.
4. Frame budgets: frame score s_t = -mean_j v[t, j]; p = softmax((s - max s) / 0.01);
   scale_t = R * (1 + p_t - mean p), at most 1; k_t = round(scale_t * n) (half to even), 1..n.
5. Each frame keeps its k_t tokens with the lowest v + f (the most unique), raster order.
6. vLLM's exact count (the authors' total drifts from R * F * n): while the sum of k_t exceeds the
   target, the kept tokens with the highest v + f anywhere are dropped; below it, the dropped tokens
   with the lowest v + f are added.
The retention R is `1 - pruning_rate` (vLLM's `--video-pruning-rate q`, target
max(F, min(int(F * n * (1 - q)), F * n))) or, with `--budget B`, B / (F * n) with target B.
Deployment choices: scores in fp32 (the authors' run in the model dtype); ties keep the lower
flat index (their `topk(sorted=False)` has no tie rule). All counts are static for a fixed frame
count; ranks are pairwise comparisons (frames.rank_*), one TopK picks the kept set: exportable.
"""

from __future__ import annotations

from tokedge.errors import UsageError
from tokedge.reduce.base import Method, OptionSpec, Signal, Stage
from tokedge.reduce.frames import VideoTokens, mask_indices, rank_ascending

KERNEL_WIDTHS = (0.125, 0.25, 0.5, 1.0, 2.0)  # the authors' alphas: 2**k for k in -3..1
TEMPERATURE = 0.01  # the authors' compute_scales(temp=0.01)
CHANNEL_RATIO = 0.5  # the authors' select_low_var_channels(ratio=0.5)


def target_count(frames: int, n: int, budget: int | None, options: dict) -> tuple[int, float]:
    """-> (tokens kept, retention R). `pruning_rate` gives vLLM's count; else the budget."""
    total = frames * n
    rate = options.get("pruning_rate")
    if rate is not None:
        return max(frames, min(int(total * (1.0 - rate)), total)), 1.0 - rate
    k = total if budget is None else budget
    if not frames <= k <= total:
        raise UsageError(f"vidcom2 keeps at least one token per frame: use --budget {frames}..{total} "
                         f"for {frames} frames of {n} tokens")
    return k, k / total


def count(frames: int, n: int, budget: int | None, options: dict) -> int:
    return target_count(frames, n, budget, options)[0]


def _kernel(x, centre):
    """x [..., n, C], centre broadcastable -> [..., n]: the sum of the five Gaussian kernels."""
    d2 = ((x - centre) ** 2).sum(dim=-1)
    return sum(((-d2) / (2.0 * a)).exp() for a in KERNEL_WIDTHS)


def scores(x):
    """x [F, n, D] -> (token similarity v + f [F, n], frame score s [F]), fp32."""
    x = x.float()
    frames, n, dim = int(x.shape[0]), int(x.shape[1]), int(x.shape[2])
    flat = x.reshape(frames * n, dim)
    var = ((flat - flat.mean(dim=0, keepdim=True)) ** 2).mean(dim=0)  # [D], population variance
    low = rank_ascending(var[None])[0] < max(1, int(dim * CHANNEL_RATIO))  # lowest variance, ties: lower channel
    x = x * low.to(x.dtype)  # unselected channels are 0: norms and distances over the selected ones
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # F.normalize
    video_centre = x.mean(dim=(0, 1), keepdim=True)
    frame_centre = x.mean(dim=1, keepdim=True)
    v = _kernel(x, video_centre)
    f = _kernel(x, frame_centre)
    return v + f, -v.mean(dim=-1)


def frame_counts(frame_score, n: int, retention: float):
    """s [F] -> [F] int64 tokens each frame keeps before the exact-count step (the authors' scales)."""
    import torch

    probs = torch.softmax((frame_score - frame_score.max()) / TEMPERATURE, dim=0)
    scale = (retention * (1.0 + probs - probs.mean())).clamp(max=1.0)
    return torch.round(scale * n).clamp(1, n).to(torch.int64)


def keep_mask(x, target: int, retention: float):
    """x [F, n, D] -> [F, n] bool, exactly `target` True."""
    import torch

    frames, n = int(x.shape[0]), int(x.shape[1])
    sim, frame_score = scores(x)
    ks = frame_counts(frame_score, n, retention)
    kept = rank_ascending(sim) < ks[:, None]  # each frame: its k_t least similar tokens
    excess = ks.sum() - target  # > 0: drop that many; < 0: add that many
    flat, keep = sim.reshape(-1), kept.reshape(-1)
    idx = torch.arange(flat.shape[0], device=flat.device)
    s_i, s_j = flat[:, None], flat[None, :]
    # among the kept: place in the drop order (highest similarity first; ties: the higher index goes first)
    drop_before = keep[None, :] & ((s_j > s_i) | ((s_j == s_i) & (idx[None, :] > idx[:, None])))
    # counts summed in float32 (exact to 2^24 tokens): the [F*n, F*n] matrix is half an int64 one
    drop = keep & (drop_before.to(torch.float32).sum(dim=-1) < excess)
    # among the dropped: place in the add order (lowest similarity first; ties: the lower index first)
    add_before = ~keep[None, :] & ((s_j < s_i) | ((s_j == s_i) & (idx[None, :] < idx[:, None])))
    add = ~keep & (add_before.to(torch.float32).sum(dim=-1) < -excess)
    return ((keep & ~drop) | add).reshape(frames, n)


def select_vidcom2(x, target: int, retention: float):
    """x [F, n, D] -> [target] int64 flat indices (f * n + j) of the kept tokens, ascending."""
    return mask_indices(keep_mask(x, target, retention), target)


def reduce_vidcom2(video: VideoTokens, budget: int | None, options: dict):
    """[F, n, D] -> ([K, D] kept tokens in frame-major raster order, [K] their flat indices)."""
    x = video.tokens
    frames, n = int(x.shape[0]), int(x.shape[1])  # python ints, also while tracing
    target, retention = target_count(frames, n, budget, options)
    kept = select_vidcom2(x, target, retention)
    return x.reshape(frames * n, -1)[kept], kept


METHOD = Method(
    name="vidcom2",
    stage=Stage.TEMPORAL,
    scores_with=(Signal.EMBEDDINGS,),
    paper="2505.14454",
    reference="xuyang-liu16/VidCom2; vllm-project/vllm (video_prune/vidcom2.py)",
    summary="video: frame uniqueness sets each frame's share of the budget, each frame keeps its most unique tokens",
    budget_meaning="visual tokens per video that enter the LLM",
    option_specs={"pruning_rate": OptionSpec(float, None, "vLLM's --video-pruning-rate q: keeps "
                                             "max(F, int(n*F*(1-q))) tokens, retention 1-q; replaces --budget",
                                             lambda v: 0 <= v < 1, "use 0 <= pruning_rate < 1")},
    temporal=reduce_vidcom2,
    temporal_count=count,
)
