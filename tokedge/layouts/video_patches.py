"""Video as dynamic patches with time-aware M-RoPE (Qwen2.5-VL): frames are resized once for the
clip with the image layout's pixel range, T frames form one temporal group, the image vision graph
runs once per group, and the tokens take (t, h, w) positions whose t follows the clip's seconds.
Runs unreduced (`--method none`) so far. Older manifests call this kind "qwen_dynamic"."""

from __future__ import annotations

import numpy as np

from tokedge.errors import InputError
from tokedge.layouts.base import VideoLayout
from tokedge.manifest_schema import ManifestError


class VideoPatches(VideoLayout):
    kind = "dynamic_patches"
    aliases = ("qwen_dynamic",)

    @classmethod
    def check_record(cls, video) -> None:
        if not 0 < video.tokens_per_second < 1e6:
            raise ManifestError("video.tokens_per_second", "a positive number", video.tokens_per_second)

    def read(self, source, frames, fps):
        """`frames` rounded to a multiple of the temporal patch size T (half to even, as
        Qwen2VLVideoProcessor's sample_frames), each frame resized as it is decoded to the clip's one
        smart_resize size, then `runtime.qwen_vl.video_inputs` (T frames per temporal group). The
        token count is checked against the context from the stream header and `frames` before
        anything is decoded (docs/safety.md "Limits")."""
        from tokedge.runtime.qwen_vl import image_spec, smart_resize, video_inputs

        layout = self.manifest.layout
        tp = int(layout.temporal_patch_size)
        if frames is not None:
            frames = max(tp, round(frames / tp) * tp)
        spec = image_spec(layout, self.manifest.preprocess)
        m = self.manifest.model
        context = min(m.max_position_embeddings, m.sliding_window or m.max_position_embeddings)

        def frame_size(height: int, width: int, count: int) -> tuple[int, int]:
            h, w = smart_resize(height, width, spec.factor, spec.min_pixels, spec.max_pixels)
            tokens = -(-count // tp) * (h // spec.factor) * (w // spec.factor)
            if tokens >= context:
                raise InputError(f"a video of {count} frames at {width}x{height} gives {tokens} visual tokens, more "
                                 f"than the model's context of {context}; use fewer --frames or a shorter clip")
            return h, w

        clip = self.clip(source, frames, fps, frame_size, spec.resample)
        return video_inputs(clip.frames, clip.indices, clip.total, clip.fps, layout, self.manifest.preprocess)

    def plan(self, frames, budget, keep, inputs):
        from tokedge.reduce.base import Stage
        from tokedge.runtime.video_pipeline import VideoPlan

        red = self.manifest.reduction
        if inputs is None:
            raise InputError("a dynamic-resolution video's token count follows its frame size: plan it from its "
                             "inputs (runtime.video_pipeline.video_inputs)")
        if Stage(red.stage) is not Stage.NONE:
            raise InputError(f"video on {self.manifest.model.family} artifacts runs unreduced only: --method "
                             f"{red.method} is not available for this video layout yet; re-export with --method none")
        full = inputs.full_tokens
        if (budget is not None and budget != full) or (keep is not None and keep != 1):
            raise InputError(f"this artifact keeps every visual token (--method none): this video gives {full}; "
                             "drop --budget/--keep")
        return VideoPlan(int(inputs.grid[0]), inputs.tokens_per_group, full, full, None)

    def tokens(self, graphs, inputs, plan):
        """The image vision graph once per temporal group, tokens group-major."""
        video = self.record
        names = {t.name for t in self.manifest.graphs[video.graph].inputs}
        dtype = np.dtype(self.manifest.graphs[video.graph].input("pixel_values").dtype)
        outs = []
        for group in inputs.groups:
            feed = group.feed(names)
            feed["pixel_values"] = feed["pixel_values"].astype(dtype, copy=False)
            outs.append(graphs.runners[video.graph].infer(feed)["image_embeds"])
        flat = np.concatenate(outs)
        return flat, np.arange(flat.shape[0], dtype=np.int64), 0.0

    def fewest_tokens(self) -> int:
        """One temporal group of the smallest frames the image layout allows."""
        from tokedge.layouts import layout_of

        return layout_of(self.manifest).bounds().tokens[0]

    def positions(self, input_ids, attention_mask, inputs):
        from tokedge.runtime.qwen_vl import video_prompt_positions

        video = self.record
        return video_prompt_positions(self.manifest.layout, video.video_token_id, video.tokens_per_second,
                                      input_ids, attention_mask, inputs)


__all__ = ["VideoPatches"]
