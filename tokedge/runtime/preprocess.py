"""Image loading and preprocessing without torch: numpy + Pillow, replaying the manifest's
`preprocess` record the way transformers' image processors do (PIL backend)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tokedge.artifact import PreprocessInfo
from tokedge.errors import InputError

# the image formats tokedge decodes (run, serve): common camera/web formats only, so that no input
# reaches Pillow's other plugins (EPS would start Ghostscript where it is installed)
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


def load_image(path: Path | str) -> Image.Image:
    """Open an image file, apply its EXIF orientation and return it fully loaded.

    Pillow's decompression-bomb limit stays on; its warning is an error here.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"image '{path}' does not exist" if not path.exists() else f"image '{path}' is not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=IMAGE_FORMATS) as img:
                img.load()
                return ImageOps.exif_transpose(img) or img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"image '{path}' is too large to decode safely ({exc}); resize it first") from None
    except UnidentifiedImageError:
        raise InputError(f"'{path}' is not an image in an accepted format ({', '.join(IMAGE_FORMATS)}); it may be "
                         "empty, corrupt or another format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"image '{path}' cannot be decoded ({exc}); the file may be truncated or corrupt") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers converts it: transparency composited onto white. 16/32-bit greyscale
    is scaled to 8 bits first (Pillow's own conversion would clip it to white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        image = Image.fromarray((np.asarray(image, dtype=np.uint32) >> 8).astype(np.uint8))
    elif image.mode in ("I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / hi * 255.0, 0, 255).round().astype(np.uint8))
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


MAX_RESIZED_PIXELS = 64_000_000  # a resize target larger than this is an aspect ratio nobody meant


def resize_shape(height: int, width: int, info: PreprocessInfo) -> tuple[int, int]:
    if info.resize_shortest_edge:
        size = info.resize_shortest_edge
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size, int(size * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    assert info.resize_size is not None
    return info.resize_size


def center_crop(chw: np.ndarray, height: int, width: int) -> np.ndarray:
    """Center crop [c, h, w]; zero-pads (centred) when the image is smaller than the crop."""
    _, h, w = chw.shape
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return chw[:, top : top + height, left : left + width]
    new_h, new_w = max(height, h), max(width, w)
    padded = np.zeros((chw.shape[0], new_h, new_w), dtype=chw.dtype)
    pad_top, pad_left = math.ceil((new_h - h) / 2), math.ceil((new_w - w) / 2)
    padded[:, pad_top : pad_top + h, pad_left : pad_left + w] = chw
    top, left = top + pad_top, left + pad_left
    return padded[:, max(0, top) : min(new_h, top + height), max(0, left) : min(new_w, left + width)]


def preprocess(image: Image.Image, info: PreprocessInfo) -> np.ndarray:
    """One PIL image -> pixel_values [3, H, W] float32."""
    if image.width < 1 or image.height < 1:
        raise InputError("image has zero width or height")
    if info.do_convert_rgb or image.mode != "RGB":
        image = to_rgb(image)
    if info.do_resize:
        h, w = resize_shape(image.height, image.width, info)
        if h * w > MAX_RESIZED_PIXELS or min(h, w) < 1:
            raise InputError(
                f"image is {image.width}x{image.height} pixels; its aspect ratio would resize it to {w}x{h} "
                "before cropping, which is too extreme; crop or pad it closer to square first"
            )
        image = image.resize((w, h), resample=Image.Resampling(info.resample))
    chw = np.moveaxis(np.asarray(image), -1, 0)
    if info.do_center_crop:
        chw = center_crop(chw, *info.crop_size)
    out = chw.astype(np.float64) * info.rescale_factor if info.do_rescale else chw.astype(np.float64)
    out = out.astype(np.float32)
    if info.do_normalize:
        mean = np.asarray(info.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(info.image_std, dtype=np.float32)[:, None, None]
        out = (out - mean) / std
    return np.ascontiguousarray(out, dtype=np.float32)


def preprocess_batch(images: list[Image.Image], info: PreprocessInfo) -> np.ndarray:
    return np.stack([preprocess(img, info) for img in images])
