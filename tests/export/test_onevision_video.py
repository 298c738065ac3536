"""LLaVA-OneVision video features through ONNX Runtime: a clip written with PyAV, decoded, sampled
and preprocessed by the torch-free runtime, run through the exported per-frame vision graph and
packed with one newline, against transformers' `get_video_features` on the same pixels."""

from __future__ import annotations

import numpy as np
import pytest

av = pytest.importorskip("av")
torch = pytest.importorskip("torch")

from tests.runtime.test_video import ONEVISION_PRE, write_clip
from tokedge.runtime.video import VideoLayout, preprocess_frames, read_video


@pytest.fixture(scope="module")
def onevision(tiny_llava_onevision_dir):
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_llava_onevision_dir).eval()


def test_video_graph_equals_transformers_video_features(onevision, tmp_path):
    import onnx_ir as ir
    import onnxruntime as ort

    from tokedge.export.families.llava_onevision import VideoVisionGraph, video_trace_spec
    from tokedge.export.onnx_export import trace_to_ir

    cfg = onevision.config
    layout = VideoLayout(frame_size=cfg.vision_config.image_size,
                         patch_grid=cfg.vision_config.image_size // cfg.vision_config.patch_size)
    hidden = cfg.text_config.hidden_size
    graph = VideoVisionGraph(onevision).eval()
    model = trace_to_ir(graph, video_trace_spec(hidden, layout.frame_size, layout.tokens_per_frame))
    path = tmp_path / "video_vision.onnx"
    ir.save(model, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    clip_path = tmp_path / "clip.mp4"
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(10)]
    write_clip(clip_path, 10, frames=frames)
    clip = read_video(clip_path, frames=4)  # 4 of 10 frames: indices 0 2 5 7 (traced with 3: F is dynamic)
    assert clip.indices.tolist() == [0, 2, 5, 7]
    pixels = preprocess_frames(clip.frames, ONEVISION_PRE)

    (embeds,) = session.run(None, {"pixel_values_videos": pixels})
    assert embeds.shape == (4, 196, hidden)
    newline = onevision.model.image_newline.detach().numpy()
    packed = np.concatenate([embeds.reshape(-1, hidden), newline[None]])

    with torch.no_grad():
        ref = onevision.model.get_video_features(
            torch.from_numpy(pixels)[None], vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy).pooler_output[0].numpy()
    assert packed.shape == ref.shape == (layout.tokens(4), hidden)
    np.testing.assert_allclose(packed, ref, atol=1e-4, rtol=1e-4)
    # the numpy layout (pooling matrices on per-frame features) agrees with the graph's in-graph pooling
    with torch.no_grad():
        per_frame = graph.projector(graph.tower(torch.from_numpy(pixels)).features).numpy()
    np.testing.assert_allclose(layout.pack(per_frame, newline), ref, atol=1e-4, rtol=1e-4)
