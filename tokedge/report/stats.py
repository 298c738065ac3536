"""Small statistics for timings: p90 and a spread check that says when measurements are too noisy
to compare (shared machine, CPU frequency scaling, thermal throttling, too few runs)."""

from __future__ import annotations

import statistics

# p90 more than this much above the median: the samples disagree, a speed-up from them is unsafe
SPREAD_LIMIT = 0.25
MIN_RUNS = 3  # fewer timed runs than this cannot show a spread at all


def quantile(values: list[float], q: float) -> float:
    """The sample at rank round(q * (n - 1)) of the sorted values (no interpolation); 0 if empty."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))] if ordered else 0.0


def p90(values: list[float]) -> float:
    return quantile(values, 0.9)


def p10(values: list[float]) -> float:
    return quantile(values, 0.1)


def spread(values: list[float]) -> float:
    """(p90 - median) / median; 0 for fewer than two samples or a zero median."""
    if len(values) < 2:
        return 0.0
    med = statistics.median(values)
    return (p90(values) - med) / med if med > 0 else 0.0


def spread_warning(what: str, values: list[float]) -> str | None:
    """One line when `values` are too few or too spread to trust, else None."""
    if len(values) < MIN_RUNS:
        return (f"{what}: only {len(values)} timed run(s); medians of fewer than {MIN_RUNS} runs can be far off, "
                "raise --runs")
    s = spread(values)
    if s > SPREAD_LIMIT:
        return (f"{what}: timings vary a lot (p90 is {s:.0%} above the median over {len(values)} runs); the machine "
                "is busy or throttling, so comparisons are unreliable: close other work, raise --runs/--warmup")
    return None
