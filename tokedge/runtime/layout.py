"""How one image becomes visual tokens, as data (`AnyresLayout`, saved in the manifest) and numpy.

LLaVA-NeXT and LLaVA-OneVision tile an image ("anyres"): a grid pinpoint is chosen from the image
size, the image is resized (aspect kept) and zero-padded to it and cut into square tiles, and a
base view (the whole image squashed to one tile) goes first. Each partition (base or tile) runs
through the vision tower to p x p features. The tiles' features are laid out as one map, the
padding is cut off again ("unpadding"), OneVision shrinks maps larger than `anyres_max_M`
tiles by bilinear interpolation, and an `image_newline` vector ends every row.

This module computes all of that from the image size alone, as a *packing plan*: for every
visual token, the four feature rows it is a weighted sum of (an index into the image's
partition features flattened to [P*N] rows, with row P*N standing for `image_newline`) and the
four weights. Gathers with weights 1/0 reproduce transformers' reshape/unpad/newline exactly and
bilinear interpolation is four taps, so the vision graph can pack (and then reduce) in-graph
with a static output count while P varies. Everything here replays transformers' processors
and `pack_image_features` (PIL backend; see docs/artifact.md, "visual layout").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tokedge.errors import InputError
from tokedge.layouts.base import TYPICAL_IMAGE, LayoutBounds


@dataclass(frozen=True)
class AnyresLayout:
    tile: int  # S: side of a tile and of the base view in pixels (vision image_size)
    patch_grid: int  # p: features per tile side (image_size // patch_size)
    pinpoints: tuple[tuple[int, int], ...]  # candidate canvases (height, width), in the config's order
    max_tiles: int | None = None  # OneVision "anyres_max_M": maps over ~M tiles are interpolated down
    interpolate_threshold: float = 1.1  # ... when sqrt(h*w / (M*p*p)) exceeds this
    multi_image_square: bool = False  # OneVision: images of multi-image prompts are padded square, untiled
    pad_fill: tuple[int, int, int] = (0, 0, 0)  # uint8 colour of the canvas padding (before normalising)

    @property
    def tokens_per_tile(self) -> int:
        return self.patch_grid * self.patch_grid


@dataclass(frozen=True)
class ImagePlan:
    height: int  # original image size
    width: int
    tiled: bool  # False: one partition (OneVision multi-image), base + newline
    canvas: tuple[int, int]  # chosen pinpoint (height, width)
    grid: tuple[int, int]  # tiles (rows, cols)
    resized: tuple[int, int]  # image size on the canvas (height, width)
    offset: tuple[int, int]  # top, left padding on the canvas
    unpadded: tuple[int, int]  # feature map after unpadding (rows, cols)
    packed: tuple[int, int]  # feature map after OneVision's interpolation (rows, cols)

    @property
    def partitions(self) -> int:
        return 1 + self.grid[0] * self.grid[1] if self.tiled else 1

    def tokens(self, layout: AnyresLayout) -> int:
        """Visual tokens of this image without reduction: base + map + one newline per row."""
        if not self.tiled:
            return layout.tokens_per_tile + 1
        rows, cols = self.packed
        return layout.tokens_per_tile + rows * (cols + 1)


def best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The pinpoint that keeps the most of the image's resolution, then wastes the least canvas;
    ties keep the earlier pinpoint (transformers' `select_best_resolution`)."""
    best, best_effective, best_wasted = None, 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        dw, dh = int(width * scale), int(height * scale)
        effective = min(dw * dh, width * height)
        wasted = h * w - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (h, w), effective, wasted
    assert best is not None
    return best


def _unpadded(rows: int, cols: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(kept rows, kept cols, first row, first col) of a rows x cols map of an image H x W
    (transformers' `unpad_image`: int(round(x, 7)) and a symmetric crop)."""
    if width / height > cols / rows:
        new = int(round(height * (cols / width), 7))
        pad = (rows - new) // 2
        return rows - 2 * pad, cols, pad, 0
    new = int(round(width * (rows / height), 7))
    pad = (cols - new) // 2
    return rows, cols - 2 * pad, 0, pad


def plan_image(layout: AnyresLayout, height: int, width: int, tiled: bool = True) -> ImagePlan:
    if height < 1 or width < 1:
        raise InputError("image has zero width or height")
    s, p = layout.tile, layout.patch_grid
    if not tiled:
        side = max(height, width)
        return ImagePlan(height, width, False, (side, side), (0, 0), (height, width), ((side - height) // 2,
                         (side - width) // 2), (0, 0), (0, 0))
    bh, bw = best_resolution(height, width, layout.pinpoints)
    sw, sh = bw / width, bh / height
    if sw < sh:
        nw, nh = bw, min(math.ceil(height * sw), bh)
    else:
        nh, nw = bh, min(math.ceil(width * sh), bw)
    grid = (bh // s, bw // s)
    rows, cols, _, _ = _unpadded(grid[0] * p, grid[1] * p, height, width)
    packed = (rows, cols)
    if layout.max_tiles is not None:
        ratio = math.sqrt(rows * cols / (layout.max_tiles * p * p))
        if ratio > layout.interpolate_threshold:
            packed = (int(rows // ratio), int(cols // ratio))
    return ImagePlan(height, width, True, (bh, bw), grid, (nh, nw), ((bh - nh) // 2, (bw - nw) // 2),
                     (rows, cols), packed)


def layout_bounds(layout: AnyresLayout) -> LayoutBounds:
    """Largest count: over every pinpoint, every feature map unpadding can leave (the full
    `gh*p` rows with any column count, or the full `gw*p` columns with any row count), after
    OneVision's interpolation, + newlines + the base view. Without `max_tiles` that is the largest
    pinpoint's whole map (an image of exactly its shape reaches it); with `max_tiles` it is an
    upper bound. Smallest: the base view alone (1 partition when `multi_image_square`)."""
    p, n = layout.patch_grid, layout.tokens_per_tile
    most = 0
    for h, w in layout.pinpoints:
        full_rows, full_cols = (h // layout.tile) * p, (w // layout.tile) * p
        maps = [(full_rows, c) for c in range(1, full_cols + 1)] + [(r, full_cols) for r in range(1, full_rows)]
        for rows, cols in maps:
            if layout.max_tiles is not None:
                ratio = math.sqrt(rows * cols / (layout.max_tiles * p * p))
                if ratio > layout.interpolate_threshold:
                    rows, cols = int(rows // ratio), int(cols // ratio)
            most = max(most, rows * (cols + 1))
    tiles = [(h // layout.tile) * (w // layout.tile) for h, w in layout.pinpoints]
    typical = plan_image(layout, *TYPICAL_IMAGE)
    fewest_parts = 1 if layout.multi_image_square else 1 + min(tiles)
    return LayoutBounds(partitions=(fewest_parts, typical.partitions, 1 + max(tiles)),
                        tokens=(n, typical.tokens(layout), n + most))


def partitions(image: Image.Image, layout: AnyresLayout, plan: ImagePlan, resample: int) -> list[Image.Image]:
    """The base view and the tiles (row-major) of an RGB image, as PIL images of S x S, before
    rescaling and normalising (those are per partition, as for a single crop)."""
    s = layout.tile
    method = Image.Resampling(resample)
    if not plan.tiled:  # OneVision multi-image: pad to a square of the mean colour, then resize
        side = plan.canvas[0]
        square = Image.new("RGB", (side, side), layout.pad_fill)
        square.paste(image, (plan.offset[1], plan.offset[0]))
        return [square.resize((s, s), resample=method, reducing_gap=None)]
    base = image.resize((s, s), resample=method, reducing_gap=None)
    nh, nw = plan.resized
    resized = image.resize((nw, nh), resample=method, reducing_gap=None)
    canvas = Image.new("RGB", (plan.canvas[1], plan.canvas[0]), (0, 0, 0))
    canvas.paste(resized, (plan.offset[1], plan.offset[0]))
    tiles = [canvas.crop((c * s, r * s, (c + 1) * s, (r + 1) * s)) for r in range(plan.grid[0])
             for c in range(plan.grid[1])]
    return [base, *tiles]


def _bilinear_taps(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source rows (low, high) and the weight of `high` for each output row of a bilinear resize
    with align_corners=False (torch's `interpolate`), computed in float32 as torch does."""
    scale = np.float32(size_in / size_out)
    dst = np.arange(size_out, dtype=np.float32)
    src = np.maximum((dst + np.float32(0.5)) * scale - np.float32(0.5), np.float32(0))
    low = np.floor(src).astype(np.int64)
    low = np.minimum(low, size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac = (src - low.astype(np.float32)).astype(np.float32)
    return low, high, frac


def pack_plan(layout: AnyresLayout, plan: ImagePlan) -> tuple[np.ndarray, np.ndarray]:
    """For each visual token of the image: (index [T, 4] int64 into the image's partition features
    flattened to [P*N] rows, where P*N is the `image_newline` row; weight [T, 4] float32)."""
    p, n = layout.patch_grid, layout.tokens_per_tile
    newline = plan.partitions * n
    base = np.arange(n, dtype=np.int64)
    if not plan.tiled:
        index = np.concatenate([base, [newline]])
        full = np.zeros((index.size, 4), dtype=np.int64)
        full[:, 0] = index
        weight = np.zeros((index.size, 4), dtype=np.float32)
        weight[:, 0] = 1
        return full, weight
    gh, gw = plan.grid
    rows_full, cols_full = gh * p, gw * p
    rows, cols, top, left = _unpadded(rows_full, cols_full, plan.height, plan.width)
    y = np.arange(top, top + rows)[:, None]
    x = np.arange(left, left + cols)[None, :]
    # map position (y, x) -> partition 1 + tile index, token within the tile
    source = (1 + (y // p) * gw + (x // p)) * n + (y % p) * p + (x % p)  # [rows, cols]
    out_rows, out_cols = plan.packed
    if (out_rows, out_cols) == (rows, cols):
        taps = source.reshape(rows, cols, 1)
        weights = np.ones((rows, cols, 1), dtype=np.float32)
    else:
        y0, y1, fy = _bilinear_taps(rows, out_rows)
        x0, x1, fx = _bilinear_taps(cols, out_cols)
        taps = np.stack([source[y0][:, x0], source[y0][:, x1], source[y1][:, x0], source[y1][:, x1]], axis=-1)
        wy0, wy1 = (1 - fy)[:, None], fy[:, None]
        wx0, wx1 = (1 - fx)[None, :], fx[None, :]
        weights = np.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1], axis=-1).astype(np.float32)
    k = taps.shape[-1]
    index = np.full((out_rows, out_cols + 1, 4), 0, dtype=np.int64)
    weight = np.zeros((out_rows, out_cols + 1, 4), dtype=np.float32)
    index[:, :out_cols, :k] = taps
    weight[:, :out_cols, :k] = weights
    index[:, out_cols, 0] = newline
    weight[:, out_cols, 0] = 1
    index = np.concatenate([np.stack([base] + [np.zeros(n, np.int64)] * 3, -1), index.reshape(-1, 4)])
    base_w = np.zeros((n, 4), dtype=np.float32)
    base_w[:, 0] = 1
    weight = np.concatenate([base_w, weight.reshape(-1, 4)])
    return index, weight


def candidate_plan(layout: AnyresLayout, plan: ImagePlan, index: np.ndarray,
                   weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The image's *candidates* for reduction: its pack plan without the `image_newline` rows
    (base view tokens, then the unpadded tile map in raster order). -> (index [C, 4], weight [C, 4])."""
    newline = plan.partitions * layout.tokens_per_tile
    keep = ~np.any((index == newline) & (weight != 0), axis=1)
    return index[keep], weight[keep]


def base_regions(layout: AnyresLayout, plan: ImagePlan) -> np.ndarray:
    """The tile (row-major index over the grid) in which the centre of each base-view token lands
    on the canvas: [N] int64. Base token (r, c) covers the whole resized image squashed to p x p,
    so its centre is at y = top + (r + 0.5) / p * nh, x = left + (c + 0.5) / p * nw (HiRED's
    allocation by spatial region; untiled plans: all 0)."""
    p = layout.patch_grid
    if not plan.tiled:
        return np.zeros(p * p, dtype=np.int64)
    (nh, nw), (top, left), (gh, gw) = plan.resized, plan.offset, plan.grid
    centre = (np.arange(p, dtype=np.float64) + 0.5) / p
    rows = np.minimum(np.floor((top + centre * nh) / layout.tile).astype(np.int64), gh - 1)
    cols = np.minimum(np.floor((left + centre * nw) / layout.tile).astype(np.int64), gw - 1)
    return (rows[:, None] * gw + cols[None, :]).reshape(-1)


def thumbnail_guide(layout: AnyresLayout, plan: ImagePlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GlobalCom2's two maps from the base view (the thumbnail) to the tiles, from the image size
    alone (docs/artifact.md, "Planning a tiled image"):
    - base_block [N] int64: the tile (row-major in the grid) whose block of the base view's p x p map
      holds each base-view token, the map split evenly by the grid with the padding ignored: rows of
      `max(p // gh, 1)` tokens (the last block takes the rest), columns alike;
    - guide_index, guide_weight [C, 4]: per candidate (base view first, then the tile map in raster
      order), four base-view tokens and their weights: the base view's p x p map resized bilinearly
      (align_corners=False, torch's `interpolate`) to the tile map's rows x cols; the base view's own
      candidates get weight 0."""
    p, n = layout.patch_grid, layout.tokens_per_tile
    gh, gw = plan.grid if plan.tiled else (1, 1)
    rows_per, cols_per = max(p // gh, 1), max(p // gw, 1)
    block_row = np.minimum(np.arange(p) // rows_per, gh - 1)
    block_col = np.minimum(np.arange(p) // cols_per, gw - 1)
    base_block = (block_row[:, None] * gw + block_col[None, :]).reshape(-1).astype(np.int64)
    rows, cols = plan.packed if plan.tiled else (0, 0)
    index = np.zeros((n + rows * cols, 4), dtype=np.int64)
    weight = np.zeros((n + rows * cols, 4), dtype=np.float32)
    if rows * cols:
        y0, y1, fy = _bilinear_taps(p, rows)
        x0, x1, fx = _bilinear_taps(p, cols)
        taps = np.stack([y0[:, None] * p + x0[None, :], y0[:, None] * p + x1[None, :],
                         y1[:, None] * p + x0[None, :], y1[:, None] * p + x1[None, :]], axis=-1)
        wy0, wy1 = (1 - fy)[:, None], fy[:, None]
        wx0, wx1 = (1 - fx)[None, :], fx[None, :]
        index[n:] = taps.reshape(-1, 4)
        weight[n:] = np.stack([wy0 * wx0, wy0 * wx1, wy1 * wx0, wy1 * wx1], axis=-1).reshape(-1, 4)
    return base_block, index, weight


def pack_features(features: np.ndarray, newline: np.ndarray, index: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """features [P, N, D], newline [D] -> packed visual tokens [T, D] (the plan applied in numpy;
    the vision graph does the same in-graph)."""
    rows = np.concatenate([features.reshape(-1, features.shape[-1]), newline[None].astype(features.dtype)])
    return np.einsum("tk,tkd->td", weight.astype(np.float32), rows[index].astype(np.float32)).astype(features.dtype)


def image_budget(reduction) -> int | None:
    """Visual tokens per image an artifact's vision graph keeps (its manifest `reduction`): the
    budget for vision-side methods (the plan is then the candidate plan), None when it packs every
    token (`none`, and in-LLM methods, which prune later)."""
    from tokedge.reduce.base import Stage

    return reduction.budget if Stage(reduction.stage) in (Stage.PRE_LLM, Stage.IN_VIT) else None


@dataclass(frozen=True)
class AnyresInputs:
    """One image's inputs to an anyres vision graph and how many visual tokens it gives."""

    pixel_values: np.ndarray  # [P, 3, S, S] float32
    pack_index: np.ndarray  # [T, 4] int64
    pack_weight: np.ndarray  # [T, 4] float32
    plan: ImagePlan
    budget: int | None = None  # reduced artifacts: tokens the vision graph keeps (the plan is the candidates')
    base_tile: np.ndarray | None = None  # [N] int64: tile of each base-view token (`base_regions`)
    guide: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # `thumbnail_guide`: base_block, guide_index/_weight

    @property
    def tokens(self) -> int:
        """Visual tokens this image gives in the prompt."""
        return int(self.pack_index.shape[0]) if self.budget is None else self.budget


def anyres_inputs(image: Image.Image, layout: AnyresLayout, info, tiled: bool = True,
                  budget: int | None = None) -> AnyresInputs:
    """An image -> its partitions preprocessed with the manifest's `PreprocessInfo` (resize/crop are
    no-ops on S x S partitions; rescale and normalise as for a single crop) and its packing plan.
    `tiled=False`: one square partition (OneVision's rule for images of multi-image prompts, used
    when `layout.multi_image_square` and the prompt has more than one image).
    `budget`: the artifact reduces each image to this many tokens; the plan is then the candidate
    plan (`candidate_plan`) and the image must have at least `budget` candidates."""
    from tokedge.runtime.preprocess import preprocess, to_rgb

    if info.do_convert_rgb or image.mode != "RGB":
        image = to_rgb(image)
    plan = plan_image(layout, image.height, image.width, tiled=tiled)
    parts = partitions(image, layout, plan, info.resample)
    pixel_values = np.stack([preprocess(part, info) for part in parts])
    index, weight = pack_plan(layout, plan)
    if budget is None:
        return AnyresInputs(pixel_values, index, weight, plan)
    index, weight = candidate_plan(layout, plan, index, weight)
    if index.shape[0] < budget:
        raise InputError(
            f"a {plan.width}x{plan.height} image gives {index.shape[0]} visual tokens, fewer than this artifact's "
            f"budget of {budget} per image; use a larger image or an artifact exported with --budget <= {index.shape[0]}"
        )
    return AnyresInputs(pixel_values, index, weight, plan, budget, base_regions(layout, plan),
                        thumbnail_guide(layout, plan))
