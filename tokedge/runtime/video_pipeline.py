"""A prompt with a video, end to end on an artifact's graphs (numpy; no torch).

    video_inputs   clip file / frame directory / frame images -> sampled, preprocessed frames
    video_plan     how many of the video's tokens reach the LLM (the per-video budget)
    generate_video video graph -> per-video reduction stage -> newline -> splice at the video
                   placeholders -> prefill (in-LLM methods prune the frame tokens) -> THE decode loop

`tokedge run --video`, `Pipeline.generate_video` and `tokedge profile --video` all build their
inputs with `video_inputs` and `video_plan` and run `generate_video`. docs/artifact.md ("video")
describes the same steps for any other client.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokedge.artifact import Manifest, PreprocessInfo, VideoInfo
from tokedge.errors import InputError, UsageError
from tokedge.layouts.video_frames import TEMPORAL_GRAPH  # noqa: F401 (the name callers import from here)
from tokedge.runtime.deadline import Deadline
from tokedge.runtime.generate import Generation, SamplingConfig, Timings, context_limit, decode_loop
from tokedge.runtime.graphs import ArtifactGraphs


def video_record(manifest: Manifest) -> VideoInfo:
    """The manifest's video record, or a one-line error for artifacts without one."""
    if manifest.video is None:
        raise InputError(f"this artifact takes images only (no video graph: model family '{manifest.model.family}', "
                         f"or exported by a tokedge without video support); pass --image, or re-export a "
                         f"LLaVA-OneVision or Qwen2.5-VL checkpoint with this tokedge to use --video")
    return manifest.video


def frame_preprocess(video: VideoInfo) -> PreprocessInfo:
    """The video processor's steps as the image path's `PreprocessInfo`: resize every frame to S x S
    (no aspect kept, no crop), rescale, normalise."""
    s = video.frame_size
    return PreprocessInfo(do_convert_rgb=True, do_resize=True, resize_shortest_edge=None, resize_size=(s, s),
                          resample=video.resample, do_center_crop=False, crop_size=(s, s), do_rescale=True,
                          rescale_factor=video.rescale_factor, do_normalize=True, image_mean=video.mean,
                          image_std=video.std)


@dataclass(frozen=True)
class VideoInputs:
    """One video's sampled, preprocessed frames."""

    pixel_values: np.ndarray  # [F, 3, S, S] float32
    indices: np.ndarray  # [F] 0-based source index of each frame
    total: int  # frames in the source
    fps: float | None  # source frame rate (None: frame images)

    @property
    def frames(self) -> int:
        return int(self.pixel_values.shape[0])


def video_inputs(manifest: Manifest, source: Path | str | Sequence[Path | str], frames: int | None = None,
                 fps: float | None = None) -> VideoInputs:
    """A clip file or a frame directory (`source` a path), or frame image files in time order (a
    list) -> the frames sampled as transformers' video loader samples them (`frames` or `fps`;
    neither: the artifact's default count, fewer for shorter clips) and preprocessed."""
    video = video_record(manifest)
    if frames is not None and frames < 1:  # before any rounding (Qwen rounds to a multiple of T)
        raise UsageError(f"--frames must be at least 1, got {frames}")
    if fps is not None and not (fps > 0 and math.isfinite(fps)):
        raise UsageError(f"--fps must be a positive finite number, got {fps}")
    if frames is not None and frames > video.max_frames:
        raise InputError(f"--frames {frames} is more than this artifact takes per video ({video.max_frames}); "
                         f"use --frames <= {video.max_frames}")
    from tokedge.layouts import video_layout_of

    return video_layout_of(manifest).read(source, frames, fps)


def check_sampled(video: VideoInfo, sampled: int) -> None:
    """Refuse a clip sampled (--fps) to more frames than the artifact takes per video."""
    if sampled > video.max_frames:
        raise InputError(f"{sampled} frames sampled (--fps) but this artifact takes at most "
                         f"{video.max_frames} per video; lower --fps or use --frames <= {video.max_frames}")


@dataclass(frozen=True)
class VideoPlan:
    """How a video of `frames` frames reaches the LLM under the artifact's method."""

    frames: int
    tokens_per_frame: int  # pooled tokens per frame before reduction
    keep: int  # frame tokens that reach the LLM's last layer (the per-video budget; newline not counted)
    placeholders: int  # `<video>` tokens in the prompt (the stage's output + newline)
    stage: str | None  # per-video reduction stage (a method name) run before the LLM, or None
    llm_keep: tuple[int, ...] = ()  # in-LLM methods: frame tokens each prefill stage keeps

    @property
    def full(self) -> int:
        return self.frames * self.tokens_per_frame


def video_plan(manifest: Manifest, frames: int, budget: int | None = None, keep: float | None = None,
               inputs=None) -> VideoPlan:
    """The per-video budget: `budget` frame tokens, or a `keep` ratio of the F*n pooled tokens
    (K = int(keep * F * n), at least 1); neither -> every token for `none`, else the artifact's
    default ratio `video.keep_ratio`. Pre-LLM methods need a registered per-video stage
    (`tokedge.reduce.video`); in-LLM methods scale each prefill stage's keep to the video.
    Dynamic-patch videos (Qwen) need their `inputs` (the grid follows the clip) and run unreduced:
    the plan's frames are the temporal groups, tokens_per_frame the tokens of one group."""
    from tokedge.layouts import video_layout_of

    video_record(manifest)
    return video_layout_of(manifest).plan(frames, budget, keep, inputs)


@dataclass
class VideoGeneration(Generation):
    frames: int = 0
    kept_per_frame: list[int] | None = None  # frame tokens reaching the LLM, per frame (None: in-LLM pruning)
    reduce_ms: float = 0.0  # the per-video reduction stage
    video_tokens: np.ndarray | None = None  # [placeholders, hidden] spliced into the prompt


def generate_video(graphs: ArtifactGraphs, inputs: VideoInputs, plan: VideoPlan, input_ids: np.ndarray,
                   attention_mask: np.ndarray, cfg: SamplingConfig, *, on_step: Callable | None = None,
                   timings: Timings | None = None, started: float | None = None, stop_at_eos: bool = True,
                   keep_logits: bool = False, deadline: Deadline | None = None) -> VideoGeneration:
    """Video graph -> per-video stage -> newline -> splice -> prefill -> `decode_loop` (batch 1)."""
    cfg.check()
    with graphs.limited(deadline):
        return _generate_video(graphs, inputs, plan, input_ids, attention_mask, cfg, on_step=on_step,
                               timings=timings, started=started, stop_at_eos=stop_at_eos, keep_logits=keep_logits,
                               deadline=deadline)


def video_tokens(graphs: ArtifactGraphs, inputs: VideoInputs, plan: VideoPlan) -> tuple[np.ndarray, np.ndarray, float]:
    """The video's tokens as they replace its placeholders: [placeholders, hidden], the flat indices
    of the kept frame tokens (all of them without a stage), and the stage's milliseconds."""
    from tokedge.layouts import video_layout_of

    return video_layout_of(graphs.manifest).tokens(graphs, inputs, plan)


def _generate_video(graphs, inputs, plan, input_ids, attention_mask, cfg, *, on_step, timings, started, stop_at_eos,
                    keep_logits, deadline) -> VideoGeneration:
    m, video = graphs.manifest.model, graphs.manifest.video
    timings = timings or Timings()
    started = time.perf_counter() if started is None else started
    if input_ids.shape[0] != 1:
        raise InputError("a video prompt runs alone (batch 1)")
    limit = context_limit(graphs)
    if input_ids.shape[1] + cfg.max_new_tokens > limit:
        raise InputError(
            f"prompt ({input_ids.shape[1]} tokens incl. {plan.placeholders} video tokens of {plan.frames} frames) + "
            f"--max-new-tokens ({cfg.max_new_tokens}) exceeds the model's limit of {limit} tokens; use fewer --frames, "
            "a smaller --budget or lower --max-new-tokens"
        )
    from tokedge.runtime.driver import prefill, prepare_video, stepper

    t0 = time.perf_counter()
    prompt, kept, reduce_ms = prepare_video(graphs, inputs, plan, input_ids, attention_mask)
    timings.vision_ms = prompt.vision_ms
    logits, state = prefill(graphs, prompt, room=cfg.max_new_tokens)
    now = time.perf_counter()
    timings.prefill_ms = (now - t0) * 1e3 - prompt.vision_ms
    timings.ttft_ms = (now - started) * 1e3

    decode_start = time.perf_counter()
    step = stepper(graphs, state, deadline)
    tokens = prompt.image_embeds[0]
    decoded = decode_loop(logits, step, cfg, eos=frozenset(m.eos_token_ids),
                          pad=m.pad_token_id if m.pad_token_id is not None else 0,
                          stop_at_eos=stop_at_eos, keep_logits=keep_logits, on_step=on_step)
    if decoded.steps:
        timings.decode_ms_per_token = (time.perf_counter() - decode_start) * 1e3 / decoded.steps
    timings.decode_tokens = decoded.steps
    timings.total_ms = (time.perf_counter() - started) * 1e3
    per_frame = None
    if not graphs.has_prefill:
        per_frame = np.bincount(kept // plan.tokens_per_frame, minlength=plan.frames).tolist()
    return VideoGeneration(token_ids=decoded.tokens, visual_tokens=state.visual_tokens(len(tokens)), timings=timings,
                           image_embeds=None, prefill_logits=logits, step_logits=decoded.step_logits,
                           frames=plan.frames, kept_per_frame=per_frame, reduce_ms=reduce_ms, video_tokens=tokens)


@dataclass
class VideoResult:
    text: str
    token_ids: list[int]
    frames: int
    frame_indices: list[int]
    visual_tokens: int  # video tokens the LLM's last layer attends to (newline included)
    budget: int  # frame tokens kept (newline not counted)
    kept_per_frame: list[int] | None
    timings: Timings
    reduce_ms: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "visual_tokens": self.visual_tokens,
                "video": {"frames": self.frames, "frame_indices": self.frame_indices, "budget": self.budget,
                          "kept_per_frame": self.kept_per_frame, "reduce_ms": round(self.reduce_ms, 3)},
                "timings": self.timings.to_dict()}
