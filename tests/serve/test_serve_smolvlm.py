"""`tokedge serve` on a SmolVLM artifact (split tiles: text markers between each view's token run):
a real server talked to with the official `openai` client; answers equal `tokedge run`, and usage
counts the prompt and image tokens as transformers' Idefics3Processor expands them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.serve.conftest import QUESTION, run_then_serve


@pytest.fixture(scope="module")
def smolvlm_artifact(tiny_smolvlm_dir, tmp_path_factory):
    from tokedge.export.pipeline import ExportConfig, export

    out = tmp_path_factory.mktemp("serve-smolvlm") / "none"
    export(ExportConfig(model=str(tiny_smolvlm_dir), out=out, method="none", validate=False))
    return out


def test_answer_and_usage_of_split_tile_images(smolvlm_artifact, tiny_smolvlm_dir, tmp_path, capsys):
    from transformers import AutoProcessor

    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    expected, resp, two = run_then_serve(smolvlm_artifact, [image, image], tmp_path, capsys)  # each its own tiles
    assert resp.choices[0].message.content == expected["text"]
    assert resp.usage.completion_tokens == len(expected["token_ids"])
    processor = AutoProcessor.from_pretrained(tiny_smolvlm_dir)
    for images, answer in (([image], resp), ([image, image], two)):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": QUESTION}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        ids = processor(images=[images], text=[text], return_tensors="np")["input_ids"][0]
        assert answer.usage.prompt_tokens == len(ids)  # the processor's expansion, tile markers included
        assert answer.usage.model_extra["visual_tokens"] == int((ids == processor.image_token_id).sum())
    assert resp.usage.model_extra["visual_tokens"] == expected["visual_tokens"] == 13 * 16
