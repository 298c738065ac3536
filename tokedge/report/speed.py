"""The profile report's section on weights, GEMM efficiency per stage, and memory (markdown)."""

from __future__ import annotations


def _head(q: dict) -> str:
    if q["lm_head"]:
        return "quantized"
    return "int8" if "lm_head" in (q.get("int8_matmuls") or ()) else "float"


def speed_section(report) -> list[str]:
    lines = ["", "## Efficiency and memory", ""]
    if report.quantization:
        q = report.quantization
        zero = "symmetric" if q.get("symmetric", True) else "zero points"
        lines.append(f"Weights: {q['scheme']} {q['form']} (group {q['group_size']}, {zero}, {q['algorithm']}) on "
                     f"{', '.join(q['graphs'])}; lm_head {_head(q)}.")
        fid = q.get("fidelity") or {}
        if "text_kl_mean" in fid:  # measured at quantization against the fp32 artifact (docs/quantization.md)
            lines.append(f"Fidelity vs fp32 (at quantization, {fid['text_tokens']:.0f} tokens of the built-in text): "
                         f"KL mean {fid['text_kl_mean']:.4f}, p99 {fid['text_kl_p99']:.3f}, top-1 "
                         f"{fid['text_top1']:.1%}, perplexity {fid['ppl_fp32']:.2f} -> {fid['ppl']:.2f}.")
    else:
        lines.append("Weights: float (not quantized).")
    lines.append(f"ONNX Runtime intra-op threads: {report.threads or 'automatic'}.")
    if any(r.share_of_gemm_peak for r in report.results):
        peak = report.gemm_peak_gflops_per_s
        lines += ["", (f"Achieved GFLOP/s per stage (analytical FLOPs / median time) against the measured GEMM peak "
                       f"({peak:.0f} GFLOP/s: {report.gemm_peak_measure}):"), "",
                  "| budget | vision | prefill | decode |", "|---|---|---|---|"]
        for r in report.results:
            if r.share_of_gemm_peak:
                cells = [f"{r.achieved_gflops_per_s[s]:.0f} ({r.share_of_gemm_peak[s]:.0%})"
                         for s in ("vision", "prefill", "decode")]
                lines.append(f"| {r.label()} | " + " | ".join(cells) + " |")
    mem = report.memory or {}
    if "artifact_bytes" in mem:
        a = mem["artifact_bytes"]
        lines += ["", (f"Artifact graphs: {a['measured'] / 2**20:.1f} MiB measured, {a['predicted'] / 2**20:.1f} MiB "
                       f"predicted by the memory plan ({a['ratio']:.3f}x).")]
    if "cpu" in mem:
        c = mem["cpu"]
        lines.append(f"CPU: peak RSS {c['peak_rss_bytes'] / 2**20:.0f} MiB (largest row, {report.memory_measure}) vs "
                     f"predicted working set "
                     f"{c['predicted_bytes'] / 2**20:.0f} MiB ({c['note']}).")
    if "device_summary" in mem:
        lines.append(mem["device_summary"][:1].upper() + mem["device_summary"][1:] + ".")  # not .capitalize(): "GB" stays
    return lines
