"""Qwen2.5-VL `--method none`, end to end (issue 11 item 1): ONE exported artifact, run torch-free
(`Pipeline`, the code of `tokedge run`), equals transformers' `Qwen2_5_VLForConditionalGeneration.generate`
token for token, prefill (and step) logits within 1e-3, on 448x448, 300x900, 1000x750 and a
two-image prompt. The reference builds its prompt with transformers' tokenizer and chat template,
expands `<|image_pad|>` with the counts of transformers' image processor and passes
`mm_token_type_ids` (without it transformers silently falls back to 1-D positions)."""

from __future__ import annotations

import json

import numpy as np
import pytest

STEPS = 8
QUESTION = "Describe the picture."
SIZES = {"448x448": [(448, 448)], "300x900": [(300, 900)], "1000x750": [(1000, 750)],
         "two-images": [(448, 448), (300, 900)]}


def _image(width, height, seed):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def pipe(qwen2_5_vl_artifact):
    from tokedge.runtime.pipeline import Pipeline

    with Pipeline.load(qwen2_5_vl_artifact) as p:
        yield p


def _reference(hf, images):
    """transformers alone: prompt ids, greedy tokens of generate (EOS dropped) and its logits
    (prefill first, then each step)."""
    import torch

    model, tok, processor = hf
    batch = processor(images=images, return_tensors="pt")
    counts = [int(g.prod()) // 4 for g in batch["image_grid_thw"]]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": QUESTION}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    parts = text.split("<|image_pad|>")
    text = parts[0] + "".join("<|image_pad|>" * n + rest for n, rest in zip(counts, parts[1:]))
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             mm_token_type_ids=(ids == model.config.image_token_id).long(),
                             pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                             max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    eos = set(model.generation_config.eos_token_id)
    if tokens and tokens[-1] in eos:
        tokens = tokens[:-1]
    return ids.numpy(), counts, tokens, torch.cat(out.logits).numpy()


@pytest.mark.parametrize("case", list(SIZES))
def test_run_equals_transformers_generate(pipe, hf_qwen2_5_vl, case):
    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.layouts import prompt_inputs

    images = [_image(w, h, seed=i + 1) for i, (w, h) in enumerate(SIZES[case])]
    ids, counts, ref_tokens, ref_logits = _reference(hf_qwen2_5_vl, images)

    inputs = prompt_inputs(pipe.manifest, images)  # tokedge's numpy preprocessing: same token counts
    assert [x.tokens for x in inputs] == counts
    enc = pipe.encoder.encode([QUESTION], [counts])  # tokedge's own template rendering and expansion
    np.testing.assert_array_equal(enc.input_ids, ids)

    result = pipe.generate(images if len(images) > 1 else images[0], QUESTION, max_new_tokens=STEPS)
    assert result.token_ids[0] == ref_tokens  # `tokedge run` = generate, token for token
    assert result.visual_tokens == sum(counts)

    gen = generate(pipe.graphs, inputs, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=STEPS),
                   keep_logits=True, stop_at_eos=False, images_per_row=[len(images)])
    assert np.abs(gen.prefill_logits[0] - ref_logits[0]).max() < 1e-3
    steps = min(len(gen.step_logits), len(ref_logits) - 1)
    for i in range(steps):  # decode steps continue at last + 1 on all three M-RoPE rows
        assert np.abs(gen.step_logits[i][0] - ref_logits[i + 1]).max() < 1e-3


def test_batch_of_prompts_with_different_image_sizes_equals_each_alone(pipe, hf_qwen2_5_vl):
    """Left padding with M-RoPE: a batch (300x900 + two images, 1000x750) gives each row's tokens alone."""
    images = [[_image(300, 900, 1), _image(448, 448, 2)], [_image(1000, 750, 3)]]
    batch = pipe.generate(images, [QUESTION, "What is it?"], max_new_tokens=STEPS)
    alone = [pipe.generate(group, prompt, max_new_tokens=STEPS).token_ids[0]
             for group, prompt in zip(images, [QUESTION, "What is it?"])]
    assert batch.token_ids == alone


def test_cli_run_two_images_one_prompt(pipe, qwen2_5_vl_artifact, tmp_path, capsys):
    """`tokedge run ART --image a --image b --prompt q`: one prompt with both images, as the API."""
    from tokedge.cli import main

    images = [_image(448, 448, 1), _image(300, 900, 2)]
    paths = []
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    assert main(["run", str(qwen2_5_vl_artifact), "--image", paths[0], "--image", paths[1], "--prompt", QUESTION,
                 "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["visual_tokens"] == 256 + 352  # hub geometry: 448x448 -> 16x16, 300x900 -> 32x11 merged tokens
    assert out["token_ids"] == pipe.generate(images, QUESTION, max_new_tokens=4).token_ids[0]
