"""What a sweep's cached results are keyed by (docs/eval.md, "Resuming a sweep").

- code version: `tokedge.__version__` plus the sha256 of every `.py` file of the package except
  the ones that only print, plot or schedule (`cli.py`, `sweep/`, `report/compare.py`,
  `report/render.py`, `serve/`, `build/`, `doctor.py`): editing an exporter, a method, the runtime,
  eval or profile invalidates every cached point, editing a report's layout invalidates nothing.
- an artifact: the export point (model, method, budget, options, quantization, validate) and the
  code version name its directory; it counts as done once its `tokedge.json` exists (exports are
  staged and renamed into place whole).
- an eval result: the artifact's manifest sha256 + the task (its format and the sha256 of its
  file, or of every file of an MME directory) + limit + seed + backend + the code version.
- a profile: the artifact's manifest sha256 + the profile settings + the code version.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import tokedge

# paths (relative to the package) whose code cannot change an export, an eval or a profile number
_PRESENTATION = ("cli.py", "sweep/", "report/compare.py", "report/render.py", "serve/", "build/", "doctor.py")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """`<version>+<12 hex>`: the package version and a hash of the code that produces numbers."""
    root = Path(tokedge.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(_PRESENTATION):
            continue
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{tokedge.__version__}+{h.hexdigest()[:12]}"


def digest(*parts: object) -> str:
    """A short stable hash of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def task_identity(task: str) -> str:
    """A task's format and the sha256 of its file (of every file below it, for an MME directory),
    so an edited task file is a new task."""
    from tokedge.eval.tasks import parse_spec

    fmt, path = parse_spec(task)
    h = hashlib.sha256(fmt.encode() + b"\0")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else []
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return f"{fmt}:{h.hexdigest()}" if files else f"name:{task}"


def task_name(task: str) -> str:
    """The name `tokedge eval` gives a task (FORMAT-STEM): result file names and report columns."""
    from tokedge.eval.tasks import parse_spec

    fmt, path = parse_spec(task)
    return f"{fmt}-{path.stem if path.suffix else path.name}"
