"""InternVL3 against transformers' own classes: `tokedge export tiny-internvl --method none`
(InternVLForConditionalGeneration with random weights saved as a user's directory, its GotOcr2 PIL
image processor) run through the torch-free runtime equals transformers' InternVLProcessor +
`generate` on three aspect ratios and a two-image prompt: the same prompt ids (`<img>`, one run per
image, `</img>`), prefill logits within 1e-3, greedy tokens equal. Reduced exports: in-LLM fastv,
dart, pdrop against the loop pruning reference; divprune and pool per view against a loop selection
over transformers' tower, pixel shuffle and projector."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tests.export.test_anyres_methods import textured_image

SIZES = [(480, 640), (900, 300), (1000, 1000)]  # (height, width): 3 x 2, 1 x 3 and 2 x 2 tiles, each + thumbnail
QUESTION = "What is shown in this image?"
NEW_TOKENS = 8


def _image(height: int, width: int, seed: int = 3):
    return textured_image(height, width, seed)


def internvl_processor(path):
    """transformers' `InternVLProcessor` of the checkpoint. Its constructor insists on a video processor,
    which needs torchvision: without torchvision the instance is assembled from the checkpoint's own
    image processor, tokenizer and template, with the attributes its __init__ sets (its __call__ and
    `replace_image_token` run unchanged)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, InternVLProcessor

    try:
        import torchvision  # noqa: F401

        return AutoProcessor.from_pretrained(path)
    except ImportError:
        pass
    tok = AutoTokenizer.from_pretrained(path)
    proc = InternVLProcessor.__new__(InternVLProcessor)
    proc.image_processor, proc.tokenizer, proc.video_processor = AutoImageProcessor.from_pretrained(path), tok, None
    proc.chat_template = (path / "chat_template.jinja").read_text()
    proc.image_seq_length = 16
    proc.start_image_token, proc.end_image_token = tok.start_image_token, tok.end_image_token
    proc.start_image_token_id, proc.end_image_token_id = tok.start_image_token_id, tok.end_image_token_id
    proc.image_token, proc.image_token_id, proc.video_token = (tok.context_image_token, tok.context_image_token_id,
                                                               tok.video_token)
    proc.multimodal_pattern = re.compile(f"(?P<image>{re.escape(proc.image_token)})|(?P<video>{re.escape(proc.video_token)})")
    return proc


@pytest.fixture(scope="module")
def checkpoint(tiny_internvl_dir):
    return tiny_internvl_dir


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, internvl_processor(checkpoint)


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory):
    from tokedge.export.pipeline import ExportConfig, export

    out = tmp_path_factory.mktemp("internvl") / "none"
    result = export(ExportConfig(model=str(checkpoint), out=out, method="none"))
    assert result.parity["ok"] and len(result.parity["cases"]) == 2
    return out


def _batch(processor, images, question=QUESTION):
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return processor(images=images, text=[text], return_tensors="pt")


@torch.no_grad()
def transformers_reference(hf, images):
    model, processor = hf
    batch = _batch(processor, images)
    logits = model(**batch).logits[0, -1].numpy()
    out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    return batch["input_ids"][0].numpy(), logits, out[0, batch["input_ids"].shape[1]:].tolist()


def tokedge_run(path, images):
    from tokedge.layouts import prompt_inputs
    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.runtime.pipeline import Pipeline

    with Pipeline.load(path) as pipe:
        result = pipe.generate(images, QUESTION, max_new_tokens=NEW_TOKENS)
        inputs = prompt_inputs(pipe.manifest, images)
        enc = pipe.encoder.encode([QUESTION], [[x.tokens for x in inputs]])
        gen = generate(pipe.graphs, inputs, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=1),
                       images_per_row=[len(images)])
    return result, enc.input_ids[0], gen.prefill_logits[0]


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for h, w in SIZES])
def test_none_matches_transformers_generate(size, artifact, hf):
    image = _image(*size)
    ids, logits, tokens = transformers_reference(hf, [image])
    result, got_ids, got_logits = tokedge_run(artifact, [image])
    np.testing.assert_array_equal(got_ids, ids)  # <img>, the image's run and </img> as the processor writes them
    np.testing.assert_allclose(got_logits, logits, atol=1e-3, rtol=0)
    assert result.token_ids[0][: len(tokens)] == tokens
    assert result.visual_tokens == int((ids == hf[0].config.image_token_id).sum())


def test_two_image_prompt_matches_transformers(artifact, hf):
    images = [_image(480, 640), _image(300, 900, seed=5)]
    ids, logits, tokens = transformers_reference(hf, images)
    result, got_ids, got_logits = tokedge_run(artifact, images)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got_logits, logits, atol=1e-3, rtol=0)
    assert result.token_ids[0][: len(tokens)] == tokens
    assert result.visual_tokens == (7 + 4) * 16


def test_vision_graph_equals_transformers_image_features(artifact, hf):
    """The exported vision graph (InternViT re-run, CLS dropped, pixel shuffle, projector) on the
    processor's own views equals transformers' get_image_features."""
    import onnxruntime as ort

    model, processor = hf
    pixels = processor.image_processor(images=[_image(480, 640)], crop_to_patches=True,
                                       return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = model.model.get_image_features(pixels, vision_feature_layer=-1,
                                              vision_feature_select_strategy="default").pooler_output
    sess = ort.InferenceSession(str(artifact / "vision.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["image_embeds"], {"pixel_values": pixels.numpy()})[0][0]
    np.testing.assert_allclose(got, want.reshape(-1, want.shape[-1]).numpy(), atol=1e-4, rtol=1e-4)


def test_methods_without_the_signals_a_view_has_are_refused_in_one_line(checkpoint, tmp_path, capsys):
    from tokedge.cli import main

    for method in ("cls-attn", "tome"):
        assert main(["export", str(checkpoint), "--method", method, "--out", str(tmp_path / method)]) == 2
        err = capsys.readouterr().err.strip()
        assert "InternVL" in err and "divprune, pool" in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def in_llm(checkpoint, tmp_path_factory):
    from tokedge.export.pipeline import ExportConfig, export

    root = tmp_path_factory.mktemp("internvl-in-llm")
    made = {}

    def make(method: str):
        if method not in made:
            made[method] = root / method
            export(ExportConfig(model=str(checkpoint), out=made[method], method=method, budget=IN_LLM_BUDGET))
        return made[method]

    return make


IN_LLM_BUDGET = 32  # image tokens kept per image from the method's layer on (of 64-112)


@pytest.mark.parametrize("method", ["fastv", "dart", "pdrop"])
@pytest.mark.parametrize("sizes", [[(480, 640)], [(480, 640), (900, 300)]], ids=["one image", "two images"])
def test_in_llm_prunes_every_image_run_as_the_reference(method, sizes, in_llm, hf):
    """The loop-based pruning reference of tests/export/test_in_llm.py on transformers' own decoder
    layers, fed with transformers' processor ids and image features, keeping the budget x images."""
    from types import SimpleNamespace

    from tests.export.test_anyres_in_llm import STEPS, splice_and_prune
    from tokedge.artifact import load_artifact
    from tokedge.layouts import prompt_inputs
    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.runtime.pipeline import Pipeline

    model, processor = hf
    art = in_llm(method)
    manifest = load_artifact(art)
    stages = [dict(s, rule=getattr(s["rule"], "value", s["rule"])) for s in manifest.reduction.stages]
    images = [_image(*size) for size in sizes]
    batch = _batch(processor, images)
    with torch.no_grad():
        feats = model.model.get_image_features(batch["pixel_values"], vision_feature_layer=-1,
                                               vision_feature_select_strategy="default").pooler_output
    shim = SimpleNamespace(model=SimpleNamespace(language_model=model.model.language_model), lm_head=model.lm_head,
                           config=model.config, get_input_embeddings=model.get_input_embeddings)
    exp_prefill, exp_tokens, exp_ids = splice_and_prune(shim, batch, [feats.reshape(-1, feats.shape[-1])], stages,
                                                        int(manifest.reduction.options.get("pivots") or 8), len(images))
    with Pipeline.load(art) as pipe:
        inputs = prompt_inputs(pipe.manifest, images)
        enc = pipe.encoder.encode([QUESTION], [[x.tokens for x in inputs]])
        gen = generate(pipe.graphs, inputs, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=STEPS + 1),
                       stop_at_eos=False, images_per_row=[len(images)])
    np.testing.assert_array_equal(enc.input_ids[0], exp_ids)
    np.testing.assert_allclose(gen.prefill_logits[0], exp_prefill, atol=1e-3, rtol=0)
    assert gen.token_ids[0] == exp_tokens
    assert gen.visual_tokens == IN_LLM_BUDGET * len(images)


@pytest.mark.parametrize("method", ["none", "fastv"])
def test_contract_client_runs_aspect_tile_artifacts_like_tokedge(method, artifact, in_llm):
    """tests/contract_client.py (written from docs/artifact.md alone: "Aspect-ratio tiles") on one image
    and on a two-image prompt: its prompt ids are tokedge's, its greedy tokens `Pipeline.generate`'s and
    its prefill logits within 1e-4."""
    from tests.contract_client import assert_runs_like_tokedge

    path = artifact if method == "none" else in_llm(method)
    prompts = [[_image(*size) for size in sizes] for sizes in ([(480, 640)], [(480, 640), (900, 300)])]
    assert_runs_like_tokedge(path, tokedge_run, prompts, QUESTION, NEW_TOKENS)


@pytest.fixture(scope="module")
def per_view(checkpoint, tmp_path_factory):
    from tokedge.export.pipeline import ExportConfig, export

    root = tmp_path_factory.mktemp("internvl-views")
    made = {}

    def make(method: str, budget: int):
        if (method, budget) not in made:
            made[method, budget] = root / f"{method}-{budget}"
            export(ExportConfig(model=str(checkpoint), out=made[method, budget], method=method, budget=budget,
                                validate=False))
        return made[method, budget]

    return make


@pytest.mark.parametrize("method,budget", [("divprune", 4), ("divprune", 9), ("pool", 4), ("pool", 1)])
def test_vision_side_methods_keep_their_budget_in_every_view(method, budget, per_view, hf):
    """Per view (every tile and the thumbnail), from transformers' own modules: its tower's
    last_hidden_state without the CLS, the model's `pixel_shuffle` and projector; then a loop selection
    written here (divprune: greedy max-min cosine over the view's projected tokens; pool: torch's
    adaptive_avg_pool2d of the view's token grid, then the projector). Prompt ids with `budget` tokens
    per view, the kept embeddings, prefill logits and greedy tokens against transformers' LM."""
    from tests.export.test_anyres_methods import loop_divprune
    from tokedge.layouts import prompt_inputs
    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.runtime.pipeline import Pipeline

    model, processor = hf
    image = _image(480, 640)
    inner = model.model
    pixels = processor.image_processor(images=[image], crop_to_patches=True, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = inner.vision_tower(pixel_values=pixels).last_hidden_state[:, 1:]
        side = int(hidden.shape[1] ** 0.5)
        grid = inner.pixel_shuffle(hidden.reshape(hidden.shape[0], side, side, -1), scale_factor=0.5)
        shuffled = grid.reshape(grid.shape[0], -1, grid.shape[-1])  # [views, 16, 4d]
        rows = []
        for view in shuffled:
            if method == "divprune":
                projected = inner.multi_modal_projector(view).numpy()
                rows.append(projected[loop_divprune(projected, budget)])
            else:
                out, g = int(budget**0.5), int(view.shape[0] ** 0.5)
                pooled = torch.nn.functional.adaptive_avg_pool2d(view.T.reshape(1, -1, g, g), out)
                rows.append(inner.multi_modal_projector(pooled.reshape(view.shape[1], -1).T).numpy())
    expected = np.concatenate(rows)
    full = processor.image_seq_length
    processor.image_seq_length = budget  # replace_image_token reads it per call
    try:
        ids = _batch(processor, [image])["input_ids"]
    finally:
        processor.image_seq_length = full
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        embeds[ids == model.config.image_token_id] = torch.from_numpy(expected)
        logits = model(inputs_embeds=embeds).logits[0, -1].numpy()
        tokens = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                do_sample=False)[0].tolist()
    with Pipeline.load(per_view(method, budget)) as pipe:
        result = pipe.generate(image, QUESTION, max_new_tokens=NEW_TOKENS)
        inputs = prompt_inputs(pipe.manifest, [image])
        enc = pipe.encoder.encode([QUESTION], [[x.tokens for x in inputs]])
        gen = generate(pipe.graphs, inputs, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=1))
    np.testing.assert_array_equal(enc.input_ids[0], ids[0].numpy())
    assert result.visual_tokens == 7 * budget
    np.testing.assert_allclose(gen.image_embeds[0], expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(gen.prefill_logits[0], logits, atol=1e-3, rtol=0)
    assert result.token_ids[0][: len(tokens)] == tokens


@pytest.fixture(scope="module")
def qwen3_checkpoint(tmp_path_factory):
    """InternVL3.5's shape: the same tower and tiles, a Qwen3 language model (per-head q/k RMSNorm)."""
    from tokedge.export.presets import TinyInternVLConfig, build_tiny_internvl

    return build_tiny_internvl(tmp_path_factory.mktemp("ckpt") / "tiny-internvl3.5",
                               TinyInternVLConfig(text_model_type="qwen3"))


@pytest.mark.parametrize("method", ["none", "fastv"])
def test_internvl3_5_qwen3_language_model(method, qwen3_checkpoint, tmp_path):
    """`none`: tokedge run equals transformers' generate on two images of different grids; fastv: the
    pruning reference (as above) on transformers' own Qwen3 decoder layers."""
    from transformers import InternVLForConditionalGeneration

    from tokedge.export.pipeline import ExportConfig, export

    model = InternVLForConditionalGeneration.from_pretrained(qwen3_checkpoint, dtype=torch.float32).eval()
    assert model.config.text_config.model_type == "qwen3"
    hf = (model, internvl_processor(qwen3_checkpoint))
    result = export(ExportConfig(model=str(qwen3_checkpoint), out=tmp_path / method, method=method,
                                 budget=IN_LLM_BUDGET if method == "fastv" else None))
    assert result.parity["ok"]
    images = [_image(480, 640), _image(300, 900, seed=5)]
    if method == "none":
        ids, logits, tokens = transformers_reference(hf, images)
        got, got_ids, got_logits = tokedge_run(tmp_path / method, images)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_allclose(got_logits, logits, atol=1e-3, rtol=0)
        assert got.token_ids[0][: len(tokens)] == tokens
    else:
        test_in_llm_prunes_every_image_run_as_the_reference("fastv", [(480, 640), (900, 300)],
                                                            lambda m: tmp_path / m, hf)


def test_max_tiles_caps_the_grid_as_transformers_processor_at_that_max(checkpoint, hf, tmp_path, capsys):
    """`--max-tiles 2`: the manifest's grid stops at 2 tiles; a 640x480 photo (3 x 2 tiles + thumbnail at the
    checkpoint's 6) then gives what transformers' processor with max_patches 2 gives, ids and logits; other
    families refuse the flag in one line (exit 2)."""
    from tokedge.artifact import load_artifact
    from tokedge.cli import main

    out = tmp_path / "t2"
    assert main(["export", str(checkpoint), "--method", "none", "--max-tiles", "2", "--out", str(out)]) == 0
    assert "up to 2 tiles" in capsys.readouterr().err
    assert load_artifact(out).layout.max_tiles == 2
    model, processor = hf
    full = processor.image_processor.max_patches
    processor.image_processor.max_patches = 2
    try:
        ids, logits, _ = transformers_reference(hf, [_image(480, 640)])
    finally:
        processor.image_processor.max_patches = full
    result, got_ids, got_logits = tokedge_run(out, [_image(480, 640)])
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got_logits, logits, atol=1e-3, rtol=0)
    assert result.visual_tokens == int((ids == model.config.image_token_id).sum()) < 7 * 16
    assert main(["export", "tiny-llava", "--method", "none", "--max-tiles", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--max-tiles applies to aspect-ratio tiled models" in capsys.readouterr().err
