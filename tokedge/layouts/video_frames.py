"""Video as pooled frames (LLaVA-OneVision): sampled frames are each resized to S x S and run
through the artifact's own video graph (tower, projector, pooling to q x q per frame); the tokens
are frame-major, followed by one newline. Pre-LLM methods reduce per video (`reduce.video`),
temporal methods run the `video_reduce` graph, in-LLM methods prune the frame tokens in prefill."""

from __future__ import annotations

import time

import numpy as np

from tokedge.errors import InputError
from tokedge.layouts.base import Range, VideoLayout

TEMPORAL_GRAPH = "video_reduce"  # a temporal method's graph (evs, dycoke): video_embeds -> video_tokens, video_kept


class VideoFrames(VideoLayout):
    kind = "frames"

    @classmethod
    def check_record(cls, video) -> None:
        from tokedge.manifest_schema import (
            MAX_FRAME_PIXELS,
            MAX_TOKENS_PER_TILE,
            MAX_VIDEO_PIXELS,
            bounded,
            positive,
        )

        positive("video.frame_size", video.frame_size, high=16384)
        positive("video.patch_grid", video.patch_grid, high=4096)
        positive("video.pooled_grid", video.pooled_grid, high=video.patch_grid)
        pixels = video.frame_size * video.frame_size  # derived sizes (docs/safety.md "Limits")
        bounded("video.frame_size", "frame pixels (squared)", pixels, MAX_FRAME_PIXELS)
        bounded("video.max_frames", f"pixels over all frames (x {pixels} per frame)", video.max_frames * pixels,
                MAX_VIDEO_PIXELS)
        bounded("video.patch_grid", "square (tokens per frame)", video.patch_grid ** 2, MAX_TOKENS_PER_TILE)

    def read(self, source, frames, fps):
        from tokedge.runtime.video import preprocess_frames
        from tokedge.runtime.video_pipeline import VideoInputs, frame_preprocess

        video = self.record
        clip = self.clip(source, frames, fps, (video.frame_size, video.frame_size), video.resample)
        pixels = preprocess_frames(clip.frames, frame_preprocess(video))
        return VideoInputs(pixels, clip.indices, clip.total, clip.fps)

    def plan(self, frames, budget, keep, inputs):
        from tokedge.reduce.base import Stage
        from tokedge.reduce.video import stage_for
        from tokedge.runtime.video_pipeline import VideoPlan

        video, red = self.record, self.manifest.reduction
        n = video.tokens_per_frame
        full = frames * n
        if budget is not None and keep is not None:
            raise InputError("--budget and --keep both set the video's budget; give one of them")
        if keep is not None and not 0 < keep <= 1:
            raise InputError(f"--keep must be in (0, 1] (a share of the video's {full} tokens), got {keep}")
        stage = Stage(red.stage)
        if stage is Stage.TEMPORAL:  # the method's graph is fixed to one frame count and keeps red.budget tokens
            if frames != video.default_frames:
                raise InputError(f"this artifact's {red.method} graph takes exactly {video.default_frames} frames "
                                 f"(fixed at export), not {frames}: use --frames {video.default_frames}, or re-export "
                                 "with --frames")
            if budget == full or keep == 1:  # the unreduced run (profile's fidelity reference): the graph is skipped
                return VideoPlan(frames, n, full, video.tokens(frames), None)
            if (budget is not None and budget != red.budget) or (keep is not None and int(keep * full) != red.budget):
                raise InputError(f"this artifact's {red.method} graph keeps {red.budget} of the video's {full} tokens "
                                 f"(fixed at export): drop --budget/--keep (or keep all {full}), or re-export with "
                                 "--budget")
            return VideoPlan(frames, n, red.budget, video.tokens(frames, red.budget), red.method)
        if stage is Stage.NONE:
            if (budget is not None and budget != full) or (keep is not None and keep != 1):
                raise InputError(f"this artifact keeps every visual token (--method none): a {frames}-frame video "
                                 f"gives {full}; drop --budget/--keep or export with a reduction method")
            return VideoPlan(frames, n, full, video.tokens(frames), None)
        if budget is None:
            budget = max(1, int((keep if keep is not None else video.keep_ratio) * full))
        if not 1 <= budget <= full:
            raise InputError(f"--budget {budget} is out of range for a {frames}-frame video: use 1..{full} visual "
                             "tokens")
        if stage is Stage.IN_LLM:
            last = red.stages[-1]["keep"] if red.stages else red.budget
            llm_keep = tuple(min(full, int(s["keep"]) * budget // int(last)) for s in red.stages)
            return VideoPlan(frames, n, budget, video.tokens(frames), None, llm_keep)
        if stage_for(red.method) is None:
            from tokedge.reduce.video import STAGES

            raise InputError(f"--method {red.method} has no per-video stage; video runs with --method none, "
                             f"{', '.join(STAGES)} or an in-LLM method (fastv, pdrop, dart)")
        return VideoPlan(frames, n, budget, video.tokens(frames, budget), red.method)

    def tokens(self, graphs, inputs, plan):
        from tokedge.reduce.video import stage_for

        video = self.record
        dtype = np.dtype(self.manifest.graphs[video.graph].input("pixel_values_videos").dtype)  # fp16 artifacts
        out = graphs.runners[video.graph].infer({"pixel_values_videos": inputs.pixel_values.astype(dtype, copy=False)})
        embeds, newline = out["video_embeds"], out["newline"]
        flat = embeds.reshape(-1, embeds.shape[-1])
        t0 = time.perf_counter()
        kept = np.arange(flat.shape[0], dtype=np.int64)
        if plan.stage is not None and TEMPORAL_GRAPH in graphs.runners:  # a temporal method's graph
            feed = {"video_embeds": embeds}
            if self.manifest.graphs[TEMPORAL_GRAPH].input("received_attention") is not None:
                feed["received_attention"] = out["received_attention"]
            reduced = graphs.runners[TEMPORAL_GRAPH].infer(feed)
            flat, kept = reduced["video_tokens"], reduced["video_kept"]
        elif plan.stage is not None:
            stage = stage_for(plan.stage)
            assert stage is not None  # `plan` refused methods without a per-video stage
            kept = stage.select(embeds, plan.keep, dict(self.manifest.reduction.options))
            flat = flat[kept]
        reduce_ms = (time.perf_counter() - t0) * 1e3
        if video.newline == "one_per_video":
            flat = np.concatenate([flat, newline.reshape(1, -1).astype(flat.dtype)])
        return flat, kept, reduce_ms

    def fewest_tokens(self) -> int:
        """Unreduced and in-LLM: one frame's tokens; a temporal graph: its fixed budget; per-video
        stages: one token; plus the newline."""
        from tokedge.reduce.base import Stage

        video, red = self.record, self.manifest.reduction
        newline = 1 if video.newline == "one_per_video" else 0
        stage = Stage(red.stage)
        if stage in (Stage.NONE, Stage.IN_LLM):
            return video.tokens_per_frame + newline
        if stage is Stage.TEMPORAL:
            return min(red.budget, video.tokens_per_frame * video.default_frames) + newline
        return 1 + newline

    def separate_graph(self) -> bool:
        return self.record.graph in self.manifest.graphs

    def axes(self) -> dict[str, Range]:
        return {"frames": (1, self.record.default_frames, self.record.max_frames)}


__all__ = ["TEMPORAL_GRAPH", "VideoFrames"]
