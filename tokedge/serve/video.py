"""A request's `video_url` part -> the sampled, preprocessed frames and the per-video plan, as
`tokedge run --video` prepares a clip (same sampling, same preprocessing, the artifact's default
budget). The clip's bytes (bounded by `--max-video-bytes`) are written to a private temporary
file for PyAV and removed as soon as the frames are read."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from tokedge.errors import InputError, MissingDependencyError, UsageError
from tokedge.serve.config import ServeConfig
from tokedge.serve.protocol import APIError


def video_refusal(manifest: Any) -> APIError:
    family = manifest.model.family
    return APIError(400, f"this artifact ({family}) takes images only (it has no video graph); send image_url parts, "
                         "or serve an artifact exported with video (LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL; "
                         "docs/video.md)", param="messages", code="video_not_supported")


def video_job_inputs(manifest: Any, data: bytes, cfg: ServeConfig) -> tuple[Any, Any]:
    """Encoded clip bytes -> (`VideoInputs`, `VideoPlan`), or APIError(400/413) naming the problem."""
    from tokedge.runtime.video_pipeline import video_inputs, video_plan

    if len(data) > cfg.max_video_bytes:
        raise APIError(413, f"a video is {len(data)} bytes; this server accepts at most {cfg.max_video_bytes} bytes "
                            "per video (--max-video-bytes); send a shorter or more compressed clip")
    with tempfile.TemporaryDirectory(prefix="tokedge-video-") as tmp:
        path = Path(tmp) / "clip"
        path.write_bytes(data)
        try:
            inputs = video_inputs(manifest, path, cfg.video_frames, None)
            plan = video_plan(manifest, inputs.frames, None, None, inputs=inputs)
        except MissingDependencyError as exc:
            raise APIError(500, f"this server cannot decode videos: {exc}") from None
        except (InputError, UsageError) as exc:
            message = str(exc).replace(f"video '{path}'", "the video").replace(f"'{path}'", "the video")
            raise APIError(400, message.replace(str(path), "the video"), param="messages") from None
    return inputs, plan
