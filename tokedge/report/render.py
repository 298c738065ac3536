"""Renderers: a ProfileReport (data) -> report.json, report.md and PNG plots. They read the report,
never live sessions."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokedge.report.profile import ProfileReport


def write_json(report: ProfileReport, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def markdown(report: ProfileReport) -> str:
    m = report.machine
    lines = [
        f"# tokedge profile: {Path(report.artifact).name} ({report.method})",
        "",
        f"Machine: {m.get('cpu')} ({m.get('cores')} cores, {m.get('memory_gb')} GiB), measured GEMM peak "
        f"{report.gemm_peak_gflops_per_s:.0f} GFLOP/s (fp32). Prompt: \"{report.prompt}\"; "
        f"{len(report.images)} image(s), {report.runs} runs after {report.warmup} warm-up, "
        f"{report.max_new_tokens} new tokens. Medians (p90 in brackets), milliseconds.",
        "",
        "| budget | backend | visual tokens | preprocess | vision | reduction | prefill | TTFT | decode/token | tokens/s "
        "| peak RSS MB | GFLOP vision / prefill | achieved GFLOP/s prefill | fidelity first / overlap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.results:
        fid = (f"{r.fidelity['first_token_agreement']:.2f} / {r.fidelity['token_overlap']:.2f}"
               if r.fidelity else "n/a")
        red = f"{r.reduction_ms:.2f}" if r.reduction_ms is not None else "n/a"
        lines.append(
            f"| {r.budget} | {r.backend} | {r.visual_tokens} | {r.preprocess_ms:.1f} | {r.vision_ms:.1f} | {red} "
            f"| {r.prefill_ms:.1f} | {r.ttft_ms:.1f} ({r.p90['ttft_ms']:.1f}) | {r.decode_ms_per_token:.2f} "
            f"({r.p90['decode_ms_per_token']:.2f}) | {r.tokens_per_s:.1f} | {r.peak_rss_mb:.0f} "
            f"| {r.flops['vision']:.2f} / {r.flops['prefill']:.2f} | {r.achieved_gflops_per_s['prefill']:.1f} | {fid} |"
        )
    if report.fidelity_reference:
        lines += ["", f"Fidelity compares greedy output with {report.fidelity_reference}."]
    if report.baseline:
        b = report.baseline
        lines += ["", "## Baseline: transformers eager, all visual tokens", "",
                  f"TTFT {b['ttft_ms']:.1f} ms (p90 {b['ttft_p90_ms']:.1f}), prefill {b['prefill_ms']:.1f} ms, "
                  f"decode {b['decode_ms_per_token']:.2f} ms/token, {b['visual_tokens']} visual tokens.", "",
                  "| budget | TTFT speed-up | decode speed-up |", "|---|---|---|"]
        lines += [f"| {r.budget} | {r.speedup_vs_baseline['ttft']:.2f}x | {r.speedup_vs_baseline['decode']:.2f}x |"
                  for r in report.results if r.speedup_vs_baseline]
    if report.predicted_on:
        d = report.predicted_on
        lines += ["", f"## Predicted on {d['name']} (roofline, not measured)", "",
                  f"{d['description']}: {d['fp16_tflops']} dense FP16 TFLOP/s, {d['bandwidth_gbs']} GB/s. "
                  "Lower bounds from FLOPs and bytes moved; real engines add kernel and launch overheads.", "",
                  "| budget | predicted TTFT ms | predicted decode ms/token | predicted tokens/s |", "|---|---|---|---|"]
        lines += [f"| {r.budget} | {r.predicted['ttft_ms']:.2f} | {r.predicted['decode_ms_per_token']:.3f} "
                  f"| {r.predicted['tokens_per_s']:.0f} |" for r in report.results if r.predicted]
    if report.tegrastats:
        t = report.tegrastats
        lines += ["", "## Jetson power and clocks (tegrastats)", "",
                  f"nvpmodel: {t.get('nvpmodel')}; mean power {t.get('mean_power_mw')} mW; "
                  f"GPU clock {t.get('gpu_mhz_min')}..{t.get('gpu_mhz_max')} MHz"]
    from tokedge.report.speed import speed_section

    lines += speed_section(report)
    for w in report.warnings:
        lines += ["", f"**Warning:** {w}"]
    return "\n".join(lines) + "\n"


def plots(report: ProfileReport, out: Path) -> list[Path]:
    """latency.png (stacked stages vs budget, decode on a second axis) and flops.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    results = sorted(report.results, key=lambda r: r.budget)
    labels = [str(r.budget) for r in results]
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(results)
    for stage, color in (("preprocess_ms", "#9ecae1"), ("vision_ms", "#3182bd"), ("prefill_ms", "#e6550d")):
        values = [getattr(r, stage) for r in results]
        ax.bar(labels, values, bottom=bottom, label=stage.replace("_ms", ""), color=color)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xlabel("visual-token budget")
    ax.set_ylabel("time to first token (ms)")
    ax2 = ax.twinx()
    ax2.plot(labels, [r.decode_ms_per_token for r in results], "k.-", label="decode ms/token")
    ax2.set_ylabel("decode (ms/token)")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"{report.method}: latency by stage")
    fig.tight_layout()
    path = out / "latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(labels, [r.flops["vision"] for r in results], "o-", label="vision")
    ax.plot(labels, [r.flops["prefill"] for r in results], "o-", label="prefill")
    ax.set_xlabel("visual-token budget")
    ax.set_ylabel("GFLOP per image")
    ax.legend()
    ax.set_title(f"{report.method}: analytical FLOPs")
    fig.tight_layout()
    path = out / "flops.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def write_all(report: ProfileReport, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    write_json(report, out / "report.json")
    (out / "report.md").write_text(markdown(report), encoding="utf-8")
    return [out / "report.json", out / "report.md", *plots(report, out)]
