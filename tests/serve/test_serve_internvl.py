"""`tokedge serve` on an InternVL artifact (aspect-ratio tiles + thumbnail, one `<img>` run per image):
a real server talked to with the official `openai` client; answers equal `tokedge run`, and usage
counts the prompt and image tokens as transformers' InternVLProcessor expands them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.export.test_internvl import internvl_processor
from tests.serve.conftest import QUESTION, run_then_serve


@pytest.fixture(scope="module")
def internvl_artifact(tiny_internvl_dir, tmp_path_factory):
    from tokedge.export.pipeline import ExportConfig, export

    out = tmp_path_factory.mktemp("serve-internvl") / "none"
    export(ExportConfig(model=str(tiny_internvl_dir), out=out, method="none", validate=False))
    return out


def test_answer_and_usage_of_aspect_tile_images(internvl_artifact, tiny_internvl_dir, tmp_path, capsys):
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    wide = Image.fromarray(np.random.default_rng(6).integers(0, 256, (300, 900, 3), dtype=np.uint8))
    expected, resp, two = run_then_serve(internvl_artifact, [image, wide], tmp_path, capsys)
    assert resp.choices[0].message.content == expected["text"]
    assert resp.usage.completion_tokens == len(expected["token_ids"])
    processor = internvl_processor(tiny_internvl_dir)
    for images, answer in (([image], resp), ([image, wide], two)):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": QUESTION}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        ids = processor(images=images, text=[text], return_tensors="np")["input_ids"][0]
        assert answer.usage.prompt_tokens == len(ids)  # the processor's expansion, <img> and </img> included
        assert answer.usage.model_extra["visual_tokens"] == int((ids == processor.image_token_id).sum())
    assert resp.usage.model_extra["visual_tokens"] == expected["visual_tokens"] == 7 * 16
