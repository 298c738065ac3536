"""The artifact contract for tiled ("anyres") layouts: `tests/contract_client.py`, written from
docs/artifact.md alone, plans LLaVA-NeXT images itself (partitions, packing plan, placeholder
expansion), runs the graphs and decodes greedily; its tokens equal `tokedge run` on one image and
transformers' `LlavaNextForConditionalGeneration.generate` on a prompt with two images."""

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
