"""`todre`: token diversity, its first stage (ToDRE, arXiv 2505.18757 v2, "Effective Visual Token
Pruning via Token Diversity and Task Relevance"; the authors released no code: Algorithm 1 of the
paper is the reference).

Greedy max-sum diversification over the projected visual tokens (the LLM's input space):
1. X = the tokens L2-normalised; the pivot p = the token with the highest CLS attention (the
   vision tower's CLS query row, mean over heads; tiled images: among the base view's tokens only,
   the paper's "global thumbnail"; towers without CLS: the attention each token receives, where the
   paper allows any pivot, random included);
2. s = X x_p, s_p = +inf; k - 1 times: c = argmin s (the first index on ties), s += X x_c, s_c = +inf;
3. the k picks (the pivot counts) return to raster (candidate) order.
Choices where the paper is silent: the CLS attention of the vision feature layer (the layer LLaVA
projects; "the last layer" in the paper); ties to the lower index. The second stage (dropping every
visual token at LLM layer 7L/8 when text and image attend little to each other, +0.1-0.2% in the
paper's ablation) is not implemented: its all-or-nothing decision is data-dependent.
Static counts: k - 1 unrolled steps (argmin, a row of X X^T); a run-time count per image unrolls the
largest count and keeps the first k picks (greedy picks are a prefix of any longer run).
"""

from __future__ import annotations

from tokedge.reduce.base import Method, Signal, Stage, VisionFeatures
from tokedge.reduce.select import gather_tokens, unroll_limit


def _normalised(x):
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def maxsum_picks(x, pivot_score, steps: int):
    """x [b, n, d], pivot_score [b, n] (-inf where a token may not be the pivot) -> [b, steps + 1]
    picks in the order chosen."""
    import torch

    xn = _normalised(x)
    n = xn.shape[1]
    cols = torch.arange(n)
    p = torch.argmax(pivot_score, dim=-1)  # [b]
    picked = cols[None, :] == p[:, None]
    s = (xn * xn.gather(1, p[:, None, None].expand(-1, 1, xn.shape[-1]))).sum(dim=-1)  # [b, n]
    picks = [p]
    inf = torch.full_like(s, float("inf"))
    for _ in range(steps):
        c = torch.argmin(torch.where(picked, inf, s), dim=-1)
        picks.append(c)
        picked = picked | (cols[None, :] == c[:, None])
        s = s + (xn * xn.gather(1, c[:, None, None].expand(-1, 1, xn.shape[-1]))).sum(dim=-1)
    return torch.stack(picks, dim=-1)


def _pivot_score(vf: VisionFeatures):
    """The CLS attention, restricted to the base view on tiled candidates (partition 0)."""
    import torch

    score = vf.cls_attention.float()
    if vf.partition is not None:
        score = torch.where(vf.partition == 0, score, torch.full_like(score, float("-inf")))
    return score


def reduce_todre(vf: VisionFeatures, k: int, options: dict):
    """[b, n, d] patches (or [1, C, d] candidates of a tiled image) -> [b, k, hidden]."""
    import torch

    embeds = vf.project(vf.features)
    if k >= embeds.shape[1]:
        return embeds
    idx = torch.sort(maxsum_picks(embeds, _pivot_score(vf), k - 1), dim=-1).values
    return gather_tokens(embeds, idx)


def reduce_todre_indexed(vf: VisionFeatures, k, options: dict, most: int = 0):
    """Towers without CLS (Qwen-VL), one image, a run-time count k (0-d int64): the pivot by received
    attention (`vf.cls_attention`), `most - 1` steps unrolled, the first k picks kept -> (tokens
    [1, k, d], raster indices [1, k] ascending)."""
    import torch

    picks = maxsum_picks(vf.features, vf.cls_attention.float(), max(int(most) - 1, 0))[0]
    kept = torch.sort(picks[:k]).values
    return vf.features[0][kept][None], kept[None]


METHOD = Method(
    name="todre",
    stage=Stage.PRE_LLM,
    paper="2505.18757",
    reference="- (no code released; the paper's Algorithm 1)",
    summary="greedy max-sum diversity of the projected tokens from the top CLS-attention pivot (stage 1)",
    scores_with=(Signal.CLS_ATTENTION, Signal.EMBEDDINGS, Signal.REGIONS),
    reduce=reduce_todre,
    reduce_indexed=reduce_todre_indexed,
    budget_check=unroll_limit("todre"),
)
