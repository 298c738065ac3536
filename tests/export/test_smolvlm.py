"""SmolVLM (Idefics3 lineage) against transformers' own classes: `tokedge export tiny-smolvlm --method
none` (Idefics3ForConditionalGeneration with random weights saved as a user's directory, its
Idefics3Processor with the PIL image processor) run through the torch-free runtime equals
transformers' processor + `generate` on three aspect ratios and a two-image prompt: the same prompt
ids (tile markers, rows, global views), prefill logits within 1e-3, greedy tokens equal."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.export.test_anyres_methods import textured_image

SIZES = [(480, 640), (900, 300), (1000, 1000)]  # (height, width): 3 x 4, 4 x 2 and 4 x 4 tiles
QUESTION = "What is shown in this image?"
NEW_TOKENS = 8


def _image(height: int, width: int, seed: int = 3) -> Image.Image:
    return textured_image(height, width, seed)


@pytest.fixture(scope="module")
def checkpoint(tiny_smolvlm_dir):
    return tiny_smolvlm_dir  # the session's tiny SmolVLM (tests/conftest.py), shared with the other SmolVLM tests


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    model = Idefics3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def artifact(checkpoint, tmp_path_factory):
    from tokedge.export.pipeline import ExportConfig, export

    out = tmp_path_factory.mktemp("smolvlm") / "none"
    result = export(ExportConfig(model=str(checkpoint), out=out, method="none"))
    assert result.parity["ok"] and len(result.parity["cases"]) == 2
    return out


@torch.no_grad()
def transformers_reference(hf, images):
    model, processor = hf
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    batch = processor(images=[images], text=[text], return_tensors="pt")
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
    np.testing.assert_array_equal(got_ids, ids)  # tile markers, rows and the global view as the processor writes them
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


def test_vision_graph_equals_transformers_connector(artifact, hf):
    """The exported vision graph (FullViewEmbeddings + pixel shuffle + projection) on the processor's own
    views equals transformers' get_image_features."""
    import onnxruntime as ort

    model, processor = hf
    image = _image(480, 640)
    batch = processor.image_processor([[image]], return_tensors="pt")
    with torch.no_grad():
        want = model.model.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"]).pooler_output
    want = torch.cat(list(want)) if isinstance(want, (list, tuple)) else want
    sess = ort.InferenceSession(str(artifact / "vision.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["image_embeds"], {"pixel_values": batch["pixel_values"][0].numpy()})[0][0]
    np.testing.assert_allclose(got, want.reshape(-1, want.shape[-1]).numpy(), atol=1e-4, rtol=1e-4)


def test_methods_without_the_signals_a_view_has_are_refused_in_one_line(checkpoint, tmp_path, capsys):
    from tokedge.cli import main

    assert main(["export", str(checkpoint), "--method", "cls-attn", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert "SmolVLM's views do not supply yet" in err and "divprune, pool" in err and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def in_llm(checkpoint, tmp_path_factory):
    from tokedge.export.pipeline import ExportConfig, export

    root = tmp_path_factory.mktemp("smolvlm-in-llm")
    made = {}

    def make(method: str):
        if method not in made:
            made[method] = root / method
            export(ExportConfig(model=str(checkpoint), out=made[method], method=method, budget=IN_LLM_BUDGET))
        return made[method]

    return make


IN_LLM_BUDGET = 64  # image tokens kept per image from the method's layer on (of 144-272)


@pytest.mark.parametrize("method", ["fastv", "dart", "pdrop"])
@pytest.mark.parametrize("sizes", [[(480, 640)], [(480, 640), (300, 900)]], ids=["one image", "two images"])
def test_in_llm_prunes_every_image_run_as_the_reference(method, sizes, in_llm, hf):
    """fastv / dart over the prompt's image-token runs (tiles and global views, text between them):
    the loop-based pruning reference of tests/export/test_in_llm.py on transformers' own decoder
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
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    batch = processor(images=[images], text=[text], return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(batch["pixel_values"], batch["pixel_attention_mask"]).pooler_output
    shim = SimpleNamespace(model=SimpleNamespace(language_model=model.model.text_model), lm_head=model.lm_head,
                           config=model.config, get_input_embeddings=model.get_input_embeddings)
    feats = [torch.cat(list(feats))] if isinstance(feats, (list, tuple)) else [feats.reshape(-1, feats.shape[-1])]
    exp_prefill, exp_tokens, exp_ids = splice_and_prune(shim, batch, feats, stages,
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
def test_contract_client_runs_split_tile_artifacts_like_tokedge(method, artifact, in_llm):
    """tests/contract_client.py (written from docs/artifact.md alone: "Split tiles with text between
    them") on one image and on a two-image prompt: its prompt ids are tokedge's, its greedy tokens
    `Pipeline.generate`'s and its prefill logits within 1e-4."""
    from tests.contract_client import assert_runs_like_tokedge

    path = artifact if method == "none" else in_llm(method)
    prompts = [[_image(*size) for size in sizes] for sizes in ([(480, 640)], [(480, 640), (300, 900)])]
    assert_runs_like_tokedge(path, tokedge_run, prompts, QUESTION, NEW_TOKENS)


@pytest.fixture(scope="module")
def per_view(checkpoint, tmp_path_factory):
    from tokedge.export.pipeline import ExportConfig, export

    root = tmp_path_factory.mktemp("smolvlm-views")
    made = {}

    def make(method: str, budget: int):
        if (method, budget) not in made:
            made[method, budget] = root / f"{method}-{budget}"
            export(ExportConfig(model=str(checkpoint), out=made[method, budget], method=method, budget=budget,
                                validate=False))
        return made[method, budget]

    return make


def _loop_divprune(x: np.ndarray, k: int) -> list[int]:
    """Greedy max-min cosine distance (DivPrune's loop, tests/export/test_anyres_methods.py), ascending."""
    from tests.export.test_anyres_methods import loop_divprune

    return loop_divprune(x, k)


@pytest.mark.parametrize("method,budget", [("divprune", 4), ("divprune", 9), ("pool", 4), ("pool", 1)])
def test_vision_side_methods_keep_their_budget_in_every_view(method, budget, per_view, hf):
    """Per view (every tile and the global view), from transformers' own modules: its tower with the
    post-layernorm, the connector's `pixel_shuffle` and projection; then a loop selection written here
    (divprune: greedy max-min cosine over the view's projected tokens; pool: torch's
    adaptive_avg_pool2d of the view's token grid, then the projection). Prompt ids with `budget`
    tokens per view, the kept embeddings, prefill logits and greedy tokens against transformers' LM."""
    from tokedge.layouts import prompt_inputs
    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.runtime.pipeline import Pipeline

    model, processor = hf
    image = _image(480, 640)
    batch = processor.image_processor([[image]], return_tensors="pt")
    inner = model.model
    with torch.no_grad():
        hidden = inner.vision_model(batch["pixel_values"][0]).last_hidden_state
        shuffled = inner.connector.pixel_shuffle(hidden, inner.connector.scale_factor)  # [views, 16, d s^2]
        proj = inner.connector.modality_projection.proj
        rows = []
        for view in shuffled:
            if method == "divprune":
                projected = proj(view).numpy()
                rows.append(projected[_loop_divprune(projected, budget)])
            else:
                side, grid = int(budget**0.5), int(view.shape[0] ** 0.5)
                pooled = torch.nn.functional.adaptive_avg_pool2d(
                    view.T.reshape(1, -1, grid, grid), side).reshape(view.shape[1], -1).T
                rows.append(proj(pooled).numpy())
    expected = np.concatenate(rows)
    # transformers' LM on the processor's prompt with `budget` image tokens per view
    content = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    full = processor.image_seq_len  # transformers 5's call ignores its image_seq_len argument: set it
    processor.image_seq_len = budget
    try:
        ids = processor(images=[[image]], text=[text], return_tensors="pt")["input_ids"]
    finally:
        processor.image_seq_len = full
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
    assert result.visual_tokens == 13 * budget
    np.testing.assert_allclose(gen.image_embeds[0], expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(gen.prefill_logits[0], logits, atol=1e-3, rtol=0)
    assert result.token_ids[0][: len(tokens)] == tokens
