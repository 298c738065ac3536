"""`tokedge serve` on an InternVL artifact (aspect-ratio tiles + thumbnail, one `<img>` run per image):
a real server talked to with the official `openai` client; answers equal `tokedge run`, and usage
counts the prompt and image tokens as transformers' InternVLProcessor expands them."""

from __future__ import annotations

import json

import numpy as np
import openai
import pytest
from PIL import Image

from tests.export.test_internvl import internvl_processor
from tests.serve.conftest import QUESTION, data_url, running_server, user_message
from tokedge.cli import main
from tokedge.serve.config import ServeConfig

KEY = "test-key-123"


@pytest.fixture(scope="module")
def internvl_artifact(tiny_internvl_dir, tmp_path_factory):
    from tokedge.export.pipeline import ExportConfig, export

    out = tmp_path_factory.mktemp("serve-internvl") / "none"
    export(ExportConfig(model=str(tiny_internvl_dir), out=out, method="none", validate=False))
    return out


def test_answer_and_usage_of_aspect_tile_images(internvl_artifact, tiny_internvl_dir, tmp_path, capsys):
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    wide = Image.fromarray(np.random.default_rng(6).integers(0, 256, (300, 900, 3), dtype=np.uint8))
    path = tmp_path / "photo.png"
    image.save(path)
    assert main(["run", str(internvl_artifact), "--image", str(path), "--prompt", QUESTION, "--max-new-tokens", "8",
                 "--json"]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = ServeConfig(artifact=internvl_artifact, api_key=KEY, max_batch=2, batch_wait_ms=200, max_prompt_tokens=2000)
    with running_server(cfg) as (base, service):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0, timeout=300)
        resp = client.chat.completions.create(model=service.cfg.served_name,
                                              messages=user_message(data_url(image), QUESTION), max_tokens=8)
        two = client.chat.completions.create(  # two images of different grids in one request
            model=service.cfg.served_name, max_tokens=8,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                                   {"type": "image_url", "image_url": {"url": data_url(wide)}},
                                                   {"type": "text", "text": QUESTION}]}])
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
