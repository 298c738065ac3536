"""Qwen2.5-VL video, `--method none`, end to end (issue 13): the session Qwen2.5-VL artifact (its
manifest carries a "dynamic_patches" video record), run torch-free, equals transformers'
`Qwen2_5_VLForConditionalGeneration.generate(pixel_values_videos=..., video_grid_thw=...,
second_per_grid_ts=...)` token for token, prefill logits within 1e-3, on a tiny clip written with PyAV.

The reference cannot use transformers' video processor (it needs torchvision, absent here), so it
replicates Qwen2VLVideoProcessor's documented steps itself in torch (docs/research/video.md 2.1):
frames decoded with PyAV, indices `arange(0, total, total / n).int()`, rescale and normalise,
patchify with the processor's view/permute, `second_per_grid_ts = 2 / (n / total * fps)`. The clip
is 112x168 (multiples of 28 inside the pixel range), so the processor's resize is the identity and
torchvision's bicubic (which tokedge, on PIL, does not reproduce bit for bit) plays no part.
Prompt: transformers' tokenizer and chat template with a video item, `<|video_pad|>` expanded, and
`mm_token_type_ids` = 2 on video tokens (without it transformers falls back to 1-D positions)."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")

STEPS = 6
QUESTION = "What happens in the video?"
TOTAL, RATE, HEIGHT, WIDTH = 8, Fraction(1, 16), 112, 168  # 16 s per frame: far-apart t positions


def _frame(i: int) -> np.ndarray:
    rng = np.random.default_rng(100 + i)
    base = rng.integers(0, 256, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8)
    return np.kron(base, np.ones((8, 8, 1), np.uint8))  # 8x8 blocks survive the codec well


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("qwen-video") / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        for i in range(TOTAL):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_frame(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def pipe(qwen2_5_vl_artifact):
    from tokedge.runtime.pipeline import Pipeline

    with Pipeline.load(qwen2_5_vl_artifact) as p:
        yield p


def _video_batch(path: Path, n: int, processor):
    """Qwen2VLVideoProcessor's steps, written from its source, in torch."""
    import torch

    with av.open(str(path)) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        fps = float(container.streams.video[0].average_rate)
    total = len(decoded)
    indices = torch.arange(0, total, total / n).int().tolist()
    video = torch.from_numpy(np.stack([decoded[i] for i in indices])).permute(0, 3, 1, 2).float()  # [F, C, H, W]
    mean = torch.tensor(processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_std).view(1, 3, 1, 1)
    video = (video / 255.0 - mean) / std
    tp, p, m = 2, 14, 2
    if video.shape[0] % tp:
        video = torch.cat([video, video[-1:].expand(tp - video.shape[0] % tp, -1, -1, -1)])
    t, gh, gw = video.shape[0] // tp, HEIGHT // p, WIDTH // p
    patches = video[None].view(1, t, tp, 3, gh // m, m, p, gw // m, m, p).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    pixel_values = patches.reshape(t * gh * gw, 3 * tp * p * p)
    seconds = torch.tensor([tp / (len(indices) / total * fps)])
    return pixel_values, torch.tensor([[t, gh, gw]]), seconds, indices


def _reference(hf, path: Path, n: int):
    """transformers alone: prompt ids, greedy tokens (EOS dropped), logits (prefill, then each step), positions."""
    import torch

    model, tok, processor = hf
    pixels, grid, seconds, indices = _video_batch(path, n, processor)
    count = int(grid.prod()) // 4
    content = [{"type": "video"}, {"type": "text", "text": QUESTION}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    assert text.count("<|video_pad|>") == 1
    ids = torch.tensor([tok(text.replace("<|video_pad|>", "<|video_pad|>" * count))["input_ids"]])
    mm = (ids == model.config.video_token_id).long() * 2
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                             pixel_values_videos=pixels, video_grid_thw=grid, second_per_grid_ts=seconds,
                             max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True)
        positions, _ = model.model.get_rope_index(ids, mm_token_type_ids=mm, video_grid_thw=grid,
                                                  second_per_grid_ts=seconds)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    if tokens and tokens[-1] in set(model.generation_config.eos_token_id):
        tokens = tokens[:-1]
    return ids.numpy(), count, tokens, torch.cat(out.logits).numpy(), positions.numpy(), indices, float(seconds[0])


def test_manifest_carries_qwen_video_record(pipe, hf_qwen2_5_vl):
    video = pipe.manifest.video
    assert video is not None and video.kind == "dynamic_patches" and video.graph == "vision"
    assert video.video_token == "<|video_pad|>"
    assert video.video_token_id == hf_qwen2_5_vl[0].config.video_token_id
    assert video.tokens_per_second == hf_qwen2_5_vl[0].config.vision_config.tokens_per_second == 2


# 4 frames: the acceptance case (2 temporal groups, second_per_grid 64 s, t offsets 0, 128); 8 frames:
# 4 groups, t offsets 0, 64, 128, 192. The text after the video resumes at +6 (max(h', w')), so the
# largest t position passes the whole prompt's text: transformers' `generate` (5.23) still decodes at
# the prompt's last column + 1 on each axis (`_update_model_kwargs_for_generation`), not at
# max + 1 (the `rope_deltas` a forward without position_ids uses); tokedge follows generate.
@pytest.mark.parametrize("frames", [4, 8])
def test_run_video_equals_transformers_generate(pipe, hf_qwen2_5_vl, clip, frames):
    from tokedge.runtime.generate import SamplingConfig
    from tokedge.runtime.qwen_vl import video_prompt_positions
    from tokedge.runtime.video_pipeline import generate_video, video_inputs, video_plan

    ids, count, ref_tokens, ref_logits, ref_positions, ref_indices, seconds = _reference(hf_qwen2_5_vl, clip, frames)
    m = pipe.manifest
    inputs = video_inputs(m, clip, frames)
    assert inputs.indices.tolist() == ref_indices and inputs.second_per_grid == pytest.approx(seconds)
    plan = video_plan(m, inputs.frames, inputs=inputs)
    assert plan.placeholders == inputs.full_tokens == count
    enc = pipe.encoder.encode_video(QUESTION, m.video.video_token, m.video.video_token_id, plan.placeholders)
    np.testing.assert_array_equal(enc.input_ids, ids)
    positions = video_prompt_positions(m.layout, m.video.video_token_id, m.video.tokens_per_second,
                                       enc.input_ids, enc.attention_mask, inputs)
    np.testing.assert_array_equal(positions, ref_positions)
    assert positions.max() > positions[..., -1].max()  # the case the decode rule exists for

    result = pipe.generate_video(clip, QUESTION, frames=frames, max_new_tokens=STEPS)
    assert result.token_ids == ref_tokens and len(ref_tokens) > 0
    assert result.visual_tokens == count and result.frames == frames

    gen = generate_video(pipe.graphs, inputs, plan, enc.input_ids, enc.attention_mask,
                         SamplingConfig(max_new_tokens=STEPS), keep_logits=True, stop_at_eos=False)
    assert np.abs(gen.prefill_logits[0] - ref_logits[0]).max() < 1e-3
    steps = min(len(gen.step_logits), len(ref_logits) - 1)  # decode positions as generate's
    assert steps >= 1
    for i in range(steps):
        assert np.abs(gen.step_logits[i][0] - ref_logits[i + 1]).max() < 1e-3, f"step {i + 1}"


def test_cli_run_video(pipe, hf_qwen2_5_vl, qwen2_5_vl_artifact, clip, capsys):
    from tokedge.cli import main

    _, _, ref_tokens, *_ = _reference(hf_qwen2_5_vl, clip, 4)
    code = main(["run", str(qwen2_5_vl_artifact), "--video", str(clip), "--frames", "4", "--prompt", QUESTION,
                 "--max-new-tokens", str(STEPS), "--json"])
    assert code in (0, None)
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == ref_tokens
    assert out["video"]["frames"] == 4


def test_rope_index_video_matches_transformers(hf_qwen2_5_vl):
    """The numpy port against `get_rope_index` on video grids (docs/research/video.md 2.2's pinned
    example: grid (4, 4, 6), 3 text tokens before and 2 after), plus an image in the same prompt."""
    import torch

    from tokedge.runtime.qwen_vl import rope_index

    model = hf_qwen2_5_vl[0]
    types = np.array([[0, 0, 0] + [2] * 24 + [0, 0, 1, 1, 1, 1, 0]])
    video_grid, image_grid = np.array([[4, 4, 6]]), np.array([[1, 4, 4]])
    for seconds in (1.0, 2 / 24, 0.5):
        ours, delta = rope_index(types, image_grid, 2, video_grids=video_grid,
                                 second_per_grid=np.array([seconds], np.float32), tokens_per_second=2)
        ref, ref_delta = model.model.get_rope_index(
            torch.zeros(types.shape, dtype=torch.long), mm_token_type_ids=torch.from_numpy(types),
            image_grid_thw=torch.from_numpy(image_grid), video_grid_thw=torch.from_numpy(video_grid),
            second_per_grid_ts=torch.tensor([seconds]))
        np.testing.assert_array_equal(ours, ref.numpy())
        np.testing.assert_array_equal(delta, ref_delta.numpy())
    ours, _ = rope_index(types[:, :29], np.zeros((0, 3)), 2, video_grids=video_grid,
                         second_per_grid=np.array([1.0], np.float32), tokens_per_second=2)
    assert sorted(set(ours[0, 0, 3:27].tolist())) == [3, 5, 7, 9]  # hand-checked (video.md 2.2)
    assert ours[0, 0, 27:29].tolist() == [6, 7]  # text resumes at start + max(h', w'), not after t


def test_reducing_methods_refused_on_qwen_video(pipe, clip):
    from dataclasses import replace

    from tokedge.errors import InputError
    from tokedge.runtime.video_pipeline import video_inputs, video_plan

    inputs = video_inputs(pipe.manifest, clip, 3)  # 3 -> 4 frames (rounded to the temporal patch, half to even)
    assert inputs.frames == 4
    with pytest.raises(InputError, match="keeps every visual token"):
        video_plan(pipe.manifest, inputs.frames, keep=0.5, inputs=inputs)
    red = replace(pipe.manifest.reduction, method="dart", stage="in-llm")
    with pytest.raises(InputError, match="runs unreduced only"):
        video_plan(replace(pipe.manifest, reduction=red), inputs.frames, inputs=inputs)


def test_temporal_method_export_refused_for_qwen(tiny_qwen2_5_vl_dir, tmp_path):
    from tokedge.errors import UsageError
    from tokedge.export.pipeline import ExportConfig, export

    with pytest.raises(UsageError, match="temporal methods are not available for qwen2_5_vl video"):
        export(ExportConfig(model=str(tiny_qwen2_5_vl_dir), out=tmp_path / "evs", method="evs"))
    assert not (tmp_path / "evs").exists()


def test_serve_video_equals_transformers_generate(hf_qwen2_5_vl, qwen2_5_vl_artifact, clip):
    """Issue 28 item 17 on the dynamic-patch layout: a `video_url` part over a real `tokedge serve`
    (the openai client) answers what transformers' `generate` answers on the same 4 frames, and
    usage counts the clip's video tokens."""
    import base64

    import openai

    from tests.serve.conftest import running_server
    from tokedge.serve.config import ServeConfig

    ids, count, ref_tokens, *_ = _reference(hf_qwen2_5_vl, clip, 4)
    model, tokenizer = hf_qwen2_5_vl[0], hf_qwen2_5_vl[1]
    eos = set(np.atleast_1d(model.generation_config.eos_token_id).tolist())
    ref_text = tokenizer.decode([t for t in ref_tokens if t not in eos], skip_special_tokens=True)
    url = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    with running_server(ServeConfig(artifact=qwen2_5_vl_artifact, video_frames=4, warmup=False)) as (base, service):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        done = client.chat.completions.create(model=service.cfg.served_name, max_tokens=STEPS, messages=[
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": QUESTION}]}])
    assert done.choices[0].message.content == ref_text and ref_text
    assert done.usage.prompt_tokens == ids.shape[1] and done.usage.model_dump()["visual_tokens"] == count
