"""Token reduction on Qwen2.5-VL end to end: ONE `dart --keep 0.5` artifact, run torch-free
(`Pipeline`, the code of `tokedge run`) on a two-image prompt, equals the independent reference of
tests/export/test_qwen_in_llm.py (transformers' decoder layers, eager attention, rotary and
get_rope_index; Edge-LLM's per-image selection as loops) token for token with logits < 1e-3; each
image keeps ceil(n/2) of its n tokens. And the one-line refusals of --keep and of methods that
cannot act on Qwen's merged tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.export.test_qwen_in_llm import reference
from tokedge.errors import UsageError

STEPS = 4
QUESTION = "What differs?"


def _image(width, height, seed):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def dart_artifact(tmp_path_factory, tiny_qwen2_5_vl_dir):
    from tokedge.export.pipeline import ExportConfig, export

    out = tmp_path_factory.mktemp("qwen-dart") / "dart-keep0.5"
    export(ExportConfig(model=str(tiny_qwen2_5_vl_dir), out=out, method="dart", keep=0.5))
    return out


def test_dart_keep_run_equals_reference(dart_artifact, hf_qwen2_5_vl):
    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.layouts import prompt_inputs
    from tokedge.runtime.pipeline import Pipeline

    model, tok, processor = hf_qwen2_5_vl
    images = [_image(300, 200, seed=5), _image(224, 224, seed=6)]
    batch = processor(images=images, return_tensors="pt")
    counts = [int(g.prod()) // 4 for g in batch["image_grid_thw"]]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": QUESTION}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    parts = text.split("<|image_pad|>")
    ids = torch.tensor([tok(parts[0] + "".join("<|image_pad|>" * n + r for n, r in zip(counts, parts[1:])))["input_ids"]])
    is_img = (ids[0] == model.config.image_token_id).numpy()
    with torch.no_grad():
        feats = torch.cat(model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output)
        embeds = model.model.language_model.embed_tokens(ids).clone()
    embeds[ids == model.config.image_token_id] = feats
    mm = torch.from_numpy(is_img.astype(np.int64))[None]
    pos, _ = model.model.get_rope_index(ids, mm, image_grid_thw=batch["image_grid_thw"])
    quotas = [math.ceil(n / 2) for n in counts]  # Edge-LLM's dartReductionRatio 0.5
    ref_logits, kept = reference(model, embeds, pos, is_img, "dart", 2, quotas, STEPS)

    with Pipeline.load(dart_artifact) as pipe:
        assert pipe.manifest.reduction.keep == 0.5
        result = pipe.generate(images, QUESTION, max_new_tokens=STEPS)
        assert result.visual_tokens == sum(quotas) == len(kept)
        inputs = prompt_inputs(pipe.manifest, images)
        enc = pipe.encoder.encode([QUESTION], [counts])
        np.testing.assert_array_equal(enc.input_ids, ids.numpy())
        gen = generate(pipe.graphs, inputs, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=STEPS),
                       keep_logits=True, stop_at_eos=False, images_per_row=[len(images)])
    ref_tokens = ref_logits.argmax(-1).tolist()
    assert gen.token_ids[0][:STEPS] == ref_tokens
    assert np.abs(gen.prefill_logits[0] - ref_logits[0]).max() < 1e-3
    steps = np.stack([s[0] for s in gen.step_logits])[:STEPS - 1]
    assert np.abs(steps - ref_logits[1:1 + len(steps)]).max() < 1e-3
    assert result.token_ids[0] == ref_tokens[:len(result.token_ids[0])]  # `tokedge run` (may stop at EOS)


@pytest.mark.parametrize("kwargs,words", [
    ({"method": "tome", "budget": 64}, "PatchMerger"),
    ({"method": "dart", "keep": 0.5, "budget": 64}, "not both"),
    ({"method": "pdrop", "keep": 0.5}, "stages"),
    ({"method": "dart", "keep": 1.5}, "(0, 1]"),
    ({"method": "none", "keep": 0.5}, "keeps every"),
])
def test_refusals_are_one_line(tiny_qwen2_5_vl_dir, tmp_path, kwargs, words):
    from tokedge.export.pipeline import ExportConfig, export

    with pytest.raises(UsageError) as err:
        export(ExportConfig(model=str(tiny_qwen2_5_vl_dir), out=tmp_path / "art", **kwargs))
    assert "\n" not in str(err.value) and words in str(err.value)
    assert not (tmp_path / "art").exists()


def test_keep_refused_on_fixed_layouts(tiny_llava_dir, tmp_path):
    from tokedge.export.pipeline import ExportConfig, export

    with pytest.raises(UsageError) as err:
        export(ExportConfig(model=str(tiny_llava_dir), out=tmp_path / "art", method="dart", keep=0.5))
    assert "\n" not in str(err.value) and "--budget" in str(err.value)


@pytest.mark.slow
def test_profile_compares_dart_keeps_with_none(dart_artifact, qwen2_5_vl_artifact, tiny_qwen2_5_vl_dir, tmp_path):
    """Issue 11 acceptance 3: `tokedge profile --keeps 1,0.75,0.5` on the dart artifact reports
    latency and fidelity for none, dart keep 0.75 (re-exported) and 0.5 (itself). The session's
    `--method none` artifact stands where the profile would re-export none (it reuses a re-export
    already there), which saves an export."""
    import shutil

    from tokedge.artifact import load_artifact

    shutil.copytree(qwen2_5_vl_artifact, tmp_path / "artifacts" / "dart-keep0.5-none")
    from tokedge.report.profile import ProfileConfig, run_profile
    from tokedge.report.render import markdown, summary_lines

    images = []
    for i, (w, h) in enumerate([(300, 200), (224, 224)]):
        images.append(tmp_path / f"{i}.png")
        _image(w, h, seed=i + 5).save(images[-1])
    report = run_profile(ProfileConfig(artifact=dart_artifact, images=tuple(images), keeps=(1.0, 0.75, 0.5), runs=1,
                                       warmup=0, max_new_tokens=3, checkpoint=str(tiny_qwen2_5_vl_dir),
                                       reexport_dir=tmp_path / "artifacts"))
    assert [r.label() for r in report.results] == ["none (all tokens)", "dart keep 0.75", "dart keep 0.5"]
    full = [7 * 11, 8 * 8]  # merged tokens of 300x200 and 224x224
    for r, keep in zip(report.results, (1.0, 0.75, 0.5)):
        assert [e["visual_tokens"] for e in r.per_image] == [math.ceil(keep * n) for n in full]
        assert r.ttft_ms > 0 and r.prefill_ms > 0 and r.decode_ms_per_token > 0
        assert r.fidelity is not None and 0.0 <= r.fidelity["token_overlap"] <= 1.0
    assert report.results[0].fidelity["first_token_agreement"] == 1.0  # the reference itself
    assert report.fidelity_reference == "tokedge with --method none"
    assert load_artifact(tmp_path / "artifacts" / "dart-keep0.5-keep-0.75").reduction.keep == 0.75
    text = markdown(report)
    assert "| dart keep 0.75 |" in text and "| none (all tokens) |" in text
    assert any(line.startswith(f"dart keep 0.5 ({report.results[2].visual_tokens} tokens):")
               for line in summary_lines(report))


@pytest.fixture(scope="module")
def visionzip_artifact(tmp_path_factory, tiny_qwen2_5_vl_dir):
    from tokedge.export.pipeline import ExportConfig, export

    out = tmp_path_factory.mktemp("qwen-vz") / "visionzip-keep0.5"
    export(ExportConfig(model=str(tiny_qwen2_5_vl_dir), out=out, method="visionzip", keep=0.5))
    return out


def test_visionzip_keep_run_equals_reference(visionzip_artifact, hf_qwen2_5_vl):
    """A pre-LLM artifact end to end: each image's vision run keeps ceil(n/2) tokens (mean received
    attention, no CLS) and the prompt carries them at their unreduced M-RoPE positions; greedy
    tokens and prefill logits equal transformers' tower + loop selection + its language model."""
    from tests.export.test_qwen_pre_llm import visionzip_loop

    _pre_llm_run_equals_reference(visionzip_artifact, hf_qwen2_5_vl, 0.5,
                                  lambda merged, score, keys, grid, k: visionzip_loop(merged, score, keys, k))


@pytest.fixture(scope="module")
def pool_artifact(tmp_path_factory, tiny_qwen2_5_vl_dir):
    from tokedge.export.pipeline import ExportConfig, export

    out = tmp_path_factory.mktemp("qwen-pool") / "pool-keep0.25"
    export(ExportConfig(model=str(tiny_qwen2_5_vl_dir), out=out, method="pool", keep=0.25))
    return out


def test_pool_keep_run_equals_reference(pool_artifact, hf_qwen2_5_vl):
    """`pool --keep 0.25` end to end: the 8x8 merged grid (224x224) pools 2x2 windows, the 7x11 one
    (300x200) 20 band windows; each token the mean of its window of transformers' merged tokens at
    the M-RoPE position of the window's top-left token (the loop of tests/export/test_qwen_pre_llm.py)."""
    from tests.export.test_qwen_pre_llm import pool_loop

    _pre_llm_run_equals_reference(pool_artifact, hf_qwen2_5_vl, 0.25,
                                  lambda merged, score, keys, grid, k: pool_loop(merged, int(grid[2]) // 2, k))


def _pre_llm_run_equals_reference(artifact, hf_qwen2_5_vl, keep, pick):
    from tests.export.test_qwen_pre_llm import tower_signals
    from tokedge.runtime.pipeline import Pipeline

    model, tok, processor = hf_qwen2_5_vl
    images = [_image(300, 200, seed=7), _image(224, 224, seed=8)]
    kept_idx, kept, grids = [], [], []
    for image in images:
        batch = processor(images=[image], return_tensors="pt")
        merged, score, keys = tower_signals(model, batch["pixel_values"], batch["image_grid_thw"])
        idx, tokens = pick(merged, score, keys, batch["image_grid_thw"][0], math.ceil(merged.shape[0] * keep))
        kept_idx.append(idx)
        kept.append(tokens)
        grids.append(batch["image_grid_thw"][0])
    counts = [int(g.prod()) // 4 for g in grids]
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": QUESTION}]
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    parts = text.split("<|image_pad|>")
    full = torch.tensor([tok(parts[0] + "".join("<|image_pad|>" * n + r for n, r in zip(counts, parts[1:])))["input_ids"]])
    token = model.config.image_token_id
    is_img = (full[0] == token).numpy()
    img_pos = np.flatnonzero(is_img)
    starts = np.cumsum([0, *counts[:-1]])
    cols = np.sort(np.concatenate([np.flatnonzero(~is_img)] + [img_pos[s + np.asarray(i)] for s, i in zip(starts, kept_idx)]))
    pos, _ = model.model.get_rope_index(full, (full == token).long(), image_grid_thw=torch.stack(grids))
    ids, pos = full[:, cols], pos[:, :, cols]
    ref_tokens, logits = [], []
    with torch.no_grad():
        x = model.model.language_model.embed_tokens(ids).clone()
        x[ids == token] = torch.cat(kept)
        for _ in range(STEPS):  # greedy without a cache: the whole sequence each step, new tokens at last + 1
            out = model(inputs_embeds=x, position_ids=pos, attention_mask=torch.ones(x.shape[:2], dtype=torch.long))
            logits.append(out.logits[0, -1].numpy())
            nxt = int(out.logits[0, -1].argmax())
            ref_tokens.append(nxt)
            x = torch.cat([x, model.model.language_model.embed_tokens(torch.tensor([[nxt]]))], 1)
            pos = torch.cat([pos, pos[:, :, -1:] + 1], 2)
    from tokedge.runtime.generate import SamplingConfig, generate
    from tokedge.layouts import prompt_inputs

    with Pipeline.load(artifact) as pipe:
        assert pipe.manifest.reduction.keep == keep
        result = pipe.generate(images, QUESTION, max_new_tokens=STEPS)
        inputs = prompt_inputs(pipe.manifest, images)
        enc = pipe.encoder.encode([QUESTION], [[x.tokens for x in inputs]])
        np.testing.assert_array_equal(enc.input_ids, ids.numpy())  # ceil(keep * n) placeholders per image
        gen = generate(pipe.graphs, inputs, enc.input_ids, enc.attention_mask, SamplingConfig(max_new_tokens=STEPS),
                       keep_logits=True, stop_at_eos=False, images_per_row=[len(images)])
    assert result.visual_tokens == sum(math.ceil(n * keep) for n in counts)
    assert result.token_ids[0] == ref_tokens[:len(result.token_ids[0])]  # `tokedge run` (may stop at EOS)
    assert gen.token_ids[0] == ref_tokens
    assert np.abs(gen.prefill_logits[0] - logits[0]).max() < 1e-3
    steps = np.stack([s[0] for s in gen.step_logits])[:STEPS - 1]
    assert np.abs(steps - np.stack(logits[1:1 + len(steps)])).max() < 1e-3


def test_keep_artifact_speaks_of_its_keep_ratio(dart_artifact, tmp_path, capsys, monkeypatch):
    """Issue 28 item 14: a --keep artifact reported "budget 8192" in verify and `run --budget 50` said
    "fixed budget of 8192 visual tokens". Now verify names each case's image and the keep ratio, and
    run says --budget does not apply and why."""
    from tokedge.cli import main

    monkeypatch.setenv("COLUMNS", "80")
    image = tmp_path / "a.png"
    _image(300, 200, seed=5).save(image)
    rc = main(["run", str(dart_artifact), "--image", str(image), "--prompt", "hi", "--budget", "50"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "--budget 50 does not apply" in err and "--keep 0.5" in err and "8192 visual tokens" not in err
    assert main(["verify", str(dart_artifact)]) == 0
    err = capsys.readouterr().err
    flat = " ".join(err.split())
    assert "budget 8192" not in flat and "(keep 0.5): embeds" in flat
    with np.load(dart_artifact / "reference.npz") as ref:
        sizes = sorted({f"image {ref[k].shape[1]}x{ref[k].shape[0]}," for k in ref.files if k.endswith(".image")})
    assert sizes and all(size in flat for size in sizes)
    assert all(len(line) <= 80 for line in err.splitlines())
