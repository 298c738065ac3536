"""`random`: a seeded uniform choice of the budget's visual tokens, the baseline every token-reduction
paper compares its scores against (e.g. FastV arXiv 2403.06764, SparseVLM 2410.04417).

The rule (the whole definition; tests/reduce/test_random.py re-derives it with a loop): the scores
are `numpy.random.default_rng(seed).permutation(TABLE)` as float32, one distinct integer per token
position; a view (or an image's candidates, or a Qwen-VL image's merged tokens) of n tokens keeps
the k positions among 0..n-1 with the largest scores, in ascending (raster) order, then projects
them. The first n entries of a uniform permutation rank the n positions uniformly, so the kept set
is a uniform k-subset of the n tokens; the same seed keeps the same positions in every image of the
same size. The scores are a constant baked into the vision graph and looked up by position
(Gather), so counts are static for a fixed budget, the graph is the same TopK-then-sort as
`cls-attn`, and it exports on every family: nothing is scored from the image.
"""

from __future__ import annotations

from functools import cache

import numpy as np

from tokedge.reduce.base import Method, OptionSpec, Stage, VisionFeatures

TABLE = 1 << 16  # token positions with a score: more than any view, candidate list or image tokedge takes


@cache
def random_scores(seed: int) -> np.ndarray:
    """[TABLE] float32: a seeded permutation of 0..TABLE-1 (distinct, exact in float32: no ties)."""
    return np.random.default_rng(seed).permutation(TABLE).astype(np.float32)


def _positions_scores(x, seed: int):
    """x [n, d] -> [n] the scores of positions 0..n-1 (a Gather from the constant table, so n may
    vary at run time)."""
    import torch

    cells = torch.cumsum(torch.ones_like(x[:, 0], dtype=torch.int64), 0) - 1  # [n] 0..n-1
    return torch.from_numpy(random_scores(seed).copy())[cells]


def select_random(x, k: int, seed: int):
    """x [b, n, d] -> [b, k] kept positions, ascending; the same positions for every row."""
    from tokedge.reduce.select import topk_sorted

    scores = _positions_scores(x[0], seed)
    return topk_sorted(scores[None].expand(x.shape[0], -1), k)


def reduce_random(vf: VisionFeatures, k: int, options: dict):
    """[b, n, d] features -> [b, k, hidden]: k seeded-random tokens in raster order, projected."""
    from tokedge.reduce.select import gather_tokens

    if k >= vf.features.shape[1]:
        return vf.project(vf.features)
    return vf.project(gather_tokens(vf.features, select_random(vf.features, k, options["seed"])))


def reduce_random_indexed(vf: VisionFeatures, k, options: dict, most: int = 0):
    """One image of a dynamic-resolution tower (b = 1), a run-time count k (0-d int64) ->
    (tokens [1, k, d], their raster indices [1, k] ascending)."""
    import torch

    x = vf.features[0]
    idx = torch.sort(torch.topk(_positions_scores(x, options["seed"]), k).indices).values
    return x[idx][None], idx[None]


METHOD = Method(
    name="random",
    stage=Stage.PRE_LLM,
    paper="-",
    summary="seeded uniform random choice of the budget's tokens (the random baseline), kept in raster order",
    scores_with=(),
    reduce=reduce_random,
    reduce_indexed=reduce_random_indexed,
    option_specs={"seed": OptionSpec(int, 0, "seed of the token choice (numpy default_rng)",
                                     check=lambda v: 0 <= v < 2**63, requirement=">= 0")},
)
