"""Acceptance of the export: an independent client of docs/artifact.md reproduces transformers.

References are transformers itself: `LlavaForConditionalGeneration.generate` for `none`; for
`cls-attn`, transformers' vision tower (eager attention), a straightforward per-sample top-k of
its CLS attention written here, its projector, and `generate(inputs_embeds=...)`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.contract_client import ContractClient

PROMPTS = [
    "Hi?",
    "What is shown in this image?",
    "Describe the picture in detail: the colours, the objects, where they are and what the people do.",
]
NEW_TOKENS = 6


def chat(processor, question: str) -> str:
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conv, add_generation_prompt=True)


def hf_inputs(processor, images, questions, visual_tokens: int):
    """pixel_values from the image processor; ids with the placeholder expanded to visual_tokens."""
    texts = [chat(processor, q).replace("<image>", "<image>" * visual_tokens) for q in questions]
    processor.tokenizer.padding_side = "left"
    enc = processor.tokenizer(texts, padding=True, return_tensors="pt")
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return pixel_values, enc["input_ids"], enc["attention_mask"]


def greedy_generate(model, **kwargs) -> torch.Tensor:
    out = model.generate(**kwargs, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                         pad_token_id=model.config.text_config.pad_token_id)
    return out


def eager_tower(model, pixel_values):
    """transformers' own vision tower with eager attention: hidden states and attention probabilities."""
    tower = model.model.vision_tower
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return tower(pixel_values, output_hidden_states=True, output_attentions=True)
    finally:
        tower.set_attn_implementation("sdpa")


def cls_attn_reference_features(model, pixel_values, k: int) -> torch.Tensor:
    """Loop-based reference of cls-attn on transformers' own attentions, then its projector."""
    out = eager_tower(model, pixel_values)
    layer = model.config.vision_feature_layer  # -2: hidden_states[-2] is the output of attentions[-2]'s layer
    feats = out.hidden_states[layer][:, 1:]
    attn = out.attentions[layer]  # [b, heads, 577, 577]
    rows = []
    for b in range(feats.shape[0]):
        scores = [float(attn[b, :, 0, 1 + j].mean()) for j in range(feats.shape[1])]
        ranked = sorted(range(len(scores)), key=lambda j: -scores[j])[:k]
        rows.append(feats[b, sorted(ranked)])
    return model.model.multi_modal_projector(torch.stack(rows))


def spliced_embeds(model, input_ids, image_features):
    embeds = model.get_input_embeddings()(input_ids)
    mask = (input_ids == model.config.image_token_id).unsqueeze(-1)
    return embeds.masked_scatter(mask, image_features)


@pytest.mark.parametrize("batch", [1, 3])
def test_none_matches_transformers_generate(artifacts, hf_tiny, test_images, batch):
    model, processor = hf_tiny
    client = ContractClient(artifacts("none", 576))
    images, questions = test_images[:batch], PROMPTS[-batch:]
    processor.tokenizer.padding_side = "left"
    inputs = processor(images=images, text=[chat(processor, q) for q in questions], padding=True, return_tensors="pt")
    assert (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist() == [576] * batch
    assert_matches_generate(client, model, inputs)


def assert_matches_generate(client, model, inputs):
    """The contract client's prefill logits (1e-3) and greedy tokens equal transformers' on `inputs`."""
    with torch.no_grad():
        expected_logits = model(**inputs).logits[:, -1].numpy()
        expected = greedy_generate(model, **inputs)[:, inputs["input_ids"].shape[1]:].numpy()
    prefill, tokens = client.generate(inputs["pixel_values"].numpy(), inputs["input_ids"].numpy(),
                                      inputs["attention_mask"].numpy(), NEW_TOKENS)
    np.testing.assert_allclose(prefill, expected_logits, atol=1e-3, rtol=0)
    assert tokens.tolist() == expected.tolist()


@pytest.mark.parametrize("question", PROMPTS)
def test_none_prompt_lengths_batch1(artifacts, hf_tiny, test_images, question):
    model, processor = hf_tiny
    client = ContractClient(artifacts("none", 576))
    inputs = processor(images=test_images[1:2], text=[chat(processor, question)], return_tensors="pt")
    with torch.no_grad():
        expected = greedy_generate(model, **inputs)[:, inputs["input_ids"].shape[1]:].numpy()
    _, tokens = client.generate(inputs["pixel_values"].numpy(), inputs["input_ids"].numpy(),
                                inputs["attention_mask"].numpy(), NEW_TOKENS)
    assert tokens.tolist() == expected.tolist()


def _check_reduced(client, model, processor, images, questions, k, budget=None):
    pixel_values, ids, mask = hf_inputs(processor, images, questions, k)
    with torch.no_grad():
        feats = cls_attn_reference_features(model, pixel_values, k)
    assert_generates_from(client, model, pixel_values, ids, mask, feats, budget)


def assert_generates_from(client, model, pixel_values, ids, mask, feats, budget=None):
    """The contract client on the image equals transformers' LM on the prompt spliced with the
    reference features `feats`: prefill logits within 1e-3, greedy tokens equal."""
    with torch.no_grad():
        embeds = spliced_embeds(model, ids, feats)
        expected_logits = model(inputs_embeds=embeds, attention_mask=mask).logits[:, -1].numpy()
        expected = greedy_generate(model, inputs_embeds=embeds, attention_mask=mask).numpy()
    prefill, tokens = client.generate(pixel_values.numpy(), ids.numpy(), mask.numpy(), NEW_TOKENS, budget)
    np.testing.assert_allclose(prefill, expected_logits, atol=1e-3, rtol=0)
    assert tokens.tolist() == expected[:, -NEW_TOKENS:].tolist()


@pytest.mark.parametrize("batch", [1, 3])
def test_cls_attn_matches_reference(artifacts, hf_tiny, test_images, batch):
    model, processor = hf_tiny
    client = ContractClient(artifacts("cls-attn", 64))
    assert client.manifest["graphs"]["vision"]["outputs"][0]["shape"][1] == 64
    _check_reduced(client, model, processor, test_images[:batch], PROMPTS[:batch], 64)


@pytest.mark.parametrize("k", [16, 64, 200, 576])
def test_runtime_budget_range(artifacts, hf_tiny, test_images, k):
    model, processor = hf_tiny
    client = ContractClient(artifacts("cls-attn", 64, dynamic=(16, 576)))
    assert client.manifest["reduction"]["budget_range"] == [16, 576]
    assert [t["name"] for t in client.manifest["graphs"]["vision"]["inputs"]] == ["pixel_values", "budget"]
    _check_reduced(client, model, processor, test_images[:2], PROMPTS[1:], k, budget=k)


def test_selection_differs_from_none(artifacts, hf_tiny, test_images):
    """A cls-attn artifact really drops tokens: its image embeds are a strict subset of the full ones."""
    model, processor = hf_tiny
    full = ContractClient(artifacts("none", 576))
    reduced = ContractClient(artifacts("cls-attn", 64))
    pixel_values = processor.image_processor(test_images[:1], return_tensors="np")["pixel_values"]
    all_rows, kept = full.image_embeds(pixel_values)[0], reduced.image_embeds(pixel_values)[0]
    assert kept.shape == (64, all_rows.shape[1])
    match = [int(np.abs(all_rows - row).max(axis=1).argmin()) for row in kept]
    assert match == sorted(match) and len(set(match)) == 64
