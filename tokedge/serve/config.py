"""`tokedge serve` settings: one frozen dataclass, built by the CLI (or a test) and read by the app."""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tokedge.errors import UsageError

if TYPE_CHECKING:
    from tokedge.runtime.backends import Backend

LOOPBACK_NAMES = ("localhost",)


@dataclass(frozen=True)
class ServeConfig:
    artifact: Path
    host: str = "127.0.0.1"  # loopback by default; anything else needs an API key or `insecure`
    port: int = 8000
    api_key: str | None = None  # every request but /health then needs `Authorization: Bearer <key>`
    insecure: bool = False  # allow a non-loopback bind without an API key
    model_name: str | None = None  # the id in /v1/models and responses (default: the artifact directory name)
    max_batch: int = 4  # concurrent requests run as one batch
    batch_wait_ms: float = 10.0  # after the first queued request, wait this long for more to batch with it
    max_queue: int = 32  # requests waiting for the batch after the running one; more get 429
    max_image_bytes: int = 8 << 20  # encoded size of one image; larger gets 413
    max_video_bytes: int = 8 << 20  # encoded size of one video (video artifacts); larger gets 413
    video_frames: int | None = None  # frames sampled from a request's video (None: the artifact's default count)
    max_image_pixels: int = 40_000_000  # width * height of one decoded image; larger gets 413
    max_request_pixels: int = 48_000_000  # all images of one request together, checked before any is decoded
    max_prompt_tokens: int = 4096  # prompt after templating, image placeholders included; longer gets 400
    max_tokens_limit: int = 1024  # the largest `max_tokens` a request may ask for
    default_max_tokens: int = 256  # when a request gives no `max_tokens`
    allow_local_images: Path | None = None  # image_url may name files under this directory (file:// or a path)
    allow_remote_images: bool = False  # image_url may be http(s); fetched with a timeout and the byte limit
    remote_timeout_s: float = 10.0  # total deadline of one remote fetch (connect, headers, body); no redirects
    max_remote_fetches: int = 4  # remote images fetched at once (others wait for a slot)
    max_preprocess: int = 2  # requests whose images are decoded and preprocessed at once (others wait)
    max_connections: int = 256  # open client connections; more are closed at once
    max_uploads: int = 16  # request bodies read at once (each up to max_body_bytes); others wait, unread
    request_timeout_s: float = 30.0  # deadline for a request's headers and, separately, for its body; 408 after
    shutdown_timeout_s: float = 60.0  # SIGTERM: how long in-flight requests may take to finish
    stall_s: float = 30.0  # /health answers 503 "stalled" once every slot of a stage is this long in use
    threads: int = 0  # ONNX Runtime intra-op threads (0 = automatic)
    runtime: Backend | None = None  # a tokedge.runtime.backends.Backend (--backend...); None: ONNX Runtime on the CPU
    warmup: bool = True  # run one tiny generation before reporting ready
    request_log: bool = True  # one line per request on stderr (method, status, tokens, TTFT, total ms)

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.artifact).resolve().name

    @property
    def max_body_bytes(self) -> int:
        """A request body may hold one base64 image (or video) at the byte limit plus the messages around it."""
        return max(self.max_image_bytes, self.max_video_bytes) * 4 // 3 + (1 << 20)

    def check(self) -> None:
        for name in ("max_batch", "max_queue", "max_image_bytes", "max_video_bytes", "max_image_pixels", "max_request_pixels",
                     "max_prompt_tokens", "max_tokens_limit", "default_max_tokens", "max_remote_fetches",
                     "max_preprocess", "max_connections", "max_uploads"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        for name in ("remote_timeout_s", "request_timeout_s", "shutdown_timeout_s", "stall_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise UsageError(f"--{name[:-2].replace('_', '-')} must be a positive number of seconds (got {value})")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port {self.port} is not a TCP port (0..65535)")
        if self.video_frames is not None and self.video_frames < 1:
            raise UsageError(f"--video-frames must be at least 1 (got {self.video_frames})")
        if self.batch_wait_ms < 0:
            raise UsageError(f"--batch-wait-ms must be >= 0 (got {self.batch_wait_ms})")
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("the API key is empty; pass a non-empty --api-key-file, TOKEDGE_API_KEY or --api-key")
        if self.api_key is not None and (not self.api_key.isascii() or not self.api_key.isprintable()):
            raise UsageError("the API key must be printable ASCII (it is sent in an HTTP header)")
        if not is_loopback(self.host) and self.api_key is None and not self.insecure:
            raise UsageError(f"refusing to bind {self.host} (reachable from other machines) without an API key; "
                             "set TOKEDGE_API_KEY (or pass --api-key-file), or --insecure to serve it unauthenticated")
        if self.allow_local_images is not None and not Path(self.allow_local_images).is_dir():
            raise UsageError(f"--allow-local-images {self.allow_local_images} is not a directory")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach. Host names other than localhost count as
    reachable from elsewhere (they may resolve to anything)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
