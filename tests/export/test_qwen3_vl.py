"""Qwen3-VL `--method none` end to end: ONE artifact exported from the tiny random-weight checkpoint
(real Qwen2Tokenizer, PIL Qwen2-VL image processor with Qwen3-VL's settings, chat template), then
`tokedge run` against transformers' `Qwen3VLForConditionalGeneration.generate` (its own image
processor, `mm_token_type_ids` given so it uses M-RoPE): greedy tokens equal, prefill and step
logits within 1e-3, on 448x448, 300x900, 1000x750 and a two-image prompt. The graphs alone: the
vision tower with its learned-position interpolation and DeepStack levels against transformers',
and checks that DeepStack and the interleaved M-RoPE axes do change the logits (the parity could
not hold by accident)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tokedge.runtime import qwen_vl

STEPS = 8
QUESTION = "Describe the picture."
CASES = {"448x448": [(448, 448)], "300x900": [(300, 900)], "1000x750": [(1000, 750)],
         "two-images": [(448, 448), (300, 900)]}


def _image(width, height, seed):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def _images(name):
    return [_image(w, h, seed=i + 1) for i, (w, h) in enumerate(CASES[name])]


@pytest.fixture(scope="module")
def qwen3_art(tiny_qwen3_vl_dir, tmp_path_factory):
    """One export of the tiny Qwen3-VL checkpoint with --method none (validated at export)."""
    from tokedge.export.pipeline import ExportConfig, export

    out = tmp_path_factory.mktemp("qwen3-art") / "art"
    result = export(ExportConfig(model=str(tiny_qwen3_vl_dir), out=out, method="none"))
    assert result.parity["ok"]
    return out


@pytest.fixture(scope="module")
def hf_qwen3(tiny_qwen3_vl_dir):
    """transformers' model (eager), tokenizer and image processor, loaded from the user's directory."""
    import torch
    from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_qwen3_vl_dir, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    return (model, AutoTokenizer.from_pretrained(tiny_qwen3_vl_dir),
            Qwen2VLImageProcessorPil.from_pretrained(tiny_qwen3_vl_dir))


def _reference(hf, images):
    """transformers alone: the chat template, each `<|image_pad|>` expanded to its grid's count
    (as Qwen3VLProcessor does), generate with its own pixels. -> (input_ids [1, L], tokens and the
    logits of every step with min_new_tokens = STEPS, the tokens up to and including the first EOS)."""
    import torch

    model, tok, processor = hf
    batch = processor(images=images, return_tensors="pt")
    counts = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": QUESTION}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    parts = text.split("<|image_pad|>")
    text = parts[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, parts[1:]))
    input_ids = torch.tensor([tok(text)["input_ids"]])
    kwargs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "mm_token_type_ids": (input_ids == model.config.image_token_id).long(),
              "pixel_values": batch["pixel_values"], "image_grid_thw": batch["image_grid_thw"]}
    with torch.no_grad():
        out = model.generate(**kwargs, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, input_ids.shape[1]:].tolist()
    eos = set(model.generation_config.eos_token_id)
    stop = next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))
    return input_ids.numpy(), tokens, torch.cat(out.logits).numpy(), tokens[:stop]


@pytest.mark.parametrize("case", list(CASES))
def test_run_equals_transformers_generate(qwen3_art, hf_qwen3, case, tmp_path, capsys):
    """`tokedge run` greedy == generate token for token; the runtime's prefill and step logits
    (its own preprocessing, prompt, M-RoPE positions) within 1e-3 of generate's."""
    from tokedge.cli import main
    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.layouts import prompt_inputs
    from tokedge.runtime.pipeline import Pipeline

    images = _images(case)
    ref_ids, ref_tokens, ref_logits, ref_plain = _reference(hf_qwen3, images)
    paths = []
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
        paths += ["--image", str(tmp_path / f"{i}.png")]
    assert main(["run", str(qwen3_art), *paths, "--prompt", QUESTION, "--max-new-tokens", str(STEPS), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["token_ids"] == ref_plain  # greedy, stopping where generate stops
    assert out["visual_tokens"] == int((ref_ids == hf_qwen3[0].config.image_token_id).sum())

    with Pipeline.load(qwen3_art) as pipe:
        inputs = prompt_inputs(pipe.manifest, images)
        enc = pipe.encoder.encode([QUESTION], [[x.tokens for x in inputs]])
        gen = generate(pipe.graphs, inputs, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=STEPS),
                       stop_at_eos=False, keep_logits=True, images_per_row=[len(images)])
    np.testing.assert_array_equal(enc.input_ids, ref_ids)  # same prompt, same placeholder counts
    logits = np.stack([gen.prefill_logits[0], *[s[0] for s in gen.step_logits]])[:STEPS]
    assert np.abs(logits[0] - ref_logits[0]).max() < 1e-3  # prefill
    assert gen.token_ids[0] == ref_tokens
    assert np.abs(logits - ref_logits).max() < 1e-3  # every decode step, positions last + 1


def _sessions(art):
    import onnxruntime as ort

    return {name: ort.InferenceSession(str(art / f"{name}.onnx"), providers=["CPUExecutionProvider"])
            for name in ("vision", "embed", "decoder")}


def _vision_feed(image, manifest_layout, preprocess):
    return qwen_vl.image_inputs(image, manifest_layout, preprocess).feed({"interp_index"})


def test_vision_graph_equals_transformers_tower(qwen3_art, hf_qwen3):
    """The vision graph alone on a non-square grid (1000x750 -> 46 x 62 patches): the merged
    features and every DeepStack level (packed after them) equal transformers' `get_image_features`;
    the numpy pixels equal its image processor's."""
    import torch

    from tokedge.artifact import read_manifest

    model, _, processor = hf_qwen3
    manifest = read_manifest(qwen3_art)
    image = _image(1000, 750, seed=9)
    batch = processor(images=[image], return_tensors="pt")
    with torch.no_grad():
        ref = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
    feed = _vision_feed(image, manifest.layout, manifest.preprocess)
    np.testing.assert_allclose(feed["pixel_values"], batch["pixel_values"].numpy(), atol=1e-5, rtol=0)
    (packed,) = _sessions(qwen3_art)["vision"].run(None, feed)
    hidden = model.config.text_config.hidden_size
    assert packed.shape == (23 * 31, 3 * hidden)  # features, then two DeepStack levels
    np.testing.assert_allclose(packed[:, :hidden], ref.pooler_output[0].numpy(), atol=1e-4, rtol=0)
    assert len(ref.deepstack_features) == 2
    for level, plane in enumerate(ref.deepstack_features):
        got = packed[:, (level + 1) * hidden:(level + 2) * hidden]
        np.testing.assert_allclose(got, plane[0].numpy(), atol=1e-4, rtol=0)  # one image


def test_deepstack_planes_and_interleaved_axes_change_the_logits(qwen3_art, hf_qwen3):
    """Dropping the DeepStack planes, or exchanging the h and w position rows (which interleaving
    spreads over all frequencies), moves the prefill logits far beyond the 1e-3 tolerance; the
    embed graph gives text tokens zero planes."""
    from tokedge.artifact import read_manifest

    model, tok, _ = hf_qwen3
    manifest = read_manifest(qwen3_art)
    sessions = _sessions(qwen3_art)
    inputs = qwen_vl.image_inputs(_image(448, 448, seed=3), manifest.layout, manifest.preprocess)
    (feat,) = sessions["vision"].run(None, inputs.feed({"interp_index"}))
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
                                   add_generation_prompt=True, tokenize=False)
    ids = np.asarray([tok(text.replace("<|image_pad|>", "<|image_pad|>" * len(feat)))["input_ids"]], np.int64)
    image = ids == model.config.image_token_id
    (x,) = sessions["embed"].run(None, {"input_ids": ids})
    hidden = model.config.text_config.hidden_size
    assert x.shape[-1] == 3 * hidden and not x[..., hidden:].any()
    x[image] = feat
    pos, _ = qwen_vl.rope_index(image.astype(np.int64), inputs.grid[None])
    tcfg = model.config.text_config
    past = {f"past_key_values.{i}.{k}": np.zeros((1, tcfg.num_key_value_heads, 0, tcfg.head_dim), np.float32)
            for i in range(tcfg.num_hidden_layers) for k in ("key", "value")}

    def prefill(embeds, positions):
        return sessions["decoder"].run(None, {"inputs_embeds": embeds, "attention_mask": np.ones(ids.shape, np.int64),
                                              "position_ids": positions, **past})[0][0, -1]

    base = prefill(x, pos)
    flat = x.copy()
    flat[..., hidden:] = 0  # no DeepStack planes
    assert np.abs(prefill(flat, pos) - base).max() > 1e-2
    assert np.abs(prefill(x, pos[[0, 2, 1]]) - base).max() > 1e-2


def test_manifest_records_the_qwen3_layout(qwen3_art):
    from tokedge.artifact import read_manifest

    manifest = read_manifest(qwen3_art)
    layout = manifest.layout
    assert manifest.model.family == "qwen3_vl" and manifest.format_version == 3
    assert (layout.kind, layout.patch_size, layout.window_size, layout.mrope_interleaved) == \
        ("dynamic_patches", 16, None, True)
    assert (layout.position_table, layout.deepstack_levels, layout.mrope_section) == (12, 2, (6, 5, 5))
    assert manifest.graphs["decoder"].input("inputs_embeds").shape[-1] == 3 * manifest.model.hidden_size


def test_methods_that_cannot_apply_are_refused_in_one_line(tiny_qwen3_vl_dir, tmp_path):
    """tome merges inside the tower (the PatchMerger's fixed 2x2 groups, every DeepStack level's too);
    refused before any weights load, nothing written."""
    from tokedge.errors import UsageError
    from tokedge.export.pipeline import ExportConfig, export

    with pytest.raises(UsageError) as err:
        export(ExportConfig(model=str(tiny_qwen3_vl_dir), out=tmp_path / "art", method="tome", budget=64))
    assert "\n" not in str(err.value) and "Qwen3-VL" in str(err.value) and "PatchMerger" in str(err.value)
    assert not (tmp_path / "art").exists()
    with pytest.raises(UsageError) as err:  # diversity over packed DeepStack rows: not defined yet
        export(ExportConfig(model=str(tiny_qwen3_vl_dir), out=tmp_path / "art", method="vispruner", keep=0.5))
    assert "\n" not in str(err.value) and "DeepStack" in str(err.value) and "divprune" in str(err.value)
    assert not (tmp_path / "art").exists()


def _hub_config(**vision):
    """A config.json as the Qwen3-VL-4B-Instruct hub checkpoint writes it (sizes from its file; no weights)."""
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
        "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
        "vision_end_token_id": 151653, "tie_word_embeddings": True,
        "text_config": {"model_type": "qwen3_vl_text", "hidden_size": 2560, "num_hidden_layers": 36,
                        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                        "rope_scaling": {"rope_type": "default", "mrope_section": [24, 20, 20],
                                         "mrope_interleaved": True}, "rope_theta": 5000000},
        "vision_config": {"model_type": "qwen3_vl", "depth": 24, "hidden_size": 1024, "num_heads": 16,
                          "out_hidden_size": 2560, "patch_size": 16, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "num_position_embeddings": 2304,
                          "deepstack_visual_indexes": [5, 11, 17], **vision},
    }


def test_hub_config_is_inspected_from_the_file_alone():
    from tokedge.export.families import for_checkpoint

    cfg = _hub_config()
    family = for_checkpoint(cfg)
    spec = family.inspect(cfg)
    layout = spec.layout
    assert (spec.family, spec.text_layers, spec.full_tokens) == ("qwen3_vl", 36, 16777216 // 32**2)
    assert (layout.patch_size, layout.window_size, layout.mrope_section, layout.mrope_interleaved) == \
        (16, None, (24, 20, 20), True)
    assert (layout.position_table, layout.deepstack_levels) == (48, 3)


@pytest.mark.parametrize("vision, words", [({"num_position_embeddings": 2300}, "not a square"),
                                           ({"deepstack_visual_indexes": [5, 30]}, "deepstack_visual_indexes")])
def test_configs_tokedge_cannot_export_are_refused_in_one_line(vision, words):
    from tokedge.errors import UnsupportedModelError
    from tokedge.export.families import for_checkpoint

    cfg = _hub_config(**vision)
    with pytest.raises(UnsupportedModelError) as err:
        for_checkpoint(cfg).inspect(cfg)
    assert words in str(err.value) and "\n" not in str(err.value)
