"""The terminal table of `tokedge eval`, read from `EvalResult`s (never from live sessions)."""

from __future__ import annotations

from collections.abc import Sequence

from tokedge.eval.runner import EvalResult


def _value(result: EvalResult, v: float) -> str:
    return f"{v:.1f}" if result.task_format == "mme" else f"{100 * v:.1f}"


def table_lines(results: Sequence[EvalResult]) -> list[str]:
    """One row per result: artifact, method, budget, task, metric, score [95% CI], n, median TTFT,
    prefill GFLOPs per example. Fractions are shown as percentages, MME in its points."""
    head = ("artifact", "method", "budget", "task", "metric", "score", "95% CI", "n", "TTFT ms", "prefill GFLOP")
    rows = []
    for r in results:
        budget = f"keep {r.keep:g}" if r.keep is not None else str(r.budget)
        rows.append((r.artifact, r.method, budget, r.task, r.metric, _value(r, r.score),
                     f"[{_value(r, r.ci95[0])}, {_value(r, r.ci95[1])}]", str(r.n), f"{r.ttft_ms_median:.1f}",
                     f"{r.prefill_flops_per_example / 1e9:.2f}"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return lines
