"""Other towers and decoders that transformers' LLaVA class accepts: SigLIP (no CLS, fixed-size
resize) with Qwen2 (q/k/v biases), and CLIP with Mistral. Checked against transformers' generate."""

from __future__ import annotations

import pytest
import torch

from tests.contract_client import ContractClient
from tests.export.test_parity import assert_matches_generate, chat


@pytest.mark.parametrize("vision,text,image_size", [("siglip", "qwen2", 224), ("clip", "mistral", 336)])
def test_family_matches_transformers(tmp_path_factory, artifacts, test_images, vision, text, image_size):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from tokedge.export.presets import TinyLlavaConfig, build_tiny_llava

    ckpt = build_tiny_llava(tmp_path_factory.mktemp("ckpt") / f"{vision}-{text}",
                            TinyLlavaConfig(vision=vision, text=text, image_size=image_size, seed=3))
    art = artifacts("none", checkpoint=ckpt)
    client = ContractClient(art)
    assert client.manifest["model"]["vision_model_type"].startswith(vision)
    assert client.manifest["model"]["text_model_type"] == text
    model = LlavaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(ckpt)
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=test_images[:2], text=[chat(processor, "Hi?"), chat(processor, "What is this?")],
                       padding=True, return_tensors="pt")
    assert_matches_generate(client, model, inputs)
