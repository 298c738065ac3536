"""`tokedge serve` on a Gemma 3 artifact (framed view; the decoder's bidirectional image blocks): a
real server talked to with the official `openai` client; answers equal `tokedge run`, and usage
counts the prompt and image tokens as transformers' Gemma3Processor expands them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.serve.conftest import QUESTION, run_then_serve


@pytest.fixture(scope="module")
def gemma3_artifact(tiny_gemma3_dir, tmp_path_factory):
    from tokedge.export.pipeline import ExportConfig, export

    out = tmp_path_factory.mktemp("serve-gemma3") / "fastv"
    export(ExportConfig(model=str(tiny_gemma3_dir), out=out, method="fastv", budget=6, validate=False))
    return out


def test_answer_and_usage_of_framed_images(gemma3_artifact, tiny_gemma3_dir, tmp_path, capsys):
    from transformers import AutoProcessor

    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    wide = Image.fromarray(np.random.default_rng(6).integers(0, 256, (300, 900, 3), dtype=np.uint8))
    expected, resp, two = run_then_serve(gemma3_artifact, [image, wide], tmp_path, capsys)
    assert resp.choices[0].message.content == expected["text"]
    assert resp.usage.completion_tokens == len(expected["token_ids"])
    processor = AutoProcessor.from_pretrained(tiny_gemma3_dir, backend="pil")
    for images, answer in (([image], resp), ([image, wide], two)):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": QUESTION}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        ids = processor(images=[images], text=[text], return_tensors="np")["input_ids"][0]
        assert answer.usage.prompt_tokens == len(ids)  # the processor's expansion, frames included
        image_tokens = int((ids == processor.tokenizer.image_token_id).sum())
        assert answer.usage.model_extra["visual_tokens"] == image_tokens * 6 // 16  # fastv keeps 6 of 16 per image
