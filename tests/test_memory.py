"""Memory plan: parameter arithmetic checked against transformers' own parameter counts and the
published Llama-7B size; the LLaVA-1.5-7B example (fp16 does not fit a Jetson Orin Nano 8 GB,
int4 does); predicted vs measured artifact bytes; the plan in build --dry-run, profile --predict
and as an export warning."""

from __future__ import annotations

import dataclasses
import json

import pytest

from tokedge.artifact import load_artifact
from tokedge.cli import main
from tokedge.memory import (
    LLAVA_15_7B,
    ParamCounts,
    WeightScheme,
    check_artifact_size,
    plan_for_device,
    plan_memory,
)
from tokedge.profiles import load_profile


def test_llama_7b_parameter_count_matches_the_published_size():
    # Llama-2-7B / Vicuna-7B: 6,738,415,616 parameters with the 32000-token vocabulary
    p = ParamCounts.of(dataclasses.replace(LLAVA_15_7B, vocab_size=32000))
    assert p.decoder_layers + p.embed + p.lm_head == 6_738_415_616


def test_param_counts_match_transformers(hf_tiny, artifacts):
    model, _ = hf_tiny
    info = load_artifact(artifacts("none")).model
    p = ParamCounts.of(info)
    lm = model.model.language_model
    assert p.embed == lm.embed_tokens.weight.numel()
    assert p.decoder_layers == sum(t.numel() for n, t in lm.named_parameters() if not n.startswith("embed_tokens"))
    assert p.lm_head == model.lm_head.weight.numel()
    tower = model.model.vision_tower
    used = sum(t.numel() for layer in tower.encoder.layers[: info.vision_layers] for t in layer.parameters())
    other = sum(t.numel() for t in [*tower.embeddings.parameters(), *tower.pre_layrnorm.parameters(),
                                    *model.model.multi_modal_projector.parameters()])
    assert p.vision == used + other


def test_llava_15_7b_fp16_does_not_fit_orin_nano_int4_does(capsys):
    nano = load_profile("jetson-orin-nano-8gb")

    def plan(scheme):
        return plan_memory(LLAVA_15_7B, ("vision", "embed", "decoder"), scheme, device=nano.name,
                           memory_gb=nano.memory_gb, visual_tokens=576, new_tokens=nano.max_new_tokens)

    fp16, int4 = plan(WeightScheme(2.0)), plan(WeightScheme(2.0, bits=4, group_size=128))
    assert not fp16.fits and fp16.weight_bytes["decoder"] > 13e9  # ~6.74B parameters at 2 bytes
    assert int4.fits and int4.total_bytes < 0.8 * nano.memory_gb * 1e9
    assert 3.3e9 < int4.weight_bytes["decoder"] < 3.9e9  # int4 layers (+fp16 scales) and an fp16 lm_head
    # the same through the CLI
    assert main(["memory", "llava-1.5-7b", "--profile", nano.name]) == 0
    assert "does NOT fit" in capsys.readouterr().out
    assert main(["memory", "llava-1.5-7b", "--profile", nano.name, "--quantize", "int4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is True


def test_predicted_artifact_bytes_within_15_percent(artifacts, tmp_path):
    for art in (artifacts("none"), artifacts("cls-attn", 64), artifacts("fastv", 64)):
        check = check_artifact_size(art, load_artifact(art))
        # the tiny model's graphs carry ~100 kB of node structure each beside < 1 MB of weights
        assert 0.8 <= check.ratio <= 1.0, (art, check)
    # bigger weights: the structure fades, the ratio closes on 1 (the bench artifact is checked to 15%)


def test_build_dry_run_and_export_warn_when_the_device_cannot_hold_it(artifacts, tiny_llava_dir, tmp_path, capsys):
    art = artifacts("cls-attn", 64)
    assert main(["build", str(art), "--profile", "jetson-orin-nano-8gb", "--dry-run", "--json"]) == 0
    memory = json.loads(capsys.readouterr().out)["memory"]
    assert memory["fits"] and memory["weight_bytes"]["decoder"] > 0 and memory["kv_cache_bytes"] > 0
    small = tmp_path / "tiny-device.toml"
    text = (load_profile("jetson-orin-nano-8gb").__dict__)
    small.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in {**text, "name": "tiny-device",
                                                                       "memory_gb": 0.001}.items()) + "\n")
    assert main(["build", str(art), "--profile", str(small), "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "does NOT fit" in err
    plan = plan_for_device(load_artifact(art), load_profile(str(small)))
    assert not plan.fits
    out = tmp_path / "exported"
    assert main(["export", str(tiny_llava_dir), "--method", "cls-attn", "--budget", "64", "--out", str(out),
                 "--profile", str(small), "--no-validate", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert any("does NOT fit" in w for w in summary["warnings"])
    assert main(["export", str(tiny_llava_dir), "--out", str(tmp_path / "x"), "--profile", "no-such-device"]) == 2
    assert "unknown device profile" in capsys.readouterr().err


def test_profile_reports_memory_and_gemm_share(artifacts, tmp_path, test_images, capsys):
    image = tmp_path / "img.png"
    test_images[0].save(image)
    art = artifacts("cls-attn", 64)
    assert main(["profile", str(art), "--image", str(image), "--runs", "1", "--warmup", "0", "--max-new-tokens", "2",
                 "--threads", "1", "--predict", "jetson-orin-nano-8gb", "--out", str(tmp_path / "r"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["threads"] == 1
    mem = report["memory"]
    assert 0.85 <= mem["artifact_bytes"]["ratio"] <= 1.15
    assert mem["device"]["fits"] and mem["cpu"]["peak_rss_bytes"] > mem["cpu"]["predicted_bytes"] > 0
    r = report["results"][0]
    for stage in ("vision", "prefill", "decode"):
        assert r["share_of_gemm_peak"][stage] == pytest.approx(
            r["achieved_gflops_per_s"][stage] / report["gemm_peak_gflops_per_s"], abs=2e-3)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "GEMM peak" in md and "predicted by the memory plan" in md
    assert main(["profile", str(art), "--image", str(image), "--threads", "-1", "--out", str(tmp_path / "q")]) == 2


def test_memory_plan_of_a_tiled_artifact_holds_its_largest_image(artifacts, tiny_llava_next_dir, capsys):
    """`tokedge memory` on a LLaVA-NeXT artifact: the KV cache holds the largest image the layout
    allows (base view + the 672x672 pinpoint's 48 x 48 map + 48 newlines) plus the text, and the
    vision activations cover the 5 partitions that image runs through the tower."""
    from tokedge.memory import activation_bytes

    art = artifacts("none", checkpoint=tiny_llava_next_dir)
    m, nx = load_artifact(art), load_profile("jetson-orin-nx-16gb")
    assert main(["memory", str(art), "--profile", nx.name, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    largest = 576 + 48 * 49
    assert plan["prompt_tokens"] == largest + 64
    tokens = largest + 64 + nx.max_new_tokens
    mi = m.model
    assert plan["kv_cache_bytes"] == 2 * mi.num_layers * mi.num_key_value_heads * mi.head_dim * tokens * nx.max_batch * 2
    one = activation_bytes(mi, largest, largest + 64, nx.max_batch, 2.0, partitions=1)
    five = activation_bytes(mi, largest, largest + 64, nx.max_batch, 2.0, partitions=5)
    assert plan["activation_bytes"] == five >= one
    assert any("largest image (2928 visual tokens, 5 partitions)" in n for n in plan["notes"])
    assert main(["memory", str(art), "--profile", nx.name]) == 0
    out = capsys.readouterr().out
    assert "2992+512 tokens" in out and "tiled layout" in out
