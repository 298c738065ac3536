"""Reduction methods on LLaVA-OneVision: divprune (pre-LLM, over an image's candidates) and the
in-LLM fastv and dart, on a 640x480 image and a 2000x1500 one whose map is shrunk bilinearly
(anyres_max_9), at one per-image budget both images can give: 20% of the 640x480 image's own
token count (2929 -> 585; OneVision's full_tokens, 8829, is an upper bound no test image reaches).

The independent reference: transformers' image processor, `LlavaOnevisionModel` modules (SigLIP
tower, projector, `pack_image_features` / `get_image_features`, the language model on
inputs_embeds with eager attention for the in-LLM scores) and selections written in plain loops
(`loop_divprune` of tests/export/test_anyres_methods.py, `pruned_reference` of
tests/export/test_in_llm.py). The artifacts run through the torch-free runtime; greedy tokens must
be equal, prefill logits within 1e-3, and divprune's kept tokens the same embeddings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.export.test_anyres_in_llm import QUESTION as IN_LLM_QUESTION
from tests.export.test_anyres_in_llm import _run, splice_and_prune
from tests.export.test_anyres_methods import loop_divprune, textured_image

SIZES = {"640x480": (480, 640), "2000x1500 (bilinear shrink)": (1500, 2000)}  # (height, width)
SMALL_TOKENS = 729 + 40 * 55  # 640x480: base view + 40 map rows of 54 tokens and a newline
BUDGET = int(0.2 * SMALL_TOKENS)  # 585 per image
QUESTION = "What is shown in this image?"
NEW_TOKENS = 8


def _image(height: int, width: int) -> Image.Image:
    return textured_image(height, width, seed=11)


@pytest.fixture(scope="module")
def artifact(ov_artifacts):
    """The session's shared OneVision artifacts (exported once with --budget BUDGET; the video
    tests use them too)."""
    return ov_artifacts


# --- the reference: transformers' modules + loop selections ---------------------------------------


@torch.no_grad()
def projected_candidates(ov_loaded, model, image) -> np.ndarray:
    """One image's candidates [C, hidden] by transformers: SigLIP at the feature layer (every row,
    "full"), the projector, then `pack_image_features` without newlines (unpadding and the
    anyres_max_9 bilinear shrink act on projected rows, as in `get_image_features`)."""
    cfg = model.config
    batch = ov_loaded.processor.image_processor([image], return_tensors="pt")
    parts = int((batch["pixel_values"][0].abs().flatten(1).sum(-1) > 0).sum())  # batch padding is all zeros
    out = model.model.vision_tower(batch["pixel_values"][0, :parts].float(), output_hidden_states=True)
    projected = model.model.multi_modal_projector(out.hidden_states[cfg.vision_feature_layer])
    packed, _ = model.model.pack_image_features([projected], batch["image_sizes"], image_newline=None,
                                                vision_aspect_ratio=cfg.vision_aspect_ratio)
    return packed[0].numpy()


@torch.no_grad()
def reference_generate(ov_loaded, model, image_embeds: np.ndarray):
    """transformers' LM on the prompt with `len(image_embeds)` image positions: prefill logits and greedy generate."""
    text = ov_loaded.family.render_images_prompt(ov_loaded, QUESTION, 1)
    text = text.replace("<image>", "<image>" * len(image_embeds))
    ids = ov_loaded.processor.tokenizer([text], return_tensors="pt")["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    embeds[ids == model.config.image_token_id] = torch.from_numpy(image_embeds).float()
    mask = torch.ones_like(ids)
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits[0, -1].numpy()
    tokens = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                            pad_token_id=ov_loaded.processor.tokenizer.pad_token_id)[0]
    return ids[0].numpy(), logits, tokens.tolist()


@torch.no_grad()
def in_llm_reference(ov_loaded, model, images, stages, pivots):
    """transformers' placeholder expansion (the processor's `replace_image_token`) and
    `get_image_features` (every packed token, newlines included) spliced into its embeddings, then
    the loop-based pruning reference keeping each stage's per-image count x the images."""
    cfg = model.config
    text = ov_loaded.family.render_images_prompt(ov_loaded, IN_LLM_QUESTION, len(images))
    batch = ov_loaded.family.reference_batch(ov_loaded, [images], [text])
    feats = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                           vision_feature_layer=cfg.vision_feature_layer,
                                           vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                           vision_aspect_ratio=cfg.vision_aspect_ratio,
                                           batch_num_images=batch["batch_num_images"])
    return splice_and_prune(model, batch, feats.pooler_output, stages, pivots, len(images))


# --- the tests --------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SIZES))
def test_divprune_matches_transformers_and_the_loop(case, artifact, ov_loaded, hf_onevision):
    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.runtime.layout import anyres_inputs
    from tokedge.runtime.pipeline import Pipeline

    image = _image(*SIZES[case])
    cand = projected_candidates(ov_loaded, hf_onevision, image)
    expected_embeds = cand[loop_divprune(cand, BUDGET)]
    ids, expected_logits, expected_tokens = reference_generate(ov_loaded, hf_onevision, expected_embeds)
    path, _ = artifact("divprune")
    with Pipeline.load(path) as pipe:
        layout, pre = pipe.manifest.layout.anyres(), pipe.manifest.preprocess
        full = anyres_inputs(image, layout, pre)
        result = pipe.generate(image, QUESTION, max_new_tokens=NEW_TOKENS)
        inputs = [anyres_inputs(image, layout, pre, budget=BUDGET)]
        enc = pipe.encoder.encode([QUESTION], [BUDGET])
        gen = generate(pipe.graphs, inputs, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=1))
    assert len(cand) < full.tokens  # candidates = the packed tokens without their newlines
    if case == "640x480":
        assert full.tokens == SMALL_TOKENS
    else:
        assert full.tokens == 7309  # 108 x 144 unpadded map shrunk to 70 x 93, + newlines + base
    np.testing.assert_array_equal(enc.input_ids[0], ids)
    assert result.visual_tokens == BUDGET
    np.testing.assert_allclose(gen.image_embeds[0], expected_embeds, atol=1e-4, rtol=1e-4)  # the same kept tokens
    np.testing.assert_allclose(gen.prefill_logits[0], expected_logits, atol=1e-3, rtol=0)
    assert result.token_ids[0] == expected_tokens


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fastv", "dart"])
@pytest.mark.parametrize("case", list(SIZES))
def test_in_llm_matches_the_pruning_reference(method, case, artifact, ov_loaded, hf_onevision):
    from tokedge.artifact import load_artifact
    from tokedge.runtime.pipeline import Pipeline

    path, _ = artifact(method)
    manifest = load_artifact(path)
    stages = [dict(s, rule=getattr(s["rule"], "value", s["rule"])) for s in manifest.reduction.stages]
    assert manifest.reduction.budget == BUDGET and stages[-1]["keep"] == BUDGET
    images = [_image(*SIZES[case])]
    exp_prefill, exp_tokens, exp_ids = in_llm_reference(ov_loaded, hf_onevision, images, stages,
                                                        int(manifest.reduction.options.get("pivots") or 8))
    with Pipeline.load(path) as pipe:
        gen, ids = _run(pipe, [images])
    np.testing.assert_array_equal(ids[0], exp_ids)
    np.testing.assert_allclose(gen.prefill_logits[0], exp_prefill, atol=1e-3, rtol=0)
    assert gen.token_ids[0] == exp_tokens
    assert gen.visual_tokens == BUDGET


@pytest.mark.slow
@pytest.mark.parametrize("method", ["divprune", "fastv", "dart"])
def test_export_parity_and_verify_pass(method, artifact):
    """Export validated against transformers on its example images (one case each); verify replays them."""
    from tokedge.verify import verify

    path, result = artifact(method)
    assert result.parity["ok"] and len(result.parity["cases"]) == 2
    assert all(c["tokens_match"] and c["max_abs_prefill_logits"] < 1e-3 for c in result.parity["cases"])
    report = verify(path)
    assert report.ok and len(report.cases) == 2


def test_method_rules_on_onevision(ov_loaded):
    """What exports on OneVision and what is refused, each refusal one line naming what works."""
    from tokedge.errors import UsageError
    from tokedge.reduce import METHODS, get_method
    from tokedge.reduce.base import Signal

    family = ov_loaded.family
    works = {"none", "divprune", "random", "fastv", "pdrop", "dart"}
    for name in METHODS:
        method = get_method(name)
        if method.reduces_over_time:  # video-only methods: image exports refuse them before the family
            continue
        if name in works:
            family.check_method(method)
            continue
        with pytest.raises(UsageError) as err:
            family.check_method(method)
        message = str(err.value)
        assert f"--method {name} " in message and "use --method divprune, fastv, pdrop, dart or none" in message
        assert "\n" not in message
        uses_cls = {Signal.CLS_ATTENTION, Signal.CLS_TOKEN, Signal.CLS_LOGITS} & set(method.scores_with)
        assert ("SigLIP tower has none" in message) == bool(uses_cls), name
