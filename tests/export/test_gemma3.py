"""Gemma 3 against transformers' own classes: `tokedge export tiny-gemma3 --method none`
(Gemma3ForConditionalGeneration with random weights saved as a user's directory, its Gemma3Processor
with the PIL image processor) run through the torch-free runtime equals transformers' processor +
`generate` on three image sizes and a two-image prompt: the same prompt ids (each image's run framed
by `<start_of_image>` ... `<end_of_image>`), prefill logits within 1e-3, greedy tokens equal. The
prompt pass attends bidirectionally within each image and the sliding-window layers see 12 keys
(shorter than the prompts): the tests check that both change the logits, so the match is not vacuous."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.export.test_anyres_methods import textured_image

SIZES = [(480, 640), (900, 300), (1000, 1000)]
QUESTION = "What is shown in this image?"
NEW_TOKENS = 8


def _image(height: int, width: int, seed: int = 3):
    return textured_image(height, width, seed)


@pytest.fixture(scope="module")
def checkpoint(tiny_gemma3_dir):
    return tiny_gemma3_dir


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    model = Gemma3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(checkpoint, backend="pil")


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory):
    from tokedge.export.pipeline import ExportConfig, export

    out = tmp_path_factory.mktemp("gemma3") / "none"
    result = export(ExportConfig(model=str(checkpoint), out=out, method="none"))
    assert result.parity["ok"]
    return out


def _batch(processor, images):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(images=[images], text=[text], return_tensors="pt")


@torch.no_grad()
def transformers_reference(hf, images):
    model, processor = hf
    batch = _batch(processor, images)
    assert "token_type_ids" in batch  # the processor marks image tokens: the model's bidirectional blocks
    logits = model(**batch).logits[0, -1].numpy()
    out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    return batch["input_ids"][0].numpy(), logits, out[0, batch["input_ids"].shape[1]:].tolist()


def tokedge_run(path, images):
    """`Pipeline.generate`, and one prefill through the runtime's own layout, encoder and generate:
    (result, prompt ids, prefill logits)."""
    from tokedge.layouts import layout_of
    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.runtime.pipeline import Pipeline

    with Pipeline.load(path) as pipe:
        result = pipe.generate(images, QUESTION, max_new_tokens=NEW_TOKENS)
        batch = layout_of(pipe.manifest).prepare([images], None, lambda b: pipe.manifest.reduction.budget)
        enc = pipe.encoder.encode([QUESTION], batch.counts)
        gen = generate(pipe.graphs, batch.inputs, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=1),
                       images_per_row=[len(images)])
    return result, enc.input_ids[0], gen.prefill_logits[0]


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for h, w in SIZES])
def test_none_matches_transformers_generate(size, artifact, hf):
    image = _image(*size)
    ids, logits, tokens = transformers_reference(hf, [image])
    result, got_ids, got_logits = tokedge_run(artifact, [image])
    np.testing.assert_array_equal(got_ids, ids)  # <start_of_image>, the run, <end_of_image> as the processor writes them
    np.testing.assert_allclose(got_logits, logits, atol=1e-3, rtol=0)
    assert result.token_ids[0][: len(tokens)] == tokens
    assert result.visual_tokens == 16


def test_two_image_prompt_matches_transformers(artifact, hf):
    """Two images: two blocks, each bidirectional within itself only."""
    images = [_image(480, 640), _image(300, 900, seed=5)]
    ids, logits, tokens = transformers_reference(hf, images)
    result, got_ids, got_logits = tokedge_run(artifact, images)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got_logits, logits, atol=1e-3, rtol=0)
    assert result.token_ids[0][: len(tokens)] == tokens
    assert result.visual_tokens == 32


@torch.no_grad()
def test_bidirectional_blocks_and_windows_change_the_logits(hf):
    """What the matches above rest on: transformers' prompt pass without token_type_ids (causal image
    tokens), or with windows wider than the prompt, gives other logits; the prompts are longer than the
    12-token window."""
    model, processor = hf
    images = [_image(480, 640), _image(300, 900, seed=5)]
    batch = _batch(processor, images)
    assert batch["input_ids"].shape[1] > 3 * model.config.text_config.sliding_window
    full = model(**batch).logits[0, -1]
    causal = model(**{k: v for k, v in batch.items() if k != "token_type_ids"}).logits[0, -1]
    assert float((full - causal).abs().max()) > 1e-2
    window = model.config.text_config.sliding_window
    for layer in model.model.language_model.layers:
        layer.self_attn.sliding_window = 10_000
    model.config.text_config.sliding_window = 10_000
    try:
        wide = model(**batch).logits[0, -1]
    finally:
        for layer in model.model.language_model.layers:
            layer.self_attn.sliding_window = window if layer.self_attn.is_sliding else None
        model.config.text_config.sliding_window = window
    assert float((full - wide).abs().max()) > 1e-2


def test_vision_graph_equals_transformers_image_features(artifact, hf):
    import onnxruntime as ort

    model, processor = hf
    pixels = processor.image_processor([_image(480, 640), _image(300, 900)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = model.model.get_image_features(pixels).pooler_output
    sess = ort.InferenceSession(str(artifact / "vision.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["image_embeds"], {"pixel_values": pixels.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)


def test_methods_without_the_signals_are_refused_in_one_line(checkpoint, tmp_path, capsys):
    from tokedge.cli import main

    for method in ("cls-attn", "tome"):
        assert main(["export", str(checkpoint), "--method", method, "--out", str(tmp_path / method)]) == 2
        err = capsys.readouterr().err.strip()
        assert "Gemma 3" in err and "divprune, pool" in err and len(err.splitlines()) == 1
