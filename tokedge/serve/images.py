"""`image_url` parts -> PIL images, and `video_url` parts -> encoded clips, within the server's limits.

`data:` URLs always; files under `--allow-local-images DIR` and http(s) URLs only when allowed
(both flags cover videos too; a video's bytes are bounded by `--max-video-bytes`).
Each image's bytes are bounded (413) before it is opened; its header is then read for its format
(an allow-list: PNG, JPEG, WebP, GIF, BMP, TIFF) and pixel count, and the request's images are
checked together against the per-request pixel budget before any of them is decoded.

Local files are opened below DIR component by component without following symbolic links and
read from that descriptor (a path swapped for a link after a check cannot lead outside DIR).
Remote fetches have one total deadline (connect, headers and body together), follow no
redirects, and answer every failure with the same text (so the server cannot be used to tell
open ports from closed ones).
"""

from __future__ import annotations

import base64
import binascii
import errno
import io
import os
import socket
import stat
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from PIL import Image, ImageOps, UnidentifiedImageError

from tokedge.runtime.preprocess import IMAGE_FORMATS
from tokedge.serve.config import ServeConfig
from tokedge.serve.protocol import APIError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
MAX_PATH_CHARS = 4096  # a local image path (PATH_MAX)


@dataclass(frozen=True)
class Media:
    """What a URL part carries: its noun in messages, its byte limit and the flag that sets it."""

    noun: str  # "image" | "video"
    limit_field: str  # the ServeConfig field bounding its encoded bytes
    example: str  # a data: URL prefix, for messages
    accept: str  # the Accept header of a remote fetch

    @property
    def part(self) -> str:
        return f"{self.noun}_url"

    @property
    def flag(self) -> str:
        return "--" + self.limit_field.replace("_", "-")

    def limit(self, cfg: ServeConfig) -> int:
        return int(getattr(cfg, self.limit_field))


IMAGE = Media("image", "max_image_bytes", "data:image/png;base64,...", "image/*")
VIDEO = Media("video", "max_video_bytes", "data:video/mp4;base64,...", "video/*")


def is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def image_bytes(url: str, cfg: ServeConfig, media: Media = IMAGE) -> bytes:
    """The encoded bytes of a `data:` URL or an allowed local file (remote URLs: `fetch_remote`)."""
    if url.startswith("data:"):
        return _from_data_url(url, cfg, media)
    if is_remote(url):
        if not cfg.allow_remote_images:
            raise APIError(400, f"{media.part} must be a data: URL; this server does not fetch remote {media.noun}s "
                                "(start it with --allow-remote-images to allow that)", param="messages")
        return fetch_remote(url, cfg, media)
    if cfg.allow_local_images is None:
        raise APIError(400, f"{media.part} must be a data: URL ({media.example}); local paths are off "
                            "(start the server with --allow-local-images DIR to allow files under DIR)",
                       param="messages")
    return _from_local(url, cfg, media)


def open_image(data: bytes, cfg: ServeConfig) -> Image.Image:
    """Encoded bytes -> a lazily opened image (only its header read): size and format checked."""
    if len(data) > cfg.max_image_bytes:
        raise APIError(413, f"an image is {len(data)} bytes; this server accepts at most {cfg.max_image_bytes} "
                            "bytes per image (--max-image-bytes); send a smaller or more compressed image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise APIError(413, "an image is too large to decode safely; resize it first") from None
    except UnidentifiedImageError:
        raise APIError(400, f"an image_url does not hold an image in an accepted format ({', '.join(IMAGE_FORMATS)})",
                       param="messages") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise APIError(400, f"an image cannot be decoded ({str(exc)[:200]}); it may be truncated or corrupt",
                       param="messages") from None
    if img.width * img.height > cfg.max_image_pixels:
        raise APIError(413, f"an image is {img.width}x{img.height} pixels; this server accepts at most "
                            f"{cfg.max_image_pixels} pixels per image (--max-image-pixels); resize it first")
    return img


def check_request_pixels(images: list[Image.Image], cfg: ServeConfig) -> int:
    """The request's pixels together (413 over --max-request-pixels)."""
    total = sum(img.width * img.height for img in images)
    if total > cfg.max_request_pixels:
        raise APIError(413, f"the request's {len(images)} images have {total} pixels together; this server accepts "
                            f"at most {cfg.max_request_pixels} per request (--max-request-pixels); send fewer or "
                            "smaller images")
    return total


def decode_image(img: Image.Image) -> Image.Image:
    """Decode an image from `open_image` (EXIF orientation applied)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
            return ImageOps.exif_transpose(img) or img
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise APIError(413, "an image is too large to decode safely; resize it first") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise APIError(400, f"an image cannot be decoded ({str(exc)[:200]}); it may be truncated or corrupt",
                       param="messages") from None


def release_memory() -> None:
    """Hand freed heap back to the system after a request's large images (glibc keeps it otherwise)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _from_data_url(url: str, cfg: ServeConfig, media: Media = IMAGE) -> bytes:
    header, sep, payload = url.partition(",")
    example = media.example.replace(",...", ",<base64 bytes>")
    if not sep or not header.endswith(";base64"):
        raise APIError(400, f"{_an(media.noun)} data URL must look like {example}", param="messages")
    limit = media.limit(cfg)
    if len(payload) > limit * 4 // 3 + 4:
        raise APIError(413, f"{_an(media.noun)} is larger than {limit} bytes, this server's limit per {media.noun} "
                            f"({media.flag}); send a smaller or more compressed {media.noun}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{_an(media.noun)} data URL is not valid base64", param="messages") from None


def _an(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


# -- local files ------------------------------------------------------------------------------------


def _local_error(message: str) -> APIError:
    return APIError(400, message, param="messages")


def _relative_parts(raw: str, root: Path, noun: str = "image") -> list[str]:
    """A path (absolute, or relative to DIR) -> its components below DIR, decided on the text alone:
    '..' and absolute paths outside DIR are refused, nothing on disk is resolved."""
    if "\x00" in raw or len(raw) > MAX_PATH_CHARS:
        raise _local_error(f"{_an(noun)} path must be at most {MAX_PATH_CHARS} characters without NUL bytes")
    path = PurePosixPath(raw)
    if path.is_absolute():
        for base in {root, root.resolve()}:  # DIR as given, or the directory it names
            if path.is_relative_to(base):
                path = path.relative_to(base)
                break
        else:
            raise _local_error(f"{noun} path '{raw[:200]}' is outside the allowed directory {root}")
    parts = [p for p in path.parts if p not in ("", ".")]
    if ".." in parts:
        raise _local_error(f"{noun} path '{raw[:200]}' is outside the allowed directory {root} ('..' is not allowed)")
    if not parts:
        raise _local_error(f"{noun} path '{raw[:200]}' names the allowed directory, not a file in it")
    return parts


def _from_local(url: str, cfg: ServeConfig, media: Media = IMAGE) -> bytes:
    """A file below DIR, opened one component at a time with O_NOFOLLOW (a symbolic link anywhere
    below DIR is refused, so a link swapped in after a check leads nowhere), checked on the open
    descriptor (a regular file within --max-image-bytes) and read from it."""
    assert cfg.allow_local_images is not None
    parsed = urlsplit(url) if url.startswith("file:") else None
    if parsed is not None and parsed.netloc not in ("", "localhost"):
        raise _local_error(f"a file:// {media.part} must name a local path (file:///path)")
    raw = unquote(parsed.path) if parsed is not None else url
    if parsed is None and ":" in url.split("/", 1)[0]:
        raise _local_error(f"{media.part} scheme '{url.split(':', 1)[0][:20]}' is not supported; use data:, file:// or "
                           "a path")
    root = Path(cfg.allow_local_images)
    parts = _relative_parts(raw, root, media.noun)
    shown = raw[:200]
    try:
        fd = os.open(root, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    except OSError as exc:
        raise APIError(500, f"the allowed image directory cannot be opened ({exc.strerror})") from None
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
        leaf = os.open(parts[-1], os.O_RDONLY | _NOFOLLOW | _NONBLOCK | _CLOEXEC, dir_fd=fd)
    except FileNotFoundError:
        raise _local_error(f"{media.noun} file '{shown}' does not exist under {root}") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _local_error(f"{media.noun} path '{shown}' goes through a symbolic link or a non-directory; "
                               f"only regular files below {root} are served") from None
        raise _local_error(f"{media.noun} file '{shown}' cannot be opened ({exc.strerror})") from None
    finally:
        os.close(fd)
    try:
        st = os.fstat(leaf)
        if not stat.S_ISREG(st.st_mode):
            raise _local_error(f"{media.noun} path '{shown}' is not a regular file")
        limit = media.limit(cfg)
        if st.st_size > limit:
            raise APIError(413, f"{media.noun} file '{shown}' is {st.st_size} bytes; this server accepts at most "
                                f"{limit} bytes per {media.noun} ({media.flag})")
        os.set_blocking(leaf, True)
        chunks, left = [], limit + 1
        while left > 0:
            block = os.read(leaf, min(left, 1 << 20))
            if not block:
                break
            chunks.append(block)
            left -= len(block)
        return b"".join(chunks)  # grown past the limit: open_image / the video reader answer 413
    except OSError as exc:
        raise _local_error(f"{media.noun} file '{shown}' cannot be read ({exc.strerror})") from None
    finally:
        os.close(leaf)


# -- remote URLs ------------------------------------------------------------------------------------


def _remote_error(cfg: ServeConfig, media: Media = IMAGE) -> APIError:
    return APIError(400, f"could not fetch {media.part}: no {media.noun} came back from that URL within this server's "
                         f"limits (an http(s) answer 200 within {cfg.remote_timeout_s:g} s, no redirects, at most "
                         f"{media.limit(cfg)} bytes)", param="messages")


class _Failed(Exception):
    pass


def _resolve(host: str, port: int, timeout: float) -> list:
    """getaddrinfo with a deadline (the resolver has no timeout of its own that we control)."""
    result: list = []

    def work() -> None:
        try:
            result.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError:
            pass

    worker = threading.Thread(target=work, name="tokedge-resolve", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive() or not result:
        raise _Failed
    return result


def fetch_remote(url: str, cfg: ServeConfig, media: Media = IMAGE) -> bytes:
    """GET an http(s) URL within one total deadline: a watchdog shuts the socket down when it
    passes, whatever the peer is doing (a host that drips a byte every few seconds included)."""
    import http.client
    import ssl

    deadline = time.monotonic() + cfg.remote_timeout_s
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        if parts.scheme not in ("http", "https") or not host:
            raise _Failed
        addresses = _resolve(host, port, cfg.remote_timeout_s)
        family, kind, proto, _, address = addresses[0]
        sock = socket.socket(family, kind, proto)
    except (_Failed, ValueError, OSError):
        raise _remote_error(cfg, media) from None
    live = [sock]  # what the watchdog shuts down (the TLS socket once wrapped)
    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), lambda: _shutdown(live[-1]))
    watchdog.daemon = True
    watchdog.start()
    conn = None
    try:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        sock.connect(address)
        if parts.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            live.append(sock)
        conn_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = conn_class(host, port, timeout=cfg.remote_timeout_s)
        conn.sock = sock  # connected (and wrapped) above, within the deadline
        target = parts.path or "/"
        conn.request("GET", f"{target}?{parts.query}" if parts.query else target,
                     headers={"Accept": media.accept, "User-Agent": "tokedge-serve", "Connection": "close"})
        resp = conn.getresponse()
        if resp.status != 200:  # redirects included: they are not followed
            raise _Failed
        data = bytearray()
        while True:
            if time.monotonic() > deadline:
                raise _Failed
            block = resp.read1(1 << 16)
            if not block:
                break
            data += block
            if len(data) > media.limit(cfg):
                raise _Failed
        if time.monotonic() > deadline or resp.length not in (None, 0):
            raise _Failed  # cut short by the watchdog
        return bytes(data)
    except (_Failed, OSError, ValueError, http.client.HTTPException):
        raise _remote_error(cfg, media) from None
    finally:
        watchdog.cancel()
        if conn is not None:
            conn.close()
        sock.close()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
