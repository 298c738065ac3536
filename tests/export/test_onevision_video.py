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
def loaded(tiny_llava_onevision_dir):
    from tokedge.export.families import load_checkpoint

    return load_checkpoint(str(tiny_llava_onevision_dir), tiny_llava_onevision_dir)


@pytest.fixture(scope="module")
def onevision(tiny_llava_onevision_dir):
    """transformers' model loaded on its own: the reference."""
    from transformers import LlavaOnevisionForConditionalGeneration

    return LlavaOnevisionForConditionalGeneration.from_pretrained(tiny_llava_onevision_dir).eval()


def test_video_graph_equals_transformers_video_features(loaded, onevision, tmp_path):
    import onnx_ir as ir
    import onnxruntime as ort

    from tokedge.export.onnx_export import trace_to_ir

    cfg = onevision.config
    layout = VideoLayout(frame_size=cfg.vision_config.image_size,
                         patch_grid=cfg.vision_config.image_size // cfg.vision_config.patch_size)
    hidden = cfg.text_config.hidden_size
    graph, spec = loaded.family.video_vision(loaded)
    assert spec.output_shapes["video_embeds"] == ("frames", layout.tokens_per_frame, hidden)
    model = trace_to_ir(graph, spec)
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

    embeds, graph_newline = session.run(None, {"pixel_values_videos": pixels})
    assert embeds.shape == (4, 196, hidden)
    newline = onevision.model.image_newline.detach().numpy()
    np.testing.assert_array_equal(graph_newline, newline[None])
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


def test_packed_video_tokens_generate_like_transformers_pixels(onevision, tiny_llava_onevision_dir, tmp_path):
    """The runtime's pieces spliced by hand (prompt expanded by `expand_video_placeholders`, packed
    tokens at the `<video>` positions) generate what transformers generates from the same pixels."""
    from tokenizers import Tokenizer

    from tokedge.runtime.video import expand_video_placeholders

    cfg = onevision.config
    layout = VideoLayout()
    clip_path = tmp_path / "clip.mp4"
    write_clip(clip_path, 6)
    pixels = preprocess_frames(read_video(clip_path, frames=2).frames, ONEVISION_PRE)
    prompt = expand_video_placeholders("<|im_start|>user\n<video>\nWhat happens?<|im_end|>\n<|im_start|>assistant\n",
                                       "<video>", [layout.tokens(2)])
    tokenizer = Tokenizer.from_file(str(tiny_llava_onevision_dir / "tokenizer.json"))
    ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=True).ids])
    assert int((ids == cfg.video_token_id).sum()) == layout.tokens(2) == 393
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = onevision.generate(input_ids=ids, attention_mask=mask, pixel_values_videos=torch.from_numpy(pixels)[None],
                                 max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
        per_frame = onevision.model.multi_modal_projector(
            onevision.model.vision_tower(torch.from_numpy(pixels), output_hidden_states=True)
            .hidden_states[cfg.vision_feature_layer]).numpy()
        packed = layout.pack(per_frame, onevision.model.image_newline.numpy())
        embeds = onevision.get_input_embeddings()(ids).clone()
        embeds[ids == cfg.video_token_id] = torch.from_numpy(packed)
        got = onevision.generate(input_ids=ids, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=6,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
    ref_new = ref.sequences[0, ids.shape[1]:].tolist()
    got_new = got.sequences[0, -len(ref_new):].tolist()
    assert got_new == ref_new
    np.testing.assert_allclose(got.logits[0].numpy(), ref.logits[0].numpy(), atol=1e-3)
