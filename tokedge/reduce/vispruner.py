"""`vispruner`: important tokens by CLS attention plus diverse tokens from the rest (VisPruner,
arXiv 2412.01818, the later version of FasterVLM).

Important: the top round(k * r) patches by CLS attention (r = `--option important=0.5`).
Diverse: from the remaining patches (raster order), repeatedly split into A (even positions) and
B (odd positions) and drop the A tokens most similar to their best B match (cosine of
feature-layer tokens), min(|A|, remaining - target) per round, until k - important remain; the
number of rounds is fixed by the counts, so the graph is static. Kept indices go back to raster
order. `--budget` = tokens kept.

Towers without CLS (Qwen-VL, `reduce_indexed`, a run-time count k per image): important = the top
round(k * r) merged tokens by the mean attention each receives (`VisionFeatures.cls_attention`
there); diverse = the same rounds on the rest with the merged tokens' cosine similarity, unrolled
`ROUNDS` times with rounds past the target dropping nothing; within a round the A tokens with the
largest best match go first, ties to the lower raster index.
"""

from __future__ import annotations

import torch

from tokedge.reduce.base import Method, OptionSpec, Signal, Stage, VisionFeatures
from tokedge.reduce.select import gather_tokens


def drop_schedule(remaining: int, target: int) -> list[int]:
    """Tokens removed per round: min(|A|, remaining - target) until target remain."""
    rounds = []
    while remaining > target:
        r = min((remaining + 1) // 2, remaining - target)
        rounds.append(r)
        remaining -= r
    return rounds


def diverse_rounds(features, idx, target: int):
    """features [b, n, d]; idx [b, R] candidate indices (raster) -> [b, target] kept (raster)."""
    for r in drop_schedule(idx.shape[1], target):
        x = torch.nn.functional.normalize(gather_tokens(features, idx).float(), dim=-1)
        a, b = x[:, ::2], x[:, 1::2]
        idx_a, idx_b = idx[:, ::2], idx[:, 1::2]
        if b.shape[1] == 0:
            best = torch.zeros(a.shape[:2], device=x.device)
        else:
            best = torch.matmul(a, b.transpose(1, 2)).max(dim=-1).values  # [b, |A|]
        keep_a = torch.topk(best, a.shape[1] - r, dim=-1, largest=False).indices
        kept = torch.cat([torch.gather(idx_a, 1, keep_a), idx_b], dim=1)
        idx = torch.sort(kept, dim=-1).values
    return idx


def select_vispruner(cls_attention, features, k: int, ratio: float):
    n = cls_attention.shape[1]
    n_imp = min(k, max(0, round(k * ratio)))
    order = torch.topk(cls_attention, n, dim=-1).indices
    important = order[:, :n_imp]
    rest = torch.sort(order[:, n_imp:], dim=-1).values
    diverse = diverse_rounds(features, rest, k - n_imp)
    return torch.sort(torch.cat([important, diverse], dim=1), dim=-1).values


def reduce_vispruner(vf: VisionFeatures, k: int, options: dict):
    if k >= vf.features.shape[1]:
        return vf.project(vf.features)
    idx = select_vispruner(vf.cls_attention, vf.features, k, options["important"])
    return vf.project(gather_tokens(vf.features, idx))


ROUNDS = 32  # unrolled diverse rounds: each drops at most half, so 2**31 candidates finish


def reduce_vispruner_indexed(vf: VisionFeatures, k, options: dict, most: int = 0):
    """VisPruner on one image of a tower without CLS, b = 1: vf.features [1, n, d] merged tokens (raster
    order), vf.cls_attention [1, n] the attention each receives, k a 0-d int64 count ->
    (tokens [1, k, d], kept_index [1, k] ascending raster indices)."""
    x, score = vf.features[0], vf.cls_attention[0].float()
    n = score.shape[0]
    cells = torch.cumsum(torch.ones_like(score, dtype=torch.int64), 0) - 1  # [n] 0..n-1
    n_imp = torch.clamp(torch.round(k.to(torch.float32) * float(options.get("important", 0.5))).to(torch.int64), max=k)
    order = torch.topk(score, n).indices  # by score, ties to the lower index
    rank = torch.zeros_like(cells).scatter(0, order, cells)
    important = rank < n_imp
    target = k - n_imp
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    sim = torch.matmul(xn, xn.T)  # [n, n]
    alive = ~important
    lower = cells[:, None] < cells[None, :]  # [i, j]: i before j
    for _ in range(ROUNDS):
        left = alive.to(torch.int64).sum()
        slot = torch.cumsum(alive.to(torch.int64), 0) - 1
        in_a = alive & (slot % 2 == 0)
        in_b = alive & (slot % 2 == 1)
        best = torch.where(in_b[None, :], sim, torch.full_like(sim, -2.0)).max(-1).values
        best = torch.where(in_b.any(), best, torch.zeros_like(best))
        drop = torch.clamp(torch.minimum(torch.div(left + 1, 2, rounding_mode="floor"), left - target), min=0)
        before = (best[:, None] > best[None, :]) | ((best[:, None] == best[None, :]) & lower)  # i ranks before j
        place = (before & in_a[:, None]).to(torch.int64).sum(0)  # [n] A tokens ranked before each
        alive = alive & ~(in_a & (place < drop))
    kept = important | alive
    index = torch.sort(torch.where(kept, cells, cells + n)).values[:k]
    return x[index][None], index[None]


METHOD = Method(
    name="vispruner",
    stage=Stage.PRE_LLM,
    paper="2412.01818",
    reference="Theia-4869/VisPruner",
    summary="important patches by CLS attention + diverse patches by bipartite de-duplication",
    scores_with=(Signal.CLS_ATTENTION, Signal.FEATURES),
    reduce=reduce_vispruner,
    reduce_indexed=reduce_vispruner_indexed,
    option_specs={
        "important": OptionSpec(float, 0.5, "share of the budget taken by CLS attention (0..1)",
                                lambda v: 0.0 <= v <= 1.0, "must be between 0 and 1"),
    },
)
