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

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")
torch = pytest.importorskip("torch")

from tests.runtime.test_video import write_clip

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
def ov_video_artifacts(ov_artifacts):
    """The session's shared OneVision artifacts (one export per method, images validated too)."""
    return lambda method="none": ov_artifacts(method)[0]


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
    parity = json.loads((art / "tokedge.json").read_text())["reference"]["parity_at_export"]
    assert parity["ok"] and parity["video"]["ok"] and parity["video"]["max_abs_video_embeds"] < 1e-4
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
def test_serve_video_equals_transformers_generate(ov_video_artifacts, ov_loaded, hf_onevision, clip8, tmp_path, capfd):
    """Issue 28 item 17: a `video_url` part over `tokedge serve` (the official openai client, a real
    server): the answer equals transformers' greedy `generate` on the same 8 frames, streamed and
    not; usage and the request log line count the clip's 1569 visual tokens; the clip's limits and
    a broken clip are one-line OpenAI-style errors; an image-only artifact refuses video."""
    import base64

    import openai

    from tests.serve.conftest import running_server
    from tokedge.serve.config import ServeConfig

    art = ov_video_artifacts("none")
    ids, pixels, _ = hf_video_inputs(ov_loaded, clip8, FRAMES)
    with torch.no_grad():
        ref = hf_onevision.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pixels,
                                    max_new_tokens=NEW_TOKENS, do_sample=False)
    ref_tokens = ref[0, ids.shape[1]:].tolist()
    eos = set(np.atleast_1d(hf_onevision.generation_config.eos_token_id).tolist())
    ref_text = ov_loaded.processor.tokenizer.decode([t for t in ref_tokens if t not in eos], skip_special_tokens=True)

    url = "data:video/mp4;base64," + base64.b64encode(clip8.read_bytes()).decode()
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": QUESTION}]}]
    cfg = ServeConfig(artifact=art, video_frames=FRAMES, max_prompt_tokens=4096, warmup=False,
                      max_video_bytes=clip8.stat().st_size + 10)
    with running_server(cfg) as (base, service):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        done = client.chat.completions.create(model=service.cfg.served_name, messages=messages,
                                              max_tokens=NEW_TOKENS, temperature=0)
        assert done.choices[0].message.content == ref_text
        assert done.choices[0].finish_reason == ("length" if len(ref_tokens) == NEW_TOKENS and not eos & set(ref_tokens)
                                                 else "stop")
        usage = done.usage.model_dump()
        assert usage["visual_tokens"] == 1569 and usage["prompt_tokens"] == ids.shape[1]
        stream = client.chat.completions.create(model=service.cfg.served_name, messages=messages,
                                                max_tokens=NEW_TOKENS, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == ref_text

        bad = "data:video/mp4;base64," + base64.b64encode(b"\x00\x01not a video at all" * 10).decode()
        big = "data:video/mp4;base64," + base64.b64encode(b"\x00" * (clip8.stat().st_size + 100)).decode()
        two = [{"type": "video_url", "video_url": {"url": url}}] * 2
        for content, status, needle in [
            ([{"type": "video_url", "video_url": {"url": bad}}], 400, "not a video PyAV/FFmpeg can read"),
            ([{"type": "video_url", "video_url": {"url": big}}], 413, "--max-video-bytes"),
            (two, 400, "one video per request"),
            ([{"type": "video_url", "video_url": {"url": "/etc/passwd"}}], 400, "--allow-local-images"),
        ]:
            with pytest.raises(openai.APIStatusError) as err:
                client.chat.completions.create(model=service.cfg.served_name, max_tokens=2, messages=[
                    {"role": "user", "content": [*content, {"type": "text", "text": "?"}]}])
            assert err.value.status_code == status, err.value.body
            message = err.value.body["message"]
            assert needle in message and "\n" not in message and "tokedge-video-" not in message, message
    log = [line for line in capfd.readouterr().err.splitlines() if "POST /v1/chat/completions 200" in line]
    assert len(log) == 2 and all("visual_tokens=1569" in line for line in log), log


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
    # --fps 2.5 on the 5 fps clip: int(8 / 5 * 2.5) = 4 frames, the same ones
    rc, out, err = _cli(capsys, "run", art, "--video", clip8, "--fps", 2.5, *common[:-2])
    assert rc == 0, err
    assert json.loads(out)["video"]["frame_indices"] == [0, 2, 4, 6]
    assert json.loads(out)["token_ids"] == answers[0]["token_ids"]


@pytest.mark.slow
def _older_artifact(art: Path, out: Path) -> Path:
    """The artifact as a tokedge without video wrote it: no `video` record, no video graph."""
    import shutil

    shutil.copytree(art, out)
    manifest = json.loads((out / "tokedge.json").read_text())
    graph = manifest.pop("video")["graph"]
    manifest.pop("architecture", None)  # (written since; a tokedge without video had no such record)
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
        rc, _, err = _cli(capsys, *argv)
        assert rc != 0, argv
        lines = err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (argv, err)
        assert "Traceback" not in err
    # the older artifact still runs images
    from PIL import Image

    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(tmp_path / "img.png")
    rc, _, err = _cli(capsys, "run", older, "--image", tmp_path / "img.png", "--prompt", "hi", "--max-new-tokens", 2)
    assert rc == 0, err


# --- image methods over all frames, with a per-video budget ----------------------------------------------

METHOD_FRAMES = 4
VIDEO_BUDGET = 196  # frame tokens of the whole video reaching the LLM (25% of 4 x 196), newline not counted


@torch.no_grad()
def hf_video_features(hf_onevision, pixels) -> np.ndarray:
    """transformers' `get_video_features`: [F*196 + 1, hidden], the newline last."""
    cfg = hf_onevision.config
    return hf_onevision.model.get_video_features(
        pixels, vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output[0].numpy()


def _tokedge_video(art: Path, clip: Path, frames: int, budget: int | None, steps: int):
    """The runtime's own inputs and generate (greedy, no EOS stop) on an artifact."""
    from tokedge.runtime.generate import SamplingConfig
    from tokedge.runtime.pipeline import Pipeline
    from tokedge.runtime.video_pipeline import generate_video, video_inputs, video_plan

    with Pipeline.load(art) as pipe:
        video = pipe.manifest.video
        inputs = video_inputs(pipe.manifest, clip, frames)
        plan = video_plan(pipe.manifest, inputs.frames, budget)
        enc = pipe.encoder.encode_video(QUESTION, video.video_token, video.video_token_id, plan.placeholders)
        gen = generate_video(pipe.graphs, inputs, plan, enc.input_ids, enc.attention_mask,
                             SamplingConfig(max_new_tokens=steps), stop_at_eos=False)
    return gen, plan, enc.input_ids


@pytest.mark.slow
def test_divprune_over_frames_matches_transformers_and_the_loop(ov_video_artifacts, ov_loaded, hf_onevision, clip8):
    """divprune on a video = the loop selection over transformers' F*196 pooled tokens as one set;
    transformers generates from those kept tokens + newline (`mm_encoder_outputs`)."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from tests.export.test_anyres_methods import loop_divprune

    ids, pixels, _ = hf_video_inputs(ov_loaded, clip8, METHOD_FRAMES)
    feats = hf_video_features(hf_onevision, pixels)
    picks = loop_divprune(feats[:-1], VIDEO_BUDGET)
    reduced = np.concatenate([feats[:-1][picks], feats[-1:]])
    token = hf_onevision.config.video_token_id
    first = int(torch.nonzero(ids[0] == token)[0])
    keep_ids = torch.cat([ids[0][:first], torch.full((VIDEO_BUDGET + 1,), token),
                          ids[0][first + METHOD_FRAMES * 196 + 1:]])[None]
    with torch.no_grad():
        ref = hf_onevision.generate(
            input_ids=keep_ids, attention_mask=torch.ones_like(keep_ids), max_new_tokens=NEW_TOKENS, do_sample=False,
            mm_encoder_outputs={"video": BaseModelOutputWithPooling(pooler_output=torch.from_numpy(reduced)[None])},
            output_logits=True, return_dict_in_generate=True)
    gen, plan, got_ids = _tokedge_video(ov_video_artifacts("divprune"), clip8, METHOD_FRAMES, VIDEO_BUDGET, NEW_TOKENS)
    np.testing.assert_array_equal(got_ids[0], keep_ids[0].numpy())
    assert plan.placeholders == VIDEO_BUDGET + 1 and gen.visual_tokens == VIDEO_BUDGET + 1
    np.testing.assert_allclose(gen.video_tokens, reduced, atol=1e-4, rtol=1e-4)  # the same kept tokens
    assert gen.kept_per_frame == np.bincount(np.asarray(picks) // 196, minlength=METHOD_FRAMES).tolist()
    assert sum(gen.kept_per_frame) == VIDEO_BUDGET
    np.testing.assert_allclose(gen.prefill_logits[0], ref.logits[0][0].numpy(), atol=1e-3, rtol=0)
    assert gen.token_ids[0] == ref.sequences[0, keep_ids.shape[1]:].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_in_llm_over_frames_matches_the_pruning_reference(method, ov_video_artifacts, ov_loaded, hf_onevision, clip8):
    """fastv / dart on a video: transformers' video features spliced at its placeholders, then the
    loop-based pruning reference over the frame tokens (newline never pruned) keeping the per-video
    budget at the artifact's layer."""
    from tests.export.test_in_llm import STEPS, pruned_reference
    from tokedge.artifact import load_artifact

    art = ov_video_artifacts(method)
    manifest = load_artifact(art)
    stages = [dict(s, rule=getattr(s["rule"], "value", s["rule"]), keep=VIDEO_BUDGET)
              for s in manifest.reduction.stages]
    assert len(stages) == 1
    ids, pixels, _ = hf_video_inputs(ov_loaded, clip8, METHOD_FRAMES)
    feats = torch.from_numpy(hf_video_features(hf_onevision, pixels))
    token = hf_onevision.config.video_token_id
    with torch.no_grad():
        embeds = hf_onevision.get_input_embeddings()(ids)
        embeds[ids == token] = feats
        frame_pos = torch.nonzero(ids[0] == token).squeeze(1)[:-1][None]  # the newline stays
        prefill, _, tokens = pruned_reference(hf_onevision, embeds, torch.ones_like(ids), frame_pos, stages,
                                              int(manifest.reduction.options.get("pivots") or 8), STEPS)
    gen, plan, got_ids = _tokedge_video(art, clip8, METHOD_FRAMES, VIDEO_BUDGET, STEPS + 1)
    np.testing.assert_array_equal(got_ids[0], ids[0].numpy())
    assert plan.llm_keep == (VIDEO_BUDGET,) and gen.visual_tokens == VIDEO_BUDGET + 1
    np.testing.assert_allclose(gen.prefill_logits[0], prefill[0], atol=1e-3, rtol=0)
    assert gen.token_ids[0] == tokens[0].tolist()


def test_video_budget_rules(ov_video_artifacts):
    """Per-video budgets: static counts for a fixed frame count, ratios, refusals in one line."""
    from tokedge.artifact import load_artifact
    from tokedge.errors import InputError
    from tokedge.runtime.video_pipeline import video_plan

    none = load_artifact(ov_video_artifacts("none"))
    assert video_plan(none, 8).placeholders == 1569 and video_plan(none, 32).placeholders == 6273
    with pytest.raises(InputError, match="keeps every visual token"):
        video_plan(none, 8, budget=100)
    div = load_artifact(ov_video_artifacts("divprune"))
    assert div.video.keep_ratio == 0.25 and none.video.keep_ratio == 1.0
    assert video_plan(div, 8).keep == 392 and video_plan(div, 8).placeholders == 393
    assert video_plan(div, 8, keep=0.1).keep == 156 and video_plan(div, 8, budget=50).placeholders == 51
    for kwargs, needle in (({"budget": 0}, "out of range"), ({"budget": 1569}, "out of range"),
                           ({"keep": 1.5}, r"\(0, 1\]"), ({"budget": 5, "keep": 0.5}, "give one of them")):
        with pytest.raises(InputError, match=needle) as err:
            video_plan(div, 8, **kwargs)
        assert "\n" not in str(err.value)


# --- tokedge profile --video ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("method", ["divprune", "fastv"])
def test_profile_video_32_frames_at_several_budgets(method, ov_video_artifacts, tmp_path, capsys):
    """ACCEPTANCE: a 32-frame clip profiled at several budgets writes a report whose structure holds
    per-stage medians, tokens per frame after reduction and fidelity vs the unreduced run, with
    token counts falling with the budget (timings are measured, never asserted)."""
    clip = tmp_path / "clip32.mp4"
    write_clip(clip, 32, frames=_frames(32, size=96, seed=9))
    out = tmp_path / f"report-{method}"
    rc, stdout, err = _cli(capsys, "profile", ov_video_artifacts(method), "--video", clip, "--frames", 32,
                           "--budgets", "3136,1568,627", "--runs", 1, "--warmup", 0, "--max-new-tokens", 2,
                           "--out", out, "--json")
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report == json.loads(stdout)
    assert report["kind"] == "video" and report["method"] == method and report["frames"] == 32
    assert report["full_tokens"] == 32 * 196 == 6272 and report["frame_indices"] == list(range(32))
    results = report["results"]
    assert [r["budget"] for r in results] == [6272, 3136, 1568, 627]  # the unreduced run first
    placeholders = [r["placeholders"] for r in results]
    llm_tokens = [r["visual_tokens"] for r in results]
    assert llm_tokens == [6273, 3137, 1569, 628]  # the budget + the newline reach the LLM's last layer
    assert all(a > b for a, b in itertools.pairwise(llm_tokens))
    if method == "divprune":  # pre-LLM: the prompt itself shrinks, and every frame's share is known
        assert placeholders == llm_tokens
        assert [sum(r["kept_per_frame"]) for r in results] == [6272, 3136, 1568, 627]
        assert all(len(r["kept_per_frame"]) == 32 for r in results)
        assert all(a > b for a, b in itertools.pairwise([r["prompt_tokens"] for r in results]))
    else:  # in-LLM: the prompt keeps every placeholder, the prefill prunes after its layer
        assert placeholders == [6273] * 4 and all(r["kept_per_frame"] is None for r in results)
    for r in results:
        assert set(r["medians_ms"]) == {"vision_ms", "reduce_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token"}
        assert all(v >= 0 for v in r["medians_ms"].values())
        assert set(r["fidelity"]) == {"first_token_agreement", "token_overlap", "prefill_top1_agreement",
                                      "max_abs_prefill_logits"}
        assert r["tokens_per_frame"] == pytest.approx(r["budget"] / 32, abs=0.01)
    assert results[0]["fidelity"]["max_abs_prefill_logits"] == 0.0 and results[0]["fidelity"]["token_overlap"] == 1
    for png in ("latency.png", "tokens.png"):  # the plots the README lists (issue 28, item 6)
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "report.md").read_text()
    assert "| budget | share | tokens/frame" in text and ("Tokens per frame after reduction" in text) == (
        method == "divprune")
    # random weights said once on the terminal and as report.md's banner (issue 28, item 9)
    from tokedge.artifact import read_manifest

    weights = read_manifest(ov_video_artifacts(method)).weights
    assert weights and weights.startswith("random") and report["weights"] == weights
    assert " ".join(err.split()).count("weights are random") == 1, err
    assert text.splitlines()[2].startswith("> **Random weights.**")


VIDEO_CHECK = r"""
import json, sys
from tokedge.cli import main
rc = main(["run", sys.argv[1], "--video", sys.argv[2], "--frames", "2", "--prompt", "What is this?",
           "--max-new-tokens", "2", "--json"])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "onnx", "onnxscript", "onnx_ir"))
print(json.dumps({"rc": rc, "heavy": heavy}))
"""


@pytest.mark.slow
def test_run_video_imports_no_torch_or_transformers(ov_video_artifacts, clip8):
    """The device path for video (PyAV decode, video graph, divprune's per-video stage) is torch-free."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", VIDEO_CHECK, str(ov_video_artifacts("divprune")), str(clip8)],
                          capture_output=True, text=True, timeout=300, cwd="/", check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert json.loads(lines[0])["visual_tokens"] == int(0.25 * 2 * 196) + 1
    assert json.loads(lines[-1]) == {"rc": 0, "heavy": []}
