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
    for r, raw in zip(report.results, saved["results"]):
        assert raw["budget"] == r.budget and raw["backend"] == "onnxruntime"
        assert raw["ttft_ms"] >= raw["vision_ms"] + raw["prefill_ms"] > 0 and raw["decode_ms_per_token"] > 0
        assert r.p90["ttft_ms"] >= r.ttft_ms and r.reduction_ms is not None and r.peak_rss_mb > 0
        for stage in ("ttft_ms", "vision_ms", "prefill_ms", "decode_ms_per_token"):
            assert r.p10[stage] <= getattr(r, stage) <= r.p90[stage]
        assert 0 < r.rss_before_load_mb < r.peak_rss_mb
        assert r.predicted["kind"].startswith("predicted") and r.predicted["ttft_ms"] > 0
        # the tiny model is far below what a roofline can say: the launch floor sets the rate
        assert r.predicted["overhead_bound"] and r.predicted["bound"]["decode"] == "latency floor"
        assert r.predicted["tokens_per_s"] < 1e6 / (3 * 10 * 6)  # at least 3 layers x 10 kernels x 6 us
        assert 0 <= r.fidelity["token_overlap"] <= 1
    assert by_budget[576].fidelity == {"first_token_agreement": 1.0, "token_overlap": 1.0}
    assert report.gemm_peak_gflops_per_s > 0 and report.machine["cores"] >= 1
    md = (out / "report.md").read_text()
    assert "| 64 | onnxruntime | 64 |" in md and "Predicted on jetson-orin-nano-8gb" in md
    assert any("kernel-launch and call floors" in w for w in report.warnings)


def test_profile_refuses_to_overwrite_a_report(artifacts, image, tmp_path, capsys):
    art = artifacts("cls-attn", 64)
    out = tmp_path / "r"
    args = ["profile", str(art), "--image", str(image), "--runs", "1", "--warmup", "0", "--max-new-tokens", "2",
            "--out", str(out)]
    assert main(args) == 0
    before = (out / "report.json").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "report.json").read_bytes() == before
    assert main([*args, "--force"]) == 0


def test_profile_terminal_summary_has_fidelity_and_prediction(artifacts, image, tmp_path, capsys):
    art = artifacts("cls-attn", 64, dynamic=(16, 576))
    assert main(["profile", str(art), "--image", str(image), "--budgets", "576,64", "--runs", "1", "--warmup", "0",
                 "--max-new-tokens", "2", "--predict", "jetson-orin-nano-8gb", "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    lines = err.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("budget 64:"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("  "))
    row64 = " ".join(lines[start:end])  # one row's fields, continued on indented lines
    assert "fidelity" in row64 and "predicted jetson-orin-nano-8gb" in row64 and "floor-bound" in row64
    assert "only 1 timed run" in err  # too few runs to trust is said, not hidden


def test_spread_warning():
    from tokedge.report.stats import spread, spread_warning

    assert spread([10.0, 10.0, 10.0, 10.0]) == 0.0
    assert spread_warning("x", [10.0, 10.5, 9.8, 10.1, 10.2]) is None
    noisy = spread_warning("budget 64 TTFT", [10.0, 11.0, 10.0, 40.0, 10.5])
    assert noisy and "budget 64 TTFT" in noisy and "vary" in noisy
    assert "raise --runs" in spread_warning("x", [10.0, 10.0])


def test_prediction_for_a_7b_model_is_bandwidth_bound(artifacts):
    """Llama-2-7B sizes on an Orin Nano: decode reads ~13.5 GB of fp16 weights per token, so the
    prediction must be close to bytes / bandwidth (an independent hand calculation)."""
    from dataclasses import replace

    from tokedge.artifact import load_artifact
    from tokedge.profiles import load_profile
    from tokedge.report.profile import predict

    m = load_artifact(artifacts("cls-attn", 64))
    big = replace(m.model, hidden_size=4096, num_layers=32, num_attention_heads=32, num_key_value_heads=32,
                  head_dim=128, intermediate_size=11008, vocab_size=32000)
    manifest = replace(m, model=big)
    orin = load_profile("jetson-orin-nano-8gb")
    got = predict(manifest, orin, 64, 40, 32)
    weight_bytes = 2 * (32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 4096 * 32000)
    expected_ms = weight_bytes / (orin.bandwidth_gbs * 1e9) * 1e3
    assert got["bound"]["decode"] == "memory" and not got["overhead_bound"]
    assert got["decode_ms_per_token"] == pytest.approx(expected_ms, rel=0.02)


def _hf_greedy(model, processor, image, question, n):
    """transformers' own generate, trimmed at the first EOS: the independent reference."""
    import torch

    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False,
                             pad_token_id=model.config.text_config.pad_token_id)
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    return ids[: next((i for i, t in enumerate(ids) if t in eos), len(ids))]


def test_profile_with_transformers_baseline(artifacts, tiny_llava_dir, hf_tiny, test_images, tmp_path):
    """Two images: the baseline runs both (not just the first) with SDPA, and its answers are
    transformers' generate for each image."""
    from PIL import Image

    model, processor = hf_tiny
    paths = []
    for i in (0, 1):
        paths += ["--image", str(tmp_path / f"{i}.png")]
        test_images[i].save(tmp_path / f"{i}.png")
    art = artifacts("cls-attn", 64)
    out = tmp_path / "r"
    assert main(["profile", str(art), *paths, "--runs", "1", "--warmup", "0", "--max-new-tokens", "5",
                 "--prompt", "What is this?", "--baseline", str(tiny_llava_dir), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    base = report["baseline"]
    assert base["visual_tokens"] == 576 and base["ttft_ms"] > 0 and base["attention"] == "sdpa"
    expected = [_hf_greedy(model, processor, Image.open(tmp_path / f"{i}.png"), "What is this?", 5) for i in (0, 1)]
    assert base["token_ids"] == expected
    assert len(base["samples"]["ttft_ms"]) == 2  # one timed run per image
    assert report["results"][0]["speedup_vs_baseline"]["ttft"] > 0
    assert report["fidelity_reference"].startswith("transformers")
    assert len(report["results"][0]["token_ids"]) == 2


def test_baseline_with_a_list_of_eos_ids(tiny_llava_dir, hf_tiny, test_images, tmp_path):
    """A checkpoint whose eos_token_id is a list: the baseline stops at any of them."""
    import shutil

    from tokedge.report.baseline import transformers_baseline

    model, processor = hf_tiny
    first = _hf_greedy(model, processor, test_images[0], "Describe this image.", 4)
    assert first  # the original checkpoint answers with at least one token
    ckpt = tmp_path / "eos-list"
    shutil.copytree(tiny_llava_dir, ckpt)
    for name in ("config.json", "generation_config.json"):
        path = ckpt / name
        if path.exists():
            data = json.loads(path.read_text())
            target = data.get("text_config", data)
            target["eos_token_id"] = [int(model.generation_config.eos_token_id), first[0]]
            path.write_text(json.dumps(data))
    base = transformers_baseline(str(ckpt), [test_images[0]], "Describe this image.", runs=1, warmup=0,
                                 max_new_tokens=4)
    assert base.token_ids == [[]]  # its first token is now one of the EOS ids


def test_profile_budget_outside_fixed_artifact(artifacts, image, tiny_llava_dir, tmp_path, capsys):
    art = artifacts("cls-attn", 64)
    out = tmp_path / "r"
    args = ["profile", str(art), "--image", str(image), "--budgets", "64,32", "--runs", "1", "--warmup", "0",
            "--max-new-tokens", "2", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "32" in err and "--checkpoint" in err and "--dynamic-budget" in err
    assert main([*args, "--checkpoint", str(tiny_llava_dir)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["visual_tokens"] for r in report["results"]] == [64, 32]
    reexported = out / "artifacts" / f"{art.name}-budget-32"
    assert (reexported / "tokedge.json").is_file() and report["results"][1]["artifact"] == str(reexported)
    assert any("budget 32 is outside" in w for w in report["warnings"])


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


def _vit_tokens_per_layer(checkpoint, method: str, budget: int) -> tuple[list[int], int]:
    """Tokens entering each ViT layer of tokedge's tome tower, counted with forward hooks."""
    import torch

    from tokedge.export.families import load_checkpoint
    from tokedge.reduce import get_method

    loaded = load_checkpoint(str(checkpoint), checkpoint)
    graph = loaded.family.modules(loaded, get_method(method), budget, {})["vision"]
    counts: list[int] = []
    for layer in graph.tower.layers:
        layer.layer_norm1.register_forward_hook(lambda mod, args, out: counts.append(int(args[0].shape[1])))
    size = loaded.model.config.vision_config.image_size
    with torch.no_grad():
        graph(torch.zeros(1, 3, size, size))
    return counts, loaded.model.config.vision_config.hidden_size


@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_tome_vision_flops_follow_the_exported_schedule(vision, tmp_path_factory):
    """ViT FLOPs for tome use the merge schedule recorded at export: per layer, the token count the
    tower really runs with (hooks), for a CLS tower and for SigLIP (no CLS, other protection)."""
    from tokedge.artifact import load_artifact
    from tokedge.export.pipeline import ExportConfig, export
    from tokedge.export.presets import TinyLlavaConfig, build_tiny_llava
    from tokedge.report import flops

    cfg = TinyLlavaConfig(vision=vision, image_size=224 if vision == "siglip" else 336)
    ckpt = build_tiny_llava(tmp_path_factory.mktemp("ckpt") / f"tiny-{vision}", cfg)
    out = tmp_path_factory.mktemp("art") / "tome"
    export(ExportConfig(model=str(ckpt), out=out, method="tome", budget=100, validate=False))
    m = load_artifact(out)
    assert sum(m.reduction.merge_schedule) == m.reduction.full_tokens - 100
    counts, d = _vit_tokens_per_layer(ckpt, "tome", 100)
    ff = 4 * d
    expected = sum(2 * n * 4 * d * d + 2 * 2 * n * n * d + 2 * n * 2 * d * ff for n in counts)
    expected += 2 * 100 * (d * m.model.hidden_size + m.model.hidden_size ** 2)
    assert flops.vision_cost(m, 100).flops == pytest.approx(expected)


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
    assert len(json.loads(capsys.readouterr().out)["profiles"]) == len(names)


def _synthetic_report():
    from tokedge.report.profile import BudgetResult

    results = []
    for k, ttft, dec in ((576, 120.0, 9.0), (192, 60.0, 8.5), (64, 40.0, 8.2), (16, 30.0, 8.0)):
        results.append(BudgetResult(
            budget=k, backend="onnxruntime", visual_tokens=k, artifact="a", ttft_ms=ttft, vision_ms=ttft / 3,
            prefill_ms=ttft / 2, preprocess_ms=ttft / 6, decode_ms_per_token=dec, tokens_per_s=1e3 / dec,
            p90={"ttft_ms": ttft * 1.1, "decode_ms_per_token": dec * 1.2}, peak_rss_mb=100.0, reduction_ms=0.1,
            prompt_tokens=10, flops={"vision": 1.0, "prefill": k / 100, "decode_per_token": 0.1},
            achieved_gflops_per_s={"vision": 1.0, "prefill": 1.0, "decode": 1.0},
            predicted={"ttft_ms": ttft / 50, "decode_ms_per_token": 1.0, "tokens_per_s": 1000.0,
                       "device": "jetson-orin-nano-8gb", "overhead_bound": False}))
    return ProfileReport(artifact="a", method="cls-attn", images=["i.png"], prompt="p", runs=5, warmup=2,
                         max_new_tokens=8, machine={}, gemm_peak_gflops_per_s=1.0, results=results,
                         baseline={"ttft_ms": 150.0, "decode_ms_per_token": 9.5, "attention": "sdpa",
                                   "visual_tokens": 576, "prefill_ms": 100.0, "ttft_p90_ms": 160.0})


def test_latency_plot_reads_at_a_glance():
    import matplotlib

    matplotlib.use("Agg")
    from tokedge.report.render import flops_figure, latency_figure

    report = _synthetic_report()
    fig = latency_figure(report)
    ax, ax2 = fig.axes  # TTFT by stage above, decode below
    labels = [t.get_text() for a in (ax, ax2) for t in a.get_legend().get_texts()]
    for wanted in ("decode ms/token (median)", "decode p90", "TTFT p90", "baseline TTFT (sdpa, all tokens)",
                   "baseline decode (sdpa, all tokens)", "predicted TTFT (jetson-orin-nano-8gb)"):
        assert wanted in labels
    assert ax2.get_ylim()[0] == 0 and ax.get_ylim()[0] == 0
    centres = sorted({round(p.get_x() + p.get_width() / 2, 6) for p in ax.patches})
    assert centres == [16, 64, 192, 576]  # budgets at their values, not evenly spaced
    fig = flops_figure(report)
    (line, _) = fig.axes[0].get_lines()[:2]
    assert list(line.get_xdata()) == [16, 64, 192, 576]
    assert fig.axes[0].get_ylim()[0] == 0


def test_profile_of_a_tiled_artifact_reports_each_image(artifacts, tiny_llava_next_dir, tmp_path, capsys):
    """`tokedge profile` on a LLaVA-NeXT artifact (`--method none`): per image, the partitions and
    visual tokens transformers' processor gives that image size, stage times, FLOPs that follow
    the partitions run, fidelity; the memory section and the prediction read the layout."""
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    art = artifacts("none", checkpoint=tiny_llava_next_dir)
    rng = np.random.default_rng(5)
    paths = []
    for width, height in ((1000, 750), (300, 900)):
        paths.append(tmp_path / f"img-{width}x{height}.png")
        Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(paths[-1])
    out = tmp_path / "report"
    assert main(["profile", str(art), *[a for p in paths for a in ("--image", str(p))], "--runs", "1", "--warmup",
                 "0", "--max-new-tokens", "3", "--predict", "jetson-orin-nx-16gb", "--baseline",
                 str(tiny_llava_next_dir), "--out", str(out), "--json"]) == 0
    report = ProfileReport.from_dict(json.loads((out / "report.json").read_text()))
    capsys.readouterr()
    processor = AutoProcessor.from_pretrained(tiny_llava_next_dir)
    (result,) = report.results
    assert result.budget == 2928  # --method none: the layout's largest count is the artifact's budget
    for entry, path in zip(result.per_image, paths):
        image = Image.open(path)
        batch = processor(images=[image], text=["<image>"], return_tensors="np")
        expected_tokens = int((batch["input_ids"][0] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum())
        pins = processor.image_processor.image_grid_pinpoints
        assert (entry["width"], entry["height"]) == image.size
        assert entry["partitions"] == image_size_to_num_patches((image.height, image.width), pins, 336)
        assert entry["visual_tokens"] == entry["vision_tokens"] == expected_tokens
        assert entry["ttft_ms"] >= entry["vision_ms"] > 0 and entry["prefill_ms"] > 0
        assert entry["fidelity"] == {"first_token_agreement": 1.0, "token_overlap": 1.0}
    wide, tall = result.per_image
    assert (wide["partitions"], tall["partitions"]) == (5, 4)
    # the tower runs once per partition and the projector on every partition's features
    assert wide["flops"]["vision"] / tall["flops"]["vision"] == pytest.approx(5 / 4, rel=1e-3)
    assert (wide["flops"]["prefill"] > tall["flops"]["prefill"]) == (wide["visual_tokens"] > tall["visual_tokens"])
    assert result.visual_tokens == max(wide["visual_tokens"], tall["visual_tokens"])
    assert result.flops["vision"] == pytest.approx((wide["flops"]["vision"] + tall["flops"]["vision"]) / 2, rel=1e-3)
    assert result.predicted["ttft_ms"] > 0 and report.memory["device"]["visual_tokens"] == 2928
    # transformers at all tokens, image by image: same greedy tokens, the largest image's count
    assert report.baseline["token_ids"] == result.token_ids
    assert report.baseline["visual_tokens"] == result.visual_tokens and result.speedup_vs_baseline["ttft"] > 0
    md = (out / "report.md").read_text()
    assert "| 2928 | onnxruntime |" in md
    assert "## Per image" in md and f"| 2928 | {paths[0].name} | 1000x750 | 5 | {wide['visual_tokens']} / " in md


def test_profile_of_a_tiled_image_over_budgets_prefill_falls(tiny_llava_next_dir, tmp_path, capsys):
    """Issue 10's acceptance: `tokedge profile` on a 1000x750 image over several budgets of a
    reduced LLaVA-NeXT artifact (one artifact per budget: the others re-exported from
    --checkpoint, as for LLaVA-1.5) writes its report with prefill falling with the budget."""
    import numpy as np
    from PIL import Image

    from tokedge.export.pipeline import ExportConfig, export

    art = tmp_path / "next-cls-576"
    export(ExportConfig(model=str(tiny_llava_next_dir), out=art, method="cls-attn", budget=576, validate=False))
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (750, 1000, 3), dtype=np.uint8)).save(image)
    out = tmp_path / "report"
    # every token (2928) cannot be a reduced tiled export (export's canvases give 2880 candidates):
    # refused in one line before the other budgets are re-exported (issue 28, item 15)
    assert main(["profile", str(art), "--image", str(image), "--budgets", "2928,256", "--checkpoint",
                 str(tiny_llava_next_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "2928" in err[0] and "<= 2880" in err[0] and not out.exists()
    assert main(["profile", str(art), "--image", str(image), "--budgets", "576,256,64", "--checkpoint",
                 str(tiny_llava_next_dir), "--runs", "3", "--warmup", "1", "--max-new-tokens", "4",
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    report = ProfileReport.from_dict(json.loads((out / "report.json").read_text()))
    # no full-token run is possible: fidelity is n/a, with the reason and --baseline (item 8)
    assert report.fidelity_reference is None and "--baseline" in report.fidelity_note
    assert "cannot keep all 2928" in report.fidelity_note and "fidelity n/a" in err
    by_budget = {r.budget: r for r in report.results}
    assert sorted(by_budget) == [64, 256, 576]
    assert [by_budget[k].visual_tokens for k in (64, 256, 576)] == [64, 256, 576]
    assert by_budget[576].prefill_ms > by_budget[64].prefill_ms
    assert by_budget[576].flops["prefill"] > by_budget[256].flops["prefill"] > by_budget[64].flops["prefill"]
    for r in report.results:
        (entry,) = r.per_image
        assert (entry["width"], entry["height"], entry["partitions"]) == (1000, 750, 5)
    assert (out / "report.md").is_file() and (out / "latency.png").is_file()
