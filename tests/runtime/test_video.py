"""Video input: frame sampling against transformers' formula (test vectors from
docs/research/video.md 1.1), clips written with PyAV and read back, frame directories, one-line
errors, per-frame preprocessing and the OneVision 27x27 -> 14x14 pooling against torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokedge.artifact import PreprocessInfo
from tokedge.errors import InputError, UsageError
from tokedge.runtime.video import (
    VideoLayout,
    expand_video_placeholders,
    pooling_matrix,
    preprocess_frames,
    read_video,
    sample_indices,
)

av = pytest.importorskip("av")


# transformers 5.23 default_sample_indices_fn, verified in the research note
VECTORS = [
    (10, 8, None, None, [0, 1, 2, 3, 5, 6, 7, 8]),
    (300, 8, None, None, [0, 37, 75, 112, 150, 187, 225, 262]),
    (300, 32, None, None, [0, 9, 18, 28, 37, 46, 56, 65, 75, 84, 93, 103, 112, 121, 131, 140, 150, 159, 168, 178,
                           187, 196, 206, 215, 225, 234, 243, 253, 262, 271, 281, 290]),
    (100, 3, None, None, [0, 33, 66]),
    (7, 7, None, None, list(range(7))),
    (300, None, 30.0, 1.0, list(range(0, 300, 30))),
    (95, None, 24.0, 2.0, [0, 13, 27, 40, 54, 67, 81]),
    (10, None, 25.0, 1.0, [0]),
]


@pytest.mark.parametrize("total,frames,source_fps,fps,expected", VECTORS)
def test_sample_indices_match_transformers_vectors(total, frames, source_fps, fps, expected):
    got = sample_indices(total, frames=frames, fps=fps, source_fps=source_fps)
    assert got.tolist() == expected


def test_linspace_sampling_matches_lmms_eval_vectors(clip10):
    assert sample_indices(300, frames=8, sampling="linspace").tolist() == [0, 42, 85, 128, 170, 213, 256, 299]
    assert sample_indices(10, frames=8, sampling="linspace").tolist() == [0, 1, 2, 3, 5, 6, 7, 9]
    clip = read_video(clip10, frames=3, sampling="linspace")
    assert clip.indices.tolist() == [0, 4, 9]
    np.testing.assert_array_equal(clip.frames[2], decode_all(clip10)[9])
    with pytest.raises(UsageError, match="sampling"):
        sample_indices(10, frames=2, sampling="random")


def test_sample_indices_refusals():
    with pytest.raises(UsageError, match="mutually exclusive"):
        sample_indices(10, frames=4, fps=1.0, source_fps=5.0)
    with pytest.raises(InputError, match="only 10"):
        sample_indices(10, frames=11)
    with pytest.raises(UsageError, match="frame rate"):
        sample_indices(10, fps=1.0, source_fps=None)
    assert sample_indices(5).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(UsageError, match="at least 1"):
        sample_indices(10, frames=0)
    with pytest.raises(UsageError, match="positive"):
        sample_indices(10, fps=0.0, source_fps=5.0)


def _frame(i: int, h: int = 48, w: int = 64) -> np.ndarray:
    """A frame whose mean level identifies it (i * 20 + 20) with a gradient for texture."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = 20 + 20 * i + (xx // 8) + (yy // 8)
    return np.stack([base, 255 - base, np.full_like(base, 128)], axis=-1).clip(0, 255).astype(np.uint8)


def write_clip(path: Path, count: int, rate: int = 5, codec: str = "mpeg4", rotation: int | None = None,
               frames: list[np.ndarray] | None = None) -> None:
    frames = frames if frames is not None else [_frame(i) for i in range(count)]
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for rgb in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decode_all(path: Path) -> list[np.ndarray]:
    """Independent reference: every frame PyAV decodes, in order, as transformers' backend converts it."""
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


@pytest.fixture(scope="module")
def clip10(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip10.mp4"
    write_clip(path, 10)
    return path


def test_read_clip_frames_samples_transformers_indices(clip10):
    clip = read_video(clip10, frames=8)
    assert clip.total == 10 and clip.fps == pytest.approx(5.0)
    assert clip.indices.tolist() == [0, 1, 2, 3, 5, 6, 7, 8]
    reference = decode_all(clip10)
    assert len(clip.frames) == 8
    for k, i in enumerate([0, 1, 2, 3, 5, 6, 7, 8]):
        np.testing.assert_array_equal(clip.frames[k], reference[i])
        # and the decoded frame is the one written at that index (lossy codec: levels, not bits)
        assert abs(float(clip.frames[k][..., 0].mean()) - float(_frame(i)[..., 0].mean())) < 4


def test_read_clip_fps_and_all_frames(clip10):
    clip = read_video(clip10, fps=1.0)  # int(10 / 5 * 1) = 2 frames
    assert clip.indices.tolist() == [0, 5]
    np.testing.assert_array_equal(clip.frames[1], decode_all(clip10)[5])
    assert read_video(clip10).indices.tolist() == list(range(10))
    with pytest.raises(InputError, match="only 10"):
        read_video(clip10, frames=11)


def test_webm_without_header_count(tmp_path):
    path = tmp_path / "clip.webm"
    write_clip(path, 6, codec="libvpx-vp9" if "libvpx-vp9" in av.codecs_available else "libvpx")
    with av.open(str(path)) as c:
        header = c.streams.video[0].frames
    clip = read_video(path, frames=3)
    assert header == 0 and clip.total == 6 and clip.indices.tolist() == [0, 2, 4]
    reference = decode_all(path)
    for k, i in enumerate([0, 2, 4]):
        np.testing.assert_array_equal(clip.frames[k], reference[i])


def test_rotation_is_applied(tmp_path):
    marked = np.zeros((48, 64, 3), dtype=np.uint8)
    marked[:16, :16] = 255  # marker top-left
    path = tmp_path / "rot.mp4"
    write_clip(path, 2, rotation=90, frames=[marked, marked])
    frame = read_video(path, frames=1).frames[0]
    assert frame.shape == (64, 48, 3)  # turned a quarter
    # 90 degrees counter-clockwise moves the top-left corner to the bottom-left
    assert frame[-16:, :16].mean() > 200 and frame[:16, :16].mean() < 50


def test_frame_directory_natural_order(tmp_path):
    for i in (1, 2, 10, 3):
        Image.fromarray(_frame(i)).save(tmp_path / f"f{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    clip = read_video(tmp_path, frames=2)  # order f1 f2 f3 f10 -> indices 0, 2 -> f1, f3
    assert clip.total == 4 and clip.fps is None and clip.indices.tolist() == [0, 2]
    np.testing.assert_array_equal(clip.frames[1], _frame(3))
    with pytest.raises(UsageError, match="frame rate"):
        read_video(tmp_path, fps=1.0)


@pytest.mark.parametrize("content", [b"", b"\x00\x13garbage" * 100, "truncated"])
def test_unreadable_files_one_line_error(tmp_path, clip10, content):
    path = tmp_path / "bad.mp4"
    path.write_bytes(clip10.read_bytes()[:200] if content == "truncated" else content)
    with pytest.raises(InputError) as err:
        read_video(path, frames=2)
    message = str(err.value)
    assert "\n" not in message and "bad.mp4" in message


def test_missing_and_empty_dir(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_video(tmp_path / "nope.mp4")
    with pytest.raises(InputError, match="no image files"):
        read_video(tmp_path)


def test_no_video_stream(tmp_path):
    path = tmp_path / "audio.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(InputError, match="no video stream"):
        read_video(path)


def test_reader_imports_no_torch(clip10):
    code = ("import sys, json; from tokedge.runtime.video import read_video; read_video(sys.argv[1], frames=2); "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))")
    out = subprocess.run([sys.executable, "-c", code, str(clip10)], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []


# --- preprocessing and layout ---------------------------------------------------------------------------

ONEVISION_PRE = PreprocessInfo(do_convert_rgb=True, do_resize=True, resize_shortest_edge=None, resize_size=(384, 384),
                               resample=3, do_center_crop=False, crop_size=(384, 384), do_rescale=True,
                               rescale_factor=1 / 255, do_normalize=True, image_mean=(0.5, 0.5, 0.5),
                               image_std=(0.5, 0.5, 0.5))


def test_preprocess_frames_match_transformers_pil_processor(clip10, tmp_path):
    """For square frames, OneVision's multi-image PIL path (pad-to-square is a no-op, then resize to
    384x384, rescale, normalise) is the video path's per-frame arithmetic: compare bit for bit."""
    pil = pytest.importorskip("transformers.models.llava_onevision.image_processing_pil_llava_onevision")
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(3)]
    processor = pil.LlavaOnevisionImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                                    size={"height": 384, "width": 384})
    ref = processor(images=[[Image.fromarray(f) for f in frames]], return_tensors="np")["pixel_values"][:, 0]
    got = preprocess_frames(frames, ONEVISION_PRE)
    assert got.shape == (3, 3, 384, 384) and got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)
    # non-square decoded frames are squashed to 384x384 (no padding): the frame's corners stay corners
    clip = read_video(clip10, frames=2)
    pixels = preprocess_frames(clip.frames, ONEVISION_PRE)
    assert pixels.shape == (2, 3, 384, 384)
    expected_corner = (clip.frames[1][-1, -1].astype(np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(pixels[1, :, -1, -1], expected_corner, atol=0.05)


def test_pooling_matrix_test_vector():
    w = pooling_matrix(27, 14)
    x = (27 * np.arange(27)[:, None] + np.arange(27)[None, :]).astype(np.float32)
    y = w @ x @ w.T
    assert y[0, 0] == pytest.approx(13.0)
    np.testing.assert_allclose(y[0, 1:5], [14.9286, 16.8571, 18.7857, 20.7143], atol=1e-4)
    assert y[13, 13] == pytest.approx(715.0)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)


def test_pool_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((3, 729, 16)).astype(np.float32)
    layout = VideoLayout()
    got = layout.pool(feats)
    t = torch.from_numpy(feats).view(3, 27, 27, 16).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(t, size=(14, 14), mode="bilinear").permute(0, 2, 3, 1).reshape(3, 196, 16)
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)
    newline = rng.standard_normal(16).astype(np.float32)
    packed = layout.pack(feats, newline)
    assert packed.shape == (3 * 196 + 1, 16) == (layout.tokens(3), 16)
    np.testing.assert_array_equal(packed[-1], newline)
    np.testing.assert_array_equal(packed[196:392], got[1])


def test_resize_while_decoding_gives_the_same_pixel_values(clip10, tmp_path):
    full = preprocess_frames(read_video(clip10, frames=3).frames, ONEVISION_PRE)
    small = read_video(clip10, frames=3, size=(384, 384))
    assert all(f.shape == (384, 384, 3) for f in small.frames)
    np.testing.assert_array_equal(preprocess_frames(small.frames, ONEVISION_PRE), full)
    for i in range(2):
        Image.fromarray(_frame(i)).save(tmp_path / f"{i}.png")
    assert read_video(tmp_path, size=(384, 384)).frames[1].shape == (384, 384, 3)


def test_video_token_counts_and_placeholders():
    layout = VideoLayout()
    assert (layout.pooled_grid, layout.tokens_per_frame, layout.tokens(8), layout.tokens(32)) == (14, 196, 1569, 6273)
    text = "<|im_start|>user\n<video>\nWhat happens?<|im_end|>\n"
    expanded = expand_video_placeholders(text, "<video>", [layout.tokens(2)])
    assert expanded.count("<video>") == 393 and expanded.endswith("\nWhat happens?<|im_end|>\n")
    with pytest.raises(InputError, match="placeholders"):
        expand_video_placeholders(text, "<video>", [1, 1])


@pytest.mark.parametrize("name,fmt", [("photo.jpg", "JPEG"), ("photo.PNG", "PNG"), ("renamed.mp4", "PNG")])
def test_a_still_image_is_not_a_one_frame_clip(name, fmt, tmp_path, clip10, artifacts, capsys):
    """Issue 28 item 18: `--video photo.jpg` used to run as a one-frame clip. It is refused in one
    line (exit 2) naming --image, before the artifact is loaded; by name or, renamed, by content.
    An animated GIF and a real clip are still videos."""
    from PIL import Image

    from tokedge.cli import main

    photo = tmp_path / name
    Image.fromarray(_frame(0)).save(photo, format=fmt)
    with pytest.raises(InputError, match="still image, not a video; pass it with --image"):
        read_video(photo)
    rc = main(["run", str(artifacts("cls-attn", 64)), "--video", str(photo), "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "--image" in err and name in err
    animated = tmp_path / "anim.gif"
    Image.fromarray(_frame(0)).save(animated, save_all=True, append_images=[Image.fromarray(_frame(i)) for i in (1, 2)])
    assert len(read_video(animated).frames) == 3
    assert len(read_video(clip10, frames=2).frames) == 2
