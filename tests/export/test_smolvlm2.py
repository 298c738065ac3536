"""SmolVLM2 (`SmolVLMForConditionalGeneration`, the class of SmolVLM2-256M/500M/2.2B) on the SmolVLM family
path: a tiny SmolVLM2 checkpoint saved as a user's directory (SmolVLMProcessor's files: its PIL image
processor, tokenizer, processor_config.json, chat template), exported with `--method none` and with
`fastv`, run through the torch-free runtime, equals transformers' SmolVLM2 model + `generate` on two
sizes and a two-image prompt. transformers' `SmolVLMProcessor` needs torchvision and num2words; without
them the reference prompt comes from `Idefics3Processor` on the same parts (its image prompt string is
the same function of rows, columns and the view's token count)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.export.test_anyres_methods import textured_image

QUESTION = "What is shown in this image?"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tokedge.export.presets import TinySmolVLMConfig, build_tiny_smolvlm

    return build_tiny_smolvlm(tmp_path_factory.mktemp("ckpt") / "tiny-smolvlm2", TinySmolVLMConfig(), version=2)


@pytest.fixture(scope="module")
def hf(checkpoint):
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        Idefics3Processor,
        SmolVLMForConditionalGeneration,
    )

    model = SmolVLMForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    assert type(model).__name__ == "SmolVLMForConditionalGeneration"
    try:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(checkpoint, backend="pil")  # torchvision and num2words present
    except (ImportError, AttributeError, ValueError):
        image_processor = AutoImageProcessor.from_pretrained(checkpoint, backend="pil")
        processor = Idefics3Processor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(checkpoint),
                                      image_seq_len=16, chat_template=(checkpoint / "chat_template.jinja").read_text())
    return model, processor


@pytest.fixture(scope="module")
def artifacts(checkpoint, tmp_path_factory):
    from tokedge.export.pipeline import ExportConfig, export

    root = tmp_path_factory.mktemp("smolvlm2")
    out = {}
    for method, budget in (("none", None), ("fastv", 64)):
        result = export(ExportConfig(model=str(checkpoint), out=root / method, method=method, budget=budget))
        assert result.parity["ok"]
        out[method] = root / method
    return out


@torch.no_grad()
def transformers_reference(hf, images):
    model, processor = hf
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    batch = processor(images=[images], text=[text], return_tensors="pt")
    logits = model(**batch).logits[0, -1].numpy()
    out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    return batch["input_ids"][0].numpy(), logits, out[0, batch["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("sizes", [[(480, 640)], [(1000, 1000)], [(480, 640), (300, 900)]],
                         ids=["640x480", "1000x1000", "two images"])
def test_smolvlm2_none_matches_transformers_generate(sizes, artifacts, hf):
    from tests.export.test_smolvlm import tokedge_run

    images = [textured_image(h, w, 3 + i) for i, (h, w) in enumerate(sizes)]
    ids, logits, tokens = transformers_reference(hf, images)
    result, got_ids, got_logits = tokedge_run(artifacts["none"], images)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got_logits, logits, atol=1e-3, rtol=0)
    assert result.token_ids[0][: len(tokens)] == tokens


def test_smolvlm2_fastv_artifact_runs_and_keeps_its_budget(artifacts):
    from tokedge.runtime.pipeline import Pipeline

    with Pipeline.load(artifacts["fastv"]) as pipe:
        result = pipe.generate([textured_image(480, 640, 3)], QUESTION, max_new_tokens=4)
        assert pipe.manifest.model.family == "smolvlm"
    assert result.visual_tokens == 64
