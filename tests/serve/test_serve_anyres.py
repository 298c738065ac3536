"""`tokedge serve` on a tiled (LLaVA-NeXT, `--method none`) artifact: a real server talked to with
the official `openai` client; each request's image gets its own partitions and visual-token count,
answers equal `tokedge run`, and usage counts the image's tokens as transformers' processor
expands them."""

from __future__ import annotations

import concurrent.futures
import json

import numpy as np
import openai
import pytest
from PIL import Image

from tests.export.test_parity import chat
from tests.serve.conftest import QUESTION, data_url, running_server, user_message
from tests.serve.test_serve import delta, scrape
from tokedge.cli import main
from tokedge.runtime.pipeline import Pipeline
from tokedge.serve.config import ServeConfig

KEY = "test-key-123"  # what tests.serve.test_serve.scrape sends
SIZES = [(480, 640), (900, 300)]  # (height, width): 640x480 and 300x900


def _image(height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(height + 3 * width)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def next_artifact(artifacts, tiny_llava_next_dir):
    return artifacts("none", checkpoint=tiny_llava_next_dir)


@pytest.fixture(scope="module")
def server(next_artifact):
    cfg = ServeConfig(artifact=next_artifact, api_key=KEY, max_batch=2, batch_wait_ms=1000, max_prompt_tokens=4000)
    with running_server(cfg) as (base, service):
        yield base, service


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key=KEY, max_retries=0, timeout=300)


def test_answer_and_usage_of_a_tiled_image(server, client, next_artifact, tiny_llava_next_dir, tmp_path, capsys):
    from transformers import AutoProcessor

    image = _image(*SIZES[0])
    path = tmp_path / "photo.png"
    image.save(path)
    assert main(["run", str(next_artifact), "--image", str(path), "--prompt", QUESTION, "--max-new-tokens", "10",
                 "--json"]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    resp = client.chat.completions.create(model=server[1].cfg.served_name,
                                          messages=user_message(data_url(image), QUESTION), max_tokens=10)
    assert resp.choices[0].message.content == expected["text"]
    assert resp.usage.completion_tokens == len(expected["token_ids"])
    # transformers' processor expands the placeholder for this image size: the independent count
    processor = AutoProcessor.from_pretrained(tiny_llava_next_dir)
    batch = processor(images=[image], text=[chat(processor, QUESTION)], return_tensors="np")
    image_tokens = int((batch["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum())
    assert resp.usage.prompt_tokens == batch["input_ids"].shape[1]
    assert resp.usage.model_extra["visual_tokens"] == expected["visual_tokens"] == image_tokens == 2340


def test_images_of_different_sizes_share_a_batch(server, client, next_artifact):
    """Two requests whose images give different token counts decode as one left-padded batch;
    each answer equals the image's own `Pipeline.generate` (a separate decode loop)."""
    base, service = server
    images = [_image(*size) for size in SIZES]
    prompts = [QUESTION, "Describe the picture."]
    with Pipeline.load(next_artifact) as pipe:
        expected = [pipe.generate(img, p, max_new_tokens=8) for img, p in zip(images, prompts)]
    assert expected[0].visual_tokens != expected[1].visual_tokens
    before = scrape(base)

    def ask(i):
        return client.chat.completions.create(model=service.cfg.served_name,
                                              messages=user_message(data_url(images[i]), prompts[i]), max_tokens=8)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(ask, range(2)))
    after = scrape(base)
    assert [a.choices[0].message.content for a in answers] == [e.text for e in expected]
    assert [a.usage.model_extra["visual_tokens"] for a in answers] == [e.visual_tokens for e in expected]
    assert delta(before, after, "tokedge_batch_size_sum") == 2
    assert delta(before, after, "tokedge_batch_size_count") == 1  # one batch of both
    assert delta(before, after, "tokedge_visual_tokens_sum") == sum(e.visual_tokens for e in expected)


def test_a_reduced_tiled_artifact_with_two_images_in_one_request(artifacts, tiny_llava_next_dir):
    """hired (candidate plan + its base_tile input) on a request with two images of different
    sizes: the answer equals `tokedge run --image a --image b`'s (`Pipeline.generate` with one
    prompt of two images) and usage counts the budget per image."""
    art = artifacts("hired", budget=585, checkpoint=tiny_llava_next_dir)
    images = [_image(*size) for size in SIZES]
    with Pipeline.load(art) as pipe:
        expected = pipe.generate(images, QUESTION, max_new_tokens=8)
    assert expected.visual_tokens == 2 * 585
    cfg = ServeConfig(artifact=art, api_key=KEY, max_batch=2, batch_wait_ms=10, max_prompt_tokens=4000)
    with running_server(cfg) as (base, service):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=300)
        content = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
        resp = client.chat.completions.create(
            model=service.cfg.served_name, max_tokens=8,
            messages=[{"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]}])
    assert resp.choices[0].message.content == expected.text
    assert resp.usage.model_extra["visual_tokens"] == 2 * 585


def test_text_only_turn_equals_transformers(server, client, tiny_llava_next_dir):
    """A tiled artifact answers a turn without an image as LlavaNextForConditionalGeneration.generate."""
    import torch
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_llava_next_dir)
    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_llava_next_dir, dtype=torch.float32).eval()
    conv = [{"role": "user", "content": [{"type": "text", "text": "Say something."}]}]
    enc = processor.tokenizer(processor.apply_chat_template(conv, add_generation_prompt=True), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    new = out[0, enc.input_ids.shape[1]:].tolist()
    resp = client.chat.completions.create(model=server[1].cfg.served_name, max_tokens=8,
                                          messages=[{"role": "user", "content": "Say something."}])
    assert server[1].text_only_refusal is None
    assert resp.choices[0].message.content == processor.tokenizer.decode(new, skip_special_tokens=True)
    assert resp.usage.completion_tokens == len(new) and resp.usage.model_extra["visual_tokens"] == 0
