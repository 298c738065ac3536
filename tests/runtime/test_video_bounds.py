"""Video input bounds (issue 22, items 9, 16, 17; docs/safety.md "Limits"): frame pixels checked
from the stream header and per decoded frame, Qwen's token count checked before decoding and each
frame resized as it is decoded, `--frames` below 1 and non-finite `--fps` refused, and container
tags that are not UTF-8 never end a read as an internal error."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from tokedge.artifact import MANIFEST_NAME, Manifest
from tokedge.errors import InputError, UsageError
from tokedge.runtime import video as video_mod
from tokedge.runtime.video import read_video, sample_indices
from tokedge.runtime.video_pipeline import video_inputs

av = pytest.importorskip("av")

QWEN = {"kind": "qwen_dynamic", "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 3136,
        "max_pixels": 12845056, "window_size": 112, "fullatt_blocks": [0], "mrope_section": [16, 24, 24],
        "vision_start_token_id": 1, "vision_end_token_id": 2}
QWEN_VIDEO = {"graph": "vision", "video_token": "<|video_pad|>", "video_token_id": 5, "frame_size": 0, "patch_grid": 0,
              "pooled_grid": 0, "tokens_per_frame": 0, "newline": "absent", "resample": 3, "rescale_factor": 1 / 255,
              "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "default_frames": 8, "max_frames": 768,
              "kind": "qwen_dynamic", "tokens_per_second": 2.0}


def write_clip(path: Path, count: int, height: int, width: int, codec: str = "mpeg4",
               title: str | None = None) -> Path:
    with av.open(str(path), "w") as container:
        if title is not None:
            container.metadata["title"] = title
        stream = container.add_stream(codec, rate=5)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(count):
            rgb = np.kron(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8),
                          np.ones((8, 8, 1), np.uint8))
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def qwen_manifest(artifacts) -> Manifest:
    """The tiny LLaVA artifact's manifest as a Qwen2.5-VL one (context 2048): enough for the video
    input stage, which reads only the layout, preprocessing, video record and context."""
    data = json.loads((artifacts("none", 576) / MANIFEST_NAME).read_text())
    data = copy.deepcopy(data)
    data.update(format_version=3, layout=QWEN, video=QWEN_VIDEO)
    return Manifest.from_dict(data)


@pytest.fixture(scope="module")
def clip448(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("vb") / "clip.mp4", 16, 448, 448)


def test_huge_frames_are_refused_from_the_header(tmp_path, monkeypatch):
    """One 8192x4104 frame (34 Mpx, a few KB on disk): refused before a frame is decoded."""
    path = write_clip(tmp_path / "big.mkv", 1, 4104, 8192, codec="ffv1")
    monkeypatch.setattr(video_mod, "_decode", lambda *a, **k: pytest.fail("decoded a frame over the limit"))
    with pytest.raises(InputError, match="over the limit"):
        read_video(path, frames=1, size=(384, 384))


def test_qwen_token_count_is_checked_before_decoding(qwen_manifest, clip448, monkeypatch):
    """16 frames at 448x448 are 8 groups x 256 tokens = the whole context of 2048: refused from
    the header and --frames, with nothing decoded."""
    monkeypatch.setattr(video_mod, "_decode", lambda *a, **k: pytest.fail("decoded before the token check"))
    with pytest.raises(InputError, match="context of 2048"):
        video_inputs(qwen_manifest, clip448, frames=16)


def test_qwen_frames_are_resized_as_they_are_decoded(qwen_manifest, clip448, monkeypatch):
    seen = []
    real = video_mod._resized

    def spy(rgb, size, resample):
        out = real(rgb, size, resample)
        seen.append((size, out.shape))
        return out

    monkeypatch.setattr(video_mod, "_resized", spy)
    inputs = video_inputs(qwen_manifest, clip448, frames=4)
    assert seen == [((448, 448), (448, 448, 3))] * 4  # smart_resize keeps 448 (a multiple of 28)
    assert inputs.full_tokens == 2 * 256


@pytest.mark.parametrize("frames", [0, -1])
def test_qwen_frames_below_one_are_refused(qwen_manifest, clip448, frames):
    with pytest.raises(UsageError, match="--frames must be at least 1"):
        video_inputs(qwen_manifest, clip448, frames=frames)


@pytest.mark.parametrize("fps", [float("inf"), float("nan"), -1.0])
def test_non_finite_fps_is_refused(qwen_manifest, clip448, fps):
    with pytest.raises(UsageError, match="--fps"):
        video_inputs(qwen_manifest, clip448, fps=fps)
    with pytest.raises(UsageError, match="--fps"):
        sample_indices(10, fps=fps, source_fps=5.0)


def test_tags_that_are_not_utf8_are_read(tmp_path):
    path = write_clip(tmp_path / "tagged.mkv", 3, 64, 64, title="TOKEDGETAG")
    data = path.read_bytes()
    assert data.count(b"TOKEDGETAG") == 1
    path.write_bytes(data.replace(b"TOKEDGETAG", b"\xff\xfe\xc3(\x80\xff\xfe\xc3(\x80"))
    clip = read_video(path, frames=2)
    assert len(clip.frames) == 2
