"""`divprune`: diverse subset of the projected tokens by greedy max-min distance (DivPrune,
arXiv 2503.02175).

On projected tokens: D = 1 - cosine similarity. The first pick is the token whose nearest
neighbour (other than itself) is farthest; each next pick maximises its minimum distance to the
picked set. k serial steps, unrolled in the graph; the result is sorted to raster order.
`--budget` = tokens kept. Deviation from the reference code, for deployment: already picked tokens
are excluded, so duplicate inputs never yield the same token twice. Counts are static.
"""

from __future__ import annotations

import torch

from tokedge.reduce.base import Method, Signal, Stage, VisionFeatures
from tokedge.reduce.select import gather_tokens, unroll_limit


def cosine_distance(x):
    """x [b, n, d] -> [b, n, n] 1 - cosine similarity (fp32)."""
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    return 1.0 - torch.matmul(xn, xn.transpose(1, 2))


def select_divprune(x, k: int):
    """x [b, n, d] -> [b, k] indices in raster order."""
    dist = cosine_distance(x)
    n = dist.shape[-1]
    # distance to the nearest other token: the second smallest of each row (the smallest is itself)
    nearest = torch.topk(dist, 2, dim=-1, largest=False).values[..., 1]
    first = nearest.argmax(dim=-1)  # [b]
    picks = [first]
    chosen = torch.nn.functional.one_hot(first, n).bool()
    min_dist = torch.gather(dist, 1, first[:, None, None].expand(-1, 1, n))[:, 0]  # [b, n]
    for _ in range(k - 1):
        score = min_dist.masked_fill(chosen, -1.0)
        nxt = score.argmax(dim=-1)
        picks.append(nxt)
        chosen = chosen | torch.nn.functional.one_hot(nxt, n).bool()
        row = torch.gather(dist, 1, nxt[:, None, None].expand(-1, 1, n))[:, 0]
        min_dist = torch.minimum(min_dist, row)
    return torch.sort(torch.stack(picks, dim=1), dim=-1).values


def reduce_divprune(vf: VisionFeatures, k: int, options: dict):
    projected = vf.project(vf.features)
    if k >= projected.shape[1]:
        return projected
    return gather_tokens(projected, select_divprune(projected, k))






def reduce_divprune_indexed(vf: VisionFeatures, k, options: dict, most: int):
    """Merged tokens of one image (b = 1), a run-time count k (0-d int64, at most `most`) -> (the k
    picked tokens [1, k, d], their indices [1, k] ascending). Same rule as `select_divprune`, its
    greedy unrolled `most - 1` steps, step i doing nothing once i >= k - 1 (no control flow)."""
    x = vf.features[0]
    dist = cosine_distance(x[None])[0]
    n = dist.shape[0]
    ar = torch.arange(n)
    first = torch.topk(dist, 2, dim=-1, largest=False).values[:, 1].argmax()
    chosen = ar == first
    closest = dist[first]
    for i in range(most - 1):
        active = k > i + 1
        nxt = closest.masked_fill(chosen, -1.0).argmax()
        chosen = chosen | ((ar == nxt) & active)
        closest = torch.where(active, torch.minimum(closest, dist[nxt]), closest)
    key = chosen.to(torch.float32) * (2.0 * n) - ar.to(torch.float32)
    idx = torch.sort(torch.topk(key, torch.minimum(k, torch.ones_like(k) * n)).indices).values
    return x[idx][None], idx[None]


METHOD = Method(
    name="divprune",
    stage=Stage.PRE_LLM,
    scores_with=(Signal.EMBEDDINGS,),
    paper="2503.02175",
    reference="vbdi/divprune",
    summary="greedy max-min diverse subset of projected tokens (cosine distance)",
    reduce=reduce_divprune,
    reduce_indexed=reduce_divprune_indexed,
    budget_check=unroll_limit("divprune"),
)
