"""`tokedge profile`: the three kinds of output, prefill falling with the budget, fidelity,
baseline and prediction; tegrastats parsing; analytical FLOPs; device profiles."""

from __future__ import annotations

import json

import pytest

from tokedge.cli import main
from tokedge.errors import UsageError
from tokedge.report.profile import ProfileReport, fidelity


@pytest.fixture(scope="module")
def image(tmp_path_factory, test_images):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    test_images[2].save(path)
    return path


def test_profile_writes_reports_and_prefill_falls(artifacts, image, tmp_path, capsys):
    art = artifacts("cls-attn", 64, dynamic=(16, 576))
    out = tmp_path / "report"
    rc = main(["profile", str(art), "--image", str(image), "--budgets", "576,192,64,16", "--runs", "5", "--warmup",
               "1", "--max-new-tokens", "4", "--out", str(out), "--predict", "jetson-orin-nano-8gb", "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.loads((out / "report.json").read_text())
    assert printed == saved
    assert {p.name for p in out.iterdir()} >= {"report.json", "report.md", "latency.png", "flops.png"}
    for png in ("latency.png", "flops.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = ProfileReport.from_dict(saved)
    by_budget = {r.budget: r for r in report.results}
    assert sorted(by_budget) == [16, 64, 192, 576]
    assert [by_budget[k].visual_tokens for k in (16, 64, 192, 576)] == [16, 64, 192, 576]
    assert by_budget[576].prefill_ms > by_budget[16].prefill_ms
    assert by_budget[576].flops["prefill"] > by_budget[192].flops["prefill"] > by_budget[16].flops["prefill"]
    for r in report.results:
        for key in ("budget", "backend", "ttft_ms", "vision_ms", "prefill_ms", "decode_ms_per_token"):
            assert key in saved["results"][0]
        assert r.p90["ttft_ms"] >= r.ttft_ms and r.reduction_ms is not None and r.peak_rss_mb > 0
        assert r.predicted["kind"].startswith("predicted") and r.predicted["ttft_ms"] > 0
        assert 0 <= r.fidelity["token_overlap"] <= 1
    assert by_budget[576].fidelity == {"first_token_agreement": 1.0, "token_overlap": 1.0}
    assert report.gemm_peak_gflops_per_s > 0 and report.machine["cores"] >= 1
    md = (out / "report.md").read_text()
    assert "| 64 | onnxruntime | 64 |" in md and "Predicted on jetson-orin-nano-8gb" in md


def test_profile_with_transformers_baseline(artifacts, image, tiny_llava_dir, tmp_path):
    art = artifacts("cls-attn", 64)
    out = tmp_path / "r"
    assert main(["profile", str(art), "--image", str(image), "--runs", "1", "--warmup", "0", "--max-new-tokens", "3",
                 "--baseline", str(tiny_llava_dir), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["baseline"]["visual_tokens"] == 576 and report["baseline"]["ttft_ms"] > 0
    assert report["results"][0]["speedup_vs_baseline"]["ttft"] > 0
    assert report["fidelity_reference"].startswith("transformers")


def test_profile_budget_outside_fixed_artifact_reexports(artifacts, image, tmp_path):
    art = artifacts("cls-attn", 64)
    out = tmp_path / "r"
    assert main(["profile", str(art), "--image", str(image), "--budgets", "64,32", "--runs", "1", "--warmup", "0",
                 "--max-new-tokens", "2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["visual_tokens"] for r in report["results"]] == [64, 32]


def test_profile_bad_options(artifacts, image, tmp_path, capsys):
    art = str(artifacts("cls-attn", 64))
    assert main(["profile", art, "--image", str(image), "--budgets", "a,b", "--out", str(tmp_path / "r")]) == 2
    assert "--budgets" in capsys.readouterr().err
    assert main(["profile", art, "--image", str(image), "--predict", "nope", "--out", str(tmp_path / "r")]) == 2
    assert "unknown device profile" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_fidelity_measures():
    assert fidelity([[1, 2, 3]], [[1, 2, 3]]) == {"first_token_agreement": 1.0, "token_overlap": 1.0}
    f = fidelity([[1, 2, 3, 4], [5, 6]], [[9, 2, 3], [5, 6]])
    assert f["first_token_agreement"] == 0.5 and f["token_overlap"] == pytest.approx((2 / 4 + 1) / 2)


def test_tegrastats_parsing_and_throttle():
    from tokedge.report.tegrastats import parse_line, summarise

    line = ("RAM 2514/7620MB (lfb 12x4MB) SWAP 0/3810MB CPU [12%@1510,8%@1510,off,off,3%@1510,1%@1510] "
            "EMC_FREQ 12%@2133 GR3D_FREQ 45%@[918] VDD_IN 5200mW/5100mW VDD_CPU_GPU_CV 1200mW/1100mW VDD_SOC 1500mW")
    s = parse_line(line)
    assert s.gpu_util == 45 and s.gpu_mhz == 918 and s.cpu_mhz == [1510, 1510, 1510, 1510]
    assert s.power_mw["VDD_IN"] == 5200 and s.power_mw["VDD_SOC"] == 1500
    slow = parse_line(line.replace("@[918]", "@[612]"))
    summary = summarise([s, slow, s], "NV Power Mode: 15W")
    assert summary.throttled and summary.gpu_mhz_min == 612 and summary.nvpmodel == "NV Power Mode: 15W"
    assert not summarise([s, s]).throttled


def test_flops_fall_with_budget_and_in_vit_cuts_vision(artifacts):
    from tokedge.artifact import load_artifact
    from tokedge.report import flops

    m = load_artifact(artifacts("cls-attn", 64))
    assert flops.prefill_cost(m, 20, 576).flops > 4 * flops.prefill_cost(m, 20, 64).flops
    assert flops.decode_cost(m, 600).bytes > flops.decode_cost(m, 100).bytes
    tome = load_artifact(artifacts("tome", 128))
    assert flops.vision_cost(tome, 128).flops < flops.vision_cost(m, 64).flops


def test_device_profiles_load_and_validate(tmp_path, capsys):
    from tokedge.profiles import list_profiles, load_profile

    names = set(list_profiles())
    assert {"jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb", "jetson-agx-thor", "rtx-4090",
            "h100-sxm"} <= names
    assert load_profile("jetson-orin-nano-8gb").trt_version == "10.3"
    bad = tmp_path / "bad.toml"
    text = (load_profile.__globals__["HERE"] / "rtx-4090.toml").read_text()
    bad.write_text(text.replace('trt_version = "11"', 'trt_version = "9"'))
    with pytest.raises(UsageError, match="trt_version"):
        load_profile(str(bad))
    bad.write_text(text + "\nturbo = true\n")
    with pytest.raises(UsageError, match="unknown key 'turbo'"):
        load_profile(str(bad))
    bad.write_text(text.replace("bandwidth_gbs = 1008.0", 'bandwidth_gbs = "fast"'))
    with pytest.raises(UsageError, match="bandwidth_gbs"):
        load_profile(str(bad))
    assert main(["profiles", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == len(names)
