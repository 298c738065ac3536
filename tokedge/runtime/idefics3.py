"""Idefics3-lineage image splitting (SmolVLM, SmolVLM2) from the image size alone, numpy + Pillow.

transformers' `Idefics3ImageProcessor` / `SmolVLMImageProcessor` (PIL backend), step by step:
1. RGB (transparency onto white), then a Lanczos resize of the longest edge to `longest_edge`
   (small images are scaled up too): the short side is `int(long / aspect)`, made even by +1;
   both sides then capped at 4096 with the aspect kept;
2. when splitting, a second Lanczos resize of that image: the long side rounded up to a multiple of
   the tile `M`, the short side `int(long / aspect)` rounded up to a multiple of `M` (stretched);
3. tiles of M x M cut row-major, then the *global* view: the step-2 image squashed to M x M
   (Lanczos) appended last; an image no larger than M in both sides is one view, unsplit;
   without splitting every image is squashed to M x M;
4. each view rescaled (x / 255, float64 then float32) and normalised ((x - mean) / std, float32).
Each view gives `image_seq_len` visual tokens. The prompt text of an image (`prompt_text`): per tile
`<fake_token_around_image><row_r_col_c>` + the tokens, a newline after each row of tiles, then
`\\n<fake_token_around_image><global-img>` + the tokens + `<fake_token_around_image>`; an unsplit
image only the global part without the leading newline. Every intermediate is uint8, as there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from tokedge.errors import InputError

MAX_SIDE = 4096  # transformers' MAX_IMAGE_SIZE: step 1 never goes past it
FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"


@dataclass(frozen=True)
class SplitPlan:
    height: int  # original image size
    width: int
    resized: tuple[int, int]  # (height, width) after step 1
    canvas: tuple[int, int]  # (height, width) after step 2 (= resized when not split)
    rows: int  # tiles (0, 0: one unsplit view)
    cols: int

    @property
    def views(self) -> int:
        return self.rows * self.cols + 1 if self.rows else 1


def longest_edge_size(height: int, width: int, longest: int) -> tuple[int, int]:
    """Step 1's (height, width): the longest edge to `longest`, the other even, both capped at 4096."""
    aspect = width / height
    if width >= height:
        width = longest
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect = width / height
    if width >= height and width > MAX_SIDE:
        width, height = MAX_SIDE, int(MAX_SIDE / aspect)
    elif height > width and height > MAX_SIDE:
        height, width = MAX_SIDE, int(MAX_SIDE * aspect)
    return max(height, 1), max(width, 1)


def tile_multiple_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Step 2's (height, width): sides rounded up to multiples of `tile` (the short one via the aspect)."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def plan_split(height: int, width: int, longest: int, tile: int, split: bool = True) -> SplitPlan:
    """The plan of an image of height x width; one view (rows = cols = 0) when not splitting or when
    step 2 leaves no side larger than the tile (its canvas is then tile x tile)."""
    if height < 1 or width < 1:
        raise InputError("image has zero width or height")
    resized = longest_edge_size(height, width, longest)
    canvas = tile_multiple_size(*resized, tile) if split else (tile, tile)
    if canvas[0] > tile or canvas[1] > tile:
        return SplitPlan(height, width, resized, canvas, (canvas[0] - tile) // tile + 1, (canvas[1] - tile) // tile + 1)
    return SplitPlan(height, width, resized, (tile, tile), 0, 0)


def split_views(image: Image.Image, plan: SplitPlan, tile: int, resample: int) -> list[Image.Image]:
    """The views of an RGB image, tiles row-major then the global view (or the one view), as PIL
    images before rescaling (each Lanczos resize of transformers' runs on uint8, as here)."""
    method = Image.Resampling(resample)
    first = image.resize((plan.resized[1], plan.resized[0]), resample=method)
    if not plan.rows:  # one view: squashed (or rounded up) to tile x tile
        return [first.resize((tile, tile), resample=method)]
    second = first.resize((plan.canvas[1], plan.canvas[0]), resample=method)
    tiles = [second.crop((c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
             for r in range(plan.rows) for c in range(plan.cols)]
    return [*tiles, second.resize((tile, tile), resample=method)]


def normalise(view: Image.Image, rescale_factor: float, mean, std) -> np.ndarray:
    """[3, H, W] float32: x * rescale_factor (float64, then float32), then (x - mean) / std in float32."""
    chw = np.moveaxis(np.asarray(view), -1, 0).astype(np.float64) * rescale_factor
    out = chw.astype(np.float32)
    out = (out - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]
    return np.ascontiguousarray(out, dtype=np.float32)


def prompt_text(rows: int, cols: int, tokens: int, image_token: str) -> str:
    """What one image's placeholder becomes in the prompt (transformers' `get_image_prompt_string`)."""
    run = image_token * tokens
    global_part = f"{FAKE_TOKEN}{GLOBAL_TOKEN}{run}{FAKE_TOKEN}"
    if not rows:
        return global_part
    text = "".join("".join(f"{FAKE_TOKEN}<row_{r + 1}_col_{c + 1}>{run}" for c in range(cols)) + "\n"
                   for r in range(rows))
    return f"{text}\n{global_part}"
