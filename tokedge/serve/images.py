"""`image_url` parts -> PIL images, within the server's limits.

`data:` URLs always; files under `--allow-local-images DIR` and http(s) URLs only when allowed.
Every image is checked for encoded size (413) and pixel count (413) before it is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, ImageOps, UnidentifiedImageError

from tokedge.serve.config import ServeConfig
from tokedge.serve.protocol import APIError


def fetch_image(url: str, cfg: ServeConfig) -> Image.Image:
    if url.startswith("data:"):
        data = _from_data_url(url, cfg)
    elif url.startswith(("http://", "https://")):
        if not cfg.allow_remote_images:
            raise APIError(400, "image_url must be a data: URL; this server does not fetch remote images "
                                "(start it with --allow-remote-images to allow that)", param="messages")
        data = _from_remote(url, cfg)
    else:
        if cfg.allow_local_images is None:
            raise APIError(400, "image_url must be a data: URL (data:image/png;base64,...); local paths are off "
                                "(start the server with --allow-local-images DIR to allow files under DIR)",
                           param="messages")
        data = _from_local(url, cfg)
    return decode_image(data, cfg)


def decode_image(data: bytes, cfg: ServeConfig) -> Image.Image:
    if len(data) > cfg.max_image_bytes:
        raise APIError(413, f"an image is {len(data)} bytes; this server accepts at most {cfg.max_image_bytes} "
                            "bytes per image (--max-image-bytes); send a smaller or more compressed image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > cfg.max_image_pixels:
                raise APIError(413, f"an image is {img.width}x{img.height} pixels; this server accepts at most "
                                    f"{cfg.max_image_pixels} pixels per image (--max-image-pixels); resize it first")
            img.load()
            return ImageOps.exif_transpose(img) or img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise APIError(413, "an image is too large to decode safely; resize it first") from None
    except UnidentifiedImageError:
        raise APIError(400, "an image_url does not hold an image Pillow can read (PNG, JPEG, WebP...)",
                       param="messages") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise APIError(400, f"an image cannot be decoded ({exc}); it may be truncated or corrupt",
                       param="messages") from None


def _from_data_url(url: str, cfg: ServeConfig) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise APIError(400, "an image data URL must look like data:image/png;base64,<base64 bytes>", param="messages")
    if len(payload) > cfg.max_image_bytes * 4 // 3 + 4:
        raise APIError(413, f"an image is larger than {cfg.max_image_bytes} bytes, this server's limit per image "
                            "(--max-image-bytes); send a smaller or more compressed image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, "an image data URL is not valid base64", param="messages") from None


def _from_local(url: str, cfg: ServeConfig) -> bytes:
    assert cfg.allow_local_images is not None
    parsed = urlparse(url)
    if parsed.scheme not in ("", "file"):
        raise APIError(400, f"image_url scheme '{parsed.scheme}' is not supported; use data:, file:// or a path",
                       param="messages")
    raw = unquote(parsed.path) if parsed.scheme == "file" else url
    root = Path(cfg.allow_local_images).resolve()
    path = (root / raw).resolve() if not Path(raw).is_absolute() else Path(raw).resolve()
    if not path.is_relative_to(root):
        raise APIError(400, f"image path '{raw}' is outside the allowed directory {root}", param="messages")
    if not path.is_file():
        raise APIError(400, f"image file '{raw}' does not exist under {root}", param="messages")
    size = path.stat().st_size
    if size > cfg.max_image_bytes:
        raise APIError(413, f"image file '{raw}' is {size} bytes; this server accepts at most "
                            f"{cfg.max_image_bytes} bytes per image (--max-image-bytes)")
    return path.read_bytes()


def _from_remote(url: str, cfg: ServeConfig) -> bytes:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=cfg.remote_timeout_s) as resp:
            data = resp.read(cfg.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise APIError(400, f"could not fetch image_url {url}: {exc}", param="messages") from None
    if len(data) > cfg.max_image_bytes:
        raise APIError(413, f"the image at {url} is larger than {cfg.max_image_bytes} bytes, this server's limit "
                            "per image (--max-image-bytes)")
    return data
