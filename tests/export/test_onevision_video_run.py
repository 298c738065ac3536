"""`tokedge run --video` on a LLaVA-OneVision artifact against transformers (issue 13).

The independent reference for `--method none`: transformers' own PyAV loader
(`transformers.video_utils.load_video`, the frames `LlavaOnevisionVideoProcessor` would get), its
documented per-frame steps replayed here (frames of exactly 384x384 skip the resize in torchvision
and PIL alike, so rescale + normalise with the checkpoint's saved mean/std is the whole
processor), `LlavaOnevisionProcessor.replace_video_token` for the placeholder count and
`LlavaOnevisionForConditionalGeneration.generate(pixel_values_videos=...)`. The artifact runs
through the real CLI and the torch-free runtime; tokens must be equal, prefill logits within 1e-3.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
torch = pytest.importorskip("torch")

from tests.runtime.test_video import write_clip  # noqa: E402

QUESTION = "What happens in this video?"
NEW_TOKENS = 8
FRAMES = 8


def _frames(count: int, size: int = 384, seed: int = 5) -> list[np.ndarray]:
    """Smooth moving textures (lossy codecs keep them recognisable), one distinct frame each."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = []
    for i in range(count):
        fx, fy, phase = rng.uniform(0.01, 0.05, 2).tolist() + [i * 0.7]
        r = 127 + 100 * np.sin(xx * fx + phase)
        g = 127 + 100 * np.cos(yy * fy - phase)
        b = 127 + 60 * np.sin((xx + yy) * 0.02 + 2 * phase)
        out.append(np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def clip8(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ov-video") / "clip8.mp4"
    write_clip(path, FRAMES, frames=_frames(FRAMES))
    return path


@pytest.fixture(scope="module")
def ov_video_artifacts(tiny_llava_onevision_dir, tmp_path_factory):
    """One OneVision artifact per method, exported once (image parity is tested elsewhere)."""
    from tokedge.export.pipeline import ExportConfig, export

    root = tmp_path_factory.mktemp("ov-video-art")
    made: dict[str, Path] = {}

    def get(method: str = "none") -> Path:
        if method not in made:
            out = root / method
            export(ExportConfig(model=str(tiny_llava_onevision_dir), out=out, method=method,
                                validate=method == "none"))
            made[method] = out
        return made[method]

    return get


def hf_video_inputs(ov_loaded, clip: Path, frames: int):
    """transformers' side: its PyAV loader, the processor's steps for 384x384 frames, its placeholder
    expansion and tokenizer. -> (input_ids, pixel_values_videos [1, F, 3, 384, 384])."""
    from transformers.video_utils import load_video

    video, meta = load_video(str(clip), num_frames=frames, backend="pyav")
    assert video.shape[1:3] == (384, 384)  # no resize: torchvision and PIL agree exactly
    ip = ov_loaded.processor.image_processor
    mean, std = np.asarray(ip.image_mean, np.float32), np.asarray(ip.image_std, np.float32)
    pixels = ((video.astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2)[None].astype(np.float32)
    hf = ov_loaded.family.hf_processor(ov_loaded)
    hf.video_token = ov_loaded.processor.video_token
    text = ov_loaded.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}])
    text = text.replace(hf.video_token, hf.replace_video_token({"pixel_values_videos": pixels}, 0))
    ids = ov_loaded.processor.tokenizer([text], return_tensors="pt")["input_ids"]
    return ids, torch.from_numpy(pixels), list(meta.frames_indices)


def _cli(capsys, *argv) -> tuple[int, str, str]:
    from tokedge.cli import main

    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.mark.slow
def test_run_video_none_equals_transformers_generate(ov_video_artifacts, ov_loaded, hf_onevision, clip8, capsys):
    """ACCEPTANCE: 8-frame PyAV clip, --method none: greedy tokens equal transformers' generate with
    the same video input, prefill logits within 1e-3."""
    from tokedge.runtime.generate import SamplingConfig
    from tokedge.runtime.pipeline import Pipeline
    from tokedge.runtime.video_pipeline import generate_video, video_inputs, video_plan

    art = ov_video_artifacts("none")
    ids, pixels, indices = hf_video_inputs(ov_loaded, clip8, FRAMES)
    assert int((ids == hf_onevision.config.video_token_id).sum()) == FRAMES * 196 + 1 == 1569
    with torch.no_grad():
        ref = hf_onevision.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pixels,
                                    max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
    ref_tokens = ref.sequences[0, ids.shape[1]:].tolist()

    rc, out, err = _cli(capsys, "run", art, "--video", clip8, "--frames", FRAMES, "--prompt", QUESTION,
                        "--max-new-tokens", NEW_TOKENS, "--json")
    assert rc == 0, err
    result = json.loads(out)
    assert result["token_ids"] == ref_tokens
    assert result["video"]["frames"] == FRAMES and result["video"]["frame_indices"] == indices
    assert result["visual_tokens"] == 1569 and result["video"]["kept_per_frame"] == [196] * FRAMES

    with Pipeline.load(art) as pipe:
        video = pipe.manifest.video
        inputs = video_inputs(pipe.manifest, clip8, FRAMES)
        plan = video_plan(pipe.manifest, inputs.frames)
        enc = pipe.encoder.encode_video(QUESTION, video.video_token, video.video_token_id, plan.placeholders)
        gen = generate_video(pipe.graphs, inputs, plan, enc.input_ids, enc.attention_mask,
                             SamplingConfig(max_new_tokens=NEW_TOKENS))
    np.testing.assert_array_equal(enc.input_ids[0], ids[0].numpy())
    np.testing.assert_allclose(inputs.pixel_values, pixels[0].numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(gen.prefill_logits[0], ref.logits[0][0].numpy(), atol=1e-3, rtol=0)
    assert gen.token_ids[0] == ref_tokens


@pytest.mark.slow
def test_frames_as_images_and_directory_match_the_clip(ov_video_artifacts, clip8, tmp_path, capsys):
    """The clip's decoded frames saved as PNG files give the same answer as a frame directory and
    as --image files marked --frames-from-images as the clip itself (same pixels, same tokens)."""
    from PIL import Image

    from tests.runtime.test_video import decode_all

    art = ov_video_artifacts("none")
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    files = []
    for i, frame in enumerate(decode_all(clip8)):
        files.append(frames_dir / f"f{i}.png")
        Image.fromarray(frame).save(files[-1])
    common = ["--prompt", QUESTION, "--max-new-tokens", 4, "--json", "--frames", 4]
    answers = []
    for source in (["--video", clip8], ["--video", frames_dir],
                   [a for f in files for a in ("--image", f)] + ["--frames-from-images"]):
        rc, out, err = _cli(capsys, "run", art, *source, *common)
        assert rc == 0, err
        answers.append(json.loads(out))
    assert answers[0]["token_ids"] == answers[1]["token_ids"] == answers[2]["token_ids"]
    assert answers[0]["video"]["frame_indices"] == answers[2]["video"]["frame_indices"] == [0, 2, 4, 6]


@pytest.mark.slow
def _older_artifact(art: Path, out: Path) -> Path:
    """The artifact as a tokedge without video wrote it: no `video` record, no video graph."""
    import shutil

    shutil.copytree(art, out)
    manifest = json.loads((out / "tokedge.json").read_text())
    graph = manifest.pop("video")["graph"]
    manifest["graphs"].pop(graph)
    (out / "tokedge.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.slow
def test_video_errors_are_one_line(ov_video_artifacts, clip8, tmp_path, capsys):
    art = ov_video_artifacts("none")
    older = _older_artifact(art, tmp_path / "older")
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x01not a video at all" * 10)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    cases = [
        (["run", older, "--video", clip8, "--prompt", "hi"], "takes images only"),
        (["run", art, "--video", bad, "--prompt", "hi"], "not a video PyAV/FFmpeg can read"),
        (["run", art, "--video", empty, "--prompt", "hi"], "not a video PyAV/FFmpeg can read"),
        (["run", art, "--video", tmp_path / "missing.mp4", "--prompt", "hi"], "does not exist"),
        (["run", art, "--video", clip8, "--frames", 9, "--prompt", "hi"], "has only 8"),
        (["run", art, "--video", clip8, "--frames", 65, "--prompt", "hi"], "takes per video (64)"),
        (["run", art, "--video", clip8, "--frames", 2, "--fps", 1, "--prompt", "hi"], "mutually exclusive"),
        (["run", art, "--video", clip8, "--image", clip8, "--prompt", "hi"], "cannot be combined"),
        (["run", art, "--frames-from-images", "--prompt", "hi"], "needs the frames"),
        (["run", art, "--frames", 2, "--image", clip8, "--prompt", "hi"], "apply to a video"),
        (["run", art, "--prompt", "hi"], "pass --image"),
        (["run", art, "--video", clip8, "--budget", 10, "--prompt", "hi"], "keeps every visual token"),
        (["run", art, "--video", clip8, "--prompt", "<video> twice"], "video placeholders"),
    ]
    for argv, needle in cases:
        rc, out, err = _cli(capsys, *argv)
        assert rc != 0, argv
        lines = err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (argv, err)
        assert "Traceback" not in err
    # the older artifact still runs images
    from PIL import Image

    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(tmp_path / "img.png")
    rc, out, err = _cli(capsys, "run", older, "--image", tmp_path / "img.png", "--prompt", "hi", "--max-new-tokens", 2)
    assert rc == 0, err
