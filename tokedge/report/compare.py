"""One comparison report over many eval results: accuracy and latency per (method, budget), the
unreduced reference, the random baseline, and a Pareto plot (accuracy vs TTFT and vs prefill
FLOPs) marking the best method per budget. `tokedge sweep` and `tokedge eval` over several
artifacts both call `write_comparison`; it reads data (eval results as `EvalResult.to_dict()`,
profile reports as `ProfileReport.to_dict()`), never live sessions.

A result dict may carry, beside the eval's own keys, `role` ("reference", "baseline", "method";
otherwise taken from `Roles`), `quantize`, `weights`, and `status`/`error` for a point that failed.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokedge.safeio import write_atomic

ROLE_ORDER = {"reference": 0, "method": 1, "baseline": 2}


@dataclass(frozen=True)
class Roles:
    """Which method is the unreduced reference and which the random baseline, when a result does
    not say (`role`)."""

    reference: str = "none"  # every visual token: the accuracy a reduction gives up from
    baseline: str = "random"  # random selection at the same budget: the floor a method must beat

    def of(self, method: str) -> str:
        return "reference" if method == self.reference else "baseline" if method == self.baseline else "method"


@dataclass
class Row:
    """One (method, budget, quantization): its score per task and its cost."""

    method: str
    budget: int | None
    quantize: str
    role: str
    scores: dict[str, dict] = field(default_factory=dict)  # task -> {score, ci95, n, metric}
    failures: dict[str, str] = field(default_factory=dict)  # task -> error
    ttft_ms: float | None = None  # the profile's median TTFT, else the mean of the evals' medians
    ttft_source: str = ""  # "profile" or "eval"
    prefill_gflops: float | None = None  # per example (eval), else per image (profile)
    best: bool = False  # the best method at its budget (and quantization)

    def label(self) -> str:
        return " ".join([self.method, *([self.quantize] if self.quantize else [])])

    def mean_score(self, tasks: list[str]) -> float | None:
        if self.failures or any(t not in self.scores for t in tasks):
            return None
        return round(statistics.fmean(self.scores[t]["score"] for t in tasks), 6)


def _task_name(result: dict) -> str:
    return str(result.get("task", ""))  # EvalResult.task: FORMAT-STEM


def build_rows(results: list[dict], profiles: list[dict] | None = None, roles: Roles = Roles()) -> tuple[list[Row], list[str]]:
    """Rows (reference first, then methods by budget, then the baseline) and the task names."""
    rows: dict[tuple, Row] = {}
    tasks: list[str] = []
    ttfts: dict[tuple, list[float]] = {}
    flops: dict[tuple, list[float]] = {}
    artifacts: dict[str, tuple] = {}
    for r in results:
        method = str(r.get("method", "?"))
        key = (method, r.get("budget"), r.get("quantize") or "")
        row = rows.setdefault(key, Row(method=key[0], budget=key[1], quantize=key[2], role=r.get("role") or roles.of(method)))
        task = _task_name(r)
        if task not in tasks:
            tasks.append(task)
        if r.get("status", "ok") != "ok":
            row.failures[task] = str(r.get("error", "failed"))
            continue
        row.scores[task] = {"score": r["score"], "ci95": r.get("ci95"), "n": r.get("n"), "metric": r.get("metric")}
        if r.get("ttft_ms_median") is not None:
            ttfts.setdefault(key, []).append(float(r["ttft_ms_median"]))
        if r.get("prefill_flops_per_example") is not None:
            flops.setdefault(key, []).append(float(r["prefill_flops_per_example"]) / 1e9)
        for ref in (r.get("artifact_sha256"), _resolved(r.get("artifact"))):
            if ref:
                artifacts[ref] = key
    for key, row in rows.items():
        if key in ttfts:
            row.ttft_ms, row.ttft_source = round(statistics.fmean(ttfts[key]), 3), "eval"
        if key in flops:
            row.prefill_gflops = round(statistics.fmean(flops[key]), 6)
    for p in profiles or []:
        report = p.get("report", p)
        key = artifacts.get(p.get("manifest_sha256") or "") or artifacts.get(_resolved(report.get("artifact")) or "")
        if key is None or not report.get("results"):
            continue
        first = report["results"][0]
        rows[key].ttft_ms, rows[key].ttft_source = round(float(first["ttft_ms"]), 3), "profile"
        if rows[key].prefill_gflops is None:
            rows[key].prefill_gflops = float(first["flops"]["prefill"])
    ordered = sorted(rows.values(), key=lambda w: (w.quantize, ROLE_ORDER.get(w.role, 1),
                                                   -1 if w.budget is None else w.budget, w.method))
    _mark_best(ordered, tasks)
    return ordered, tasks


def _resolved(path) -> str | None:
    try:
        return str(Path(path).resolve()) if path else None
    except OSError:
        return None


def _mark_best(rows: list[Row], tasks: list[str]) -> None:
    """The best method per (budget, quantization): highest mean score; ties go to fewer prefill
    FLOPs, then the name (deterministic: never to a latency, which differs run to run)."""
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        if row.role == "method" and row.mean_score(tasks) is not None:
            groups.setdefault((row.budget, row.quantize), []).append(row)
    for group in groups.values():
        max(group, key=lambda w: (w.mean_score(tasks), -(w.prefill_gflops or 0.0), [-ord(c) for c in w.method])).best = True


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower x, higher y), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def weights_notice(results: list[dict]) -> str | None:
    """The random-weights notice when any result's artifact has a preset's random weights."""
    from tokedge.artifact import random_weights_notice

    for r in results:
        weights = r.get("weights")
        if weights is None and r.get("artifact"):
            try:
                from tokedge.artifact import read_manifest

                weights = read_manifest(r["artifact"]).weights
            except Exception:  # noqa: BLE001 - a moved or damaged artifact: its result counts, without the banner
                weights = None
        notice = random_weights_notice(weights)
        if notice:
            return notice
    return None


def comparison_dict(results: list[dict], profiles: list[dict] | None = None, roles: Roles = Roles(),
                    extra: dict | None = None) -> dict:
    rows, tasks = build_rows(results, profiles, roles)
    notice = weights_notice(results)
    return {
        "tasks": tasks,
        "weights_notice": notice,
        "rows": [{**asdict(r), "label": r.label(), "mean_score": r.mean_score(tasks)} for r in rows],
        "best_per_budget": {f"{r.budget}{' ' + r.quantize if r.quantize else ''}": r.method for r in rows if r.best},
        "failures": [{"method": r.get("method"), "budget": r.get("budget"), "task": _task_name(r),
                      "quantize": r.get("quantize") or "", "error": r.get("error"), "attempts": r.get("attempts")}
                     for r in results if r.get("status", "ok") != "ok"],
        **(extra or {}),
    }


def _fmt(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown(data: dict, title: str = "tokedge comparison") -> str:
    tasks = data["tasks"]
    notice = data.get("weights_notice")
    lines = [f"# {title}", ""]
    if notice:
        lines += [f"> **Random weights.** {notice[0].upper()}{notice[1:]}.", ""]
    lines += [("Accuracy per task (score, 95% interval, examples), their mean, latency (median TTFT, ms) and "
               "prefill GFLOP per example. **Bold**: the best method at its budget (ties: fewer FLOPs). The "
               "reference keeps every visual token; the random baseline keeps a random subset of the same size."), "",
              "| role | method | budget | " + " | ".join(tasks) + " | mean | TTFT ms | prefill GFLOP | status |",
              "|---|---|---|" + "---|" * len(tasks) + "---|---|---|---|"]
    for r in data["rows"]:
        cells = []
        for t in tasks:
            s = r["scores"].get(t)
            if s is None:
                cells.append("failed" if t in r["failures"] else "-")
                continue
            ci = s.get("ci95")
            ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""
            cells.append(f"{s['score']:.3f}{ci_text} (n={s.get('n')})")
        name = f"**{r['label']}**" if r["best"] else r["label"]
        status = "ok" if not r["failures"] else "failed: " + "; ".join(f"{t}: {e}" for t, e in r["failures"].items())
        lines.append(f"| {r['role']} | {name} | {r['budget'] if r['budget'] is not None else 'all'} | "
                     + " | ".join(cells) + f" | {_fmt(r['mean_score'], 3)} | {_fmt(r['ttft_ms'], 1)}"
                     f"{' (eval)' if r['ttft_source'] == 'eval' else ''} | {_fmt(r['prefill_gflops'], 3)} | {status} |")
    metrics = sorted({f"{t}: {s['metric']}" for r in data["rows"] for t, s in r["scores"].items() if s.get("metric")})
    if metrics:
        lines += ["", "Metrics: " + "; ".join(metrics) + "."]
    if data.get("failures"):
        lines += ["", "## Failures", "", "Each point was retried once before it was reported here; a rerun retries it.", ""]
        lines += [f"- {f['method']} {f['budget']} {f['quantize']} {f['task']}: {f['error']} "
                  f"({f.get('attempts') or '?'} attempts)".replace("  ", " ") for f in data["failures"]]
    if data.get("sweep"):
        s = data["sweep"]
        lines += ["", "## Sweep", "",
                  (f"Code version {s.get('code_version')}; {len(s.get('ran', []))} job(s) ran, "
                   f"{len(s.get('cached', []))} came from the cache; engine: {s.get('engine')}.")]
    return "\n".join(lines) + "\n"


def pareto_figure(data: dict, x: str = "ttft_ms"):
    """Mean accuracy against cost (`ttft_ms` or `prefill_gflops`): one colour per method, the
    reference as a star, the random baseline in grey, the Pareto front as a step line, and a ring
    around the best method at each budget (labelled with the budget)."""
    import matplotlib.pyplot as plt

    rows = [r for r in data["rows"] if r["mean_score"] is not None and r[x] is not None]
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab10")
    methods = sorted({r["label"] for r in rows if r["role"] == "method"})
    for i, name in enumerate(methods):
        mine = sorted((r for r in rows if r["label"] == name), key=lambda r: r[x])
        ax.plot([r[x] for r in mine], [r["mean_score"] for r in mine], "o-", color=colors(i % 10), label=name,
                linewidth=1, markersize=5)
    for role, style, color, size in (("baseline", "x--", "#777777", 7), ("reference", "*", "#000000", 14)):
        mine = sorted((r for r in rows if r["role"] == role), key=lambda r: r[x])
        if mine:
            label = f"{mine[0]['label']} ({'random baseline' if role == 'baseline' else 'all tokens'})"
            ax.plot([r[x] for r in mine], [r["mean_score"] for r in mine], style, color=color, label=label,
                    markersize=size, linewidth=1)
    points = [(r[x], r["mean_score"]) for r in rows]
    front = [points[i] for i in pareto(points)]
    if front:  # a step line carried to the largest cost, so a front of one point shows too
        right = max(p[0] for p in points)
        ax.step([p[0] for p in front] + [right], [p[1] for p in front] + [front[-1][1]], where="post",
                color="#2ca02c", alpha=0.35, linewidth=5, label="Pareto front", zorder=0)
    for i, r in enumerate(r for r in rows if r["best"]):  # labels staggered: points often share a score
        ax.plot([r[x]], [r["mean_score"]], "o", markersize=14, markerfacecolor="none", markeredgecolor="#d62728")
        ax.annotate(f"best @ {r['budget']}: {r['label']}", (r[x], r["mean_score"]), textcoords="offset points",
                    xytext=(6, 8 + 11 * (i % 4)), fontsize=7, color="#d62728")
    ax.set_xlabel("median TTFT (ms)" if x == "ttft_ms" else "prefill GFLOP per example")
    ax.set_ylabel("mean accuracy over tasks")
    ax.set_ylim(-0.02, 1.05)
    ax.legend(loc="lower right", fontsize=7, frameon=False)
    title = "accuracy vs latency" if x == "ttft_ms" else "accuracy vs prefill FLOPs"
    if data.get("weights_notice"):
        title += " (random weights: the numbers show the pipeline, not a model)"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


FIGURES = (("pareto.png", lambda data: pareto_figure(data, "ttft_ms")),
           ("pareto-flops.png", lambda data: pareto_figure(data, "prefill_gflops")))


def write_comparison(results: list[dict], out: Path, profiles: list[dict] | None = None, *, roles: Roles = Roles(),
                     extra: dict | None = None, title: str = "tokedge comparison") -> list[Path]:
    """report.json, report.md and the Pareto plots (pareto.png: accuracy vs TTFT; pareto-flops.png:
    vs prefill FLOPs; none without matplotlib) in `out`, each written atomically. `extra` adds
    top-level keys to report.json (the sweep's own section: `sweep`)."""
    from tokedge.report.render import write_figures

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = comparison_dict(results, profiles, roles, extra)
    write_atomic(out / "report.json", json.dumps(data, indent=2) + "\n")
    write_atomic(out / "report.md", markdown(data, title))
    return [out / "report.json", out / "report.md", *write_figures(data, out, FIGURES)]


# --- eval results beside a profile (`tokedge profile --eval-results DIR`) -------------------------


def load_eval_results(where: Path) -> list[dict]:
    """Every eval result in `where` (not recursive): the JSON files `tokedge eval --out DIR` writes
    (`EvalResult.to_dict()`) and those of a sweep's `results/` (the same dict under `result`)."""
    from tokedge.errors import InputError

    where = Path(where)
    if not where.is_dir():
        raise InputError(f"--eval-results '{where}' is not a directory of eval results (tokedge eval --out DIR)")
    found = []
    for path in sorted(where.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        data = data.get("result", data) if isinstance(data, dict) else None
        if isinstance(data, dict) and "artifact_sha256" in data and "score" in data:
            found.append(data)
    return found


def accuracy_for(report_dict: dict, results: list[dict]) -> list[dict]:
    """The eval results of the artifacts a profile measured (matched by manifest sha256), each with
    the profile row of its budget as `profile_row` (its measured TTFT and FLOPs)."""
    import hashlib

    rows_by_sha: dict[str, list[dict]] = {}
    for row in report_dict.get("results", []):
        try:
            sha = hashlib.sha256((Path(row["artifact"]) / "tokedge.json").read_bytes()).hexdigest()
        except OSError:
            continue
        rows_by_sha.setdefault(sha, []).append(row)
    matched = []
    for r in results:
        rows = rows_by_sha.get(r["artifact_sha256"], [])
        row = next((w for w in rows if w.get("budget") == r.get("budget")), rows[0] if rows else None)
        if row is not None:
            matched.append({**r, "profile_row": {k: row[k] for k in ("budget", "ttft_ms", "flops", "artifact")}})
    return matched


def profile_comparison(accuracy: list[dict], weights: str | None = None) -> dict:
    """The comparison dict of a profile's matched eval results, latency from the profile's rows."""
    profiles = [{"manifest_sha256": a["artifact_sha256"], "report": {"artifact": a["profile_row"]["artifact"],
                                                                     "results": [a["profile_row"]]}} for a in accuracy]
    return comparison_dict([{**a, "weights": weights} for a in accuracy], profiles)


def accuracy_lines(accuracy: list[dict]) -> list[str]:
    """report.md's section for a profile with eval results."""
    if not accuracy:
        return []
    lines = ["", "## Accuracy (tokedge eval)", "",
             ("Eval results of the profiled artifacts (matched by manifest sha256); TTFT is this profile's median. "
              "pareto.png plots accuracy against it, pareto-flops.png against prefill FLOPs."), "",
             "| budget | method | task | metric | score | 95% interval | n | TTFT ms |", "|---|---|---|---|---|---|---|---|"]
    for a in sorted(accuracy, key=lambda a: (-(a.get("budget") or 0), a.get("task", ""))):
        ci = a.get("ci95") or [None, None]
        ci_text = f"{ci[0]:.3f}..{ci[1]:.3f}" if None not in ci else "n/a"
        lines.append(f"| {a.get('budget')} | {a.get('method')} | {a.get('task')} | {a.get('metric')} | {a['score']:.3f} "
                     f"| {ci_text} | {a.get('n')} | {a['profile_row']['ttft_ms']:.1f} |")
    return lines
