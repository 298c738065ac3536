"""`tokedge build` planning (pure, TensorRT-free) and the TensorRT path's guards. Engine building
and the TensorRT runner need TensorRT and a GPU: those tests skip with the reason elsewhere."""

from __future__ import annotations

import json
import shutil

import pytest

from tokedge.artifact import load_artifact
from tokedge.build import FP32_LAYERS, precision_settings
from tokedge.build.trt import tensorrt_available
from tokedge.cli import main
from tokedge.errors import ArtifactError, IntegrityError, UsageError
from tokedge.profiles import load_profile

NO_TRT = "TensorRT with a CUDA GPU is not available on this machine"


def _dry_run(artifact, profile, capsys):
    assert main(["build", str(artifact), "--profile", profile, "--dry-run", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_dry_run_shapes_follow_manifest_and_profile(artifacts, capsys):
    art = artifacts("cls-attn", 64, dynamic=(16, 576))
    m, p = load_artifact(art), load_profile("jetson-orin-nano-8gb")
    out = _dry_run(art, "jetson-orin-nano-8gb", capsys)
    assert out["dry_run"] is True and not (art.parent / f"{art.name}.engines-{p.name}").exists()
    engines = {e["graph"]: e for e in out["plan"]["engines"]}
    assert set(engines) == {"vision", "embed", "decoder"}
    vision = engines["vision"]["profiles"][0]
    assert vision["shapes"]["pixel_values"] == {"min": [1, 3, 336, 336], "opt": [1, 3, 336, 336],
                                                 "max": [p.max_batch, 3, 336, 336]}
    assert vision["values"]["budget"] == {"min": [16], "opt": [64], "max": [576]}
    prefill, decode = engines["decoder"]["profiles"]
    assert (prefill["name"], decode["name"]) == ("prefill", "decode")
    hidden, kv, hd = m.model.hidden_size, m.model.num_key_value_heads, m.model.head_dim
    total = min(p.max_sequence, m.model.max_position_embeddings)  # the tiny model's 2048 positions cap it
    assert prefill["shapes"]["inputs_embeds"]["max"] == [p.max_batch, min(p.max_prompt_tokens, total - 1), hidden]
    assert prefill["shapes"]["inputs_embeds"]["min"][1] == 16 + 1  # the fewest visual tokens plus one text token
    assert prefill["shapes"]["past_key_values.0.key"]["max"] == [p.max_batch, kv, 0, hd]
    assert decode["shapes"]["inputs_embeds"]["max"] == [p.max_batch, 1, hidden]
    assert decode["shapes"]["past_key_values.2.value"]["max"] == [p.max_batch, kv, total - 1, hd]
    assert decode["shapes"]["attention_mask"]["max"] == [p.max_batch, total]
    for e in engines.values():
        assert e["strongly_typed"] is False and e["builder_flags"] == ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
        assert e["workspace_mb"] == p.workspace_mb and e["onnx_sha256"] == m.files[e["onnx"]]
        for prof in e["profiles"]:
            for rng in [*prof["shapes"].values(), *prof["values"].values()]:
                assert all(lo <= opt <= hi for lo, opt, hi in zip(rng["min"], rng["opt"], rng["max"]))


def test_dry_run_for_in_llm_artifact_has_group_axes(artifacts, capsys):
    art = artifacts("fastv", 64)
    p = load_profile("jetson-agx-orin-64gb")
    longest = min(p.max_sequence, load_artifact(art).model.max_position_embeddings)  # 2048 for the tiny model
    engines = {e["graph"]: e for e in _dry_run(art, p.name, capsys)["plan"]["engines"]}
    assert set(engines) == {"vision", "embed", "prefill", "decoder"}
    (decode,) = engines["decoder"]["profiles"]
    removed = 576 - 64
    assert decode["shapes"]["attention_mask.1"]["max"][1] == longest - removed
    assert decode["shapes"]["past_key_values.2.key"]["max"][2] == longest - 1 - removed
    assert decode["shapes"]["past_key_values.0.key"]["max"][2] == longest - 1
    prefill = engines["prefill"]["profiles"][0]
    # one image (576 positions) up to a prompt of several images filling the prompt length
    assert prefill["shapes"]["image_positions"]["min"] == [1, 576]
    assert prefill["shapes"]["image_positions"]["max"] == [p.max_batch, min(p.max_prompt_tokens, longest - 1) - 1]
    assert prefill["shapes"]["image_keep"] == {"min": [1], "opt": [1], "max": [1]}
    assert prefill["shapes"]["inputs_embeds"]["min"][1] == 577


def test_precision_flags_trt10_vs_trt11():
    orin, rtx = load_profile("jetson-orin-nano-8gb"), load_profile("rtx-4090")
    assert precision_settings(orin, "fp32") == (False, ("FP16", "OBEY_PRECISION_CONSTRAINTS"), FP32_LAYERS)
    assert precision_settings(orin, "fp16") == (False, ("FP16", "OBEY_PRECISION_CONSTRAINTS"), FP32_LAYERS)
    assert precision_settings(rtx, "fp16") == (True, (), ())
    with pytest.raises(UsageError, match="strongly typed"):
        precision_settings(rtx, "fp32")
    fp32_orin = orin.__class__(**{**orin.__dict__, "precision": "fp32"})
    assert precision_settings(fp32_orin, "fp32") == (False, (), ())


def test_trt11_plan_for_fp16_artifact(artifacts, capsys):
    out = _dry_run(artifacts("none", 576, dtype="fp16"), "h100-sxm", capsys)
    assert all(e["strongly_typed"] and e["builder_flags"] == [] for e in out["plan"]["engines"])


def test_budget_range_must_meet_profile(artifacts, tmp_path, capsys):
    bad = tmp_path / "tiny.toml"
    text = (load_profile.__globals__["HERE"] / "jetson-orin-nano-8gb.toml").read_text()
    bad.write_text(text.replace('name = "jetson-orin-nano-8gb"', 'name = "tiny"').replace("budget_min = 16",
                                                                                            "budget_min = 600")
                   .replace("budget_max = 2928", "budget_max = 700"))
    rc = main(["build", str(artifacts("cls-attn", 64, dynamic=(16, 576))), "--profile", str(bad), "--dry-run"])
    assert rc == 2 and "do not overlap" in capsys.readouterr().err


@pytest.mark.skipif(tensorrt_available(), reason="checks the message shown where TensorRT is missing")
def test_build_without_tensorrt_is_a_clean_error(artifacts, tmp_path, capsys):
    out = tmp_path / "engines"
    rc = main(["build", str(artifacts("cls-attn", 64)), "--profile", "jetson-orin-nano-8gb", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "TensorRT is not installed" in err and len(err.splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_tensorrt_backend_guards(artifacts, tmp_path):
    from tokedge.artifact import MANIFEST_NAME, sha256_file
    from tokedge.runtime.pipeline import Pipeline

    art = artifacts("cls-attn", 64)
    with pytest.raises(UsageError, match="--engines"):
        Pipeline.load(art, backend="tensorrt")
    engines = tmp_path / "engines"
    engines.mkdir()
    (engines / "engines.json").write_text(json.dumps({"artifact_manifest_sha256": "0" * 64, "engines": {}}))
    with pytest.raises(ArtifactError, match="different artifact"):
        Pipeline.load(art, backend="tensorrt", engines=engines)
    # engines recorded against this artifact's manifest (hashed here with hashlib) pass that check and
    # reach the next one: the engine's own hash, checked before anything is deserialised
    import hashlib

    manifest_sha = hashlib.sha256((art / MANIFEST_NAME).read_bytes()).hexdigest()
    assert sha256_file(art / MANIFEST_NAME) == manifest_sha
    (engines / "vision.plan").write_bytes(b"not an engine")
    (engines / "vision.plan.json").write_text(json.dumps({"plan_sha256": "a" * 64}))
    (engines / "engines.json").write_text(json.dumps({"artifact_manifest_sha256": manifest_sha,
                                                      "engines": {"vision": {"plan": "vision.plan", "sha256": "a" * 64}}}))
    with pytest.raises(IntegrityError, match="does not match its recorded sha256"):
        Pipeline.load(art, backend="tensorrt", engines=engines)


def test_engine_hash_checked_before_deserialising(tmp_path):
    from tokedge.build.trt import check_engine

    plan = tmp_path / "vision.plan"
    plan.write_bytes(b"not the engine that was built")
    with pytest.raises(IntegrityError, match="rebuild"):
        check_engine(plan, {"plan_sha256": "a" * 64}, "a" * 64)


@pytest.mark.skipif(not tensorrt_available(), reason=NO_TRT)
def test_tensorrt_engines_generate_like_onnxruntime(artifacts, tmp_path, test_images):  # pragma: no cover
    from tokedge.runtime.pipeline import Pipeline

    art = tmp_path / "art"
    shutil.copytree(artifacts("cls-attn", 64), art)
    assert main(["build", str(art), "--profile", "jetson-orin-nano-8gb"]) == 0
    engines = art.parent / f"{art.name}.engines-jetson-orin-nano-8gb"
    with Pipeline.load(art) as ort_pipe, Pipeline.load(art, backend="tensorrt", engines=engines) as trt_pipe:
        a = ort_pipe.generate(test_images[0], "What is this?", max_new_tokens=8)
        b = trt_pipe.generate(test_images[0], "What is this?", max_new_tokens=8)
    assert a.token_ids == b.token_ids


def test_prefill_never_exceeds_what_decode_can_continue(artifacts, capsys):
    art = artifacts("none", 576, dtype="fp16")  # TensorRT 11 profiles take fp16 artifacts
    positions = load_artifact(art).model.max_position_embeddings  # 2048: below h100-sxm's 16384 prompt cap
    engines = {e["graph"]: e for e in _dry_run(art, "h100-sxm", capsys)["plan"]["engines"]}
    prefill, decode = engines["decoder"]["profiles"]
    assert prefill["shapes"]["inputs_embeds"]["max"][1] == positions - 1
    assert decode["shapes"]["past_key_values.0.key"]["max"][2] == positions - 1
    assert decode["shapes"]["attention_mask"]["max"][1] == positions


class _FakeAllocator:
    """Stands in for cudaMalloc/cudaFree to test the runner's buffer bookkeeping on a CPU."""

    def __init__(self):
        self.next, self.live = 0x1000, set()

    def malloc(self, nbytes):
        self.next += 0x1000 + nbytes
        self.live.add(self.next)
        return self.next

    def free(self, ptr):
        self.live.remove(ptr)


def test_runner_buffers_zero_size_growth_and_retirement():
    from tokedge.build.trt import TrtRunner

    runner = TrtRunner.__new__(TrtRunner)
    runner.cuda, runner.buffers, runner.capacity, runner.retired = _FakeAllocator(), {}, {}, []
    empty = runner._buffer("past_key_values.0.key", 0)  # prefill's empty past still gets a buffer
    assert empty in runner.cuda.live
    small = runner._buffer("present.0.key", 100, slot=0)
    assert runner._buffer("present.0.key", 80, slot=0) == small  # reused when large enough
    other = runner._buffer("present.0.key", 100, slot=1)
    assert other != small  # ping-pong slots are distinct buffers
    grown = runner._buffer("present.0.key", 1000, slot=0)
    assert grown != small and small in runner.retired and small in runner.cuda.live  # not freed while referenced
    assert runner.capacity["present.0.key#0"] >= 1000


def test_dry_run_for_a_tiled_artifact_bounds_partitions_tokens_and_prompt(artifacts, tiny_llava_next_dir, tmp_path,
                                                                         capsys):
    """LLaVA-NeXT (`--method none`): the vision graph's partitions and packing rows follow the
    layout (base view + the most tiles a pinpoint has; the largest pinpoint's map with newlines),
    the decoder's sequence holds thousands of visual tokens; a profile too small for the largest
    image warns instead of failing."""
    from tokedge.export.presets import NEXT_PINPOINTS

    art = artifacts("none", checkpoint=tiny_llava_next_dir)
    m, p = load_artifact(art), load_profile("jetson-orin-nano-8gb")
    tiles = [(h // 336) * (w // 336) for h, w in NEXT_PINPOINTS]
    largest = 576 + max((h // 14) * (w // 14 + 1) for h, w in NEXT_PINPOINTS)  # full map + a newline per row
    assert largest == 2928
    out = _dry_run(art, p.name, capsys)
    engines = {e["graph"]: e for e in out["plan"]["engines"]}
    vision = engines["vision"]["profiles"][0]["shapes"]
    assert vision["pixel_values"]["min"] == [1 + min(tiles), 3, 336, 336]
    assert vision["pixel_values"]["max"] == [1 + max(tiles), 3, 336, 336]
    assert vision["pack_index"]["min"] == [576, 4] and vision["pack_index"]["max"] == [largest, 4]
    assert vision["pack_weight"]["max"] == [largest, 4]
    assert vision["pack_index"]["opt"] == [2340, 4] and vision["pixel_values"]["opt"][0] == 5  # a 1024x768 photo
    prefill, decode = engines["decoder"]["profiles"]
    total = min(p.max_sequence, m.model.max_position_embeddings)
    assert prefill["shapes"]["inputs_embeds"]["min"][1] == 576 + 1
    assert prefill["shapes"]["inputs_embeds"]["max"][1] == min(p.max_prompt_tokens, total - 1) > largest
    assert decode["shapes"]["attention_mask"]["max"][1] == total
    for e in engines.values():
        for prof in e["profiles"]:
            for rng in prof["shapes"].values():
                assert all(lo <= opt <= hi for lo, opt, hi in zip(rng["min"], rng["opt"], rng["max"]))
    assert out["plan"]["warnings"] == [] and any("per-image layout" in n for n in out["plan"]["notes"])
    assert out["memory"]["visual_tokens"] == largest  # the largest image (the KV cache holds the profile's limit)
    small = tmp_path / "small.toml"
    text = (load_profile.__globals__["HERE"] / f"{p.name}.toml").read_text()
    small.write_text(text.replace(f'name = "{p.name}"', 'name = "small"')
                     .replace(f"max_prompt_tokens = {p.max_prompt_tokens}", "max_prompt_tokens = 2048"))
    warned = _dry_run(art, str(small), capsys)["plan"]["warnings"]
    assert len(warned) == 1 and "images over 2047 visual tokens will not run" in warned[0]
    small.write_text(text.replace(f'name = "{p.name}"', 'name = "small"')
                     .replace(f"max_prompt_tokens = {p.max_prompt_tokens}", "max_prompt_tokens = 500"))
    assert main(["build", str(art), "--profile", str(small), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "fewer than the artifact's 576 visual tokens" in err and len(err.splitlines()) == 1
