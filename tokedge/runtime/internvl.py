"""InternVL's dynamic aspect-ratio tiling (InternVL3 / 3.5) from the image size alone, numpy + Pillow.

transformers' `GotOcr2ImageProcessor` with `crop_to_patches` (what `InternVLProcessor` asks for;
PIL backend), step by step:
1. RGB; the grid (columns, rows) is the candidate of `min_tiles <= columns * rows <= max_tiles`
   (candidates ordered by tile count, then columns, then rows) whose columns / rows is closest to
   the image's width / height; on a tie, a later (larger) candidate replaces the best when the image's
   area exceeds half the candidate's canvas area (tile^2 * columns * rows);
2. one bicubic resize of the image to (rows * tile) x (columns * tile), cut into tiles row-major;
3. with more than one tile, a *thumbnail* last: the original image squashed to tile x tile (bicubic);
4. each view rescaled (x / 255, float64 then float32) and normalised ((x - mean) / std, float32).
Each view gives `image_seq_length` visual tokens (256 at 448 px, patch 14, pixel shuffle 0.5).
An image's prompt text is `<img>` + its visual tokens as one run + `</img>` (`prompt_text`).
Every intermediate is uint8, as there.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from PIL import Image

from tokedge.errors import InputError
from tokedge.runtime.idefics3 import normalise

START_TOKEN = "<img>"  # InternVL's tokenizer: start_image_token, end_image_token around each image's run
END_TOKEN = "</img>"


@dataclass(frozen=True)
class TilePlan:
    height: int  # original image size
    width: int
    rows: int
    cols: int
    thumbnail: bool  # a squashed whole-image view follows the tiles

    @property
    def views(self) -> int:
        return self.rows * self.cols + (1 if self.thumbnail else 0)


@lru_cache(maxsize=16)
def candidates(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Every (columns, rows) with min_tiles <= columns * rows <= max_tiles, by tile count (a stable
    sort of the columns-outer, rows-inner enumeration)."""
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1)
             if min_tiles <= c * r <= max_tiles]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def best_grid(height: int, width: int, tile: int, min_tiles: int, max_tiles: int) -> tuple[int, int]:
    """(columns, rows) of step 1."""
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in candidates(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def plan_tiles(height: int, width: int, tile: int, min_tiles: int, max_tiles: int) -> TilePlan:
    """The plan of an image of height x width: its grid and whether a thumbnail follows. With
    `max_tiles` 1 (the processor's crop_to_patches off) the image is one squashed view."""
    if height < 1 or width < 1:
        raise InputError("image has zero width or height")
    if max_tiles <= 1:
        return TilePlan(height, width, 1, 1, False)
    cols, rows = best_grid(height, width, tile, min_tiles, max_tiles)
    return TilePlan(height, width, rows, cols, rows * cols > 1)


def tile_views(image: Image.Image, plan: TilePlan, tile: int, resample: int) -> list[Image.Image]:
    """The views of an RGB image, tiles row-major then the thumbnail, as PIL images before rescaling."""
    method = Image.Resampling(resample)
    canvas = image.resize((plan.cols * tile, plan.rows * tile), resample=method)
    views = [canvas.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
             for r in range(plan.rows) for c in range(plan.cols)]
    if plan.thumbnail:
        views.append(image.resize((tile, tile), resample=method))
    return views


def prompt_text(tokens: int, image_token: str) -> str:
    """What one image's placeholder becomes in the prompt (transformers' `replace_image_token`)."""
    return f"{START_TOKEN}{image_token * tokens}{END_TOKEN}"


__all__ = ["END_TOKEN", "START_TOKEN", "TilePlan", "best_grid", "candidates", "normalise", "plan_tiles",
           "prompt_text", "tile_views"]
