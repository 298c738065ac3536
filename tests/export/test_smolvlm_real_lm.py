"""SmolVLM with its real language model (SmolLM2-135M-Instruct, the LM of SmolVLM-256M; random tiny
vision tower): `tokedge export --method none` passes its own validation against transformers, and
`tokedge run` answers factual questions (with an image, as the CLI takes one with every prompt) and
an image prompt with the same tokens as transformers' `generate` on the checkpoint (SmolVLM's chat
template, greedy); the factual answer is the real LM's ("The capital of France is Paris.")."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

QUESTIONS = ["What is the capital of France?", "What is the capital of Japan?"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def artifact(real_smolvlm_dir, tmp_path_factory):
    from tokedge.export.pipeline import ExportConfig, export

    out = tmp_path_factory.mktemp("smolvlm-real") / "none"
    result = export(ExportConfig(model=str(real_smolvlm_dir), out=out, method="none"))
    assert result.parity["ok"]
    return out


@torch.no_grad()
def transformers_answer(checkpoint, question, image=None):
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    model = Idefics3ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    batch = processor(text=[text], images=[[image]] if image is not None else None, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    tokens = out[0, batch["input_ids"].shape[1]:].tolist()
    return tokens, processor.tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from PIL import Image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
    path = tmp_path_factory.mktemp("photo") / "photo.png"
    image.save(path)
    return image, path


@pytest.mark.parametrize("question", QUESTIONS + ["Describe this image."])
def test_real_lm_answers_as_transformers(question, artifact, real_smolvlm_dir, photo, capsys):
    """`tokedge run --image --prompt` (the CLI takes an image with every prompt) and transformers'
    processor + `generate` on the same image and question: the same greedy tokens."""
    from tokedge.cli import main

    image, path = photo
    tokens, _ = transformers_answer(real_smolvlm_dir, question, image)
    capsys.readouterr()
    assert main(["run", str(artifact), "--image", str(path), "--prompt", question,
                 "--max-new-tokens", str(NEW_TOKENS), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["token_ids"] == tokens[: len(result["token_ids"])] and len(result["token_ids"]) >= 4, question
    assert result["visual_tokens"] == 13 * 16  # 3 x 4 tiles and the global view, 16 tokens each


def test_real_lm_answers_a_text_question_as_transformers_and_knows_it(artifact, real_smolvlm_dir):
    """A text-only chat turn through the runtime path `tokedge serve` takes for one (its
    `BatchDecoder` on the chat template's rendering, no image): the real LM's answer, token for token
    transformers' `generate` on the checkpoint, and it is right."""
    from tokedge.layouts import ImageBatch
    from tokedge.runtime.generate import SamplingConfig
    from tokedge.runtime.pipeline import Pipeline
    from tokedge.runtime.prompt import render_messages
    from tokedge.runtime.stepwise import BatchDecoder

    question = QUESTIONS[0]
    tokens, text = transformers_answer(real_smolvlm_dir, question)
    assert text.strip().startswith("The capital of France is Paris."), text
    with Pipeline.load(artifact) as pipe:
        rendered = render_messages(pipe.manifest.prompt, [{"role": "user", "content": [{"type": "text", "text": question}]}],
                                   pipe.manifest.prompt.special_tokens)
        enc = pipe.encoder.encode_rendered([rendered], [[]])
        dec = BatchDecoder(pipe.graphs, ImageBatch([], [[]]), enc.input_ids, enc.attention_mask,
                           [SamplingConfig(max_new_tokens=NEW_TOKENS)])
        got = [dec.prefill()[0]]
        while dec.active and len(got) < NEW_TOKENS:
            got.append(dec.step()[0])
    got = [t for t in got if t is not None]
    assert got == tokens[: len(got)] and len(got) >= 6
