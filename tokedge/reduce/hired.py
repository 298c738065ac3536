"""`hired`: high-resolution early dropping (HiRED, arXiv 2408.10945; authors' code
github.com/hasanar1f/HiRED), the deployment variant of docs/methods.md ("tiled images").

Tiled images (LLaVA-NeXT anyres): the budget B (`--budget`, visual tokens per image) is split
between the base view and the tiles, then each partition keeps its own best tokens.
1. Base view: b0 = min(int(B * alpha), N) tokens (N = the base view's tokens).
2. Tiles share R = B - b0. Weights: of the K0 = int(N * (1 - alpha)) base-view tokens with the
   highest CLS attention in the FIRST encoder layer, w_t = how many have their centre inside tile t
   (spatial region on the canvas; the authors use horizontal stripes of the base map).
3. Quotas: largest-remainder split of R by w_t (floor(R * w_t / W) each, the leftover one by one
   to the largest remainders, ties to the lower tile), each capped at the tile's candidate count
   (tokens inside the unpadded map). W = 0 gives every tile 0.
4. Within the base view and within each tile: the top tokens by the feature layer's CLS attention.
5. If the caps left fewer than B kept, the best remaining tokens anywhere (same score) fill up to
   exactly B (the authors' count falls below B instead). Output in candidate order: base view
   first, then the tile map in raster order, no newline tokens.
All counts are integers computed exactly (no float rounding in the split); ties in a top-k go
to the lower index. Single view (LLaVA-1.5): keep the top B by the feature layer's CLS
attention (the authors' modeling_llava.py), i.e. `cls-attn`. Dynamic resolution (Qwen-VL): each
image is one view (no base view, no tiles), so the same single-view rule with the attention each
merged token receives (`cls-attn`'s `reduce_indexed`).
"""

from __future__ import annotations

import torch

from tokedge.reduce.base import Method, OptionSpec, Signal, Stage, VisionFeatures
from tokedge.reduce.cls_attn import reduce_cls_attn, reduce_cls_attn_indexed
from tokedge.reduce.select import gather_tokens, rank_in_group


def split_budget(budget: int, base_tokens: int, alpha: float) -> tuple[int, int]:
    """-> (b0 base-view tokens kept, K0 base-view tokens that vote for tiles)."""
    return min(int(budget * alpha), base_tokens), int(base_tokens * (1 - alpha))


def tile_quotas(weights, remaining: int, caps):
    """weights [T] int64 (votes per tile), remaining R, caps [T] int64 -> quotas [T] int64:
    largest-remainder split of R by weights (ties: lower tile), capped at caps."""
    total = weights.sum()
    safe = torch.clamp(total, min=1)
    share = remaining * weights
    floor = torch.div(share, safe, rounding_mode="floor")
    rem = share - floor * safe
    extra = torch.where(total > 0, remaining - floor.sum(), torch.zeros_like(total))
    t = torch.arange(weights.shape[0], device=weights.device)
    before = (rem[None, :] > rem[:, None]) | ((rem[None, :] == rem[:, None]) & (t[None, :] < t[:, None]))
    rank = before.long().sum(-1)  # [T] place of each tile in the remainder order
    return torch.minimum(floor + (rank < extra).long(), caps)


def select_hired(score, early_base, partition, base_tile, budget: int, alpha: float):
    """One image's candidates (base view first). score [C] feature-layer CLS attention, early_base
    [N] first-layer CLS attention of the base view's tokens, partition [C] int64 (0 base, t+1 tile
    t), base_tile [N, T] one-hot tile under each base-view token -> [budget] kept candidate
    indices, ascending."""
    n_base = early_base.shape[0]
    b0, k0 = split_budget(budget, n_base, alpha)
    region = base_tile.long()
    votes = torch.topk(early_base, k0).indices if k0 > 0 else torch.zeros(0, dtype=torch.long)
    weights = region[votes].sum(0)  # [T]
    tiles = torch.arange(1, region.shape[1] + 1, device=partition.device)
    caps = (partition[:, None] == tiles[None, :]).long().sum(0)  # [T]
    quotas = torch.cat([torch.full((1,), b0, dtype=torch.long), tile_quotas(weights, budget - b0, caps)])
    order = torch.topk(score, score.shape[0]).indices  # every candidate, best first
    part = partition[order]
    member = (part[:, None] == torch.arange(quotas.shape[0])[None, :]).long()  # [C, P]
    rank = rank_in_group(member)  # place of each candidate within its partition
    keep = rank < quotas[part]
    priority = (~keep).long() * score.shape[0] + torch.arange(score.shape[0])  # kept first, then by score
    chosen = torch.topk(-priority, budget).indices
    return torch.sort(order[chosen]).values


def reduce_hired(vf: VisionFeatures, k: int, options: dict):
    """[1, C, d] candidates of one tiled image (or [b, n, d] single views) -> [1, k, hidden]."""
    if vf.partition is None:  # one view: the authors' LLaVA-1.5 variant
        return reduce_cls_attn(vf, k, options)
    idx = select_hired(vf.cls_attention[0], vf.early_cls_attention[0, : vf.base_tile.shape[1]], vf.partition[0],
                       vf.base_tile[0], k, options["alpha"])
    return vf.project(gather_tokens(vf.features, idx[None]))


METHOD = Method(
    name="hired",
    stage=Stage.PRE_LLM,
    paper="2408.10945",
    reference="hasanar1f/HiRED",
    summary="budget split base/tiles by first-layer CLS attention, top tokens per partition by feature-layer CLS",
    scores_with=(Signal.CLS_ATTENTION, Signal.EARLY_CLS_ATTENTION, Signal.REGIONS),
    reduce=reduce_hired,
    reduce_indexed=reduce_cls_attn_indexed,  # one view per image: the single-view rule
    budget_meaning="visual tokens per image that enter the LLM (base view + tiles)",
    option_specs={
        "alpha": OptionSpec(float, 0.5, "share of the budget for the base view; 1 - alpha of its tokens vote for tiles",
                            lambda v: 0.0 < v < 1.0, "must be between 0 and 1 (exclusive)"),
    },
)
