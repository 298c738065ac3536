"""In-LLM methods (fastv, dart) on LLaVA-NeXT (anyres): the vision graph keeps every packed token
of every image, the prefill prunes over all image positions of the prompt, keeping
`--budget` x (images in the prompt). Checked against the loop-based PyTorch reference of
tests/export/test_in_llm.py (transformers' own decoder layers, eager attention, DynamicCache),
fed with transformers' own packed image features and processor ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.export.test_in_llm import pruned_reference

STEPS = 4
QUESTION = "What is shown here?"
FULL = 576 + 48 * 49  # the tiny LLaVA-NeXT's full_tokens (base + the 672x672 map with newlines)
BUDGET = FULL // 5  # 20% of the full token count, per image
SIZES = {"640x480": [(480, 640)], "1000x1000": [(1000, 1000)], "two images": [(480, 640), (150, 1000)]}


def _image(height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(height * 13 + width)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def hf_next(tiny_llava_next_dir):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_llava_next_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_llava_next_dir)


@pytest.fixture(scope="module")
def next_in_llm(tiny_llava_next_dir, tmp_path_factory):
    from tokedge.export.pipeline import ExportConfig, export

    root = tmp_path_factory.mktemp("next-in-llm")
    made = {}

    def make(method: str) -> "Path":  # noqa: F821
        if method not in made:
            made[method] = root / method
            export(ExportConfig(model=str(tiny_llava_next_dir), out=made[method], method=method, budget=BUDGET))
        return made[method]

    return make


@torch.no_grad()
def reference(model, processor, images, stages, pivots):
    """transformers' processor ids and packed image features spliced into its embeddings, then the
    loop-based pruning reference with each stage keeping its per-image count x the images."""
    conversation = [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": QUESTION}]}]
    batch = processor(images=images, text=[processor.apply_chat_template(conversation, add_generation_prompt=True)],
                      return_tensors="pt")
    cfg = model.config
    feats = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                           vision_feature_layer=cfg.vision_feature_layer,
                                           vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    return splice_and_prune(model, batch, feats.pooler_output, stages, pivots, len(images))


def splice_and_prune(model, batch, image_features, stages, pivots, images: int):
    """transformers' packed features (one tensor per image) spliced into its own embeddings at the
    processor's placeholders, then the loop-based pruning reference with each stage keeping its
    per-image count x the images. -> (prefill logits, greedy tokens, input ids) of row 0."""
    cfg = model.config
    feats = torch.cat(list(image_features))
    ids, mask = batch["input_ids"], batch["attention_mask"]
    embeds = model.get_input_embeddings()(ids)
    embeds = embeds.masked_scatter((ids == cfg.image_token_id).unsqueeze(-1), feats)
    image_pos = torch.nonzero(ids[0] == cfg.image_token_id).squeeze(1)[None]
    scaled = [{**s, "keep": s["keep"] * images} for s in stages]
    prefill, _, tokens = pruned_reference(model, embeds, mask, image_pos, scaled, pivots, STEPS)
    return prefill[0], tokens[0].tolist(), ids[0].numpy()


def _run(pipe, groups):
    """The runtime's own preprocessing, prompt expansion and generate: (generation, input_ids)."""
    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.runtime.layout import anyres_inputs

    layout, pre = pipe.manifest.layout.anyres(), pipe.manifest.preprocess
    inputs = [[anyres_inputs(img, layout, pre) for img in group] for group in groups]
    enc = pipe.encoder.encode([QUESTION] * len(groups), [[i.tokens for i in row] for row in inputs])
    gen = generate(pipe.graphs, [i for row in inputs for i in row], enc.input_ids, enc.attention_mask,
                   SamplingConfig(max_new_tokens=STEPS + 1), stop_at_eos=False,
                   images_per_row=[len(row) for row in inputs])
    return gen, enc.input_ids


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fastv", "dart"])
@pytest.mark.parametrize("case", list(SIZES))
def test_in_llm_on_anyres_matches_pruning_reference(next_in_llm, hf_next, method, case):
    from tokedge.artifact import load_artifact
    from tokedge.runtime.pipeline import Pipeline

    model, processor = hf_next
    art = next_in_llm(method)
    manifest = load_artifact(art)
    stages = [dict(s, rule=getattr(s["rule"], "value", s["rule"])) for s in manifest.reduction.stages]
    assert manifest.reduction.budget == BUDGET and stages[-1]["keep"] == BUDGET
    parity = manifest.reference["parity_at_export"]  # export replays its own per-image cases too
    assert parity["ok"] and len(parity["cases"]) == 2 and all(c["tokens_match"] for c in parity["cases"])
    images = [_image(*size) for size in SIZES[case]]
    exp_prefill, exp_tokens, exp_ids = reference(model, processor, images, stages,
                                                 int(manifest.reduction.options.get("pivots") or 8))
    with Pipeline.load(art) as pipe:
        gen, ids = _run(pipe, [images])
    np.testing.assert_array_equal(ids[0], exp_ids)
    np.testing.assert_allclose(gen.prefill_logits[0], exp_prefill, atol=1e-3, rtol=0)
    assert gen.token_ids[0] == exp_tokens
    assert gen.visual_tokens == BUDGET * len(images)  # image tokens the last layers attend to


@pytest.mark.slow
def test_batch_rows_with_different_image_counts_prune_alone(next_in_llm, hf_next):
    """A batch [one small image] + [two images]: each row keeps its own count (runs its prefill
    alone, caches merged with left padding) and decodes as the reference does for it alone."""
    from tokedge.artifact import load_artifact
    from tokedge.runtime.pipeline import Pipeline

    model, processor = hf_next
    art = next_in_llm("fastv")
    stages = [dict(s, rule=getattr(s["rule"], "value", s["rule"])) for s in load_artifact(art).reduction.stages]
    groups = [[_image(300, 300)], [_image(*size) for size in SIZES["two images"]]]
    expected = [reference(model, processor, g, stages, 8) for g in groups]
    with Pipeline.load(art) as pipe:
        gen, _ = _run(pipe, groups)
    for row, (exp_prefill, exp_tokens, _) in enumerate(expected):
        np.testing.assert_allclose(gen.prefill_logits[row], exp_prefill, atol=1e-3, rtol=0)
        assert gen.token_ids[row] == exp_tokens
