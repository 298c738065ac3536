"""Renderers: a ProfileReport (data) -> report.json, report.md and PNG plots. They read the report,
never live sessions."""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

from tokedge.report.profile import ProfileReport
from tokedge.safeio import write_atomic


def _times(ratio: float | None) -> str:
    """A speedup, or n/a where the baseline had nothing to compare (it decoded no token)."""
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def write_json(report: ProfileReport, path: Path) -> None:
    write_atomic(path, json.dumps(report.to_dict(), indent=2) + "\n")


def markdown(report: ProfileReport) -> str:
    m = report.machine
    from tokedge.artifact import random_weights_notice

    notice = random_weights_notice(report.weights)
    lines = [
        f"# tokedge profile: {Path(report.artifact).name} ({report.method})",
        "",
        *([f"> **Random weights.** {notice[0].upper()}{notice[1:]}.", ""] if notice else []),
        f"Machine: {m.get('cpu')} ({m.get('cores')} cores, {m.get('memory_gb')} GiB), measured GEMM peak "
        f"{report.gemm_peak_gflops_per_s:.0f} GFLOP/s (fp32). Prompt: \"{report.prompt}\"; "
        f"{len(report.images)} image(s), {report.runs} runs after {report.warmup} warm-up, "
        f"{report.max_new_tokens} new tokens. Medians ({_spread_words(report)} in brackets), milliseconds. "
        f"Timing: {report.timing}.",
        "",
        f"Memory: {report.memory_measure}.",
        "",
        "| budget | backend | visual tokens | preprocess | vision | reduction | prefill | TTFT | decode/token | tokens/s "
        "| peak RSS MiB (before load) | GFLOP vision / prefill | achieved GFLOP/s prefill | fidelity first / overlap |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.results:
        fid = (f"{r.fidelity['first_token_agreement']:.2f} / {r.fidelity['token_overlap']:.2f}"
               if r.fidelity else "n/a")
        red = f"{r.reduction_ms:.2f}" if r.reduction_ms is not None else "n/a"
        rss = f"{r.peak_rss_mb:.0f}" + (f" ({r.rss_before_load_mb:.0f})" if r.rss_before_load_mb is not None else "")
        lines.append(
            f"| {r.label()} | {r.backend} | {r.visual_tokens} | {r.preprocess_ms:.1f} | {_cell(r, 'vision_ms', 1)} "
            f"| {red} | {_cell(r, 'prefill_ms', 1)} | {_cell(r, 'ttft_ms', 1)} | {_cell(r, 'decode_ms_per_token', 2)} "
            f"| {r.tokens_per_s:.1f} | {rss} "
            f"| {r.flops['vision']:.2f} / {r.flops['prefill']:.2f} | {r.achieved_gflops_per_s['prefill']:.1f} | {fid} |"
        )
    if report.fidelity_reference:
        lines += ["", f"Fidelity compares greedy output with {report.fidelity_reference}."]
    elif report.fidelity_note:
        lines += ["", report.fidelity_note[:1].upper() + report.fidelity_note[1:] + "."]
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
        lines += [f"| {r.label()} | {r.speedup_vs_baseline['ttft']:.2f}x | {_times(r.speedup_vs_baseline['decode'])} |"
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
    from tokedge.report.compare import accuracy_lines

    lines += accuracy_lines(report.accuracy)
    for w in report.warnings:
        lines += ["", f"**Warning:** {w}"]
    return "\n".join(lines) + "\n"


def _spread_words(report: ProfileReport) -> str:
    return "p10..p90" if any(r.p10 for r in report.results) else "p90"


def _cell(r, key: str, digits: int) -> str:
    """The median with its spread: "median (p10..p90)", or "(p90)" for reports without p10."""
    med = getattr(r, key)
    if key in r.p10 and key in r.p90:
        return f"{med:.{digits}f} ({r.p10[key]:.{digits}f}..{r.p90[key]:.{digits}f})"
    return f"{med:.{digits}f} ({r.p90[key]:.{digits}f})" if key in r.p90 else f"{med:.{digits}f}"


def fit(parts: list[str], width: int = 80, indent: str = "  ") -> list[str]:
    """Join `parts` with two spaces into lines of at most `width` columns, breaking only between
    parts (continuation lines indented), so a terminal never wraps a line mid-word. A part longer
    than the width (a path) keeps a line to itself."""
    lines: list[str] = []
    for part in parts:
        if lines and len(lines[-1]) + 2 + len(part) <= width:
            lines[-1] += "  " + part
        else:
            lines.append(part if not lines else indent + part)
    return lines


def wrap(text: str, width: int = 80, indent: str = "  ") -> list[str]:
    """A sentence broken at spaces into lines of at most `width` (words longer than that, such as
    paths, are kept whole on their own line)."""
    import textwrap

    return textwrap.wrap(text, width=width, subsequent_indent=indent, break_long_words=False,
                         break_on_hyphens=False) or [""]


def summary_lines(report: ProfileReport, width: int = 80) -> list[str]:
    """The terminal summary: per row the medians with their spread, fidelity, the baseline speed-up
    and the prediction, so a budget can be chosen without opening report.md; every line fits in
    `width` columns, broken between fields."""
    from tokedge.report.profile import row_label

    lines = []
    for r in sorted(report.results, key=lambda r: (-r.visual_tokens, -r.budget)):
        head = row_label(r.budget, r.keep, r.method or report.method, r.visual_tokens)
        if r.keep is not None:
            head += f" ({r.visual_tokens} tokens)"
        ttft = f"TTFT {r.ttft_ms:.1f} ms" + (f" ({r.p10['ttft_ms']:.1f}..{r.p90['ttft_ms']:.1f})" if r.p10
                                             else f" (p90 {r.p90['ttft_ms']:.1f})")
        dec = f"decode {r.decode_ms_per_token:.2f} ms/token" + (
            f" ({r.p10['decode_ms_per_token']:.2f}..{r.p90['decode_ms_per_token']:.2f})" if r.p10 else "")
        parts = [f"{head}:", ttft, dec]
        if r.fidelity:
            parts.append(f"fidelity {r.fidelity['first_token_agreement']:.2f}/{r.fidelity['token_overlap']:.2f}")
        if r.speedup_vs_baseline:
            parts.append(f"vs baseline: TTFT {r.speedup_vs_baseline['ttft']:.2f}x, "
                         f"decode {_times(r.speedup_vs_baseline['decode'])}")
        if r.predicted:
            rate = f"{r.predicted['tokens_per_s']:.0f} tok/s" + (" (floor-bound)" if r.predicted.get("overhead_bound")
                                                                 else "")
            parts.append(f"predicted {r.predicted['device']}: TTFT {r.predicted['ttft_ms']:.2f} ms, {rate}")
        lines += fit(parts, width)
    if any(r.p10 for r in report.results):
        lines += wrap("medians (p10..p90) over interleaved rounds, milliseconds", width)
    if report.fidelity_reference:
        lines += wrap(f"fidelity (first-token agreement/token overlap) vs {report.fidelity_reference}", width)
    elif report.fidelity_note:
        lines += wrap(report.fidelity_note, width)
    if report.baseline:
        b = report.baseline
        lines += wrap(f"baseline transformers ({b.get('attention', 'eager')} attention, {b['visual_tokens']} tokens): "
                      f"TTFT {b['ttft_ms']:.1f} ms, decode {b['decode_ms_per_token']:.2f} ms/token", width)
    from tokedge.artifact import random_weights_notice

    notice = random_weights_notice(report.weights)
    if notice:
        lines += wrap(f"note: {notice}", width)
    return lines


def compute_lines(report: ProfileReport, width: int = 80) -> list[str]:
    """Per row, each stage's achieved GFLOP/s and its share of the measured GEMM peak."""
    lines = []
    for r in report.results:
        if r.share_of_gemm_peak:
            name = r.label() if r.keep is not None else f"budget {r.budget}"
            lines += fit([f"{name} compute:", *(
                f"{stage} {r.achieved_gflops_per_s[stage]:.0f} GFLOP/s ({r.share_of_gemm_peak[stage]:.0%})"
                for stage in ("vision", "prefill", "decode")), f"of {report.gemm_peak_gflops_per_s:.0f} GFLOP/s GEMM peak"],
                width)
    return lines


def memory_lines(report: ProfileReport, width: int = 80) -> list[str]:
    """Artifact bytes against the memory plan, the largest row's peak RSS, the device plan."""
    mem = report.memory or {}
    if "artifact_bytes" not in mem:
        return []
    size = mem["artifact_bytes"]
    parts = [(f"artifact graphs {size['measured'] / 2**20:.1f} MiB, predicted {size['predicted'] / 2**20:.1f} MiB "
              f"({size['ratio']:.2f}x);")]
    if "cpu" in mem:
        parts += [f"peak RSS {mem['cpu']['peak_rss_bytes'] / 2**20:.0f} MiB (a fresh process per row),",
                  f"predicted working set {mem['cpu']['predicted_bytes'] / 2**20:.0f} MiB"]
    lines = fit(parts, width)
    if "device_summary" in mem:
        lines += wrap(mem["device_summary"], width)
    return lines


def x_axis(report: ProfileReport) -> tuple[list, list[float], str]:
    """The plots' x axis: (results in x order, x values, axis label). Rows of a budget are placed at
    their budget; rows of a keep ratio (dynamic resolution: the budget is only the largest image's
    bound) at the visual tokens that reached the LLM, which is what they ran with."""
    if any(r.keep is not None for r in report.results):
        results = sorted(report.results, key=lambda r: r.visual_tokens)
        return results, [float(r.visual_tokens) for r in results], "visual tokens reaching the LLM (largest image)"
    results = sorted(report.results, key=lambda r: r.budget)
    return results, [float(r.budget) for r in results], "visual-token budget"


def plot_title(report: ProfileReport, what: str) -> str:
    """A title that names every method in the plot (with --keeps: `none` and each method's keep
    ratios), then what is plotted on a second line."""
    if all(r.keep is None for r in report.results):
        return f"{report.method}: {what}"
    keeps: dict[str, list[str]] = {}
    for r in sorted(report.results, key=lambda r: -(r.keep or 0.0)):
        if r.keep is not None and r.keep >= 1.0:
            keeps.setdefault("none (all tokens)", [])
        else:
            keeps.setdefault(r.method or report.method, []).append(f"{r.keep:g}" if r.keep is not None else "")
    names = [name if not ratios else f"{name} keep {'/'.join(ratios)}" for name, ratios in keeps.items()]
    return f"{', '.join(names)}\n{what}"


def _x_ticks(ax, xs: list[float], label: str) -> None:
    """Rows at their values (a linear axis), so cost that grows linearly looks linear."""
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}" for x in xs], fontsize=8)
    ax.set_xlim(0, max(xs) * 1.05 + 1)
    ax.set_xlabel(label)


def latency_figure(report: ProfileReport):
    """Two panels over the same x axis. Top: stacked TTFT stages per row with p10..p90 whiskers
    (p90 for older reports), the baseline TTFT and the prediction. Bottom: decode ms/token (median,
    p10..p90 band) from 0 with the baseline decode. Separate panels, so the two baseline lines can
    never sit on top of each other as they did on twin axes that both scaled to their baseline."""
    import matplotlib.pyplot as plt

    results, xs, xlabel = x_axis(report)
    gaps = [b - a for a, b in itertools.pairwise(xs) if b > a] or [max(xs)]
    width = max(1.0, 0.6 * min(gaps))
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 7.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    bottom = [0.0] * len(results)
    for stage, color in (("preprocess_ms", "#9ecae1"), ("vision_ms", "#3182bd"), ("prefill_ms", "#e6550d")):
        values = [getattr(r, stage) for r in results]
        ax.bar(xs, values, width=width, bottom=bottom, label=stage.replace("_ms", ""), color=color)
        bottom = [b + v for b, v in zip(bottom, values)]
    spread = all(r.p10 for r in results)
    lower = [max(0.0, r.ttft_ms - r.p10["ttft_ms"]) if spread else 0.0 for r in results]
    upper = [max(0.0, r.p90["ttft_ms"] - r.ttft_ms) for r in results]
    ax.errorbar(xs, [r.ttft_ms for r in results], yerr=[lower, upper], fmt="none", ecolor="#444444", capsize=3,
                label="TTFT p10..p90" if spread else "TTFT p90")
    if report.baseline:
        ax.axhline(report.baseline["ttft_ms"], color="#e6550d", linestyle="--", linewidth=1,
                   label=f"baseline TTFT ({report.baseline.get('attention', 'eager')}, all tokens)")
    predicted = [(x, r.predicted["ttft_ms"]) for x, r in zip(xs, results) if r.predicted]
    if predicted:
        ax.plot([x for x, _ in predicted], [v for _, v in predicted], "D", color="#31a354", markersize=4,
                label=f"predicted TTFT ({next(r for r in results if r.predicted).predicted['device']})")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # from 0, with a band above the bars and the baseline for the legend
    ax.set_ylabel("time to first token (ms)")
    ax.legend(loc="upper left", fontsize=7, frameon=False, ncol=3)
    ax.set_title(plot_title(report, "latency by stage (medians, whiskers p10..p90)" if spread
                            else "latency by stage (medians, whiskers to p90)"))
    ax2.plot(xs, [r.decode_ms_per_token for r in results], "k.-", label="decode ms/token (median)")
    if spread:
        ax2.fill_between(xs, [r.p10["decode_ms_per_token"] for r in results],
                         [r.p90["decode_ms_per_token"] for r in results], color="#bbbbbb", alpha=0.6,
                         label="decode p10..p90")
    else:
        ax2.plot(xs, [r.p90["decode_ms_per_token"] for r in results], "k:", linewidth=1, label="decode p90")
    if report.baseline:
        ax2.axhline(report.baseline["decode_ms_per_token"], color="k", linestyle="--", linewidth=0.8,
                    label=f"baseline decode ({report.baseline.get('attention', 'eager')}, all tokens)")
    ax2.set_ylim(0, ax2.get_ylim()[1] * 1.3)
    ax2.set_ylabel("decode (ms/token)")
    ax2.legend(loc="upper left", fontsize=7, frameon=False, ncol=3)
    _x_ticks(ax2, xs, xlabel)
    fig.tight_layout()
    return fig


def flops_figure(report: ProfileReport):
    import matplotlib.pyplot as plt

    results, xs, xlabel = x_axis(report)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(xs, [r.flops["vision"] for r in results], "o-", label="vision")
    ax.plot(xs, [r.flops["prefill"] for r in results], "o-", label="prefill")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("GFLOP per image")
    _x_ticks(ax, xs, xlabel)
    ax.legend()
    ax.set_title(plot_title(report, "analytical FLOPs"))
    fig.tight_layout()
    return fig


def write_figures(report, out: Path, makers) -> list[Path]:
    """Each (file name, figure maker) as a PNG in `out`, written atomically; nothing when matplotlib
    is not installed (the `report` extra). The one place profile and video reports save plots."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for name, make in makers:
        fig = make(report)
        path = out / name
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=110)
        plt.close(fig)
        write_atomic(path, png.getvalue())
        written.append(path)
    return written


def plots(report: ProfileReport, out: Path) -> list[Path]:
    """latency.png and flops.png, and with eval results pareto.png and pareto-flops.png (accuracy
    vs TTFT and vs prefill FLOPs, as `tokedge sweep` draws them); nothing without matplotlib."""
    written = write_figures(report, out, (("latency.png", latency_figure), ("flops.png", flops_figure)))
    if report.accuracy:
        from tokedge.report.compare import FIGURES, profile_comparison

        written += write_figures(profile_comparison(report.accuracy, report.weights), out, FIGURES)
    return written


def write_all(report: ProfileReport, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    write_json(report, out / "report.json")
    write_atomic(out / "report.md", markdown(report))
    return [out / "report.json", out / "report.md", *plots(report, out)]
