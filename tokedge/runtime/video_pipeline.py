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
from tokedge.runtime.deadline import Deadline
from tokedge.runtime.generate import Generation, SamplingConfig, Timings, context_limit, decode_loop
from tokedge.runtime.graphs import ArtifactGraphs, splice_image_embeds
from tokedge.runtime.video import Clip, preprocess_frames, read_frame_files, read_video

TEMPORAL_GRAPH = "video_reduce"  # a temporal method's graph (evs, dycoke): video_embeds -> video_tokens, video_kept


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
    if video.kind == "qwen_dynamic":
        return _qwen_video_inputs(manifest, source, frames, fps)
    size = (video.frame_size, video.frame_size)
    if isinstance(source, (list, tuple)):
        clip: Clip = read_frame_files(source, frames, fps, video.sampling, video.default_frames, size=size,
                                      resample=video.resample)
    else:
        clip = read_video(source, frames, fps, video.sampling, size=size, resample=video.resample,
                          default=video.default_frames)
    if len(clip.frames) > video.max_frames:
        raise InputError(f"{len(clip.frames)} frames sampled (--fps) but this artifact takes at most "
                         f"{video.max_frames} per video; lower --fps or use --frames <= {video.max_frames}")
    pixels = preprocess_frames(clip.frames, frame_preprocess(video))
    return VideoInputs(pixels, clip.indices, clip.total, clip.fps)


def _qwen_video_inputs(manifest: Manifest, source, frames: int | None, fps: float | None):
    """Qwen2.5-VL: `frames` rounded to a multiple of the temporal patch size T (half to even, as
    Qwen2VLVideoProcessor's sample_frames), frames decoded at full size, then
    `runtime.qwen_vl.video_inputs` (one smart_resize for the clip, T frames per temporal group)."""
    from tokedge.runtime.qwen_vl import image_spec, smart_resize
    from tokedge.runtime.qwen_vl import video_inputs as qwen_video_inputs

    video, layout = video_record(manifest), manifest.layout
    tp = int(layout.temporal_patch_size)
    if frames is not None:
        frames = max(tp, round(frames / tp) * tp)
    spec = image_spec(layout, manifest.preprocess)
    m = manifest.model
    context = m.max_position_embeddings if not m.sliding_window else min(m.max_position_embeddings, m.sliding_window)

    def frame_size(height: int, width: int, count: int) -> tuple[int, int]:
        """The clip's one resize (from its first frame, or the stream header before decoding), refusing
        a clip whose visual tokens cannot fit the context: every frame is then resized as it is decoded."""
        h, w = smart_resize(height, width, spec.factor, spec.min_pixels, spec.max_pixels)
        tokens = -(-count // tp) * (h // spec.factor) * (w // spec.factor)
        if tokens >= context:
            raise InputError(f"a video of {count} frames at {width}x{height} gives {tokens} visual tokens, more than "
                             f"the model's context of {context}; use fewer --frames or a shorter clip")
        return h, w

    if isinstance(source, (list, tuple)):
        clip: Clip = read_frame_files(source, frames, fps, video.sampling, video.default_frames, size=frame_size,
                                      resample=spec.resample)
    else:
        clip = read_video(source, frames, fps, video.sampling, size=frame_size, resample=spec.resample,
                          default=video.default_frames)
    if len(clip.frames) > video.max_frames:
        raise InputError(f"{len(clip.frames)} frames sampled (--fps) but this artifact takes at most "
                         f"{video.max_frames} per video; lower --fps or use --frames <= {video.max_frames}")
    return qwen_video_inputs(clip.frames, clip.indices, clip.total, clip.fps, layout, manifest.preprocess)


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
    Qwen ("qwen_dynamic") videos need their `inputs` (the grid follows the clip) and run unreduced:
    the plan's frames are the temporal groups, tokens_per_frame the tokens of one group."""
    from tokedge.reduce.base import Stage
    from tokedge.reduce.video import stage_for

    video = video_record(manifest)
    red = manifest.reduction
    if video.kind == "qwen_dynamic":
        if inputs is None or not hasattr(inputs, "grid"):
            raise InputError("a Qwen-VL video's token count follows its frame size: plan it from its inputs "
                             "(runtime.video_pipeline.video_inputs)")
        if Stage(red.stage) is not Stage.NONE:
            raise InputError(f"video on {manifest.model.family} artifacts runs unreduced only: --method "
                             f"{red.method} is not available for Qwen video yet; re-export with --method none")
        full = inputs.full_tokens
        if (budget is not None and budget != full) or (keep is not None and keep != 1):
            raise InputError(f"this artifact keeps every visual token (--method none): this video gives {full}; "
                             "drop --budget/--keep")
        return VideoPlan(int(inputs.grid[0]), inputs.tokens_per_group, full, full, None)
    n = video.tokens_per_frame
    full = frames * n
    if budget is not None and keep is not None:
        raise InputError("--budget and --keep both set the video's budget; give one of them")
    if keep is not None and not 0 < keep <= 1:
        raise InputError(f"--keep must be in (0, 1] (a share of the video's {full} tokens), got {keep}")
    stage = Stage(red.stage)
    if stage is Stage.TEMPORAL:  # the method's graph is fixed to one frame count and keeps red.budget tokens
        if frames != video.default_frames:
            raise InputError(f"this artifact's {red.method} graph takes exactly {video.default_frames} frames (fixed at "
                             f"export), not {frames}: use --frames {video.default_frames}, or re-export with --frames")
        if budget == full or keep == 1:  # the unreduced run (profile's fidelity reference): the graph is skipped
            return VideoPlan(frames, n, full, video.tokens(frames), None)
        if (budget is not None and budget != red.budget) or (keep is not None and int(keep * full) != red.budget):
            raise InputError(f"this artifact's {red.method} graph keeps {red.budget} of the video's {full} tokens (fixed "
                             f"at export): drop --budget/--keep (or keep all {full}), or re-export with --budget")
        return VideoPlan(frames, n, red.budget, video.tokens(frames, red.budget), red.method)
    if stage is Stage.NONE:
        if (budget is not None and budget != full) or (keep is not None and keep != 1):
            raise InputError(f"this artifact keeps every visual token (--method none): a {frames}-frame video gives "
                             f"{full}; drop --budget/--keep or export with a reduction method")
        return VideoPlan(frames, n, full, video.tokens(frames), None)
    if budget is None:
        budget = max(1, int((keep if keep is not None else video.keep_ratio) * full))
    if not 1 <= budget <= full:
        raise InputError(f"--budget {budget} is out of range for a {frames}-frame video: use 1..{full} visual tokens")
    if stage is Stage.IN_LLM:
        last = red.stages[-1]["keep"] if red.stages else red.budget
        llm_keep = tuple(min(full, int(s["keep"]) * budget // int(last)) for s in red.stages)
        return VideoPlan(frames, n, budget, video.tokens(frames), None, llm_keep)
    if stage_for(red.method) is None:
        from tokedge.reduce.video import STAGES

        raise InputError(f"--method {red.method} has no per-video stage; video runs with --method none, "
                         f"{', '.join(STAGES)} or an in-LLM method (fastv, pdrop, dart)")
    return VideoPlan(frames, n, budget, video.tokens(frames, budget), red.method)


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
    from tokedge.reduce.video import stage_for

    video = graphs.manifest.video
    if video.kind == "qwen_dynamic":  # the image vision graph once per temporal group, tokens group-major
        names = {t.name for t in graphs.manifest.graphs[video.graph].inputs}
        dtype = np.dtype(graphs.manifest.graphs[video.graph].input("pixel_values").dtype)
        outs = []
        for group in inputs.groups:
            feed = group.feed(names)
            feed["pixel_values"] = feed["pixel_values"].astype(dtype, copy=False)
            outs.append(graphs.runners[video.graph].infer(feed)["image_embeds"])
        flat = np.concatenate(outs)
        return flat, np.arange(flat.shape[0], dtype=np.int64), 0.0
    dtype = np.dtype(graphs.manifest.graphs[video.graph].input("pixel_values_videos").dtype)  # fp16 artifacts
    out = graphs.runners[video.graph].infer({"pixel_values_videos": inputs.pixel_values.astype(dtype, copy=False)})
    embeds, newline = out["video_embeds"], out["newline"]
    flat = embeds.reshape(-1, embeds.shape[-1])
    t0 = time.perf_counter()
    kept = np.arange(flat.shape[0], dtype=np.int64)
    if plan.stage is not None and TEMPORAL_GRAPH in graphs.runners:  # a temporal method's graph
        feed = {"video_embeds": embeds}
        if graphs.manifest.graphs[TEMPORAL_GRAPH].input("received_attention") is not None:
            feed["received_attention"] = out["received_attention"]
        reduced = graphs.runners[TEMPORAL_GRAPH].infer(feed)
        flat, kept = reduced["video_tokens"], reduced["video_kept"]
    elif plan.stage is not None:
        options = dict(graphs.manifest.reduction.options)
        kept = stage_for(plan.stage).select(embeds, plan.keep, options)
        flat = flat[kept]
    reduce_ms = (time.perf_counter() - t0) * 1e3
    if video.newline == "one_per_video":
        flat = np.concatenate([flat, newline.reshape(1, -1).astype(flat.dtype)])
    return flat, kept, reduce_ms


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
    t0 = time.perf_counter()
    tokens, kept, reduce_ms = video_tokens(graphs, inputs, plan)
    timings.vision_ms = (time.perf_counter() - t0) * 1e3

    t0 = time.perf_counter()
    embeds = splice_image_embeds(graphs.embed(input_ids), input_ids, video.video_token_id, tokens[None])
    prune = None
    if graphs.has_prefill:  # in-LLM methods prune the frame tokens (never the newline)
        where = np.flatnonzero(input_ids[0] == video.video_token_id)[: plan.full].astype(np.int64)
        prune = (where[None], np.asarray(plan.llm_keep, dtype=np.int64))
    positions = None
    if video.kind == "qwen_dynamic":  # M-RoPE with time-aware temporal positions
        from tokedge.runtime.qwen_vl import video_prompt_positions

        positions = video_prompt_positions(graphs.manifest.layout, video.video_token_id, video.tokens_per_second,
                                           input_ids, attention_mask, inputs)
    logits, state = graphs.prefill(embeds, attention_mask, input_ids, room=cfg.max_new_tokens, prune=prune,
                                   position_ids=positions)
    now = time.perf_counter()
    timings.prefill_ms = (now - t0) * 1e3
    timings.ttft_ms = (now - started) * 1e3

    decode_start = time.perf_counter()

    def step(ids: np.ndarray) -> np.ndarray:
        if deadline is not None:
            deadline.check()
        return graphs.step(graphs.embed(ids[:, None]), state)

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
