"""`tokedge run` / Pipeline: greedy tokens equal transformers' generate (none) and the PyTorch
reference with the same selection (cls-attn); sampling is reproducible; batches equal singles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.export.test_parity import chat, cls_attn_reference_features, spliced_embeds
from tokedge.cli import main
from tokedge.errors import InputError
from tokedge.runtime.pipeline import Pipeline

QUESTION = "What is shown in this image?"
N = 10


@pytest.fixture(scope="module")
def image_files(tmp_path_factory, test_images):
    root = tmp_path_factory.mktemp("images")
    paths = []
    for i, img in enumerate(test_images):
        path = root / f"img{i}.png"
        img.save(path)
        paths.append(path)
    return paths


def _until_eos(row, eos_ids):
    out = []
    for t in row:
        if t in eos_ids:
            break
        out.append(int(t))
    return out


def _hf_generate(model, **kwargs):
    return model.generate(**kwargs, max_new_tokens=N, do_sample=False,
                          pad_token_id=model.config.text_config.pad_token_id)


def test_greedy_none_equals_transformers_generate(artifacts, hf_tiny, image_files):
    from transformers.image_utils import load_image

    model, processor = hf_tiny
    inputs = processor(images=load_image(str(image_files[0])), text=chat(processor, QUESTION), return_tensors="pt")
    with torch.no_grad():
        expected = _hf_generate(model, **inputs)[0, inputs["input_ids"].shape[1]:].tolist()
    with Pipeline.load(artifacts("none", 576)) as pipe:
        result = pipe.generate(image_files[0], QUESTION, max_new_tokens=N)
    eos = set(pipe.manifest.model.eos_token_ids)
    assert result.token_ids[0] == _until_eos(expected, eos)
    assert result.visual_tokens == 576
    assert result.text == processor.tokenizer.decode(result.token_ids[0], skip_special_tokens=True)


def test_greedy_cls_attn_equals_reference_with_same_selection(artifacts, hf_tiny, image_files):
    from transformers.image_utils import load_image

    model, processor = hf_tiny
    text = chat(processor, QUESTION).replace("<image>", "<image>" * 64)
    ids = processor.tokenizer(text, return_tensors="pt")
    pixel_values = processor.image_processor(load_image(str(image_files[1])), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        embeds = spliced_embeds(model, ids["input_ids"], cls_attn_reference_features(model, pixel_values, 64))
        expected = _hf_generate(model, inputs_embeds=embeds, attention_mask=ids["attention_mask"])[0].tolist()
    with Pipeline.load(artifacts("cls-attn", 64)) as pipe:
        result = pipe.generate(image_files[1], QUESTION, max_new_tokens=N)
    assert result.token_ids[0] == _until_eos(expected, set(pipe.manifest.model.eos_token_ids))
    assert result.visual_tokens == 64


def test_batch_of_three_equals_three_single_runs(artifacts, image_files):
    prompts = ["Hi?", QUESTION, "Describe the picture in detail, with colours and objects."]
    with Pipeline.load(artifacts("cls-attn", 64)) as pipe:
        batch = pipe.generate(image_files, prompts, max_new_tokens=N)
        singles = [pipe.generate(img, p, max_new_tokens=N).token_ids[0] for img, p in zip(image_files, prompts)]
    assert batch.token_ids == singles


def test_sampling_is_reproducible_with_a_seed(artifacts, image_files):
    kwargs = dict(max_new_tokens=N, temperature=1.5, top_k=50, top_p=0.95)
    with Pipeline.load(artifacts("cls-attn", 64)) as pipe:
        a = pipe.generate(image_files[0], QUESTION, seed=11, **kwargs).token_ids
        b = pipe.generate(image_files[0], QUESTION, seed=11, **kwargs).token_ids
        others = [pipe.generate(image_files[0], QUESTION, seed=s, **kwargs).token_ids for s in (12, 13, 14)]
        greedy = pipe.generate(image_files[0], QUESTION, max_new_tokens=N).token_ids
    assert a == b
    assert any(o != a for o in others + [greedy])


def test_sampling_filters():
    from tokedge.runtime.generate import SamplingConfig, sample_next

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]]))
    rng = np.random.default_rng(0)
    top1 = {int(sample_next(logits, SamplingConfig(temperature=1.0, top_k=1), rng)[0]) for _ in range(50)}
    nucleus = {int(sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.7), rng)[0]) for _ in range(300)}
    full = {int(sample_next(logits, SamplingConfig(temperature=1.0), rng)[0]) for _ in range(2000)}
    assert top1 == {0} and nucleus == {0, 1} and full == {0, 1, 2, 3}


def test_runtime_budget_changes_visual_tokens(artifacts, image_files):
    with Pipeline.load(artifacts("cls-attn", 64, dynamic=(16, 576))) as pipe:
        assert pipe.generate(image_files[0], QUESTION, max_new_tokens=2).visual_tokens == 64
        assert pipe.generate(image_files[0], QUESTION, max_new_tokens=2, budget=200).visual_tokens == 200
        with pytest.raises(InputError, match="16..576"):
            pipe.generate(image_files[0], QUESTION, budget=600)


def test_cli_run_json(artifacts, image_files, capsys):
    rc = main(["run", str(artifacts("cls-attn", 64)), "--image", str(image_files[0]), "--prompt", QUESTION,
               "--max-new-tokens", "5", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["visual_tokens"] == 64 and len(out["token_ids"]) <= 5 and isinstance(out["text"], str)
    for key in ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token"):
        assert out["timings"][key] >= 0
    assert out["timings"]["ttft_ms"] >= out["timings"]["prefill_ms"]


def test_cli_run_streams_text(artifacts, image_files, capsys):
    rc = main(["run", str(artifacts("none", 576)), "--image", str(image_files[0]), "--prompt", QUESTION,
               "--max-new-tokens", "6"])
    assert rc == 0
    with Pipeline.load(artifacts("none", 576)) as pipe:
        expected = pipe.generate(image_files[0], QUESTION, max_new_tokens=6).text
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("args,fragment", [
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--top-p", "0"], "--top-p"),
    (["--temperature", "-1"], "--temperature"),
    (["--budget", "100"], "fixed budget of 64"),
    (["--backend", "cuda"], "--backend cuda"),
    (["--max-new-tokens", "5000"], "limit of 2048"),
])
def test_cli_run_bad_options(artifacts, image_files, capsys, args, fragment):
    rc = main(["run", str(artifacts("cls-attn", 64)), "--image", str(image_files[0]), "--prompt", QUESTION, *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and fragment in err and len(err.splitlines()) == 1
