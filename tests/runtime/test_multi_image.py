"""Several images in one prompt (`tokedge run --image a --image b --prompt ...`, `Pipeline.generate`
with a list of images per prompt), against transformers' own processor and `generate` given the
same images in one conversation turn: LLaVA-NeXT (anyres, a token count per image) and LLaVA-1.5."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

QUESTION = "Compare these pictures."
NEW_TOKENS = 10
# (height, width): different sizes, so different tile grids and token counts (2340, 1306, 1176);
# two of them in one prompt stay inside the tiny model's 4096 positions
A, B, C = (480, 640), (150, 1000), (300, 300)


def _image(height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(height * 13 + width)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def hf_expected(model, processor, images: list[Image.Image], question: str, new_tokens: int = NEW_TOKENS):
    """transformers on one prompt with `images` (one image item each, in order): (prefill logits
    [vocab], greedy new tokens, input_ids)."""
    import torch

    conversation = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": question}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    batch = processor(images=images, text=[text], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits[0, -1].numpy()
        out = model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)[0, batch["input_ids"].shape[1]:]
    return logits, out.tolist(), batch["input_ids"][0].numpy()


@pytest.fixture(scope="module")
def hf_next(tiny_llava_next_dir):
    import torch
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_llava_next_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_llava_next_dir)


@pytest.fixture(scope="module")
def next_none(tiny_llava_next_dir, tmp_path_factory):
    from tokedge.export.pipeline import ExportConfig, export

    out = tmp_path_factory.mktemp("next-multi") / "art"
    export(ExportConfig(model=str(tiny_llava_next_dir), out=out, method="none"))
    return out


def _prefill_logits(pipe, images: list[Image.Image], question: str) -> tuple[np.ndarray, np.ndarray]:
    """The runtime's own preprocessing, prompt and one prefill: (logits [vocab], input_ids)."""
    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.runtime.layout import anyres_inputs
    from tokedge.runtime.preprocess import preprocess_batch

    if pipe.manifest.layout.kind == "anyres":
        pixel_values = [anyres_inputs(img, pipe.manifest.layout.anyres(), pipe.manifest.preprocess) for img in images]
        counts = [p.tokens for p in pixel_values]
    else:
        pixel_values = preprocess_batch(images, pipe.manifest.preprocess)
        counts = [pipe.manifest.prompt.visual_tokens] * len(images)
    enc = pipe.encoder.encode([question], [counts])
    gen = generate(pipe.graphs, pixel_values, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=1),
                   images_per_row=[len(images)])
    return gen.prefill_logits[0], enc.input_ids[0]


def test_two_images_in_one_prompt_match_transformers_next(next_none, hf_next):
    """LLaVA-NeXT, --method none: one prompt with two images of different sizes (each tiled on its
    own grid) == LlavaNextForConditionalGeneration.generate with the processor given both."""
    from tokedge.runtime.pipeline import Pipeline

    model, processor = hf_next
    images = [_image(*A), _image(*B)]
    exp_logits, exp_tokens, exp_ids = hf_expected(model, processor, images, QUESTION)
    with Pipeline.load(next_none) as pipe:
        result = pipe.generate(images, QUESTION, max_new_tokens=NEW_TOKENS)
        logits, ids = _prefill_logits(pipe, images, QUESTION)
    np.testing.assert_array_equal(ids, exp_ids)  # two image blocks of their own counts, in order
    assert int((ids == model.config.image_token_id).sum()) == 2340 + 1306 == result.visual_tokens
    assert result.token_ids[0] == exp_tokens
    np.testing.assert_allclose(logits, exp_logits, atol=1e-3, rtol=0)


def test_batch_of_prompts_with_different_image_counts_next(next_none, hf_next):
    """A batch [prompt with A and B, prompt with C] (left-padded together, different image counts)
    gives each prompt what transformers gives it alone."""
    from tokedge.runtime.pipeline import Pipeline

    model, processor = hf_next
    groups = [[_image(*A), _image(*B)], [_image(*C)]]
    questions = [QUESTION, "What is this?"]
    expected = [hf_expected(model, processor, g, q)[1] for g, q in zip(groups, questions)]
    with Pipeline.load(next_none) as pipe:
        result = pipe.generate(groups, questions, max_new_tokens=NEW_TOKENS)
    assert result.token_ids == expected


def test_two_images_in_one_prompt_match_transformers_llava(artifacts, hf_tiny, test_images):
    """LLaVA-1.5 (one 576-token view per image): two images in one prompt ==
    LlavaForConditionalGeneration with both images, and a batch mixing one- and two-image prompts."""
    from tokedge.runtime.pipeline import Pipeline

    model, processor = hf_tiny
    images = test_images[:2]
    exp_logits, exp_tokens, exp_ids = hf_expected(model, processor, images, QUESTION)
    single = hf_expected(model, processor, test_images[2:], "What is this?")[1]
    with Pipeline.load(artifacts("none", 576)) as pipe:
        result = pipe.generate(images, QUESTION, max_new_tokens=NEW_TOKENS)
        logits, ids = _prefill_logits(pipe, images, QUESTION)
        batch = pipe.generate([test_images[2], images], ["What is this?", QUESTION], max_new_tokens=NEW_TOKENS)
    np.testing.assert_array_equal(ids, exp_ids)
    assert result.token_ids[0] == exp_tokens and result.visual_tokens == 2 * 576
    np.testing.assert_allclose(logits, exp_logits, atol=1e-3, rtol=0)
    assert batch.token_ids == [single, exp_tokens]


def test_python_api_grouping_and_refusals():
    from tokedge.errors import InputError, UsageError
    from tokedge.runtime.pipeline import group_images, images_for_prompts

    assert group_images("a", "p") == ([["a"]], ["p"])
    assert group_images(["a", "b"], "p") == ([["a", "b"]], ["p"])  # one prompt, two images
    assert group_images(["a", "b"], ["p", "q"]) == ([["a"], ["b"]], ["p", "q"])  # pairs
    assert group_images([["a", "b"], "c"], ["p", "q"]) == ([["a", "b"], ["c"]], ["p", "q"])
    with pytest.raises(InputError, match="3 image entries for 2 prompts"):
        group_images(["a", "b", "c"], ["p", "q"])
    with pytest.raises(InputError, match="at least one image"):
        group_images([[], "c"], ["p", "q"])
    # the CLI's repeated flags
    assert images_for_prompts(["a", "b"], ["p"]) == [["a", "b"]]
    assert images_for_prompts(["a", "b"], ["p", "q"]) == [["a"], ["b"]]
    assert images_for_prompts(["a", "b", "c"], ["p", "q"], "2,1") == [["a", "b"], ["c"]]
    for images, prompts, grouping, fragment in [
        (["a", "b", "c"], ["p", "q"], None, "--images-per-prompt"),
        (["a"], ["p", "q"], None, "1 --image for 2 --prompt"),
        (["a", "b", "c"], ["p", "q"], "2,2", "adds up to 4"),
        (["a", "b", "c"], ["p", "q"], "3", "1 entries for 2 --prompt"),
        (["a", "b"], ["p", "q"], "2,0", "at least 1"),
        (["a", "b"], ["p", "q"], "x,1", "comma-separated"),
    ]:
        with pytest.raises(UsageError, match=fragment):
            images_for_prompts(images, prompts, grouping)


def test_cli_groups_images_into_prompts(next_none, tmp_path, capsys):
    """`tokedge run`: several --image with one --prompt = one prompt with all of them; as many
    --prompt as --image = pairs; --images-per-prompt groups a batch; anything else is one line."""
    from tokedge.cli import main

    paths = []
    for name, size in (("a.png", A), ("b.png", B), ("c.png", C)):
        _image(*size).save(tmp_path / name)
        paths.append(str(tmp_path / name))
    a, b, c = paths
    base = ["run", str(next_none), "--max-new-tokens", "2", "--json"]
    assert main([*base, "--image", a, "--image", b, "--prompt", QUESTION]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["visual_tokens"] == 2340 + 1306 and isinstance(out["text"], str)
    assert main([*base, "--image", c, "--prompt", "p1", "--image", b, "--prompt", "p2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["visual_tokens"] == 1176 and len(out["text"]) == 2  # pairs: row 0 holds C only
    assert main([*base, "--image", a, "--image", b, "--image", c, "--prompt", "p1", "--prompt", "p2",
                 "--images-per-prompt", "2,1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["visual_tokens"] == 2340 + 1306 and len(out["token_ids"]) == 2
    assert main([*base, "--image", a, "--image", b, "--image", c, "--prompt", "p1", "--prompt", "p2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--images-per-prompt" in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_multi_image_square_layouts_do_not_tile_images_of_multi_image_prompts(next_none, tmp_path):
    """OneVision's rule, read from the layout data: with `multi_image_square` set, each image of a
    prompt with several images is one square partition (base + newline: 577 tokens); a prompt
    with one image is still tiled. (The manifest is not in `files`, so flipping it keeps the
    artifact loadable; the graphs take any partition count.)"""
    import shutil

    from tokedge.runtime.pipeline import Pipeline

    art = tmp_path / "square"
    shutil.copytree(next_none, art)
    manifest = json.loads((art / "tokedge.json").read_text())
    manifest["layout"]["multi_image_square"] = True
    (art / "tokedge.json").write_text(json.dumps(manifest))
    with Pipeline.load(art) as pipe:
        one = pipe.generate(_image(*A), "hi", max_new_tokens=1)
        two = pipe.generate([_image(*A), _image(*B)], "hi", max_new_tokens=1)
    assert one.visual_tokens == 2340 and two.visual_tokens == 2 * (576 + 1)
