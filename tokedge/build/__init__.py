"""`tokedge build`: TensorRT engines from an artifact and a device profile.

`plan` is pure (shapes, profiles, precision: runs anywhere, `--dry-run`); `trt` is the only module
that imports tensorrt (engine building, verified loading, the runner). This module ties them
together: check, plan, then build under a staged directory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tokedge.axes import TYPICAL_TEXT_TOKENS
from tokedge.build.plan import (
    FP32_LAYERS,
    BuildPlan,
    EnginePlan,
    OptProfile,
    ShapeRange,
    plan_build,
    precision_settings,
)

__all__ = ["FP32_LAYERS", "TYPICAL_TEXT_TOKENS", "BuildPlan", "EnginePlan", "OptProfile", "ShapeRange", "build",
           "check_warnings", "default_engines_dir", "plan_build", "precision_settings"]


def check_warnings(artifact: Path, trt_version: str) -> list[str]:
    """What `tokedge check` would reject for this TensorRT family, as warning lines (empty: clean)."""
    from tokedge.check import check_artifact

    report = check_artifact(artifact, f"trt-{trt_version}", profiles=[])  # ops only: build plans its own profile
    if report.ok:
        return []
    first = report.findings[0].line()
    more = f" (and {len(report.findings) - 1} more)" if len(report.findings) > 1 else ""
    return [f"`tokedge check --target trt-{trt_version}` rejects this artifact: {first}{more}; "
            "the build will fail on those ops"]


def default_engines_dir(artifact: Path, profile: str) -> Path:
    artifact = Path(artifact)
    return artifact.parent / f"{artifact.name}.engines-{profile}"


def build(artifact: Path, profile_name: str, out: Path | None = None, force: bool = False,
          dry_run: bool = False) -> tuple[BuildPlan, Path, list[dict]]:
    """Plan (always) and build (unless dry_run) the engines of an artifact for a device profile.

    Engines go to a staged directory renamed into place, under the writer lock that serialises
    concurrent builds of the same engines; `engines.json` records each plan's sha256 and the
    artifact's manifest hash, which the TensorRT runner checks before deserialising anything.
    """
    import json
    import tempfile

    from tokedge.artifact import open_artifact, staged_directory, write_manifest
    from tokedge.profiles import load_profile

    artifact = Path(artifact)
    verified = open_artifact(artifact)  # every file read once, no links followed, hashed
    manifest = verified.manifest
    profile = load_profile(profile_name)
    plan = plan_build(manifest, profile, artifact)
    out = Path(out) if out else default_engines_dir(artifact, profile.name)

    def checked(source: Path) -> BuildPlan:
        return dataclasses.replace(plan, warnings=plan.warnings + tuple(check_warnings(source, profile.trt_version)))

    if dry_run:
        return checked(artifact), out, []
    from tokedge.build.trt import build_all

    timing_cache = out.parent / f".{profile.name}.timing.cache"
    with staged_directory(out, force=force, marker="engines.json", protect=(artifact,)) as stage, \
            tempfile.TemporaryDirectory(prefix=f".{out.name}.source-", dir=out.parent) as private:
        # the static check and TensorRT read files: they get a private copy of the verified bytes,
        # never the artifact's paths again
        verified.write_to(Path(private))
        write_manifest(Path(private), manifest)
        plan = checked(Path(private))
        metas = build_all(plan, Path(private), stage, timing_cache)
        index = {
            "profile": profile.name,
            "trt_version": profile.trt_version,
            "artifact_manifest_sha256": verified.manifest_sha256,
            "plan": plan.to_dict(),
            "engines": {m["graph"]: {"plan": f"{m['graph']}.plan", "sha256": m["plan_sha256"]} for m in metas},
        }
        (stage / "engines.json").write_text(json.dumps(index, indent=2) + "\n")
    return plan, out, metas
