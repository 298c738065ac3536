"""LLaVA-NeXT (anyres): the tiny preset checkpoint and the family's vision graph, against
transformers' own processor and model (the independent reference)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

SIZES = [(480, 640), (900, 300), (1000, 1000)]  # (height, width): 640x480, 300x900, 1000x1000


def _image(height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(height * 7 + width)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def hf_next(tiny_llava_next_dir):
    import torch
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_llava_next_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_llava_next_dir)


def test_preset_is_a_llava_next_checkpoint(tiny_llava_next_dir, hf_next):
    from tokedge.export.presets import NEXT_PINPOINTS

    model, processor = hf_next
    assert type(processor).__name__ == "LlavaNextProcessor"
    assert [tuple(p) for p in processor.image_processor.image_grid_pinpoints] == list(NEXT_PINPOINTS)
    assert model.config.text_config.max_position_embeddings >= 4096
    assert model.config.vision_config.image_size == 336 and model.config.vision_config.patch_size == 14
    assert (tiny_llava_next_dir / "tokenizer.json").is_file()
    assert float(model.model.image_newline.detach().abs().sum()) > 0  # initialised, not left empty


@pytest.mark.parametrize("size", SIZES)
def test_layout_counts_match_the_processor(hf_next, size):
    """runtime/layout.py's plan for the preset's layout gives the processor's placeholder count and
    its partition count."""
    from tokedge.runtime.layout import AnyresLayout, plan_image

    model, processor = hf_next
    layout = AnyresLayout(tile=336, patch_grid=24,
                          pinpoints=tuple(tuple(p) for p in model.config.image_grid_pinpoints))
    batch = processor(images=[_image(*size)], text=["<image>"], return_tensors="np")
    expected = int((batch["input_ids"][0] == model.config.image_token_id).sum())
    plan = plan_image(layout, *size)
    assert plan.tokens(layout) == expected
    assert plan.partitions == batch["pixel_values"].shape[1]


@pytest.fixture(scope="module")
def next_loaded(tiny_llava_next_dir):
    from tokedge.export.families import load_checkpoint

    return load_checkpoint(str(tiny_llava_next_dir), tiny_llava_next_dir)


@pytest.fixture(scope="module")
def vision_session(next_loaded, tmp_path_factory):
    """The family's vision graph traced to ONNX and opened in ONNX Runtime."""
    import onnxruntime as ort

    from tokedge.export import onnx_export as ox
    from tokedge.reduce import get_method

    family = next_loaded.family
    modules = family.modules(next_loaded, get_method("none"), 0, {})
    model = ox.trace_to_ir(modules["vision"], family.vision_trace_spec(next_loaded))
    ox.finish(model)
    where = tmp_path_factory.mktemp("next-vision")
    file, _ = ox.save_graph(model, where, "vision", 1 << 40)
    return ort.InferenceSession(str(where / file), providers=["CPUExecutionProvider"])


def test_family_is_registered_and_describes_anyres(tiny_llava_next_dir, next_loaded):
    from tokedge.export.families import inspect_checkpoint
    from tokedge.export.presets import NEXT_PINPOINTS

    family, spec = inspect_checkpoint(str(tiny_llava_next_dir), tiny_llava_next_dir)
    assert family.name == "llava_next" and next_loaded.family is family
    assert spec.layout.kind == "anyres" and spec.layout.pinpoints == NEXT_PINPOINTS
    assert spec.layout.tile == 336 and spec.layout.patch_grid == 24 and spec.layout.image_newline
    assert spec.full_tokens == 576 + 48 * 49  # base + the 672x672 map (48 x 48) with a newline per row


@pytest.mark.parametrize("name,fragment", [
    ("tome", "use --method visionzip"), ("pool", "use --method cls-attn or hired"),
    ("vispruner", "use --method divprune"),
])
def test_methods_without_a_tiled_definition_are_refused_with_a_reason(next_loaded, name, fragment):
    from tokedge.errors import UsageError
    from tokedge.reduce import get_method

    with pytest.raises(UsageError, match=rf"--method {name} .*{fragment}"):
        next_loaded.family.modules(next_loaded, get_method(name), 64, {})


@pytest.mark.parametrize("size", SIZES)
def test_vision_graph_matches_transformers_features(next_loaded, hf_next, vision_session, size):
    """ONNX Runtime on the runtime's own preprocessing and packing plan == transformers'
    processor + get_image_features (tower, projector, pack_image_features with image_newline)."""
    import torch

    from tokedge.runtime.layout import anyres_inputs

    model, processor = hf_next
    image = _image(*size)
    family = next_loaded.family
    inputs = anyres_inputs(image, family.layout(next_loaded).anyres(), family.preprocess(next_loaded))
    batch = processor.image_processor([image], return_tensors="np")
    np.testing.assert_allclose(inputs.pixel_values, batch["pixel_values"][0, : inputs.pixel_values.shape[0]],
                               atol=1e-6)
    (embeds,) = vision_session.run(None, {"pixel_values": inputs.pixel_values, "pack_index": inputs.pack_index,
                                          "pack_weight": inputs.pack_weight})
    with torch.no_grad():
        out = model.model.get_image_features(torch.from_numpy(batch["pixel_values"]),
                                             torch.from_numpy(batch["image_sizes"]),
                                             vision_feature_layer=-2, vision_feature_select_strategy="default")
    expected = out.pooler_output[0].numpy()
    assert embeds.shape == (1, *expected.shape)
    np.testing.assert_allclose(embeds[0], expected, atol=1e-4, rtol=1e-4)


QUESTION = "What is shown in this image?"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def next_artifact(tiny_llava_next_dir, tmp_path_factory):
    from tokedge.export.pipeline import ExportConfig, export

    out = tmp_path_factory.mktemp("next-art") / "art"
    export(ExportConfig(model=str(tiny_llava_next_dir), out=out, method="none"))
    return out


def test_anyres_manifest_is_format_2(next_artifact):
    import json

    from tokedge.artifact import FORMAT_VERSION, load_artifact

    raw = json.loads((next_artifact / "tokedge.json").read_text())
    assert raw["format_version"] == 2 <= FORMAT_VERSION  # tiled layouts stay readable by format-2 readers
    assert raw["layout"]["kind"] == "anyres" and raw["model"]["family"] == "llava_next"
    assert load_artifact(next_artifact).layout.anyres().pinpoints[0] == (336, 672)


@pytest.mark.parametrize("size", SIZES)
def test_none_matches_transformers_generate(next_artifact, hf_next, size):
    """`--method none` greedy generation == LlavaNextForConditionalGeneration.generate token for
    token, and prefill logits within 1e-3, on the runtime's own preprocessing, prompt expansion
    and packing (ONNX Runtime, no torch on that path)."""
    import torch

    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.runtime.layout import anyres_inputs
    from tokedge.runtime.pipeline import Pipeline

    model, processor = hf_next
    image = _image(*size)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    batch = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        expected_logits = model(**batch).logits[0, -1].numpy()
        expected = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)[0, batch["input_ids"].shape[1]:]

    with Pipeline.load(next_artifact) as pipe:
        result = pipe.generate(image, QUESTION, max_new_tokens=NEW_TOKENS)
        inputs = [anyres_inputs(image, pipe.manifest.layout.anyres(), pipe.manifest.preprocess)]
        enc = pipe.encoder.encode([QUESTION], [inputs[0].tokens])
        np.testing.assert_array_equal(enc.input_ids[0], batch["input_ids"][0].numpy())
        gen = generate(pipe.graphs, inputs, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=1))
    assert result.token_ids[0] == expected.tolist()
    assert result.visual_tokens == inputs[0].tokens
    np.testing.assert_allclose(gen.prefill_logits[0], expected_logits, atol=1e-3, rtol=0)


def test_verify_replays_the_recorded_anyres_cases(next_artifact):
    """Export records one transformers case per example image (the image itself, so the runtime
    replays its own preprocessing and plan); verify passes on them."""
    from tokedge.verify import verify

    report = verify(next_artifact)
    assert report.ok and len(report.cases) == 2
    assert all(c.tokens_match and c.max_abs_prefill_logits < 1e-3 for c in report.cases)


def test_cli_runs_anyres_and_refuses_what_it_cannot_do(next_artifact, tiny_llava_next_dir, tmp_path, capsys):
    """`tokedge run --json` reports the image's own token count; --budget and reduction methods
    are refused in one line each (profile and serve take anyres artifacts: tests/report,
    tests/serve/test_serve_anyres.py)."""
    import json

    from tokedge.cli import main

    image = tmp_path / "photo.png"
    _image(480, 640).save(image)
    assert main(["run", str(next_artifact), "--image", str(image), "--prompt", QUESTION, "--max-new-tokens", "3",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["visual_tokens"] == 2340 and len(out["token_ids"]) == 3  # 576 + 36 rows x (48 + 1) for 640x480
    refusals = [
        (["run", str(next_artifact), "--image", str(image), "--prompt", "hi", "--budget", "64"], "drop --budget"),
        (["export", str(tiny_llava_next_dir), "--method", "pool", "--budget", "64", "--out", str(tmp_path / "x")],
         "use --method cls-attn or hired"),
    ]
    for args, fragment in refusals:
        assert main(args) != 0
        err = capsys.readouterr().err.strip()
        assert fragment in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists()
