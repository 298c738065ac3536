"""A sweep grid as data: a frozen `SweepGrid` parsed from TOML at the edge, and the points it names.

```toml
model = "tiny-llava"                      # checkpoint directory, hub id or preset
methods = ["cls-attn", "divprune", "pool"]
budgets = [16, 64, 144]
tasks = ["pope:tasks/pope.json", "tasks/mine.jsonl"]  # `tokedge eval --task` specs; paths relative to the grid
reference = "none"                        # the unreduced artifact: one point per task, no budget
baseline = "random"                       # random selection at every budget: the floor to beat ("" for none)
quantize = [""]                           # "" (float), "int8", "int4": each multiplies the grid
limit = 20                                # examples per task (omit: all)
```
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from tokedge.errors import InputError, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 (JetPack 6)
    import tomli as tomllib  # pyright: ignore[reportMissingImports]

QUANT_SCHEMES = ("", "int8", "int4")


@dataclass(frozen=True)
class ProfileSettings:
    """How each artifact is profiled (`tokedge profile`'s flags of the same names)."""

    enabled: bool = True  # false: latency comes from the eval's TTFT alone
    image: str = ""  # "" = a built-in synthetic 480x360 picture
    runs: int = 3
    warmup: int = 1
    max_new_tokens: int = 8
    prompt: str = "Describe this image."


@dataclass(frozen=True)
class SweepGrid:
    model: str  # checkpoint directory, hub id or preset (tiny-llava)
    methods: tuple[str, ...]  # reduction methods, each at every budget
    budgets: tuple[int, ...]
    tasks: tuple[str, ...]  # task files or names, as `tokedge eval` takes them
    reference: str = "none"  # the unreduced method: one artifact, evaluated on every task ("" to skip)
    baseline: str = "random"  # random selection: every budget, every task ("" to skip)
    quantize: tuple[str, ...] = ("",)  # "" float; "int8"/"int4" weight-only (matmulnbits)
    limit: int | None = None  # examples per task; None = the whole task
    seed: int = 0
    backend: str = "onnxruntime"
    validate: bool = True  # export's ONNX Runtime vs transformers check
    options: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)  # method -> KEY=VALUE options
    profile: ProfileSettings = ProfileSettings()

    def exports(self) -> list[ExportPoint]:
        """Every artifact the grid needs, in a stable order: reference, baseline, methods."""
        points = []
        for quant in self.quantize:
            if self.reference:
                points.append(ExportPoint(self.reference, None, quant, self.options.get(self.reference, ())))
            for method in ([self.baseline] if self.baseline else []) + list(self.methods):
                for budget in self.budgets:
                    points.append(ExportPoint(method, budget, quant, self.options.get(method, ())))
        return points

    def role(self, method: str) -> str:
        """'reference', 'baseline' or 'method': how the comparison report places a point."""
        return "reference" if method == self.reference else "baseline" if method == self.baseline else "method"


@dataclass(frozen=True)
class ExportPoint:
    method: str
    budget: int | None  # None: the method's default (all tokens for the reference)
    quantize: str = ""
    options: tuple[tuple[str, str], ...] = ()

    def name(self) -> str:
        """A readable directory name: method-budget[-quant]."""
        return "-".join([self.method, "full" if self.budget is None else str(self.budget),
                         *([self.quantize] if self.quantize else [])])


def _strings(data: dict, key: str, where: str, required: bool = True) -> tuple[str, ...]:
    value = data.get(key)
    if value is None and not required:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or (required and not value):
        raise InputError(f"{where}: '{key}' must be a non-empty list of strings")
    return tuple(value)


def parse_grid(data: dict, where: str = "grid", base: Path | None = None) -> SweepGrid:
    """A `SweepGrid` from a TOML table; task paths relative to `base` (the grid file's directory)."""
    known = {"model", "methods", "budgets", "tasks", "reference", "baseline", "quantize", "limit", "seed", "backend",
             "validate", "options", "profile"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise InputError(f"{where}: 'model' must name a checkpoint, hub id or preset (e.g. \"tiny-llava\")")
    budgets = data.get("budgets")
    if not isinstance(budgets, list) or not budgets or not all(isinstance(b, int) and b > 0 for b in budgets):
        raise InputError(f"{where}: 'budgets' must be a non-empty list of positive integers")
    tasks = tuple(_resolve_task(t, base) for t in _strings(data, "tasks", where))
    quantize = _strings(data, "quantize", where, required=False) or ("",)
    bad = [q for q in quantize if q not in QUANT_SCHEMES]
    if bad:
        raise UsageError(f"{where}: quantize {bad[0]!r} is not one of: \"\" (float), int8, int4")
    limit = data.get("limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise InputError(f"{where}: 'limit' must be a positive integer")
    options_table = data.get("options", {})
    if not isinstance(options_table, dict):
        raise InputError(f"{where}: 'options' must be a table of method = {{ key = value }}")
    options = {m: tuple((str(k), str(v)) for k, v in table.items()) for m, table in options_table.items()}
    profile_table = data.get("profile", {})
    if not isinstance(profile_table, dict):
        raise InputError(f"{where}: 'profile' must be a table (enabled, image, runs, warmup, max_new_tokens, prompt)")
    try:
        profile = ProfileSettings(**profile_table)
    except TypeError as exc:
        raise InputError(f"{where}: [profile]: {exc}") from None
    if profile.image and base is not None and not Path(profile.image).is_absolute():
        profile = ProfileSettings(**{**profile.__dict__, "image": str(base / profile.image)})
    return SweepGrid(
        model=model, methods=_strings(data, "methods", where), budgets=tuple(budgets), tasks=tasks,
        reference=str(data.get("reference", "none")), baseline=str(data.get("baseline", "random")),
        quantize=quantize, limit=limit, seed=int(data.get("seed", 0)), backend=str(data.get("backend", "onnxruntime")),
        validate=bool(data.get("validate", True)), options=options, profile=profile)


def _resolve_task(task: str, base: Path | None) -> str:
    """A task as `tokedge eval --task` takes it (FORMAT:PATH or PATH); a relative PATH is relative
    to the grid file."""
    from tokedge.eval.tasks import parse_spec

    head, sep, _ = task.partition(":")
    fmt, path = parse_spec(task)
    if base is not None and not path.is_absolute():
        path = (base / path).resolve()
    return f"{head}:{path}" if sep and head == fmt else str(path)


def load_grid(path: Path) -> SweepGrid:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"grid file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read grid file '{path}': {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"grid file '{path}' is not valid TOML: {exc}") from None
    return parse_grid(data, where=str(path), base=Path(path).resolve().parent)
