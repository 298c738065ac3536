"""Renderers: a ProfileReport (data) -> report.json, report.md and PNG plots. They read the report,
never live sessions."""

from __future__ import annotations

import io
import json
from pathlib import Path

from tokedge.report.profile import ProfileReport
from tokedge.safeio import write_atomic


def write_json(report: ProfileReport, path: Path) -> None:
    write_atomic(path, json.dumps(report.to_dict(), indent=2) + "\n")


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
            f"| {r.label()} | {r.backend} | {r.visual_tokens} | {r.preprocess_ms:.1f} | {r.vision_ms:.1f} | {red} "
            f"| {r.prefill_ms:.1f} | {r.ttft_ms:.1f} ({r.p90['ttft_ms']:.1f}) | {r.decode_ms_per_token:.2f} "
            f"({r.p90['decode_ms_per_token']:.2f}) | {r.tokens_per_s:.1f} | {r.peak_rss_mb:.0f} "
            f"| {r.flops['vision']:.2f} / {r.flops['prefill']:.2f} | {r.achieved_gflops_per_s['prefill']:.1f} | {fid} |"
        )
    if report.fidelity_reference:
        lines += ["", f"Fidelity compares greedy output with {report.fidelity_reference}."]
    rows = [(r, e) for r in report.results for e in r.per_image]
    if any(e["partitions"] > 1 for _, e in rows):  # tiled layouts: every image has its own counts
        lines += ["", "## Per image", "",
                  "Partitions the vision graph ran (base view + tiles) and visual tokens (vision graph / reaching "
                  "the LLM) follow each image's size.", "",
                  "| budget | image | size | partitions | visual tokens | vision | prefill | TTFT | decode/token "
                  "| GFLOP vision / prefill | fidelity first / overlap |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r, e in rows:
            fid = e.get("fidelity")
            fid_text = f"{fid['first_token_agreement']:.2f} / {fid['token_overlap']:.2f}" if fid else "n/a"
            lines.append(
                f"| {r.label()} | {Path(e['image']).name} | {e['width']}x{e['height']} | {e['partitions']} "
                f"| {e['vision_tokens']} / {e['visual_tokens']} | {e['vision_ms']:.1f} | {e['prefill_ms']:.1f} "
                f"| {e['ttft_ms']:.1f} | {e['decode_ms_per_token']:.2f} "
                f"| {e['flops']['vision']:.2f} / {e['flops']['prefill']:.2f} "
                f"| {fid_text} |"
            )
    if report.baseline:
        b = report.baseline
        lines += ["", f"## Baseline: transformers ({b.get('attention', 'eager')} attention), all visual tokens", "",
                  f"TTFT {b['ttft_ms']:.1f} ms (p90 {b['ttft_p90_ms']:.1f}), prefill {b['prefill_ms']:.1f} ms, "
                  f"decode {b['decode_ms_per_token']:.2f} ms/token, {b['visual_tokens']} visual tokens.", "",
                  "| budget | TTFT speed-up | decode speed-up |", "|---|---|---|"]
        lines += [f"| {r.label()} | {r.speedup_vs_baseline['ttft']:.2f}x | {r.speedup_vs_baseline['decode']:.2f}x |"
                  for r in report.results if r.speedup_vs_baseline]
    if report.predicted_on:
        d = report.predicted_on
        lines += ["", f"## Predicted on {d['name']} (roofline, not measured)", "",
                  f"{d['description']}: {d['fp16_tflops']} dense FP16 TFLOP/s, {d['bandwidth_gbs']} GB/s. "
                  "Lower bounds: max of FLOPs / peak, bytes / bandwidth and a latency floor (kernel launches and engine "
                  "calls); \"floor-bound\" rows are set by the floor, not by the model.", "",
                  "| budget | predicted TTFT ms | predicted decode ms/token | predicted tokens/s |", "|---|---|---|---|"]
        lines += [f"| {r.label()} | {r.predicted['ttft_ms']:.2f} | {r.predicted['decode_ms_per_token']:.3f} "
                  f"| {r.predicted['tokens_per_s']:.0f}{' (floor-bound)' if r.predicted.get('overhead_bound') else ''} |"
                  for r in report.results if r.predicted]
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


def summary_lines(report: ProfileReport) -> list[str]:
    """The terminal summary: per budget the medians, fidelity, the baseline speed-up and the
    prediction, so a budget can be chosen without opening report.md."""
    lines = []
    for r in sorted(report.results, key=lambda r: -r.budget):
        parts = [f"{r.label() if r.keep is not None else f'budget {r.budget:>4}'}: TTFT {r.ttft_ms:7.1f} ms (p90 {r.p90['ttft_ms']:.1f})",
                 f"decode {r.decode_ms_per_token:6.2f} ms/token"]
        if r.fidelity:
            parts.append(f"fidelity {r.fidelity['first_token_agreement']:.2f}/{r.fidelity['token_overlap']:.2f}")
        if r.speedup_vs_baseline:
            parts.append(f"vs baseline TTFT {r.speedup_vs_baseline['ttft']:.2f}x")
        if r.predicted:
            rate = f"{r.predicted['tokens_per_s']:.0f} tok/s" + (" (floor-bound)" if r.predicted.get("overhead_bound")
                                                                 else "")
            parts.append(f"predicted {r.predicted['device']}: TTFT {r.predicted['ttft_ms']:.2f} ms, {rate}")
        lines.append("  ".join(parts))
    if report.fidelity_reference:
        lines.append(f"fidelity (first-token agreement/token overlap) vs {report.fidelity_reference}")
    if report.baseline:
        b = report.baseline
        lines.append(f"baseline transformers ({b.get('attention', 'eager')} attention, {b['visual_tokens']} tokens): "
                     f"TTFT {b['ttft_ms']:.1f} ms, decode {b['decode_ms_per_token']:.2f} ms/token")
    return lines


def _budget_axis(ax, budgets: list[int]) -> None:
    """Budgets at their values (a linear axis), so cost that grows linearly looks linear."""
    ax.set_xticks(budgets)
    ax.set_xticklabels([str(b) for b in budgets], fontsize=8)
    ax.set_xlim(0, max(budgets) * 1.05 + 1)
    ax.set_xlabel("visual-token budget")


def latency_figure(report: ProfileReport):
    """Stacked TTFT stages per budget with p90 whiskers; decode ms/token (median and p90) on the
    right axis from 0; the baseline and the prediction when the report has them."""
    import matplotlib.pyplot as plt

    results = sorted(report.results, key=lambda r: r.budget)
    budgets = [r.budget for r in results]
    gaps = [b - a for a, b in zip(budgets, budgets[1:])] or [max(budgets)]
    width = max(1.0, 0.6 * min(gaps))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    bottom = [0.0] * len(results)
    for stage, color in (("preprocess_ms", "#9ecae1"), ("vision_ms", "#3182bd"), ("prefill_ms", "#e6550d")):
        values = [getattr(r, stage) for r in results]
        ax.bar(budgets, values, width=width, bottom=bottom, label=stage.replace("_ms", ""), color=color)
        bottom = [b + v for b, v in zip(bottom, values)]
    ttft = [r.ttft_ms for r in results]
    ax.errorbar(budgets, ttft, yerr=[[0.0] * len(results), [max(0.0, r.p90["ttft_ms"] - r.ttft_ms) for r in results]],
                fmt="none", ecolor="#444444", capsize=3, label="TTFT p90")
    if report.baseline:
        ax.axhline(report.baseline["ttft_ms"], color="#e6550d", linestyle="--", linewidth=1,
                   label=f"baseline TTFT ({report.baseline.get('attention', 'eager')}, all tokens)")
    predicted = [(r.budget, r.predicted["ttft_ms"]) for r in results if r.predicted]
    if predicted:
        ax.plot([b for b, _ in predicted], [v for _, v in predicted], "D", color="#31a354", markersize=4,
                label=f"predicted TTFT ({results[0].predicted['device']})")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)  # from 0, with room above the baseline line
    ax.set_ylabel("time to first token (ms)")
    _budget_axis(ax, budgets)
    ax2 = ax.twinx()
    ax2.plot(budgets, [r.decode_ms_per_token for r in results], "k.-", label="decode ms/token (median)")
    ax2.plot(budgets, [r.p90["decode_ms_per_token"] for r in results], "k:", linewidth=1, label="decode p90")
    if report.baseline:
        ax2.axhline(report.baseline["decode_ms_per_token"], color="k", linestyle="--", linewidth=0.8,
                    label="baseline decode")
    ax2.set_ylim(0, ax2.get_ylim()[1] * 1.08)
    ax2.set_ylabel("decode (ms/token)")
    handles, labels = ax.get_legend_handles_labels()
    handles2, labels2 = ax2.get_legend_handles_labels()
    # below the axes, so that it never hides the baseline lines or the bars
    ax.legend(handles + handles2, labels + labels2, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3,
              fontsize=7, frameon=False)
    ax.set_title(f"{report.method}: latency by stage (medians, whiskers to p90)")
    fig.tight_layout()
    return fig


def flops_figure(report: ProfileReport):
    import matplotlib.pyplot as plt

    results = sorted(report.results, key=lambda r: r.budget)
    budgets = [r.budget for r in results]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(budgets, [r.flops["vision"] for r in results], "o-", label="vision")
    ax.plot(budgets, [r.flops["prefill"] for r in results], "o-", label="prefill")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("GFLOP per image")
    _budget_axis(ax, budgets)
    ax.legend()
    ax.set_title(f"{report.method}: analytical FLOPs")
    fig.tight_layout()
    return fig


def plots(report: ProfileReport, out: Path) -> list[Path]:
    """latency.png and flops.png (nothing when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for name, make in (("latency.png", latency_figure), ("flops.png", flops_figure)):
        fig = make(report)
        path = out / name
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110)
        plt.close(fig)
        write_atomic(path, png.getvalue())
        written.append(path)
    return written


def write_all(report: ProfileReport, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    write_json(report, out / "report.json")
    write_atomic(out / "report.md", markdown(report))
    return [out / "report.json", out / "report.md", *plots(report, out)]
