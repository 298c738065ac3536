"""The artifact contract for dynamic-resolution ("qwen_dynamic") layouts: `tests/contract_client.py`,
written from docs/artifact.md alone (smart_resize, block-major patches, window inputs, M-RoPE
positions, decoding at last + 1), runs the Qwen2.5-VL artifact; its greedy tokens equal
transformers' `Qwen2_5_VLForConditionalGeneration.generate` on a two-image prompt (300x900 and
1000x750: partial windows) and its prefill logits are within 1e-3."""

from __future__ import annotations

import numpy as np

from tests.contract_client import ContractClient

QUESTION = "What differs between these pictures?"
NEW_TOKENS = 6


def _image(width, height, seed):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def test_contract_client_equals_transformers_on_two_images(qwen2_5_vl_artifact, hf_qwen2_5_vl):
    import torch

    model, _, processor = hf_qwen2_5_vl
    images = [_image(300, 900, 5), _image(1000, 750, 6)]
    logits, tokens, ids = ContractClient(qwen2_5_vl_artifact).run(images, QUESTION, NEW_TOKENS)
    batch = processor(images=images, return_tensors="pt")
    input_ids = torch.from_numpy(ids)
    assert int((input_ids == model.config.image_token_id).sum()) == int(batch["image_grid_thw"].prod(-1).sum()) // 4
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             mm_token_type_ids=(input_ids == model.config.image_token_id).long(),
                             pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                             output_logits=True, return_dict_in_generate=True)
    assert np.abs(logits[0] - out.logits[0][0].numpy()).max() < 1e-3
    assert tokens[0].tolist() == out.sequences[0, ids.shape[1]:].tolist()
