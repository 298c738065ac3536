"""tokedge's video preprocessing against transformers' real video processors (torchvision only):
`LlavaOnevisionVideoProcessor` (every frame to 384x384) and `Qwen2VLVideoProcessor` (one
smart_resize per clip, pairs of frames per temporal group), and Qwen2.5-VL's full multimodal
processor for the video's token count and temporal spacing.

The video processors resample with torchvision, the runtime with PIL (docs/video.md): frames that
need no resize must be equal, resized frames within a grey level. Needs torchvision (`.venv-tv`).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.preprocess.support import DIFFS, GREY_LEVELS, PIL_ATOL, SHARE, processor_order
from tests.preprocess.support import image as _image
from tests.preprocess.support import levels as _levels


def _frames(h: int, w: int, n: int = 4) -> list[np.ndarray]:
    return [np.asarray(_image(h, w, seed=i)) for i in range(n)]


def _compare(family: str, size, ours: np.ndarray, theirs: np.ndarray, std, resized: bool) -> None:
    """ours/theirs [..., 3, h, w]-shaped (channel third from last)."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    diff = np.abs(ours.astype(np.float64) - theirs.astype(np.float64))
    levels = _levels(np.moveaxis(diff, -3, 0).reshape(3, -1, diff.shape[-1]), std)
    DIFFS.append((family, "video frames", f"{size[0]}x{size[1]}", "video proc.", float(diff.max()),
                  f"{levels:.2f} grey levels; {float(np.mean(diff > PIL_ATOL)):.1%} of values differ"))
    if resized:
        share = float(np.mean(diff > PIL_ATOL))
        assert levels <= GREY_LEVELS + 1e-3 and share <= SHARE, f"{family} video {size}: {levels:.2f} levels, {share:.1%}"
    else:
        np.testing.assert_allclose(ours, theirs, atol=PIL_ATOL, rtol=0)


@pytest.fixture(scope="module")
def onevision_pre(tiny_llava_onevision_dir):
    from tokedge.export.families import load_checkpoint

    loaded = load_checkpoint(str(tiny_llava_onevision_dir), tiny_llava_onevision_dir)
    return loaded.family.preprocess(loaded)


@pytest.mark.parametrize("size", [(384, 384), (480, 640), (720, 1280)])
def test_onevision_frames_match_the_video_processor(onevision_pre, size):
    from transformers import LlavaOnevisionVideoProcessor

    from tokedge.runtime.video import preprocess_frames

    frames = _frames(*size)
    # the hub's video_preprocessor_config.json carries the image processor's mean/std (0.5), as the artifact does
    processor = LlavaOnevisionVideoProcessor(image_mean=list(onevision_pre.image_mean),
                                             image_std=list(onevision_pre.image_std))
    theirs = processor(videos=[np.stack(frames)], return_tensors="np")["pixel_values_videos"][0]
    ours = preprocess_frames(frames, onevision_pre)
    _compare("llava-onevision", size, ours, theirs, onevision_pre.image_std, resized=size != (384, 384))


@pytest.fixture(scope="module")
def qwen_loaded(tiny_qwen2_5_vl_dir):
    from tokedge.export.families import load_checkpoint

    return load_checkpoint(str(tiny_qwen2_5_vl_dir), tiny_qwen2_5_vl_dir)


def _qwen_video(loaded, frames, fps: float, indices=None, total: int | None = None):
    from tokedge.runtime.qwen_vl import video_inputs

    layout, pre = loaded.family.layout(loaded), loaded.family.preprocess(loaded)
    indices = np.arange(len(frames)) if indices is None else np.asarray(indices)
    return video_inputs(frames, indices, total or len(frames), fps, layout, pre), layout, pre


@pytest.mark.parametrize("size", [(448, 448), (300, 400), (480, 640)])
def test_qwen2_5_vl_frames_match_the_video_processor(qwen_loaded, size):
    """Pixels and grid of `runtime.qwen_vl.video_inputs` (each temporal group's rows put back in the
    processor's order) against `Qwen2VLVideoProcessor` with the artifact's pixel range."""
    from transformers import Qwen2VLVideoProcessor

    frames = _frames(*size)
    video, layout, pre = _qwen_video(qwen_loaded, frames, fps=2.0)
    processor = Qwen2VLVideoProcessor(size={"shortest_edge": int(layout.min_pixels),
                                            "longest_edge": int(layout.max_pixels)},
                                      patch_size=int(layout.patch_size), merge_size=int(layout.merge_size),
                                      temporal_patch_size=int(layout.temporal_patch_size),
                                      image_mean=list(pre.image_mean), image_std=list(pre.image_std))
    batch = processor(videos=[np.stack(frames)], return_tensors="np")
    assert list(batch["video_grid_thw"][0]) == list(video.grid)
    ours = np.concatenate([processor_order(group, layout) for group in video.groups])
    p, t = int(layout.patch_size), int(layout.temporal_patch_size)
    as_chw = (lambda rows: rows.reshape(-1, 3, t * p, p).transpose(1, 0, 2, 3).reshape(3, -1, p))
    factor = p * int(layout.merge_size)
    _compare("qwen2.5-vl", size, as_chw(ours), as_chw(batch["pixel_values_videos"]), pre.image_std,
             resized=size[0] % factor != 0 or size[1] % factor != 0)


def test_qwen2_5_vl_processor_video_tokens_and_spacing(qwen_loaded, tiny_qwen2_5_vl_dir):
    """The full Qwen2.5-VL processor (it constructs with torchvision): the prompt's video tokens and
    `second_per_grid_ts` equal the runtime's count and temporal spacing for the same frames: 4 frames
    sampled from an 8-frame clip at 2 fps (sampled fps 1: 2 s per temporal group)."""
    from transformers import AutoProcessor

    frames, indices = _frames(448, 448, n=4), [0, 2, 4, 6]
    video, layout, _ = _qwen_video(qwen_loaded, frames, fps=2.0, indices=indices, total=8)
    assert video.second_per_grid == pytest.approx(2.0)
    processor = AutoProcessor.from_pretrained(tiny_qwen2_5_vl_dir)
    processor.video_processor.size = {"shortest_edge": int(layout.min_pixels), "longest_edge": int(layout.max_pixels)}
    text = "<|vision_start|><|video_pad|><|vision_end|>What happens?"
    batch = processor(text=[text], videos=[np.stack(frames)], return_tensors="np",
                      video_metadata=[{"total_num_frames": 8, "fps": 2.0, "frames_indices": indices}])
    video_id = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert int((batch["input_ids"][0] == video_id).sum()) == video.full_tokens
    assert list(batch["video_grid_thw"][0]) == list(video.grid)
    assert float(batch["second_per_grid_ts"][0]) == pytest.approx(video.second_per_grid)
