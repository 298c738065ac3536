"""LLaVA-OneVision (images): the tiny preset checkpoint, the family's layout, vision graph and
`--method none` artifact, against transformers' own image processor, placeholder counting
(`LlavaOnevisionProcessor._get_number_of_features` / `replace_image_token`) and model (the
independent reference). transformers' processor class cannot be built without torchvision, so the
reference uses its image processor, tokenizer and counting methods directly (the family's
`reference_batch`)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

# (height, width): 640x480, 300x900, 1000x1000, and 2000x1500 whose unpadded 108 x 144 map exceeds
# anyres_max_9 (ratio 1.54 > 1.1) and is shrunk bilinearly to 70 x 93 (7309 tokens)
SIZES = [(480, 640), (900, 300), (1000, 1000), (1500, 2000)]
QUESTION = "What is shown in this image?"
NEW_TOKENS = 12

# docs/research/llava-next-onevision-hired.md, section 2.2 (S=384, p=27, the 36 default pinpoints,
# "full", single-image prompts): (height, width) -> partitions, placeholder tokens. The table gives
# 4 partitions for 900x400; transformers' image_size_to_num_patches (and the 1152x768 canvas, 3 x 2
# tiles, whose 81 x 54 map unpads to 81 x 36 = the table's 3726 tokens) give 7: corrected here.
RESEARCH_TABLE = [
    ((240, 320), 2, 1317), ((400, 300), 3, 1737), ((336, 336), 2, 1485), ((100, 1000), 4, 1467),
    ((1000, 90), 4, 1377), ((500, 501), 5, 3699), ((768, 1024), 7, 4725), ((1600, 1200), 21, 7332),
    ((3000, 2000), 25, 7362), ((50, 60), 2, 1373), ((300, 500), 3, 1998), ((900, 400), 7, 3726),
]


def _image(height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(height * 7 + width)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# --- the checkpoint and the family -------------------------------------------------------------------


def test_preset_is_a_onevision_checkpoint(tiny_llava_onevision_dir, hf_onevision):
    from transformers import AutoImageProcessor, AutoTokenizer

    config = hf_onevision.config
    assert config.model_type == "llava_onevision" and config.vision_config.model_type == "siglip_vision_model"
    assert config.text_config.model_type == "qwen2" and config.vision_aspect_ratio == "anyres_max_9"
    assert config.vision_feature_select_strategy == "full" and config.vision_feature_layer == -1
    assert config.vision_config.image_size == 384 and config.vision_config.patch_size == 14
    assert len(config.image_grid_pinpoints) == 36
    assert config.text_config.max_position_embeddings >= 8765 + 64  # the largest image seen below, plus text
    ip = AutoImageProcessor.from_pretrained(tiny_llava_onevision_dir)
    assert type(ip).__name__ == "LlavaOnevisionImageProcessorPil"
    assert list(ip.image_mean) == [0.5] * 3 and list(ip.image_std) == [0.5] * 3
    tok = AutoTokenizer.from_pretrained(tiny_llava_onevision_dir)
    assert tok.convert_tokens_to_ids("<video>") == config.video_token_id
    assert tok.convert_tokens_to_ids("<image>") == config.image_token_id
    files = {p.name for p in tiny_llava_onevision_dir.iterdir()}
    assert {"preprocessor_config.json", "processor_config.json", "chat_template.json", "tokenizer.json"} <= files
    assert json.loads((tiny_llava_onevision_dir / "processor_config.json").read_text())["num_image_tokens"] == 729
    assert float(hf_onevision.model.image_newline.detach().abs().sum()) > 0


def test_family_is_registered_and_describes_onevision(tiny_llava_onevision_dir, ov_loaded):
    from tokedge.export.families import inspect_checkpoint

    family, spec = inspect_checkpoint(str(tiny_llava_onevision_dir), tiny_llava_onevision_dir)
    assert family.name == "llava_onevision" and ov_loaded.family is family
    # a LLaVA-NeXT family underneath: work on that family's graphs applies to OneVision
    assert "LlavaNextFamily" in [cls.__name__ for cls in type(family).__mro__]
    layout = ov_loaded.spec.layout
    assert layout.kind == "anyres" and layout.tile == 384 and layout.patch_grid == 27 and layout.image_newline
    assert layout.max_tiles == 9 and layout.multi_image_square and layout.pad_fill == (127, 127, 127)
    assert layout.pinpoints[:3] == ((384, 384), (384, 768), (384, 1152)) and len(layout.pinpoints) == 36
    assert spec.geometry.patch_tokens == 729 and not spec.geometry.has_cls and spec.geometry.layers == 3
    assert spec.full_tokens == ov_loaded.full_tokens >= 8765


def test_family_reads_the_transformers_5_processor_files(tmp_path_factory, ov_loaded):
    """processor_config.json with the image processor nested in it and chat_template.jinja (what
    transformers 5 writes) load the same processor as the hub's three files."""
    from tokedge.export.families import load_checkpoint
    from tokedge.export.presets import TinyLlavaOnevisionConfig, build_tiny_llava_onevision

    nested = build_tiny_llava_onevision(tmp_path_factory.mktemp("ckpt") / "ov-nested",
                                        TinyLlavaOnevisionConfig(processor_files="nested"))
    files = {p.name for p in nested.iterdir()}
    assert "preprocessor_config.json" not in files and "chat_template.jinja" in files
    loaded = load_checkpoint(str(nested), nested)
    a, b = loaded.processor, ov_loaded.processor
    assert a.chat_template == b.chat_template and a.chat_template.startswith("{% for message in messages %}")
    assert (a.num_image_tokens, a.vision_aspect_ratio, a.image_token) == (729, "anyres_max_9", "<image>")
    assert a.image_processor.to_dict() == b.image_processor.to_dict()
    assert loaded.family.layout(loaded) == ov_loaded.family.layout(ov_loaded)
    assert loaded.family.preprocess(loaded) == ov_loaded.family.preprocess(ov_loaded)


def test_the_processor_chat_template_wins_over_the_tokenizer_one(tiny_llava_onevision_dir, ov_loaded, tmp_path):
    """Hub OneVision tokenizers may carry the plain Qwen2 template; the processor-level one is the
    model's (research doc, pitfall 11). Without a processor-level file the tokenizer's is used."""
    from tokedge.export.families import load_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llava_onevision_dir, ckpt)
    tok_config = json.loads((ckpt / "tokenizer_config.json").read_text())
    tokenizer_template = "{% for message in messages %}TOKENIZER {{ message['role'] }}{% endfor %}"
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**tok_config, "chat_template": tokenizer_template}))
    assert load_checkpoint(str(ckpt), ckpt).processor.chat_template == ov_loaded.processor.chat_template
    (ckpt / "chat_template.json").unlink()
    assert load_checkpoint(str(ckpt), ckpt).processor.chat_template == tokenizer_template


def test_the_preset_name_resolves_to_a_onevision_checkpoint():
    from tokedge.export.families import inspect_checkpoint
    from tokedge.export.pipeline import resolve_model

    path = resolve_model("tiny-llava-onevision")  # built once into the preset cache
    family, spec = inspect_checkpoint("tiny-llava-onevision", path)
    assert family.name == "llava_onevision" and spec.layout.max_tiles == 9


def _config(tiny_llava_onevision_dir) -> dict:
    return json.loads((tiny_llava_onevision_dir / "config.json").read_text())


@pytest.mark.parametrize("edit,fragment", [
    ({"vision_config": {"model_type": "clip_vision_model"}}, "unsupported vision tower 'clip_vision_model'"),
    ({"text_config": {"model_type": "gemma"}}, "unsupported language model 'gemma'"),
    ({"vision_aspect_ratio": "anyres"}, "vision_aspect_ratio 'anyres' is not supported"),
    ({"vision_aspect_ratio": "anyres_max_0"}, "vision_aspect_ratio 'anyres_max_0' is not supported"),
    ({"vision_aspect_ratio": "pad"}, "'anyres_max_<tiles>'"),
    ({"vision_feature_select_strategy": "default"}, "vision_feature_select_strategy 'default' is not supported"),
    ({"vision_feature_layer": [-2, -1]}, "multi-layer vision features"),
    ({"architectures": ["LlavaNextForConditionalGeneration"]}, "unsupported architecture"),
])
def test_inspect_refuses_what_it_cannot_export_in_one_line(tiny_llava_onevision_dir, edit, fragment):
    from tokedge.errors import UnsupportedModelError
    from tokedge.export.families import for_checkpoint

    config = _config(tiny_llava_onevision_dir)
    for key, value in edit.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    with pytest.raises(UnsupportedModelError) as err:
        for_checkpoint(config).inspect(config)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_cli_export_refuses_a_bad_aspect_ratio_in_one_line(tiny_llava_onevision_dir, tmp_path, capsys):
    from tokedge.cli import main

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llava_onevision_dir, ckpt)
    config = _config(ckpt)
    config["vision_aspect_ratio"] = "anyres_max_nine"
    (ckpt / "config.json").write_text(json.dumps(config))
    assert main(["export", str(ckpt), "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip()
    assert "vision_aspect_ratio 'anyres_max_nine'" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_load_refuses_a_processor_that_disagrees_with_the_model(tiny_llava_onevision_dir, tmp_path):
    from tokedge.errors import InputError
    from tokedge.export.families import load_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llava_onevision_dir, ckpt)
    fields = json.loads((ckpt / "processor_config.json").read_text())
    (ckpt / "processor_config.json").write_text(json.dumps({**fields, "vision_aspect_ratio": "anyres_max_4"}))
    with pytest.raises(InputError) as err:
        load_checkpoint(str(ckpt), ckpt)
    message = str(err.value)
    assert "vision_aspect_ratio is 'anyres_max_4'" in message and "'anyres_max_9'" in message and "\n" not in message


# --- layout: counts and pixels against transformers' processor --------------------------------------


@pytest.mark.parametrize("size,partitions,tokens", RESEARCH_TABLE)
def test_layout_counts_match_transformers_and_the_research_table(ov_loaded, size, partitions, tokens):
    """runtime/layout.py's plan == transformers' `_get_number_of_features` == the spec's table."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    from tokedge.runtime.layout import plan_image

    layout = ov_loaded.family.layout(ov_loaded).anyres()
    hf = ov_loaded.family.hf_processor(ov_loaded)
    plan = plan_image(layout, *size)
    assert hf._get_number_of_features(*size, 384, 384) == plan.tokens(layout) == tokens
    config = ov_loaded.model.config
    assert image_size_to_num_patches(size, config.image_grid_pinpoints, 384) == plan.partitions == partitions


def test_layout_counts_match_transformers_over_many_sizes(ov_loaded):
    """A sweep of sizes (both interpolation sides, thin images, the largest counts) and the bound."""
    from tokedge.runtime.layout import plan_image

    layout = ov_loaded.family.layout(ov_loaded).anyres()
    hf = ov_loaded.family.hf_processor(ov_loaded)
    largest = 0
    for height in range(30, 2700, 113):
        for width in range(30, 2700, 97):
            expected = hf._get_number_of_features(height, width, 384, 384)
            assert plan_image(layout, height, width).tokens(layout) == expected, (height, width)
            largest = max(largest, expected)
    assert hf._get_number_of_features(1187, 983, 384, 384) == 8765  # just under the shrink threshold
    assert largest <= 8765 <= ov_loaded.full_tokens


def test_the_largest_test_image_is_shrunk_bilinearly(ov_loaded):
    """2000x1500 exercises the anyres_max_9 interpolation (fractional pack weights), the others do not."""
    from tokedge.runtime.layout import pack_plan, plan_image

    layout = ov_loaded.family.layout(ov_loaded).anyres()
    for size in SIZES:
        plan = plan_image(layout, *size)
        _, weight = pack_plan(layout, plan)
        shrunk = plan.packed != plan.unpadded
        assert shrunk == (size == (1500, 2000)) == bool(np.any((weight > 0) & (weight < 1)))
    assert plan_image(layout, 1500, 2000).packed == (70, 93)


@pytest.mark.parametrize("size", SIZES)
def test_tiled_pixels_match_the_image_processor(ov_loaded, size):
    from tokedge.runtime.layout import anyres_inputs

    family, image = ov_loaded.family, _image(*size)
    inputs = anyres_inputs(image, family.layout(ov_loaded).anyres(), family.preprocess(ov_loaded))
    batch = ov_loaded.processor.image_processor([image], return_tensors="np")
    assert list(batch["batch_num_images"]) == [1]
    np.testing.assert_allclose(inputs.pixel_values, batch["pixel_values"][0, : inputs.pixel_values.shape[0]], atol=1e-6)
    assert not np.any(batch["pixel_values"][0, inputs.pixel_values.shape[0]:])  # only batch padding is left


def test_multi_image_prompts_are_padded_square_with_the_mean_colour(ov_loaded):
    """Images of a prompt with several images: one partition each (square, mean-colour padding),
    base + one newline = 730 tokens, as transformers' image processor and `replace_image_token`."""
    from tokedge.runtime.layout import anyres_inputs, plan_image

    family = ov_loaded.family
    layout, pre = family.layout(ov_loaded).anyres(), family.preprocess(ov_loaded)
    images = [_image(480, 640), _image(900, 300), _image(500, 500)]
    batch = ov_loaded.processor.image_processor([images], return_tensors="np")
    assert list(batch["batch_num_images"]) == [3]
    hf = family.hf_processor(ov_loaded)
    for i, image in enumerate(images):
        inputs = anyres_inputs(image, layout, pre, tiled=False)
        assert inputs.pixel_values.shape == (1, 3, 384, 384)
        np.testing.assert_allclose(inputs.pixel_values[0], batch["pixel_values"][i, 0], atol=1e-6)
        expected = len(hf.replace_image_token(batch, i)) // len("<image>")
        assert expected == inputs.tokens == plan_image(layout, *image.size[::-1], tiled=False).tokens(layout) == 730
    # the padding really is the mean grey: a 480x640 image leaves 80 rows above it in the square
    corner = anyres_inputs(images[0], layout, pre, tiled=False).pixel_values[0, :, 0, 0]
    np.testing.assert_allclose(corner, (127 / 255 - 0.5) / 0.5, atol=1e-6)


# --- the vision graph and the artifact ----------------------------------------------------------------


@pytest.fixture(scope="module")
def vision_session(ov_loaded, tmp_path_factory):
    import onnxruntime as ort

    from tokedge.export import onnx_export as ox
    from tokedge.reduce import get_method

    family = ov_loaded.family
    modules = family.modules(ov_loaded, get_method("none"), 0, {})
    model = ox.trace_to_ir(modules["vision"], family.vision_trace_spec(ov_loaded))
    ox.finish(model)
    where = tmp_path_factory.mktemp("ov-vision")
    file, _ = ox.save_graph(model, where, "vision", 1 << 40)
    return ort.InferenceSession(str(where / file), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("size", SIZES)
def test_vision_graph_matches_transformers_features(ov_loaded, hf_onevision, vision_session, size):
    """ONNX Runtime on the runtime's preprocessing and packing plan == transformers' image processor
    + get_image_features (SigLIP at layer -1, projector, unpadding, bilinear shrink, newlines)."""
    import torch

    from tokedge.runtime.layout import anyres_inputs

    family, image = ov_loaded.family, _image(*size)
    inputs = anyres_inputs(image, family.layout(ov_loaded).anyres(), family.preprocess(ov_loaded))
    (embeds,) = vision_session.run(None, {"pixel_values": inputs.pixel_values, "pack_index": inputs.pack_index,
                                          "pack_weight": inputs.pack_weight})
    batch = ov_loaded.processor.image_processor([image], return_tensors="pt")
    with torch.no_grad():
        out = hf_onevision.model.get_image_features(batch["pixel_values"].float(), batch["image_sizes"],
                                                vision_feature_layer=-1, vision_feature_select_strategy="full",
                                                vision_aspect_ratio="anyres_max_9")
    expected = out.pooler_output[0].numpy()
    assert embeds.shape == (1, *expected.shape)
    np.testing.assert_allclose(embeds[0], expected, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def ov_artifact(ov_artifacts):
    return ov_artifacts("none")[0]  # exported once per session, shared with the method and video tests


def test_manifest_records_the_onevision_layout(ov_artifact):
    from tokedge.artifact import FORMAT_VERSION, load_artifact
    from tokedge.runtime.layout import AnyresLayout

    raw = json.loads((ov_artifact / "tokedge.json").read_text())
    assert raw["format_version"] == 2 <= FORMAT_VERSION and raw["model"]["family"] == "llava_onevision"
    layout = raw["layout"]
    assert layout["kind"] == "anyres" and layout["max_tiles"] == 9 and layout["interpolate_threshold"] == 1.1
    assert layout["multi_image_square"] is True and layout["pad_fill"] == [127, 127, 127]
    assert layout["image_newline"] is True and len(layout["pinpoints"]) == 36
    assert raw["preprocess"]["image_mean"] == [0.5] * 3 and raw["preprocess"]["resize_size"] == [384, 384]
    assert raw["prompt"]["chat_template"].startswith("{% for message in messages %}")
    runtime = load_artifact(ov_artifact).layout.anyres()
    assert runtime == AnyresLayout(tile=384, patch_grid=27, pinpoints=runtime.pinpoints, max_tiles=9,
                                   multi_image_square=True, pad_fill=(127, 127, 127))


def _generate_reference(ov_loaded, hf_onevision, images: list, text: str):
    """transformers: prefill logits at the last position and greedy tokens, on its own inputs."""
    import torch

    batch = ov_loaded.family.reference_batch(ov_loaded, [images], [text])
    with torch.no_grad():
        logits = hf_onevision(**batch).logits[0, -1].numpy()
        tokens = hf_onevision.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)[0, batch["input_ids"].shape[1]:]
    return batch, logits, tokens.tolist()


@pytest.mark.slow  # ~50 s: transformers' forward and generate on up to 7.4k-token prompts
@pytest.mark.parametrize("size", SIZES)
def test_none_matches_transformers_generate(ov_loaded, hf_onevision, ov_artifact, size):
    """`--method none` greedy generation == LlavaOnevisionForConditionalGeneration.generate token for
    token, and prefill logits within 1e-3, on the runtime's own preprocessing, chat template, prompt
    expansion and packing (ONNX Runtime, no torch on that path)."""
    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.runtime.layout import anyres_inputs
    from tokedge.runtime.pipeline import Pipeline

    image = _image(*size)
    text = ov_loaded.family.render_prompt(ov_loaded, QUESTION)
    batch, expected_logits, expected = _generate_reference(ov_loaded, hf_onevision, [image], text)
    with Pipeline.load(ov_artifact) as pipe:
        result = pipe.generate(image, QUESTION, max_new_tokens=NEW_TOKENS)
        inputs = [anyres_inputs(image, pipe.manifest.layout.anyres(), pipe.manifest.preprocess)]
        enc = pipe.encoder.encode([QUESTION], [inputs[0].tokens])
        np.testing.assert_array_equal(enc.input_ids[0], batch["input_ids"][0].numpy())
        gen = generate(pipe.graphs, inputs, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=1))
    assert result.token_ids[0] == expected
    assert result.visual_tokens == inputs[0].tokens
    np.testing.assert_allclose(gen.prefill_logits[0], expected_logits, atol=1e-3, rtol=0)


def test_a_batch_of_one_image_prompts_matches_transformers(ov_loaded, hf_onevision, ov_artifact):
    """Two prompts with one image each, of different sizes (different partition and token counts,
    left padding; transformers: batch_num_images [1, 1], pixel_values padded to the larger P)."""
    import torch

    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.runtime.layout import anyres_inputs
    from tokedge.runtime.pipeline import Pipeline

    images = [_image(480, 640), _image(900, 300)]
    questions = [QUESTION, "Describe the picture in detail."]
    texts = [ov_loaded.family.render_prompt(ov_loaded, q) for q in questions]
    batch = ov_loaded.family.reference_batch(ov_loaded, [[image] for image in images], texts)
    assert batch["batch_num_images"].tolist() == [1, 1] and batch["pixel_values"].shape[1] == 5
    with torch.no_grad():
        expected_logits = hf_onevision(**batch).logits[:, -1].numpy()
        out = hf_onevision.generate(**batch, max_new_tokens=6, do_sample=False)[:, batch["input_ids"].shape[1]:]
    with Pipeline.load(ov_artifact) as pipe:
        result = pipe.generate(images, questions, max_new_tokens=6)
        eos = set(pipe.manifest.model.eos_token_ids)
        inputs = [anyres_inputs(image, pipe.manifest.layout.anyres(), pipe.manifest.preprocess) for image in images]
        assert [i.tokens for i in inputs] == [2929, 2997]
        enc = pipe.encoder.encode(questions, [i.tokens for i in inputs])
        np.testing.assert_array_equal(enc.input_ids, batch["input_ids"].numpy())  # left padding included
        gen = generate(pipe.graphs, inputs, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=1))
    np.testing.assert_allclose(gen.prefill_logits, expected_logits, atol=1e-3, rtol=0)
    for row, expected in zip(result.token_ids, out.tolist()):  # the runtime drops EOS; transformers pads after it
        cut = next((i for i, t in enumerate(expected) if t in eos), len(expected))
        assert row == expected[:cut]


def test_two_image_prompt_matches_transformers(ov_loaded, hf_onevision, ov_artifact, tmp_path, capsys):
    """`tokedge run --image a --image b --prompt q` (one prompt, two images: OneVision pads each
    square, untiled, 730 tokens each) == transformers' generate on its own processor's inputs
    (nested image list, batch_num_images [2]); prefill logits within 1e-3."""
    from tokedge.cli import main
    from tokedge.runtime.pipeline import Pipeline

    images = [_image(480, 640), _image(900, 300)]
    question = "Compare the two images."
    text = ov_loaded.family.render_images_prompt(ov_loaded, question, images=2)
    batch, expected_logits, expected = _generate_reference(ov_loaded, hf_onevision, images, text)
    assert batch["batch_num_images"].tolist() == [2] and batch["pixel_values"].shape[:2] == (2, 1)  # untiled
    paths = []
    for i, image in enumerate(images):
        paths += ["--image", str(tmp_path / f"{i}.png")]
        image.save(tmp_path / f"{i}.png")
    assert main(["run", str(ov_artifact), *paths, "--prompt", question, "--max-new-tokens", str(NEW_TOKENS),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["visual_tokens"] == 2 * 730
    assert out["token_ids"] == expected
    with Pipeline.load(ov_artifact) as pipe:
        enc = pipe.encoder.encode([question], [[730, 730]])
        np.testing.assert_array_equal(enc.input_ids[0], batch["input_ids"][0].numpy())
        from tokedge.runtime.generate import SamplingConfig, generate
        from tokedge.layouts import prompt_inputs

        gen = generate(pipe.graphs, prompt_inputs(pipe.manifest, images), enc.input_ids, enc.attention_mask,
                       SamplingConfig(max_new_tokens=1), images_per_row=[2])
    np.testing.assert_allclose(gen.prefill_logits[0], expected_logits, atol=1e-3, rtol=0)


def test_verify_replays_the_recorded_cases(ov_artifact):
    """Export recorded transformers' outputs for two example images; verify replays and passes."""
    from tokedge.verify import verify

    report = verify(ov_artifact)
    assert report.ok and len(report.cases) == 2
    assert all(c.tokens_match and c.max_abs_prefill_logits < 1e-3 for c in report.cases)


def test_cli_runs_onevision_and_refuses_what_cannot_apply(ov_artifact, tiny_llava_onevision_dir, tmp_path, capsys):
    """`tokedge run --json` reports the image's own token count; CLS methods and methods without a
    per-image meaning on tiles are refused at export in one line each, before anything is written
    (the method rules: tests/export/test_onevision_methods.py)."""
    from tokedge.cli import main

    image = tmp_path / "photo.png"
    _image(480, 640).save(image)
    assert main(["run", str(ov_artifact), "--image", str(image), "--prompt", QUESTION, "--max-new-tokens", "3",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["visual_tokens"] == 2929 and len(out["token_ids"]) == 3  # 729 + 40 rows x (54 + 1) for 640x480
    refusals = [
        (["export", str(tiny_llava_onevision_dir), "--method", "cls-attn", "--budget", "64", "--out",
          str(tmp_path / "x")], "SigLIP tower has none"),
        (["export", str(tiny_llava_onevision_dir), "--method", "pool", "--budget", "64", "--out",
          str(tmp_path / "x")], "pools one square patch grid and a tiled image has none"),
        (["run", str(ov_artifact), "--image", str(image), "--prompt", "hi", "--budget", "64"], "drop --budget"),
    ]
    for args, fragment in refusals:
        assert main(args) != 0
        err = capsys.readouterr().err.strip()
        assert fragment in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()
