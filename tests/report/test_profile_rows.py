"""`tokedge profile` rows (issue 28): interleaved rounds with their spread, memory per row in a
fresh process, FLOP counts against the graphs' own MatMuls and the GEMM peak they are shared of,
plots against what ran, fidelity's reason when n/a, budgets checked before re-exports, 80 columns."""

from __future__ import annotations

import json
import resource
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tokedge.cli import main
from tokedge.report.profile import STAGES, BudgetResult, Entry, ProfileConfig, ProfileReport

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def image(tmp_path_factory, test_images):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    test_images[2].save(path)
    return path


# --- item 3: interleaved rounds, spread ----------------------------------------------------------


class _Recorder:
    """A stand-in pipeline that logs each call and times it by its position in the log."""

    def __init__(self, log: list):
        self.log = log

    def generate(self, image, prompt, *, max_new_tokens, budget):
        self.log.append((budget, image))
        t = float(len(self.log))
        return SimpleNamespace(timings=SimpleNamespace(**{s: t for s in STAGES}), token_ids=[[len(self.log)]],
                               visual_tokens=budget)


def test_rounds_interleave_every_row_and_rotate():
    """Each round runs every row once per image (so load from other work falls on all rows alike),
    the first row rotates from round to round, warm-up rounds are not timed, and the greedy tokens
    are those of the first timed round."""
    from tokedge.report.profile import run_rounds

    log: list = []
    art = Path("a")
    entries = [Entry(k, None, art, k) for k in (576, 192, 64)]
    cfg = ProfileConfig(artifact=art, images=(), runs=3, warmup=1)
    rows = run_rounds(entries, {art: _Recorder(log)}, ["img0", "img1"], cfg, ["576", "192", "64"])
    assert len(log) == 4 * 3 * 2
    rounds = [log[i:i + 6] for i in range(0, len(log), 6)]
    for n, calls in enumerate(rounds):
        assert sorted(calls) == sorted((k, img) for k in (576, 192, 64) for img in ("img0", "img1"))
        assert calls[0][0] == (576, 192, 64)[n % 3]  # rotation: every row leads once in three rounds
    for row, k in zip(rows, (576, 192, 64)):
        assert len(row.samples["ttft_ms"]) == 3 * 2 and min(row.samples["ttft_ms"]) > 6  # round 0 untimed
        first_timed = [i + 1 for i, call in enumerate(log) if call[0] == k][2:4]  # round 1, both images
        assert row.tokens == [[i] for i in first_timed]
        assert row.llm_tokens == [k, k]


def test_quantiles():
    from tokedge.report.stats import p10, p90, quantile

    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0, 6.0, 7.0, 8.0, 9.0, 11.0]
    assert (p10(values), quantile(values, 0.5), p90(values)) == (2.0, 6.0, 10.0)  # numpy's "nearest" method
    assert p10(values) == np.quantile(values, 0.1, method="nearest")
    assert p90(values) == np.quantile(values, 0.9, method="nearest")
    assert p10([]) == 0.0


# --- item 1: memory per row --------------------------------------------------------------------


def test_memory_is_each_rows_own_peak_not_the_process_peak(artifacts, image):
    """With 600 MB held by this process, a row's memory is still that of a fresh process loading
    the tiny artifact: far below the ballast (the old `peak RSS` was this process's peak so far,
    and a child's getrusage inherits its parent's peak, so neither could pass)."""
    from tokedge.report.profile import measure_memory
    from tokedge.runtime.backends import Backend

    ballast = np.ones(600 * 2**20 // 8)  # touched: resident
    own_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert own_peak_mb > 600
    art = artifacts("cls-attn", 64, dynamic=(16, 576))
    mem = measure_memory(Entry(576, None, art, 576), Backend(), (image,), "Describe this image.", 2)
    assert 0 < mem["rss_before_load_mb"] < mem["peak_rss_mb"] < 400 < own_peak_mb
    del ballast


# --- item 4: FLOPs against the graphs, the GEMM peak --------------------------------------------


def _graph_matmul_gflops(monkeypatch, tmp_path, art: Path, image, budget: int | None) -> tuple[dict, object, int]:
    """GFLOP of every MatMul / FusedMatMul / Gemm node ONNX Runtime ran for one image and one new
    token (prefill only), per graph, from its profiler's output shapes: 2 * prod(output) * K."""
    import itertools
    import math

    import onnxruntime as ort

    from tokedge.report.profile import image_counts
    from tokedge.runtime.pipeline import Pipeline

    sessions = itertools.count()

    class Profiled(ort.SessionOptions):
        def __init__(self):
            super().__init__()
            self.enable_profiling = True
            # one prefix per session: ONNX Runtime names a trace prefix + the time to the second, so two
            # sessions ending in the same second would write (and both read back) one file
            self.profile_file_prefix = str(tmp_path / f"ort{next(sessions)}")

    monkeypatch.setattr(ort, "SessionOptions", Profiled)
    with Pipeline.load(art) as pipe:
        pipe.generate(image, "Describe this image.", max_new_tokens=1, budget=budget)
        traces = {name: Path(r.session.end_profiling()) for name, r in pipe.graphs.runners.items()}
        counts = image_counts(pipe.manifest, image, budget)
        encoded = pipe.encoder.encode(["Describe this image."], [counts.placeholders])
        prompt_tokens = int(encoded.attention_mask.sum()) - counts.placeholders
        manifest = pipe.manifest
    monkeypatch.undo()
    out = {}
    for name, trace in traces.items():
        total = 0
        for ev in json.loads(trace.read_text()):
            args = ev.get("args", {})
            if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time") and \
                    args.get("op_name") in ("MatMul", "FusedMatMul", "Gemm"):
                (a,) = args["input_type_shape"][0].values()
                (c,) = args["output_type_shape"][0].values()
                assert args["op_name"] != "Gemm" or len(a) == 2
                total += 2 * math.prod(c) * a[-1]  # K: the activation's last axis (weights are initializers)
        out[name] = total / 1e9
    return out, (manifest, counts), prompt_tokens


@pytest.mark.parametrize("budget", [576, 64])
def test_stage_flops_match_the_matmuls_onnxruntime_runs(budget, artifacts, test_images, monkeypatch, tmp_path):
    """The analytical vision and prefill FLOPs behind `achieved GFLOP/s` equal the MatMul FLOPs of
    the graphs ONNX Runtime executes (its profiler's shapes: an independent count), for a LLaVA
    pre-LLM artifact at the full and a reduced budget (the projector runs on the kept tokens only)."""
    from tokedge.report.profile import _stage_gflops

    art = artifacts("cls-attn", 64, dynamic=(16, 576))
    graphs, (manifest, counts), prompt_tokens = _graph_matmul_gflops(monkeypatch, tmp_path, art, test_images[0],
                                                                     budget)
    ours = _stage_gflops(manifest, budget, counts, prompt_tokens, 1)
    assert ours["vision"] == pytest.approx(graphs["vision"], rel=1e-3)
    assert ours["prefill"] == pytest.approx(sum(v for k, v in graphs.items() if k != "vision"), rel=1e-3)


def test_qwen_stage_flops_match_the_matmuls_onnxruntime_runs(qwen2_5_vl_artifact, test_images, monkeypatch,
                                                             tmp_path):
    """The same for a dynamic-resolution artifact: the tower over this image's own patches (window
    attention included), the merger and the prefill over this image's tokens."""
    from tokedge.report.profile import _stage_gflops

    graphs, (manifest, counts), prompt_tokens = _graph_matmul_gflops(monkeypatch, tmp_path, qwen2_5_vl_artifact,
                                                                     test_images[1], None)
    ours = _stage_gflops(manifest, manifest.reduction.budget, counts, prompt_tokens, 1)
    assert ours["vision"] == pytest.approx(graphs["vision"], rel=1e-3)
    assert ours["prefill"] == pytest.approx(sum(v for k, v in graphs.items() if k != "vision"), rel=1e-3)


def test_gemm_peak_runs_onnxruntimes_matmul():
    """The peak is measured with ONNX Runtime's MatMul (the engine the stages run on), from a model
    encoded by hand (profile imports no `onnx`): onnx itself accepts it and it multiplies."""
    import onnx
    import onnxruntime as ort

    from tokedge.report.machine import matmul_model

    model = onnx.load_from_string(matmul_model())
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["MatMul"]
    session = ort.InferenceSession(matmul_model(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 5), dtype=np.float32), rng.standard_normal((5, 2), dtype=np.float32)
    np.testing.assert_allclose(session.run(None, {"a": a, "b": b})[0], a @ b, rtol=1e-5)


# --- items 2 and 5: plots ------------------------------------------------------------------------


def _row(budget, visual, ttft, dec, keep=None, method="cls-attn"):
    return BudgetResult(
        budget=budget, backend="onnxruntime", visual_tokens=visual, artifact="a", ttft_ms=ttft, vision_ms=ttft / 3,
        prefill_ms=ttft / 2, preprocess_ms=ttft / 6, decode_ms_per_token=dec, tokens_per_s=1e3 / dec,
        p90={"ttft_ms": ttft * 1.1, "decode_ms_per_token": dec * 1.2},
        p10={"ttft_ms": ttft * 0.95, "decode_ms_per_token": dec * 0.9}, peak_rss_mb=100.0, reduction_ms=0.1,
        prompt_tokens=10, flops={"vision": 1.0, "prefill": visual / 100, "decode_per_token": 0.1},
        achieved_gflops_per_s={"vision": 1.0, "prefill": 1.0, "decode": 1.0}, method=method, keep=keep)


def _report(results, **extra) -> ProfileReport:
    return ProfileReport(artifact="a", method=results[-1].method, images=["i.png"], prompt="p", runs=5, warmup=2,
                         max_new_tokens=8, machine={}, gemm_peak_gflops_per_s=1.0, results=results, **extra)


def test_keeps_plot_is_against_the_visual_tokens_that_ran_and_names_none():
    """Qwen --keeps rows: budgets 4096..16384 are only the largest image's bounds; the runs used
    98..391 tokens. The x axis shows those, says what they are, and the title names `none` too."""
    import matplotlib

    matplotlib.use("Agg")
    from tokedge.report.render import flops_figure, latency_figure

    report = _report([_row(16384, 391, 90.0, 5.0, 1.0, "none"), _row(12288, 294, 80.0, 4.8, 0.75, "dart"),
                      _row(8192, 196, 70.0, 4.6, 0.5, "dart"), _row(4096, 98, 60.0, 4.5, 0.25, "dart")])
    fig = latency_figure(report)
    ax, ax2 = fig.axes
    assert list(ax2.get_xticks()) == [98, 196, 294, 391]
    assert ax2.get_xlabel().startswith("visual tokens") and "budget" not in ax2.get_xlabel()
    assert sorted({round(p.get_x() + p.get_width() / 2, 6) for p in ax.patches}) == [98, 196, 294, 391]
    title = ax.get_title()
    assert title.startswith("none (all tokens), dart keep 0.75/0.5/0.25\n")
    fig = flops_figure(report)
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [98, 196, 294, 391]
    assert "none (all tokens)" in fig.axes[0].get_title()


def test_baseline_ttft_and_decode_lines_are_apart():
    """Both baselines are usually the slowest on their own axis; on twin axes that each scale to
    their maximum they drew at the same height. On their own panels they cannot."""
    import matplotlib

    matplotlib.use("Agg")
    from tokedge.report.render import latency_figure

    report = _report([_row(k, k, t, d) for k, t, d in ((576, 120.0, 9.0), (192, 60.0, 8.5), (64, 40.0, 8.2))],
                     baseline={"ttft_ms": 150.0, "decode_ms_per_token": 9.5, "attention": "sdpa",
                               "visual_tokens": 576, "prefill_ms": 100.0, "ttft_p90_ms": 160.0})
    fig = latency_figure(report)
    fig.canvas.draw()
    ax, ax2 = fig.axes
    (ttft,) = [line for line in ax.get_lines() if line.get_label().startswith("baseline TTFT")]
    (dec,) = [line for line in ax2.get_lines() if line.get_label().startswith("baseline decode")]
    y_ttft = ax.transData.transform((100, ttft.get_ydata()[0]))[1]
    y_dec = ax2.transData.transform((100, dec.get_ydata()[0]))[1]
    assert abs(y_ttft - y_dec) > 50  # pixels
    bbox, bbox2 = ax.get_window_extent(), ax2.get_window_extent()
    assert bbox2.y1 < bbox.y0  # decode panel below the TTFT panel, no overlap


# --- item 6: video plots -------------------------------------------------------------------------


def test_video_report_writes_its_plots(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from tokedge.report.video_profile import (
        VideoBudgetResult,
        VideoProfileReport,
        video_latency_figure,
        write_video_report,
    )

    results = [VideoBudgetResult(
        budget=k, keep_share=k / 392, placeholders=k + 1, visual_tokens=k + 1, prompt_tokens=k + 20,
        kept_per_frame=[k // 2, k - k // 2], tokens_per_frame=k / 2,
        medians_ms={"vision_ms": 10.0, "reduce_ms": 1.0, "prefill_ms": k / 10, "ttft_ms": 11.0 + k / 10,
                    "decode_ms_per_token": 2.0},
        p90_ms={"vision_ms": 11.0, "reduce_ms": 1.1, "prefill_ms": k / 9, "ttft_ms": 12.0 + k / 9,
                "decode_ms_per_token": 2.2}, tokens_per_s=500.0, peak_rss_mb=1.0) for k in (392, 196, 39)]
    report = VideoProfileReport(artifact="a", method="divprune", stage="pre-llm", video="v.mp4", frames=2,
                                frame_indices=[0, 1], tokens_per_frame=196, full_tokens=392, prompt="p", runs=1,
                                warmup=0, max_new_tokens=2, machine={}, decode_preprocess_ms=1.0, results=results)
    files = write_video_report(report, tmp_path)
    assert {f.name for f in files} == {"report.json", "report.md", "latency.png", "tokens.png"}
    for name in ("latency.png", "tokens.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    ax = video_latency_figure(report).axes[0]
    assert sorted({round(p.get_x() + p.get_width() / 2, 6) for p in ax.patches}) == [39, 196, 392]


# --- items 8, 13, 14, 15: the command ------------------------------------------------------------


def test_fidelity_na_says_why_and_how(artifacts, image, tmp_path, capsys, monkeypatch):
    """A fixed-budget artifact profiled alone has no full-token run: fidelity is n/a, and the
    report and the terminal say why and name --baseline. Every terminal line fits 80 columns,
    broken between fields, never mid-word."""
    monkeypatch.setenv("COLUMNS", "80")
    art = artifacts("cls-attn", 64)
    out = tmp_path / "r"
    assert main(["profile", str(art), "--image", str(image), "--runs", "2", "--warmup", "0", "--max-new-tokens", "2",
                 "--predict", "jetson-orin-nano-8gb", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    report = ProfileReport.from_dict(json.loads((out / "report.json").read_text()))
    assert report.results[0].fidelity is None and report.fidelity_reference is None
    note = report.fidelity_note
    assert "--baseline" in note and "576" in note and "n/a" in note
    md = (out / "report.md").read_text()
    assert "--baseline" in md and "| n/a |" in md
    assert "--baseline" in err
    lines = err.splitlines()
    assert [line for line in lines if len(line) > 80 and str(tmp_path) not in line] == []
    # the fields of one row continue on indented lines, whole
    head = next(i for i, line in enumerate(lines) if line.startswith("budget 64:"))
    assert "TTFT" in lines[head] and lines[head + 1].startswith("  ")
    assert any(line.strip().startswith("predicted jetson-orin-nano-8gb: TTFT") for line in lines[head:head + 4])
    # sizes in units that show them (a 2 MB model is not "0.00 GB"), GB not lowered to "gb"
    assert "0.00 GB" not in err and " gb" not in md and "0.00 GB" not in md and " MB" in md
    assert report.memory_measure.startswith("peak RSS of a fresh process") and report.memory_measure in md
    assert report.timing.startswith("interleaved") and "ONNX Runtime" in report.gemm_peak_measure


def test_size_text():
    from tokedge.memory import size_text

    assert [size_text(n) for n in (2_300_000, 7.1e9, 64_000, 12)] == ["2.30 MB", "7.10 GB", "64.00 kB", "12 B"]


def test_old_reports_still_load():
    """report.json files written before these fields: defaults say what their numbers were."""
    raw = _report([_row(576, 576, 50.0, 8.0)]).to_dict()
    for key in ("timing", "memory_measure", "fidelity_note", "gemm_peak_measure"):
        raw.pop(key)
    for r in raw["results"]:
        r.pop("p10"), r.pop("rss_before_load_mb")
    report = ProfileReport.from_dict(raw)
    assert report.memory_measure.startswith("peak RSS of the profiling process so far")
    assert report.timing.startswith("sequential") and report.results[0].p10 == {}
    from tokedge.report.render import markdown, summary_lines

    assert "(p90 in brackets)" in markdown(report) and summary_lines(report)


def test_budgets_are_checked_before_any_reexport(artifacts, image, tiny_llava_dir, tmp_path, capsys):
    """A budget export refuses (here: above the model's 576) is refused in one line before the
    re-export of the others starts; then each re-export is announced on its own line."""
    art = artifacts("cls-attn", 64)
    out = tmp_path / "r"
    args = ["profile", str(art), "--image", str(image), "--runs", "1", "--warmup", "0", "--max-new-tokens", "2",
            "--checkpoint", str(tiny_llava_dir), "--out", str(out)]
    assert main([*args, "--budgets", "32,64,5000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "5000" in err[0] and "1..576" in err[0]
    assert not (out / "artifacts").exists()  # nothing was exported before the refusal
    assert main([*args, "--budgets", "64,48"]) == 0
    err = capsys.readouterr().err
    assert f"re-exporting budget 48 (1/1) from {tiny_llava_dir}" in err.replace("\n  ", " ")


def test_dynamic_resolution_rows_are_labelled_by_keep_not_by_the_bound(qwen2_5_vl_artifact, image, tmp_path,
                                                                      capsys):
    """A Qwen-VL artifact's `budget` is the largest image's bound (16384): the rows say `none (all
    tokens)` or `<method> keep R` with the tokens that ran, never "budget 16384"."""
    from dataclasses import replace

    from tokedge.artifact import load_artifact
    from tokedge.report.profile import _row_keep

    out = tmp_path / "r"
    assert main(["profile", str(qwen2_5_vl_artifact), "--image", str(image), "--runs", "1", "--warmup", "0",
                 "--max-new-tokens", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    report = ProfileReport.from_dict(json.loads((out / "report.json").read_text()))
    (r,) = report.results
    assert r.keep == 1.0 and f"none (all tokens) ({r.visual_tokens} tokens):" in err
    assert f"budget {r.budget}" not in err and r.visual_tokens < r.budget
    assert "| none (all tokens) |" in (out / "report.md").read_text()
    assert report.fidelity_reference == "tokedge with --method none" and report.fidelity_note is None
    m = load_artifact(qwen2_5_vl_artifact)
    dart = replace(m, reduction=replace(m.reduction, method="dart", stage="in-llm", keep=0.5))
    assert _row_keep(dart, None) == 0.5
    assert _row_keep(m, None) == 1.0
    # a keep artifact alone: fidelity n/a says how to get a reference, without the 16384 bound
    from tokedge.report.profile import _set_fidelity

    alone = _report([_row(dart.reduction.budget, 126, 50.0, 2.0, 0.5, "dart")])
    _set_fidelity(alone, ProfileConfig(artifact=qwen2_5_vl_artifact, images=()), dart)
    assert alone.fidelity_reference is None and alone.results[0].fidelity is None
    assert "--keeps 1,0.5 with --checkpoint" in alone.fidelity_note and "--baseline" in alone.fidelity_note
    assert str(dart.reduction.full_tokens) not in alone.fidelity_note


def test_profile_without_reexports_imports_no_torch(artifacts, image, tmp_path):
    """Profiling what the artifact can run needs the base install only: neither the rows' planning
    nor the memory probes nor the fidelity note import torch, transformers or onnx."""
    import os
    import subprocess
    import sys

    art = artifacts("cls-attn", 64, dynamic=(16, 576))
    code = ("import json, sys\nfrom tokedge.cli import main\n"
            f"rc = main(['profile', {str(art)!r}, '--image', {str(image)!r}, '--runs', '1', '--warmup', '0', "
            f"'--max-new-tokens', '2', '--out', {str(tmp_path / 'r')!r}])\n"
            "print(json.dumps([rc, sorted(m for m in ('torch', 'transformers', 'onnx') if m in sys.modules)]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [0, []], done.stderr[-2000:]
