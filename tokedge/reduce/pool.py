"""`pool`: 2-D average pooling of the patch grid to a sqrt(k) x sqrt(k) grid (the adaptive
pooling baseline of TokenFLEX / LLaVA-Mini-style projectors).

Pools like torch's adaptive_avg_pool2d (window i covers floor(i*G/s) .. ceil((i+1)*G/s)), written
as one constant [k, n] averaging matrix so uneven windows export too. `--budget` = k, a perfect
square <= the grid. Counts are static.

Dynamic resolution (Qwen-VL, `reduce_indexed`): each image's merged grid H x W (n = H*W tokens)
pools to exactly its run-time count k (any 1 <= k <= n) in horizontal bands: h = floor(sqrt(k*H/W))
clamped to [ceil(k/W), min(H, k)] bands; band i covers rows floor(i*H/h) .. ceil((i+1)*H/h) and
holds w_i = floor((i+1)*k/h) - floor(i*k/h) windows, window c of it covers columns
floor(c*W/w_i) .. ceil((c+1)*W/w_i). Each token is its window's mean and takes the M-RoPE
position of the window's top-left merged token. When k = h*w with w = k/h in every band this is
adaptive_avg_pool2d of the merged grid to h x w (e.g. --keep 0.25 on an even grid: 2x2 windows).
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


def band_windows(k, height, width):
    """Adaptive band pooling of an H x W grid to k windows; every argument a 0-d int64 tensor (traced
    with run-time values) -> (rows0, rows1, cols0, cols1), each [k] int64 (half-open ranges)."""
    one = torch.ones_like(k)
    root = torch.floor(torch.sqrt((k * height).to(torch.float32) / width.to(torch.float32))).to(torch.int64)
    root = torch.where((root + 1) * (root + 1) * width <= k * height, root + 1, root)  # float rounding
    root = torch.where(root * root * width > k * height, root - 1, root)
    lowest = torch.div(k + width - 1, width, rounding_mode="floor")
    h = torch.maximum(torch.minimum(torch.maximum(root, lowest), torch.minimum(height, k)), one)
    j = torch.arange(k)  # [k] 0..k-1
    band = torch.div((j + 1) * h - 1, k, rounding_mode="floor")
    start = torch.div(band * k, h, rounding_mode="floor")
    w = torch.div((band + 1) * k, h, rounding_mode="floor") - start
    col = j - start
    r0 = torch.div(band * height, h, rounding_mode="floor")
    r1 = torch.div((band + 1) * height + h - 1, h, rounding_mode="floor")
    c0 = torch.div(col * width, w, rounding_mode="floor")
    c1 = torch.div((col + 1) * width + w - 1, w, rounding_mode="floor")
    return r0, r1, c0, c1


def reduce_pool_indexed(vf: VisionFeatures, k, options: dict, most: int = 0):
    """`pool` on one image of a dynamic-resolution tower, b = 1: vf.features [1, n, d] in raster order
    of the merged grid, vf.grid_width its columns (0-d int64), k a 0-d int64 count ->
    (tokens [1, k, d] the window means, kept_index [1, k] the windows' top-left raster indices, ascending)."""
    x = vf.features[0]
    cells = torch.cumsum(torch.ones_like(x[:, 0], dtype=torch.int64), 0) - 1  # [n] 0..n-1
    width = vf.grid_width
    height = torch.div(torch.ones_like(cells).sum(), width, rounding_mode="floor")
    r0, r1, c0, c1 = band_windows(k, height, width)
    row, col = torch.div(cells, width, rounding_mode="floor"), cells % width
    inside = ((row[None] >= r0[:, None]) & (row[None] < r1[:, None]) &
              (col[None] >= c0[:, None]) & (col[None] < c1[:, None])).to(torch.float32)  # [k, n]
    weight = inside / inside.sum(-1, keepdim=True)
    tokens = torch.matmul(weight, x.float()).to(x.dtype)
    return tokens[None], (r0 * width + c0)[None]


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
    reference="torch.nn.functional.adaptive_avg_pool2d",
    summary="adaptive 2-D average pooling of the patch grid to sqrt(k) x sqrt(k)",
    reduce=reduce_pool,
    reduce_indexed=reduce_pool_indexed,
    budget_check=_check,
    indexed_budget_check=lambda budget, full: None,  # any count: band pooling reaches it exactly
)
