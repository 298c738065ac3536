"""`tokedge sweep`: export, evaluate and profile every point of a grid, then write one comparison
report. The jobs (`tokedge.sweep.jobs`) run in this process, one after another (the default), or
as Ray tasks on a cluster (`--ray ADDRESS`): Ray schedules them, each declaring one CPU, and
retries each failed task once; results travel through the output directory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokedge.sweep.grid import SweepGrid
from tokedge.sweep.jobs import FAIL_ONCE_ENV, attempts, eval_job, export_job, profile_job, settings_of
from tokedge.sweep.keys import code_version, task_name

Progress = Callable[[str, int, int], None]  # (label of the job that finished, done, total)


@dataclass(frozen=True)
class SweepConfig:
    grid: SweepGrid
    out: Path
    ray_address: str | None = None  # None: local, one job at a time; "auto" or HOST:PORT: a Ray cluster
    cpus_per_job: float = 1.0  # what each Ray task declares (num_cpus)
    fail_once: str | None = None  # test hook: first attempt of matching jobs fails (TOKEDGE_SWEEP_FAIL_ONCE)


@dataclass(frozen=True)
class Child:
    """An eval or a profile of one export: its job, the arguments after the export's output, its label."""

    kind: str  # "eval" or "profile"
    label: str
    meta: dict
    args: tuple

    def job(self):
        return eval_job if self.kind == "eval" else profile_job


@dataclass(frozen=True)
class Plan:
    """One export and the jobs that need it."""

    label: str
    point: dict
    children: tuple[Child, ...]


@dataclass
class SweepReport:
    out: str
    engine: str
    code_version: str
    records: list[dict] = field(default_factory=list)  # every eval/profile record or failure
    ran: list[str] = field(default_factory=list)  # job labels computed by this run
    cached: list[str] = field(default_factory=list)  # job labels found done
    seconds: float = 0.0
    files: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[dict]:
        return [r for r in self.records if r.get("status") == "failed"]


def plan_sweep(cfg: SweepConfig) -> list[Plan]:
    g = cfg.grid
    settings = {"limit": g.limit, "seed": g.seed, "backend": g.backend}
    plans = []
    for p in g.exports():
        point = {**asdict(p), "name": p.name()}
        meta = {"method": p.method, "budget": p.budget, "quantize": p.quantize, "role": g.role(p.method),
                "backend": g.backend}
        children = [Child("eval", f"eval {p.name()}/{task_name(t)}", {**meta, "task": task_name(t)},
                          (t, settings, meta, str(cfg.out))) for t in g.tasks]
        if g.profile.enabled:
            children.append(Child("profile", f"profile {p.name()}", meta, (settings_of(g.profile), meta, str(cfg.out))))
        plans.append(Plan(f"export {p.name()}", point, tuple(children)))
    return plans


def _failure(child: Child, error: str, out: Path, counted: str | None = None) -> dict:
    """A failed job as a record; `counted`: the label whose attempts count (its export's, when that failed)."""
    return {**child.meta, "kind": child.kind, "label": child.label, "status": "failed", "error": error,
            "attempts": max(1, attempts(out, counted or child.label))}


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)  # a RayTaskError carries the task's own exception
    exc = cause if isinstance(cause, BaseException) else exc
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _retry(fn, *args):
    """Run `fn(*args)`, once more if it raises (what Ray's max_retries=1 does for a task)."""
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - a first failure is retried once
        return fn(*args)


Outcomes = tuple[list[tuple[Child, dict]], dict[str, dict]]  # (child, record) pairs; export label -> its outcome


def run_local(cfg: SweepConfig, plans: list[Plan], progress: Progress | None = None) -> Outcomes:
    """Each export, then its evals and profile, in this process."""
    total, done, out, exports = sum(len(p.children) for p in plans), 0, [], {}
    g = cfg.grid
    for plan in plans:
        try:
            exported = _retry(export_job, g.model, plan.point, str(cfg.out), g.validate, cfg.fail_once)
            exports[plan.label] = exported
        except Exception as exc:  # noqa: BLE001 - any failure of a job is reported, not raised
            exported, error = None, f"export failed: {_first_line(exc)}"
            exports[plan.label] = {"status": "failed", "error": error}
        for child in plan.children:
            if exported is None:
                record = _failure(child, error, cfg.out, plan.label)
            else:
                try:
                    record = _retry(child.job(), exported, *child.args, cfg.fail_once)
                except Exception as exc:  # noqa: BLE001 - any failure of a job is reported, not raised
                    record = _failure(child, _first_line(exc), cfg.out)
            out.append((child, record))
            done += 1
            if progress:
                progress(child.label, done, total)
    return out, exports


def run_ray(cfg: SweepConfig, plans: list[Plan], progress: Progress | None = None) -> Outcomes:
    """Every job a Ray task (num_cpus declared, retried once on any exception); an eval or profile
    takes its export's ObjectRef, so Ray starts it when the artifact exists."""
    from tokedge.errors import require

    ray = require("ray", "sweep")
    import logging

    ray.init(address=cfg.ray_address, logging_level=logging.ERROR, log_to_driver=False,
             include_dashboard=False, configure_logging=True)
    try:
        options = {"num_cpus": cfg.cpus_per_job, "max_retries": 1, "retry_exceptions": True}
        remote_export = ray.remote(**options)(export_job)
        remote = {"eval": ray.remote(**options)(eval_job), "profile": ray.remote(**options)(profile_job)}
        g = cfg.grid
        pending, export_refs = {}, {}
        for plan in plans:
            exported = export_refs[plan.label] = remote_export.remote(g.model, plan.point, str(cfg.out), g.validate,
                                                                      cfg.fail_once)
            for child in plan.children:
                pending[remote[child.kind].remote(exported, *child.args, cfg.fail_once)] = (child, plan.label)
        out, total = [], len(pending)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            child, export_label = pending.pop(ready[0])
            try:
                record = ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - the task failed twice, or its export did: reported
                try:
                    ray.get(export_refs[export_label])
                    record = _failure(child, _first_line(exc), cfg.out)
                except Exception as upstream:  # noqa: BLE001 - any failure of a job is reported, not raised
                    record = _failure(child, f"export failed: {_first_line(upstream)}", cfg.out, export_label)
            out.append((child, record))
            if progress:
                progress(child.label, len(out), total)
        exports = {}
        for label, ref in export_refs.items():
            try:
                exports[label] = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - any failure of a job is reported, not raised
                exports[label] = {"status": "failed", "error": f"export failed: {_first_line(exc)}"}
        order = {c.label: i for i, c in enumerate(c for p in plans for c in p.children)}
        return sorted(out, key=lambda pair: order[pair[0].label]), exports
    finally:
        ray.shutdown()


def run_sweep(cfg: SweepConfig, progress: Progress | None = None) -> SweepReport:
    """Run every job not done yet, then write the comparison report into `cfg.out`."""
    from tokedge.eval.tasks import load_task
    from tokedge.report.compare import Roles, write_comparison

    start = time.perf_counter()
    for task in cfg.grid.tasks:  # a missing or unreadable task file fails here, before any export
        load_task(task, limit=1)
    cfg.out.mkdir(parents=True, exist_ok=True)
    plans = plan_sweep(cfg)
    engine = f"ray ({cfg.ray_address})" if cfg.ray_address else "local (one job at a time)"
    pairs, exports = (run_ray if cfg.ray_address else run_local)(cfg, plans, progress)
    report = SweepReport(out=str(cfg.out), engine=engine, code_version=code_version())
    for label, exported in exports.items():
        if exported.get("status") != "failed":
            (report.cached if exported.get("cached") else report.ran).append(label)
    for child, record in pairs:
        report.records.append({k: v for k, v in record.items() if k != "cached"})
        if record.get("status") != "failed":
            (report.cached if record.get("cached") else report.ran).append(child.label)
    report.seconds = round(time.perf_counter() - start, 2)
    results = [_comparable(r) for r in report.records if r["kind"] == "eval" or r.get("status") == "failed"]
    profiles = [r for r in report.records if r["kind"] == "profile" and r.get("status") != "failed"]
    sweep = {"code_version": report.code_version, "engine": engine, "ran": report.ran, "cached": report.cached,
             "seconds": report.seconds, "grid": asdict(cfg.grid)}
    files = write_comparison(results, cfg.out, profiles, roles=Roles(cfg.grid.reference, cfg.grid.baseline),
                             extra={"sweep": sweep}, title=f"tokedge sweep: {cfg.grid.model}")
    report.files = [str(f) for f in files]
    return report


def _comparable(record: dict) -> dict:
    """A record as `write_comparison` reads it: the eval's own dict with the sweep's keys beside it."""
    if record.get("status") == "failed":
        return record
    return {**record["result"], "role": record["role"], "quantize": record["quantize"], "weights": record.get("weights"),
            "budget": record["budget"], "status": "ok",
            "attempts": record.get("attempt")}


def fail_once_from_env() -> str | None:
    return os.environ.get(FAIL_ONCE_ENV) or None
