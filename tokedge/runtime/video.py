"""Video input without torch: decode a clip with PyAV (or read a directory of frames), sample frames
the way transformers' video processors do, preprocess each frame, and the LLaVA-OneVision video
layout (per-frame tower features pooled 27x27 -> 14x14 by fixed bilinear matrices, one newline per
video). See docs/research/video.md sections 1 and 3 for the transformers behaviour replayed here.

PyAV is the `video` extra (`pip install 'tokedge[video]'`); it is imported only when a clip file is
read, so a frame directory and the layout work without it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tokedge.artifact import PreprocessInfo
from tokedge.errors import InputError, UsageError, require
from tokedge.runtime.layout import _bilinear_taps
from tokedge.runtime.preprocess import load_image, preprocess, to_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# --- frame sampling ------------------------------------------------------------------------------------


SAMPLING = ("uniform", "linspace")


def sample_indices(total: int, frames: int | None = None, fps: float | None = None,
                   source_fps: float | None = None, sampling: str = "uniform", default: int | None = None) -> np.ndarray:
    """0-based indices of the frames to keep, as transformers' `default_sample_indices_fn`:
    `frames=N` -> `i * total // N` for i < N; `fps=F` -> N = max(1, int(total / source_fps * F));
    neither -> every frame, or with `default` min(default, total) frames sampled the same way
    (an artifact's default frame count: never "all frames" of a long clip). Returns int64 [N],
    strictly increasing.

    sampling="linspace" is lmms-eval's rule (`np.linspace(0, total - 1, N).astype(int)`, first and
    last frame included), which the temporal-reduction papers evaluate with."""
    if sampling not in SAMPLING:
        raise UsageError(f"frame sampling '{sampling}' is unknown; use one of {', '.join(SAMPLING)}")
    if frames is not None and fps is not None:
        raise UsageError("--frames and --fps are mutually exclusive; give one of them")
    if total < 1:
        raise InputError("the video has no frames")
    if fps is not None:
        if not (fps > 0 and math.isfinite(fps)):
            raise UsageError(f"--fps must be a positive finite number, got {fps}")
        if not source_fps:
            raise UsageError("--fps needs the video's frame rate, which this input does not have; use --frames N")
        frames = max(1, int(total / source_fps * fps))
    if frames is None and default is not None:
        frames = min(default, total)
    if frames is None:
        return np.arange(total, dtype=np.int64)
    if frames < 1:
        raise UsageError(f"--frames must be at least 1, got {frames}")
    if frames > total:
        raise InputError(f"{frames} frames requested but the video has only {total}; ask for at most {total}")
    if sampling == "linspace":
        return np.linspace(0, total - 1, frames).astype(np.int64)
    return np.arange(frames, dtype=np.int64) * total // frames


# --- decoding ----------------------------------------------------------------------------------------------


MAX_FRAME_PIXELS = 1 << 25  # pixels of one decoded video frame (8K UHD is 33.2 M); docs/safety.md "Limits"

# a frame size: fixed (height, width), or a function of the first frame's (height, width) and the number of
# frames to decode, called before decoding (it may refuse the clip) and giving the size every frame is resized to
FrameSize = tuple[int, int] | Callable[[int, int, int], tuple[int, int]] | None


def check_frame_pixels(width: int, height: int, what: str) -> None:
    if width * height > MAX_FRAME_PIXELS:
        raise InputError(f"{what} has frames of {width}x{height} pixels, over the limit of {MAX_FRAME_PIXELS} "
                         "pixels per frame; downscale the video first")


@dataclass(frozen=True)
class Clip:
    frames: list[np.ndarray]  # N arrays [H, W, 3] uint8 RGB, upright, in time order (sampled frames only)
    indices: np.ndarray  # [N] int64 0-based index of each kept frame in the source
    total: int  # frames in the source
    fps: float | None  # source frame rate; None for a frame directory or when the container has none


def _natural_key(name: str):
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def read_frame_dir(path: Path, frames: int | None = None, fps: float | None = None,
                   sampling: str = "uniform", default: int | None = None, size: FrameSize = None,
                   resample: int = 3) -> Clip:
    """Image files in `path` are the frames, in natural name order (digit runs compare as numbers:
    f2.png before f10.png). No frame rate, so `fps` is refused."""
    files = sorted((p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: _natural_key(p.name))
    if not files:
        raise InputError(f"frame directory '{path}' holds no image files ({', '.join(IMAGE_SUFFIXES)})")
    return read_frame_files(files, frames, fps, sampling, default, size, resample)


def read_frame_files(files, frames: int | None = None, fps: float | None = None,
                     sampling: str = "uniform", default: int | None = None, size: FrameSize = None,
                     resample: int = 3) -> Clip:
    """Image files given in time order (e.g. several --image marked as frames) are a video's
    frames. No frame rate, so `fps` is refused. Each frame is resized to `size` as it is loaded
    (a callable `size` sees the first frame's size)."""
    files = [Path(f) for f in files]
    if not files:
        raise InputError("no frame images given; pass at least one image file")
    indices = sample_indices(len(files), frames, fps, None, sampling, default)
    images = []
    for i in indices:
        rgb = np.asarray(to_rgb(load_image(files[i])))
        check_frame_pixels(rgb.shape[1], rgb.shape[0], f"frame image '{files[i]}'")
        if callable(size):  # one size for the clip, from its first frame
            size = size(rgb.shape[0], rgb.shape[1], len(indices))
        # without a size frames may differ: each is resized on its own (transformers would fail to stack them)
        images.append(_resized(rgb, size, resample))
    return Clip(images, indices, len(files), None)


def _unreadable(path: Path, exc: BaseException) -> InputError:
    text = getattr(exc, "strerror", None) or str(exc).strip()  # FFmpeg's reason without errno and path
    detail = text.splitlines()[0] if text else type(exc).__name__
    return InputError(f"'{path}' is not a video PyAV/FFmpeg can read (empty, corrupt or unsupported): {detail}")


def _upright(frame) -> np.ndarray:
    """RGB array of a decoded frame with its display rotation applied (counter-clockwise degrees)."""
    rgb = frame.to_ndarray(format="rgb24")
    turns = round(getattr(frame, "rotation", 0) or 0) // 90 % 4
    return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


def _open(av, path: Path):
    # tags are only shown, never trusted: bytes that are not UTF-8 (WebM/MKV from anywhere) must not end the read
    return av.open(str(path), metadata_errors="replace")


def _count_packets(av, path: Path) -> int:
    with _open(av, path) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def _resized(rgb: np.ndarray, size: tuple[int, int] | None, resample: int) -> np.ndarray:
    if size is None or rgb.shape[:2] == tuple(size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), resample=Image.Resampling(resample)))


def _decode(av, path: Path, wanted: np.ndarray, size: FrameSize = None,
            resample: int = 3) -> tuple[list[np.ndarray], int]:
    """Decode in presentation order up to the last wanted index; returns the wanted frames (resized
    to `size` at once when given) and the number of frames decoded. A decode error after the first
    frame is treated as the end of stream. Every frame's size is checked before it is converted."""
    keep = {int(i) for i in wanted}
    last = int(wanted[-1])
    out: list[np.ndarray] = []
    count = 0
    with _open(av, path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for frame in container.decode(stream):
                check_frame_pixels(frame.width, frame.height, f"video '{path}'")  # the header may lie
                if count in keep:
                    rgb = _upright(frame)
                    if callable(size):  # one size for the clip, from its first (upright) frame
                        size = size(rgb.shape[0], rgb.shape[1], len(wanted))
                    out.append(_resized(rgb, size, resample))
                count += 1
                if count > last:
                    break
        except av.error.FFmpegError as exc:
            if count == 0:
                raise _unreadable(path, exc) from None
    return out, count


def refuse_still_image(path: Path) -> None:
    """A photo given as a video would be a one-frame clip: refused, naming --image. Judged by the
    name (IMAGE_SUFFIXES) and by the content (Pillow reads a single-frame image's header), so a
    renamed photo is caught too, and without PyAV installed."""
    still = path.suffix.lower() in IMAGE_SUFFIXES
    if not still:
        try:
            with Image.open(path) as img:
                still = getattr(img, "n_frames", 1) == 1
        except Exception:  # noqa: BLE001 - not an image Pillow reads: a clip for PyAV
            still = False
    if still:
        raise InputError(f"'{path}' is a still image, not a video; pass it with --image (or several frames with "
                         "--image F0 --image F1 ... --frames-from-images)")


def read_video(path: Path | str, frames: int | None = None, fps: float | None = None,
               sampling: str = "uniform", size: FrameSize = None, resample: int = 3,
               default: int | None = None) -> Clip:
    """A clip file (decoded with PyAV) or a directory of frames -> the sampled frames.

    size=(height, width) resizes each kept frame as soon as it is decoded (PIL, `resample`), so a
    long high-resolution clip never holds more than N small frames; with the processor's fixed size
    and resample, `preprocess_frames` then gives exactly what it gives on full-size frames. A
    callable `size(height, width, frames)` is first called with the stream header's size and the
    number of frames to decode, before anything is decoded (it may refuse the clip), then with the
    first decoded frame's upright size for the size of every frame. Frames over MAX_FRAME_PIXELS
    are refused from the header and again per decoded frame.

    Indices follow transformers' PyAV loader: the container's frame count (counted from packets when
    the header has none), frames numbered in decoded order. Display rotation is applied (transformers
    ignores it). A stream that ends before its count is resampled over the frames that decoded."""
    path = Path(path)
    if path.is_dir():
        return read_frame_dir(path, frames, fps, sampling, default, size, resample)
    if not path.exists():
        raise InputError(f"video '{path}' does not exist")
    if not path.is_file():
        raise InputError(f"video '{path}' is not a file")
    refuse_still_image(path)
    av = require("av", "video")
    try:
        with _open(av, path) as container:
            if not container.streams.video:
                raise InputError(f"'{path}' has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            source_fps = float(rate) if rate else None
            total = int(stream.frames or 0)
            width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        check_frame_pixels(width, height, f"video '{path}'")
        if total <= 0:
            total = _count_packets(av, path)
        if total <= 0:
            raise InputError(f"'{path}' has a video stream without frames")
        indices = sample_indices(total, frames, fps, source_fps, sampling, default)
        if callable(size) and width and height:  # sizes and token count from the header, before decoding
            size(height, width, len(indices))
        kept, decoded = _decode(av, path, indices, size, resample)
        if len(kept) < len(indices):  # the header promised more frames than the stream holds
            if decoded == 0:
                raise InputError(f"no frames could be decoded from '{path}'")
            total = decoded
            indices = sample_indices(total, frames, fps, source_fps, sampling, default)
            kept, _ = _decode(av, path, indices, size, resample)
    except (av.error.FFmpegError, OSError, UnicodeError) as exc:
        raise _unreadable(path, exc) from None
    return Clip(kept, indices, total, source_fps)


# --- per-frame preprocessing ---------------------------------------------------------------------------


def preprocess_frames(frames, info: PreprocessInfo) -> np.ndarray:
    """Sampled frames (N arrays [H, W, 3] uint8) -> pixel_values_videos [N, 3, S, S] float32: every frame
    resized to the processor's fixed size (no aspect kept, no padding; PIL bicubic), rescaled and
    normalised with the saved mean/std, exactly as the image path does one image."""
    if info.resize_size is None:
        raise InputError("this artifact's preprocessing has no fixed frame size; video needs one")
    return np.stack([preprocess(Image.fromarray(np.asarray(frame, dtype=np.uint8)), info) for frame in frames])


# --- LLaVA-OneVision video layout ----------------------------------------------------------------------


def pooling_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] float32 matrix W of a 1-D bilinear resize (align_corners=False, no
    antialias): a 2-D resize of a map X is W @ X @ W.T, as torch's `interpolate(mode="bilinear")`."""
    low, high, frac = _bilinear_taps(size_in, size_out)
    w = np.zeros((size_out, size_in), dtype=np.float32)
    rows = np.arange(size_out)
    np.add.at(w, (rows, low), (1 - frac).astype(np.float32))
    np.add.at(w, (rows, high), frac)
    return w


@dataclass(frozen=True)
class VideoLayout:
    """LLaVA-OneVision's video path: each frame through the tower and projector (patch_grid^2
    features), bilinear-pooled to ceil(patch_grid / 2)^2 tokens in raster order, frames one after
    another, then ONE `image_newline` for the whole video."""

    frame_size: int = 384  # S: every frame is resized to S x S
    patch_grid: int = 27  # p: tower features per frame side (image_size // patch_size)
    max_frames: int = 32  # default --frames for the family (papers use 32); never "all frames"

    @property
    def pooled_grid(self) -> int:
        return math.ceil(self.patch_grid / 2)

    @property
    def tokens_per_frame(self) -> int:
        return self.pooled_grid * self.pooled_grid

    def tokens(self, frames: int) -> int:
        """`<video>` placeholders for a video of `frames` frames, unreduced: F * q^2 + 1 newline."""
        return frames * self.tokens_per_frame + 1

    def pool(self, features: np.ndarray) -> np.ndarray:
        """Per-frame projected features [F, p*p, D] -> pooled [F, q*q, D] (raster order)."""
        f, n, d = features.shape
        p = self.patch_grid
        if n != p * p:
            raise InputError(f"frame features have {n} tokens; this layout expects {p}x{p} = {p * p}")
        w = pooling_matrix(p, self.pooled_grid)
        grid = features.reshape(f, p, p, d).astype(np.float32, copy=False)
        pooled = np.einsum("ai,fijd,bj->fabd", w, grid, w, optimize=True)
        return np.ascontiguousarray(pooled.reshape(f, self.tokens_per_frame, d), dtype=np.float32)

    def pack(self, features: np.ndarray, newline: np.ndarray) -> np.ndarray:
        """Per-frame projected features [F, p*p, D] and `image_newline` [D] -> the video's visual
        tokens [F*q*q + 1, D] as they replace the `<video>` placeholders."""
        pooled = self.pool(features)
        return np.concatenate([pooled.reshape(-1, pooled.shape[-1]), newline.reshape(1, -1).astype(np.float32)])


def expand_video_placeholders(text: str, token: str, counts: list[int]) -> str:
    """Replace the i-th `token` in `text` by `counts[i]` copies of it (transformers' processors do
    this per video, in order). The number of placeholders must equal the number of videos."""
    parts = text.split(token)
    if len(parts) - 1 != len(counts):
        raise InputError(f"the prompt has {len(parts) - 1} '{token}' placeholders for {len(counts)} videos; "
                         "give one per video")
    out = [parts[0]]
    for count, rest in zip(counts, parts[1:]):
        out.append(token * count)
        out.append(rest)
    return "".join(out)
