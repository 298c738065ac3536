"""`vispruner`: important tokens by CLS attention plus diverse tokens from the rest (VisPruner,
arXiv 2412.01818, the later version of FasterVLM).

Important: the top round(k * r) patches by CLS attention (r = `--option important=0.5`).
Diverse: from the remaining patches (raster order), repeatedly split into A (even positions) and
B (odd positions) and drop the A tokens most similar to their best B match (cosine of
feature-layer tokens), min(|A|, remaining - target) per round, until k - important remain; the
number of rounds is fixed by the counts, so the graph is static. Kept indices go back to raster
order. `--budget` = tokens kept.
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


METHOD = Method(
    name="vispruner",
    stage=Stage.PRE_LLM,
    paper="2412.01818",
    summary="important patches by CLS attention + diverse patches by bipartite de-duplication",
    scores_with=(Signal.CLS_ATTENTION, Signal.FEATURES),
    reduce=reduce_vispruner,
    option_specs={
        "important": OptionSpec(float, 0.5, "share of the budget taken by CLS attention (0..1)",
                                lambda v: 0.0 <= v <= 1.0, "must be between 0 and 1"),
    },
)
