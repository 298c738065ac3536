"""Temporal methods (evs, dycoke, fastvid, holitom, vidcom2) on a LLaVA-OneVision video artifact, end to end (issue 13).

Export with the method (its graph fixed to 8 frames, keep 0.25 -> 392 of 1568 frame tokens; vidcom2 also
--budget 784), then
`tokedge run --video` on an 8-frame PyAV clip through the real CLI and the torch-free runtime.
The independent reference: transformers' own loader and `get_video_features` on the same clip, the
loop reference selection of each method's test (tests/reduce/test_evs.py, test_dycoke.py) on those
features, the newline appended, and `generate` with the reduced tokens as `mm_encoder_outputs`
(docs/research/video.md 1.5). Tokens equal, prefill logits within 1e-3, kept tokens the same.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

av = pytest.importorskip("av")
torch = pytest.importorskip("torch")

from tests.export.test_onevision_video_run import FRAMES, NEW_TOKENS, QUESTION, _cli, _frames, hf_video_inputs
from tests.reduce.test_dycoke import reference_budget
from tests.reduce.test_evs import reference_keep
from tests.reduce.test_fastvid import reference as fastvid_reference
from tests.reduce.test_holitom import reference as holitom_reference
from tests.reduce.test_vidcom2 import reference as vidcom2_reference
from tests.runtime.test_video import write_clip

KEEP = 392  # the default keep ratio 0.25 of 8 x 196

OPTIONS = {"fastvid": (("cuts", "3"),)}  # 3 segments of the 8 frames (the default 8 cuts: one frame each)


def _fastvid(feats: np.ndarray, attn: np.ndarray, keep: int):
    return fastvid_reference(feats, attn, keep, cuts=3)


REFERENCES = {"evs": reference_keep, "dycoke": reference_budget,
              "vidcom2": lambda feats, keep: vidcom2_reference(feats, keep, keep / feats[:, :, 0].size)}


@pytest.fixture(scope="module")
def clip8(tmp_path_factory):
    path = tmp_path_factory.mktemp("ov-temporal-clip") / "clip8.mp4"
    write_clip(path, FRAMES, frames=_frames(FRAMES))
    return path


@pytest.fixture(scope="module")
def temporal_artifacts(tiny_llava_onevision_dir, tmp_path_factory):
    from tokedge.export.pipeline import ExportConfig, export

    root = tmp_path_factory.mktemp("ov-temporal")
    made = {}

    def get(method: str, budget: int | None = None):  # None: the method's default keep ratio 0.25 (KEEP)
        if (method, budget) not in made:
            cfg = ExportConfig(model=str(tiny_llava_onevision_dir), out=root / f"{method}-{budget}", method=method,
                               validate=False, options=OPTIONS.get(method, ()), budget=budget)
            made[method, budget] = export(cfg).out
        return made[method, budget]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("method,budget", [("evs", KEEP), ("dycoke", KEEP), ("fastvid", KEEP), ("holitom", KEEP),
                                           ("vidcom2", KEEP), ("vidcom2", 2 * KEEP)])  # vidcom2: its second budget
def test_run_video_equals_transformers_with_loop_reference_selection(method, budget, temporal_artifacts, ov_loaded,
                                                                     hf_onevision, clip8, capsys):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from tokedge.runtime.generate import SamplingConfig
    from tokedge.runtime.pipeline import Pipeline
    from tokedge.runtime.video_pipeline import generate_video, video_inputs, video_plan

    art = temporal_artifacts(method, None if budget == KEEP else budget)
    manifest = json.loads((art / "tokedge.json").read_text())
    assert manifest["reduction"]["method"] == method and manifest["reduction"]["stage"] == "temporal"
    assert manifest["reduction"]["budget"] == budget and manifest["video"]["default_frames"] == FRAMES

    _, pixels, _ = hf_video_inputs(ov_loaded, clip8, FRAMES)
    with torch.no_grad():
        pooled = hf_onevision.model.get_video_features(pixel_values_videos=pixels).pooler_output[0]
    feats = pooled[:-1].reshape(FRAMES, 196, -1).numpy()
    if method in ("fastvid", "holitom"):  # + the last layer's received attention, pooled as transformers pools
        attn = received_attention(hf_onevision, pixels[0])
        if method == "fastvid":
            keep, merged = _fastvid(feats, attn, budget)
        else:
            _, merged, keep = holitom_reference(feats, attn, budget)
        reduced = torch.cat([torch.from_numpy(merged).float(), pooled[-1:]])
    else:
        keep = REFERENCES[method](feats, budget)
        reduced = torch.cat([pooled[:-1][torch.tensor(keep)], pooled[-1:]])  # kept frame tokens + the newline
    video_token = ov_loaded.processor.video_token
    text = ov_loaded.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}])
    ids = ov_loaded.processor.tokenizer([text.replace(video_token, video_token * (budget + 1))],
                                        return_tensors="pt")["input_ids"]
    with torch.no_grad():
        encoded = {"video": BaseModelOutputWithPooling(pooler_output=reduced[None])}
        ref = hf_onevision.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                    mm_encoder_outputs=encoded, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True)
    ref_tokens = ref.sequences[0, ids.shape[1]:].tolist()

    per_frame = np.bincount(np.asarray(keep) // 196, minlength=FRAMES).tolist()
    if method == "evs":  # the real CLI once (the same runtime path as below for the others)
        rc, out, err = _cli(capsys, "run", art, "--video", clip8, "--frames", FRAMES, "--prompt", QUESTION,
                            "--max-new-tokens", NEW_TOKENS, "--json")
        assert rc == 0, err
        result = json.loads(out)
        assert result["token_ids"] == ref_tokens
        assert result["visual_tokens"] == KEEP + 1 and result["video"]["budget"] == KEEP
        assert result["video"]["kept_per_frame"] == per_frame

    with Pipeline.load(art) as pipe:
        video = pipe.manifest.video
        inputs = video_inputs(pipe.manifest, clip8, FRAMES)
        plan = video_plan(pipe.manifest, inputs.frames)
        enc = pipe.encoder.encode_video(QUESTION, video.video_token, video.video_token_id, plan.placeholders)
        gen = generate_video(pipe.graphs, inputs, plan, enc.input_ids, enc.attention_mask,
                             SamplingConfig(max_new_tokens=NEW_TOKENS))
    np.testing.assert_array_equal(enc.input_ids[0], ids[0].numpy())
    np.testing.assert_allclose(gen.video_tokens, reduced.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(gen.prefill_logits[0], ref.logits[0][0].numpy(), atol=1e-3, rtol=0)
    assert gen.token_ids[0] == ref_tokens and gen.kept_per_frame == per_frame


def received_attention(hf_model, pixels) -> np.ndarray:
    """transformers' tower with eager attention: the last layer's probabilities, mean over heads and
    queries ([F, 729]), then OneVision's own `apply_pooling` (bilinear 27 -> 14) -> [F, 196]."""
    tower = hf_model.model.vision_tower
    assert hf_model.config.vision_feature_layer == -1  # the feature layer is the last one
    previous = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = tower(pixels, output_attentions=True, return_dict=True)
    finally:
        tower.set_attn_implementation(previous)
    attn = out.attentions[-1].float().mean(dim=1).mean(dim=1)
    with torch.no_grad():
        return hf_model.model.apply_pooling(attn[..., None])[..., 0].numpy()


@pytest.mark.slow
def test_fixed_counts_refuse_other_frames_and_budgets(temporal_artifacts, clip8, tmp_path, capsys):
    art = temporal_artifacts("evs")
    for argv, needle in [(["run", art, "--video", clip8, "--frames", 4], "takes exactly 8 frames"),
                         (["run", art, "--video", clip8, "--budget", 100], "keeps 392 of the video's"),
                         (["run", art, "--video", clip8, "--keep", 0.5], "keeps 392 of the video's"),
                         (["profile", art, "--video", clip8, "--budgets", "100"], "keeps 392 of 1568")]:
        rc, _, err = _cli(capsys, *argv, "--prompt", QUESTION)
        lines = err.strip().splitlines()
        assert rc != 0 and len(lines) == 1 and needle in lines[0], (argv, err)
    # profile: the unreduced run (the graph skipped) as the fidelity reference, then the artifact's budget
    rc, _, err = _cli(capsys, "profile", art, "--video", clip8, "--runs", 1, "--warmup", 0, "--max-new-tokens", 2,
                      "--out", tmp_path / "prof")
    assert rc == 0, err
    report = json.loads((tmp_path / "prof" / "report.json").read_text())
    assert report["stage"] == "temporal" and [r["budget"] for r in report["results"]] == [1568, KEEP]
    assert report["results"][0]["kept_per_frame"] == [196] * FRAMES
    assert sum(report["results"][1]["kept_per_frame"]) == KEEP and report["results"][1]["visual_tokens"] == KEEP + 1


def test_temporal_export_refusals(tiny_llava_onevision_dir, tmp_path, capsys):
    """One line each: --frames belongs to temporal methods; dycoke pairs frames; no runtime budget."""
    cases = [(["--method", "divprune", "--frames", 8], "drop --frames"),
             (["--method", "dycoke", "--frames", 7], "even frame count"),
             (["--method", "evs", "--dynamic-budget", "200:400"], "drop --dynamic-budget")]
    for argv, needle in cases:
        rc, _, err = _cli(capsys, "export", tiny_llava_onevision_dir, "--out", tmp_path / "a", *argv)
        lines = [line for line in err.strip().splitlines() if not line.startswith("✓")]  # progress lines
        assert rc == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, (argv, err)
        assert not (tmp_path / "a").exists()
