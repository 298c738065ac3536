"""`tokedge serve` on a Qwen2.5-VL (`--method none`) artifact: a real server talked to with the
official `openai` client. Two requests with images of different sizes arrive together and are
batched (left padding with M-RoPE positions per row); each answer equals `tokedge run` alone
(`Pipeline`, checked against transformers in tests/runtime/test_qwen2_5_vl_run.py) and usage
counts each image's own visual tokens."""

from __future__ import annotations

import concurrent.futures

import numpy as np
import openai
import pytest
from PIL import Image

from tests.serve.conftest import QUESTION, data_url, running_server
from tokedge.runtime.pipeline import Pipeline
from tokedge.serve.config import ServeConfig

KEY = "test-key-123"


def _image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def server(qwen2_5_vl_artifact):
    cfg = ServeConfig(artifact=qwen2_5_vl_artifact, api_key=KEY, max_batch=2, batch_wait_ms=1000,
                      max_prompt_tokens=4000)
    with running_server(cfg) as (base, service):
        yield base, service


def test_batched_requests_with_different_image_sizes_equal_run(server, qwen2_5_vl_artifact):
    base, service = server
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=300)
    requests = [[_image(448, 448, 1)], [_image(300, 900, 2), _image(1000, 750, 3)]]

    def ask(images):
        content = [{"type": "image_url", "image_url": {"url": data_url(image)}} for image in images]
        return client.chat.completions.create(
            model=service.cfg.served_name, max_tokens=6,
            messages=[{"role": "user", "content": [*content, {"type": "text", "text": QUESTION}]}])

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(ask, requests))
    with Pipeline.load(qwen2_5_vl_artifact) as pipe:
        expected = [pipe.generate(images, QUESTION, max_new_tokens=6) for images in requests]
    for answer, alone in zip(answers, expected):
        assert answer.choices[0].message.content == alone.text
        assert answer.usage.model_extra["visual_tokens"] == alone.visual_tokens
    assert [a.usage.model_extra["visual_tokens"] for a in answers] == [256, 352 + 972]


def test_text_only_turn_equals_transformers(server, hf_qwen2_5_vl):
    """A chat turn without an image (M-RoPE positions of plain text) answers as transformers'
    Qwen2_5_VLForConditionalGeneration.generate does on the same templated prompt."""
    import torch

    base, service = server
    model, tokenizer, _ = hf_qwen2_5_vl
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Count to five."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:].tolist()
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=300)
    resp = client.chat.completions.create(model=service.cfg.served_name, max_tokens=8, messages=messages)
    assert service.text_only_refusal is None
    assert resp.choices[0].message.content == tokenizer.decode(new, skip_special_tokens=True)
    assert resp.usage.prompt_tokens == ids["input_ids"].shape[1] and resp.usage.completion_tokens == len(new)
    assert resp.usage.model_extra["visual_tokens"] == 0
