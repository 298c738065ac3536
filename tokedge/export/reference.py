"""Example inputs and transformers-side reference outputs recorded at export (reference.npz)."""

from __future__ import annotations

import numpy as np
import torch

from tokedge.export.families.llava import LoadedLlava, reference_image_features, reference_logits
from tokedge.reduce.base import Method

EXAMPLE_PROMPTS = ("What is shown in this image?", "Describe the picture in detail, please.")


def example_images(n: int = 2):
    """Deterministic synthetic RGB images of different sizes and aspect ratios."""
    from PIL import Image

    rng = np.random.default_rng(1234)
    sizes = [(300, 200), (224, 400), (336, 336)]
    images = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * 200
        noise = rng.integers(0, 55, size=(h, w, 3))
        images.append(Image.fromarray((base + noise).astype(np.uint8), "RGB"))
    return images


def render_prompt(llava: LoadedLlava, question: str) -> str:
    proc = llava.processor
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if getattr(proc, "chat_template", None):
        return proc.apply_chat_template(conversation, add_generation_prompt=True)
    return f"USER: {getattr(proc, 'image_token', '<image>')}\n{question} ASSISTANT:"


def tokenize(llava: LoadedLlava, prompts: list[str], visual_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Expand each image placeholder to `visual_tokens` copies and tokenize, left-padded."""
    tok = llava.processor.tokenizer
    image_token = getattr(llava.processor, "image_token", None) or "<image>"
    texts = [p.replace(image_token, image_token * visual_tokens) for p in prompts]
    previous = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(texts, padding=True, return_tensors="np")
    finally:
        tok.padding_side = previous
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def pixel_values_for(llava: LoadedLlava, images) -> np.ndarray:
    return llava.processor.image_processor(images, return_tensors="np")["pixel_values"].astype(np.float32)


@torch.no_grad()
def reference_case(llava: LoadedLlava, method: Method, pixel_values: np.ndarray, prompts: list[str], budget: int,
                   steps: int, options: dict | None = None) -> dict[str, np.ndarray]:
    input_ids, attention_mask = tokenize(llava, prompts, budget)
    return reference_from_ids(llava, method, pixel_values, input_ids, attention_mask, budget, steps, options)


@torch.no_grad()
def reference_from_ids(llava: LoadedLlava, method: Method, pixel_values: np.ndarray, input_ids: np.ndarray,
                       attention_mask: np.ndarray, budget: int, steps: int,
                       options: dict | None = None) -> dict[str, np.ndarray]:
    """transformers' outputs for already-tokenized inputs (placeholders expanded to `budget`)."""
    feats = reference_image_features(llava, method, torch.from_numpy(pixel_values), budget, options)
    prefill, tokens, step_logits = reference_logits(
        llava, torch.from_numpy(input_ids), torch.from_numpy(attention_mask), feats, steps
    )
    return {
        "budget": np.array(budget, dtype=np.int64),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "image_embeds": feats.float().numpy(),
        "prefill_logits": prefill.numpy(),
        "step_logits": torch.stack(step_logits, dim=1).numpy(),
        "tokens": tokens.numpy(),
    }
