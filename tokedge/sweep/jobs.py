"""The three jobs of a sweep: export an artifact, evaluate it on a task, profile it. Plain
top-level functions of plain data, so a local loop and a Ray worker run the very same code.

Each job checks its own cache first and writes its output atomically when it finishes (an export
is staged and renamed into place whole; a result or a profile is one `write_atomic`), so a sweep
killed at any moment loses no finished point, and a rerun computes only what is missing. The
output directory is the only shared state: on a Ray cluster it must be a path every node sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from tokedge.artifact import manifest_sha256
from tokedge.safeio import write_atomic
from tokedge.sweep.keys import code_version, digest, task_identity, task_name

# a test hook (docs/eval.md): points whose label contains this string fail on their first attempt
FAIL_ONCE_ENV = "TOKEDGE_SWEEP_FAIL_ONCE"


class InjectedFailure(RuntimeError):
    """The failure `TOKEDGE_SWEEP_FAIL_ONCE` asks for (retried like any other)."""


def _attempt(out: Path, label: str, fail_once: str | None) -> int:
    """Count this attempt of `label` in `<out>/attempts/` (retries run one after another) and fail
    the first one when `fail_once` names it."""
    counts = out / "attempts"
    counts.mkdir(parents=True, exist_ok=True)
    path = counts / (hashlib.sha256(label.encode()).hexdigest()[:16] + ".txt")
    n = int(path.read_text() or 0) + 1 if path.exists() else 1
    write_atomic(path, str(n))
    if fail_once and fail_once in label and n == 1:
        raise InjectedFailure(f"injected failure of {label} (attempt 1, {FAIL_ONCE_ENV})")
    return n


def attempts(out: Path, label: str) -> int:
    path = out / "attempts" / (hashlib.sha256(label.encode()).hexdigest()[:16] + ".txt")
    return int(path.read_text() or 0) if path.exists() else 0


def artifact_dir(out: Path, model: str, point: dict, validate: bool) -> Path:
    """`<out>/artifacts/<method>-<budget>[-quant]-<key>`: the key covers the export's inputs and
    the code version, so a changed grid or exporter never reuses a stale artifact."""
    key = digest(model, point, validate, code_version())
    return out / "artifacts" / f"{point['name']}-{key[:10]}"


def export_job(model: str, point: dict, out: str, validate: bool, fail_once: str | None = None) -> dict:
    """Export one artifact (skipped when it exists). `point`: method, budget, quantize, options, name.
    -> {artifact, manifest_sha256, weights, cached, seconds}"""
    out_dir = Path(out)
    target = artifact_dir(out_dir, model, point, validate)
    info = {"artifact": str(target), "name": point["name"]}
    if (target / "tokedge.json").is_file():
        return {**info, **_artifact_info(target), "cached": True, "seconds": 0.0}
    _attempt(out_dir, f"export {point['name']}", fail_once)
    from tokedge.export.pipeline import ExportConfig, export

    quant = None
    if point["quantize"]:
        from tokedge.export.quantize import QuantConfig

        quant = QuantConfig(scheme=point["quantize"])
        quant.check()
    start = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    _build_preset_once(model)
    export(ExportConfig(model=model, out=target, method=point["method"], budget=point["budget"], validate=validate,
                        options=tuple(tuple(o) for o in point["options"]), quantize=quant, force=True))
    return {**info, **_artifact_info(target), "cached": False, "seconds": round(time.perf_counter() - start, 2)}


def _build_preset_once(model: str) -> None:
    """Build a preset's checkpoint under a lock: two jobs of one node may export from it at once,
    and the first use builds it."""
    from tokedge.export.presets import PRESETS, preset_cache_dir, resolve_preset
    from tokedge.locking import exclusive

    if model in PRESETS:
        with exclusive(preset_cache_dir() / f".{model}.sweep.lock"):
            resolve_preset(model)


def _artifact_info(target: Path) -> dict:
    from tokedge.artifact import read_manifest

    m = read_manifest(target)
    return {"manifest_sha256": manifest_sha256(target), "weights": m.weights, "budget": m.reduction.budget,
            "method": m.reduction.method}


def result_path(out: Path, exported: dict, task: str, settings: dict) -> Path:
    key = digest(exported["manifest_sha256"], task_identity(task), settings, code_version())
    return out / "results" / f"{exported['name']}-{task_name(task)}-{key}.json"


def eval_job(exported: dict, task: str, settings: dict, meta: dict, out: str, fail_once: str | None = None) -> dict:
    """Evaluate one artifact on one task (skipped when its result exists); the record is written
    atomically to `<out>/results/` before it is returned. `settings`: limit, seed, backend."""
    out_dir = Path(out)
    path = result_path(out_dir, exported, task, settings)
    if path.is_file():
        return {**json.loads(path.read_text()), "cached": True}
    label = f"{exported['name']}/{task_name(task)}"
    n = _attempt(out_dir, f"eval {label}", fail_once)
    from tokedge.eval.runner import evaluate

    start = time.perf_counter()
    result = evaluate(Path(exported["artifact"]), task, limit=settings["limit"], backend=settings["backend"],
                      seed=settings["seed"])
    record = {**meta, "kind": "eval", "label": label, "task": task_name(task), "task_spec": task,
              "artifact": exported["artifact"],
              "manifest_sha256": exported["manifest_sha256"], "weights": exported.get("weights"),
              "code_version": code_version(), "settings": settings, "attempt": n,
              "seconds": round(time.perf_counter() - start, 2), "result": result.to_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=1) + "\n")
    return {**record, "cached": False}


def profile_path(out: Path, exported: dict, settings: dict) -> Path:
    key = digest(exported["manifest_sha256"], settings, code_version())
    return out / "profiles" / f"{exported['name']}-{key}.json"


def profile_job(exported: dict, settings: dict, meta: dict, out: str, fail_once: str | None = None) -> dict:
    """Profile one artifact at its own budget (skipped when its report exists); written atomically
    to `<out>/profiles/`. `settings`: ProfileSettings as a dict."""
    out_dir = Path(out)
    path = profile_path(out_dir, exported, settings)
    if path.is_file():
        return {**json.loads(path.read_text()), "cached": True}
    label = exported["name"]
    n = _attempt(out_dir, f"profile {label}", fail_once)
    from tokedge.report.profile import ProfileConfig, run_profile

    image = Path(settings["image"]) if settings["image"] else _default_image(out_dir)
    start = time.perf_counter()
    report = run_profile(ProfileConfig(artifact=Path(exported["artifact"]), images=(image,), prompt=settings["prompt"],
                                       runs=settings["runs"], warmup=settings["warmup"],
                                       max_new_tokens=settings["max_new_tokens"], backend=meta.get("backend", "onnxruntime")))
    record = {**meta, "kind": "profile", "label": label, "artifact": exported["artifact"],
              "manifest_sha256": exported["manifest_sha256"], "code_version": code_version(), "attempt": n,
              "seconds": round(time.perf_counter() - start, 2), "report": report.to_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(record, indent=1) + "\n")
    return {**record, "cached": False}


def _default_image(out: Path) -> Path:
    """The demo's synthetic picture, written once (atomically) into the sweep directory."""
    path = out / "profile-image.png"
    if not path.is_file():
        from tokedge.demo import demo_image

        tmp = out / f".profile-image-{os.getpid()}-{time.monotonic_ns()}.png"
        demo_image(tmp)
        data = tmp.read_bytes()
        tmp.unlink()
        write_atomic(path, data)
    return path


def settings_of(profile) -> dict:
    """ProfileSettings -> the dict a profile job takes."""
    return asdict(profile)
