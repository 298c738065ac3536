"""The logit effect of the backend difference: each family's tiny preset model (transformers, fp32)
runs the same prompt on one 500x700 photo preprocessed by the PIL backend (what tokedge's runtime
equals) and by the torchvision backend (what transformers gives a user with torchvision); the max
logit difference goes into the run's table and docs/runtime.md.

The presets have random weights: the numbers show the size of the effect through a real graph of
each family's shape, not a real model's accuracy change. Needs torchvision (`.venv-tv`).
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.preprocess.support import DIFFS
from tests.preprocess.support import image as _image

SIZE = (500, 700)  # resized by every family (Qwen-VL: 504x700 and 512x704)
LLAVA_PROMPT = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
QWEN_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>What is shown in this image?"
CASES = {  # family: (checkpoint fixture, transformers class, prompt)
    "llava-1.5": ("tiny_llava_dir", "LlavaForConditionalGeneration", LLAVA_PROMPT),
    "llava-next": ("tiny_llava_next_dir", "LlavaNextForConditionalGeneration", LLAVA_PROMPT),
    "llava-onevision": ("tiny_llava_onevision_dir", "LlavaOnevisionForConditionalGeneration", LLAVA_PROMPT),
    "qwen2.5-vl": ("tiny_qwen2_5_vl_dir", "Qwen2_5_VLForConditionalGeneration", QWEN_PROMPT),
    "qwen3-vl": ("tiny_qwen3_vl_dir", "Qwen3VLForConditionalGeneration", QWEN_PROMPT),
    "smolvlm": ("tiny_smolvlm_dir", "Idefics3ForConditionalGeneration",
                "<|im_start|>User:<image>What is shown in this image?<end_of_utterance>\nAssistant:"),
    "gemma3": ("tiny_gemma3_dir", "Gemma3ForConditionalGeneration",
               "<start_of_turn>user\n<start_of_image>What is shown in this image?<end_of_turn>\n<start_of_turn>model\n"),
    "internvl": ("tiny_internvl_dir", "InternVLForConditionalGeneration",
                 "<|im_start|>user\n<IMG_CONTEXT>\nWhat is shown in this image?<|im_end|>\n<|im_start|>assistant\n"),
}
# (family, size): a typical resize for every family, and the sizes where the backends differ most
# (smart_resize's near-1 scales: 480x640 -> 476x644 on Qwen2.5-VL, 300x900 -> 288x896 on Qwen3-VL)
RUNS = [(family, SIZE) for family in CASES] + [("qwen2.5-vl", (480, 640)), ("qwen3-vl", (300, 900))]
# the largest logit difference accepted, as a share of the logits' spread (max - min) over the
# prompt: a backend difference of one grey level must stay a perturbation, not a different answer
RELATIVE_BOUND = 0.05


@pytest.mark.parametrize("family,size", RUNS)
def test_backend_logit_difference(request, family, size):
    import torch
    import transformers
    from transformers import AutoImageProcessor, AutoProcessor

    fixture, model_class, prompt = CASES[family]
    directory = request.getfixturevalue(fixture)
    model = getattr(transformers, model_class).from_pretrained(directory, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(directory)  # constructs for every family with torchvision
    image = _image(*size, seed=11)
    runs = {}
    for backend in ("pil", "torchvision"):
        processor.image_processor = AutoImageProcessor.from_pretrained(directory, backend=backend)
        images = [[image]] if family == "smolvlm" else [image]  # Idefics3's processor nests images per prompt
        inputs = processor(images=images, text=[prompt], return_tensors="pt")
        with torch.no_grad():
            runs[backend] = (inputs, model(**inputs).logits[0].numpy())
    (pil_in, pil_logits), (tv_in, tv_logits) = runs["pil"], runs["torchvision"]
    assert torch.equal(pil_in["input_ids"], tv_in["input_ids"])  # same token counts: only pixels differ
    pixels = float((pil_in["pixel_values"].float() - tv_in["pixel_values"].float()).abs().max())
    assert pixels > 1e-3, "the backends agree at this size; the measurement would be of nothing"
    diff = np.abs(pil_logits - tv_logits)
    spread = float(pil_logits.max() - pil_logits.min())
    same_top1 = bool(pil_logits[-1].argmax() == tv_logits[-1].argmax())
    note = (f"pixels differ by {pixels:.4f}; logit spread {spread:.3f}; last-token top-1 "
            f"{'same' if same_top1 else 'differs'}")
    DIFFS.append((family, "logits (whole prompt)", f"{size[0]}x{size[1]}", "pil vs tv", float(diff.max()), note))
    assert np.isfinite(diff).all()
    assert float(diff.max()) <= RELATIVE_BOUND * spread, (family, float(diff.max()), spread)
