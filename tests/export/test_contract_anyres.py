"""The artifact contract for tiled ("anyres") layouts: `tests/contract_client.py`, written from
docs/artifact.md alone, plans LLaVA-NeXT images itself (partitions, packing plan, placeholder
expansion), runs the graphs and decodes greedily; its tokens equal `tokedge run` on one image and
transformers' `LlavaNextForConditionalGeneration.generate` on a prompt with two images. Reduced
artifacts (hired, globalcom2: candidate plan, `base_tile`, the thumbnail guide; fastv: `image_keep`) equal `tokedge run`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.contract_client import ContractClient

QUESTION = "What is shown in this image?"
SIZES = [(480, 640), (900, 300), (1000, 1000)]  # (height, width): 640x480, 300x900, 1000x1000
NEW_TOKENS = 10


def _image(height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(height * 11 + width)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _until_eos(tokens, eos) -> list[int]:
    out = []
    for t in tokens:
        if t in eos:
            break
        out.append(int(t))
    return out


@pytest.fixture(scope="module")
def next_artifact(artifacts, tiny_llava_next_dir):
    return artifacts("none", checkpoint=tiny_llava_next_dir)


@pytest.fixture(scope="module")
def client(next_artifact):
    return ContractClient(next_artifact)


@pytest.fixture(scope="module")
def hf_next(tiny_llava_next_dir):
    import torch
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_llava_next_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_llava_next_dir)


@pytest.mark.parametrize("size", SIZES)
def test_contract_client_plans_a_tiled_image_like_transformers_and_runs_like_tokedge(
        client, next_artifact, hf_next, size, tmp_path, capsys):
    from tokedge.cli import main

    model, processor = hf_next
    image = _image(*size)
    pixel_values, index, _ = client.plan_tiled(image)
    batch = processor(images=[image], text=[processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True)], return_tensors="np")
    # the client's partitions are the processor's; its token count is the processor's expansion
    np.testing.assert_allclose(pixel_values, batch["pixel_values"][0, : len(pixel_values)], atol=1e-6)
    assert len(index) == int((batch["input_ids"][0] == model.config.image_token_id).sum())
    logits, tokens, ids = client.run([image], QUESTION, NEW_TOKENS)
    np.testing.assert_array_equal(ids[0], batch["input_ids"][0])
    import torch

    with torch.no_grad():
        expected_logits = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits[0, -1].numpy()
    np.testing.assert_allclose(logits[0], expected_logits, atol=1e-3, rtol=0)
    path = tmp_path / "image.png"
    image.save(path)
    assert main(["run", str(next_artifact), "--image", str(path), "--prompt", QUESTION, "--max-new-tokens",
                 str(NEW_TOKENS), "--json"]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    eos = set(client.manifest["model"]["eos_token_ids"])
    assert _until_eos(tokens[0], eos) == expected["token_ids"]
    assert expected["visual_tokens"] == len(index)


def test_contract_client_runs_two_images_in_one_prompt_like_transformers(client, hf_next):
    """Two images of different sizes in one prompt: each placeholder expands to its own image's
    count and takes its own embeddings, in order (the runtime's multi-image support lands on
    another branch; transformers is the reference here)."""
    import torch

    model, processor = hf_next
    images = [_image(480, 640), _image(900, 300)]
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare the two images."}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    batch = processor(images=images, text=[text], return_tensors="pt")
    with torch.no_grad():
        expected_logits = model(**batch).logits[0, -1].numpy()
        expected = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)[0, batch["input_ids"].shape[1]:]
    logits, tokens, ids = client.run(images, "Compare the two images.", NEW_TOKENS)
    np.testing.assert_array_equal(ids[0], batch["input_ids"][0].numpy())
    counts = [len(client.plan_tiled(image)[1]) for image in images]
    assert counts[0] != counts[1] and sum(counts) == int((ids[0] == model.config.image_token_id).sum())
    eos = set(client.manifest["model"]["eos_token_ids"])
    assert _until_eos(tokens[0], eos) == _until_eos(expected.tolist(), eos)
    np.testing.assert_allclose(logits[0], expected_logits, atol=1e-3, rtol=0)


@pytest.mark.parametrize("size", [(1600, 1200), (2000, 3000), (400, 300), (100, 1000)])
def test_contract_packing_plan_matches_onevision_packing(size):
    """The documented plan with `max_tiles` (OneVision's `anyres_max_9`: unpadding, then bilinear
    interpolation of large maps), as the contract client computes it, applied to random partition
    features == transformers' `LlavaOnevisionModel.pack_image_features` (no OneVision artifact
    needed: the plan is a function of the image size and the layout)."""
    from types import SimpleNamespace

    import torch
    from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

    pins = [[a * 384, b * 384] for a in range(1, 7) for b in range(1, 7)]
    client = ContractClient.__new__(ContractClient)
    client.manifest = {"preprocess": {"resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
                                      "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}}
    client.layout = {"kind": "anyres", "tile": 384, "patch_grid": 27, "pinpoints": pins, "max_tiles": 9,
                     "interpolate_threshold": 1.1, "multi_image_square": True, "pad_fill": [0, 0, 0]}
    height, width = size
    pixel_values, index, weight = client.plan_tiled(_image(height, width))
    parts = len(pixel_values)
    rng = np.random.default_rng(1)
    features = rng.standard_normal((parts, 729, 8)).astype(np.float32)
    newline = rng.standard_normal(8).astype(np.float32)
    rows = np.concatenate([features.reshape(-1, 8), newline[None]])
    packed = np.einsum("tk,tkd->td", weight, rows[index])
    fake = SimpleNamespace(config=SimpleNamespace(vision_config=SimpleNamespace(image_size=384, patch_size=14),
                                                  image_grid_pinpoints=pins))
    expected, _ = LlavaOnevisionModel.pack_image_features(
        fake, [torch.from_numpy(features)], torch.tensor([[height, width]]), torch.from_numpy(newline))
    np.testing.assert_allclose(packed, expected[0].numpy(), atol=1e-5, rtol=1e-5)
    interpolated = bool(((weight > 0) & (weight < 1)).any())
    assert interpolated == (height * width >= 1600 * 1200)  # the two large images exceed ~9 tiles


# pre-LLM with base_tile, pre-LLM with the thumbnail guide (and without base_tile), in-LLM (image_keep)
REDUCED = ["hired", "globalcom2", "fastv"]
# the two-image prompt fits the tiny model's 4096 positions unreduced (fastv prunes inside the LLM): 2340 + 1376
PROMPTS = {"one image": [(480, 640)], "two images": [(480, 640), (400, 300)]}


def _tokedge_reference(artifact, images, question):
    """tokedge's own run of the prompt: Pipeline.generate's tokens, and the prefill logits of the
    same runtime path (layout.prompt_inputs -> PromptEncoder -> runtime.generate)."""
    from tokedge.layouts import prompt_inputs
    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.runtime.pipeline import Pipeline

    pipe = Pipeline.load(artifact)
    result = pipe.generate(images, question, max_new_tokens=NEW_TOKENS)
    inputs = prompt_inputs(pipe.manifest, images)
    enc = pipe.encoder.encode([question], [[x.tokens for x in inputs]])
    gen = generate(pipe.graphs, inputs, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=1),
                   images_per_row=[len(images)])
    return result, gen.prefill_logits, enc.input_ids


@pytest.mark.slow
@pytest.mark.parametrize("method", REDUCED)
def test_contract_client_runs_reduced_tiled_artifacts_like_tokedge(artifacts, tiny_llava_next_dir, method):
    """Reduced LLaVA-NeXT artifacts (budget 585) through the client, from docs/artifact.md alone:
    pre-LLM methods fed the candidate plan (and hired its `base_tile`, globalcom2 its thumbnail guide), fastv's prefill fed
    `image_keep` = keep x images; on one 640x480 image and on a prompt with two images of different
    sizes, its greedy tokens are `Pipeline.generate`'s and its prefill logits tokedge's within 1e-4."""
    artifact = artifacts(method, budget=585, checkpoint=tiny_llava_next_dir)
    client = ContractClient(artifact)
    manifest = client.manifest
    vision_inputs = {t["name"] for t in manifest["graphs"]["vision"]["inputs"]}
    assert ("base_tile" in vision_inputs) == (method == "hired")
    assert ("base_block" in vision_inputs) == (method == "globalcom2")
    assert ("prefill" in manifest["graphs"]) == (method == "fastv")
    eos = set(manifest["model"]["eos_token_ids"])
    for name, sizes in PROMPTS.items():
        images = [_image(*size) for size in sizes]
        logits, tokens, ids = client.run(images, QUESTION, NEW_TOKENS)
        result, expected_logits, expected_ids = _tokedge_reference(artifact, images, QUESTION)
        np.testing.assert_array_equal(ids, expected_ids, err_msg=name)
        image_tokens = int((ids[0] == manifest["prompt"]["image_token_id"]).sum())
        if method == "fastv":  # the vision graph keeps every token; the full plans' counts
            assert image_tokens == sum(len(client.plan_tiled(image)[1]) for image in images)
        else:  # every image reduced to the budget
            assert image_tokens == 585 * len(images)
        assert _until_eos(tokens[0], eos) == result.token_ids[0], name
        np.testing.assert_allclose(logits, expected_logits, atol=1e-4, rtol=0, err_msg=name)
