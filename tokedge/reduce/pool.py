"""`pool`: 2-D average pooling of the patch grid to a sqrt(k) x sqrt(k) grid (the adaptive
pooling baseline of TokenFLEX / LLaVA-Mini-style projectors).

Pools like torch's adaptive_avg_pool2d (window i covers floor(i*G/s) .. ceil((i+1)*G/s)), written
as one constant [k, n] averaging matrix so uneven windows export too. `--budget` = k, a perfect
square <= the grid. Counts are static.
"""

from __future__ import annotations

import math

import torch

from tokedge.reduce.base import Method, Signal, Stage, VisionFeatures


def pooling_matrix(grid: int, side: int) -> torch.Tensor:
    """[side*side, grid*grid] row-stochastic matrix of adaptive average pooling windows."""
    mat = torch.zeros(side * side, grid * grid)
    for i in range(side):
        r0, r1 = (i * grid) // side, -((-(i + 1) * grid) // side)
        for j in range(side):
            c0, c1 = (j * grid) // side, -((-(j + 1) * grid) // side)
            cells = [r * grid + c for r in range(r0, r1) for c in range(c0, c1)]
            mat[i * side + j, cells] = 1.0 / len(cells)
    return mat


def pool_tokens(features, k: int):
    """features [b, n, d] (n a square grid, raster order) -> [b, k, d]."""
    n = features.shape[1]
    grid, side = math.isqrt(n), math.isqrt(k)
    mat = pooling_matrix(grid, side).to(features.dtype)
    return torch.matmul(mat, features)


def reduce_pool(vf: VisionFeatures, k: int, options: dict):
    if k >= vf.features.shape[1]:
        return vf.project(vf.features)
    return vf.project(pool_tokens(vf.features, k))


def _check(budget: int, full: int) -> str | None:
    if math.isqrt(full) ** 2 != full:
        return f"needs a square patch grid, and this model has {full} patch tokens"
    if math.isqrt(budget) ** 2 != budget:
        lo, hi = math.isqrt(budget) ** 2, (math.isqrt(budget) + 1) ** 2
        return f"must be a perfect square (for example {max(lo, 1)} or {hi})"
    return None


METHOD = Method(
    name="pool",
    stage=Stage.PRE_LLM,
    scores_with=(Signal.POSITIONS,),
    paper="2501.03895 (LLaVA-Mini; adaptive pooling baseline)",
    summary="adaptive 2-D average pooling of the patch grid to sqrt(k) x sqrt(k)",
    reduce=reduce_pool,
    budget_check=_check,
)
