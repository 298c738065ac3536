"""Shared by the preprocessing stage's tests: the table of measured differences (printed at the end
of the run by conftest.pytest_terminal_summary), test images, and small conversions."""

from __future__ import annotations

import numpy as np
from PIL import Image

PIL_ATOL = 1e-5  # float32 rounding: tokedge equals the PIL backend
# torchvision vs PIL resampling, measured (docs/runtime.md): 1-2 grey levels on <1% of values at most
# sizes, up to 9 on ~27% where the scale is near 1 (smart_resize's rounding, e.g. 900 -> 896 px); a
# wrong crop, shift or channel order would exceed both bounds by far
GREY_LEVELS, SHARE = 10.0, 0.30

# (family, what, size, against, max abs difference vs tokedge, note)
DIFFS: list[tuple[str, str, str, str, float, str]] = []


def image(h: int, w: int, seed: int = 0) -> Image.Image:
    """A photo-like test image: smooth gradients plus noise (pure noise exaggerates resampling
    differences, flat colour hides them)."""
    rng = np.random.default_rng(seed + h * 7 + w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 100 * np.sin(xx / (17 + c * 5) + yy / (23 + c * 3)) for c in range(3)], -1)
    noisy = base + rng.normal(0, 20, size=(h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")


def levels(diff: np.ndarray, std) -> float:
    """A difference of normalised pixels [.., 3, ..] back in grey levels (x std x 255 per channel)."""
    return float(np.max(diff * np.asarray(std, np.float32).reshape(3, 1, 1) * 255))


def processor_order(inputs, layout) -> np.ndarray:
    """The runtime's rows (window order on Qwen2.5-VL) back in the image processor's order."""
    from tokedge.runtime.qwen_vl import qwen2_5_vision_inputs

    if layout.window_size is None:
        return inputs.pixel_values
    order = qwen2_5_vision_inputs(inputs.grid[None], int(layout.merge_size), int(layout.window_size),
                                  int(layout.patch_size)).patch_order
    rows = np.empty_like(inputs.pixel_values)
    rows[order] = inputs.pixel_values
    return rows


