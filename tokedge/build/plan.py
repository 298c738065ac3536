"""Build planning, pure and TensorRT-free: shapes, optimisation profiles and precision flags per
graph from an artifact's manifest and a device profile. `--dry-run` and the tests run anywhere;
`tokedge.build.trt` turns a plan into engines (and imports this module, never the reverse).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from tokedge.artifact import Manifest, TensorSpec
from tokedge.axes import axis_bounds
from tokedge.errors import UsageError
from tokedge.memory import image_bounds
from tokedge.profiles import DeviceProfile

# layer types kept in fp32 under TensorRT 10.x builder precision flags (scores, softmax, TopK)
FP32_LAYERS = ("SOFTMAX", "TOPK", "REDUCE")


@dataclass(frozen=True)
class ShapeRange:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class OptProfile:
    name: str  # "default", "prefill" or "decode"
    shapes: dict[str, ShapeRange]  # execution-tensor shapes
    values: dict[str, ShapeRange] = field(default_factory=dict)  # shape-tensor values (the budget)


@dataclass(frozen=True)
class EnginePlan:
    graph: str
    onnx: str  # file in the artifact
    onnx_sha256: str
    plan: str  # engine file name
    profiles: tuple[OptProfile, ...]
    strongly_typed: bool
    builder_flags: tuple[str, ...]  # TensorRT BuilderFlag names
    fp32_layer_types: tuple[str, ...]  # LayerType names pinned to fp32 (weakly typed builds only)
    workspace_mb: int


@dataclass(frozen=True)
class BuildPlan:
    artifact: str
    profile: str
    trt_version: str
    precision: str
    engines: tuple[EnginePlan, ...]
    notes: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()  # e.g. ops `tokedge check` rejects for this TensorRT family

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def precision_settings(profile: DeviceProfile, artifact_dtype: str) -> tuple[bool, tuple[str, ...], tuple[str, ...]]:
    """-> (strongly_typed, builder flags, fp32-pinned layer types) for a TensorRT family.

    TensorRT 10.x (JetPack 6) is weakly typed: precision comes from builder flags, with scores,
    softmax and TopK pinned to fp32 (OBEY_PRECISION_CONSTRAINTS makes the pins binding).
    TensorRT 11 is strongly typed: the graph's dtypes are the engine's precision, so the artifact
    must already be in the profile's precision (`tokedge export --dtype fp16`).
    """
    if profile.trt_version == "11":
        wanted = {"fp16": "fp16", "fp32": "fp32"}.get(profile.precision)
        if wanted is None:
            raise UsageError(f"profile {profile.name}: precision {profile.precision} needs a quantised export, "
                             "which tokedge does not make yet")
        if artifact_dtype != wanted:
            raise UsageError(
                f"TensorRT 11 is strongly typed and profile {profile.name} wants {wanted}, but the artifact is "
                f"{artifact_dtype}; re-export with --dtype {wanted}"
            )
        return True, (), ()
    flags: list[str] = []
    if profile.precision == "fp16":
        flags += ["FP16", "OBEY_PRECISION_CONSTRAINTS"]
    elif profile.precision == "bf16":
        flags += ["BF16", "OBEY_PRECISION_CONSTRAINTS"]
    elif profile.precision not in ("fp32",):
        raise UsageError(f"profile {profile.name}: precision {profile.precision} is not supported by tokedge builds")
    return False, tuple(flags), FP32_LAYERS if flags else ()


def _shape(spec: TensorSpec, axes: dict[str, tuple[int, int, int]], graph: str) -> ShapeRange:
    """An input's shape range from its declared dims: sizes as they are, axes from their bounds."""
    mins, opts, maxs = [], [], []
    for dim in spec.shape:
        if isinstance(dim, int):
            lo = opt = hi = dim
        elif dim in axes:
            lo, opt, hi = axes[dim]
        else:
            raise UsageError(f"graph {graph}: input {spec.name} has axis '{dim}' that no layout or graph of this "
                             "artifact declares bounds for; re-export it with this tokedge")
        mins.append(lo)
        opts.append(opt)
        maxs.append(hi)
    rng = ShapeRange(tuple(mins), tuple(opts), tuple(maxs))
    if not all(0 <= a <= b <= c for a, b, c in zip(rng.min, rng.opt, rng.max)):
        raise UsageError(f"graph {graph}: input {spec.name} got the impossible shape range min {list(rng.min)} "
                         f"opt {list(rng.opt)} max {list(rng.max)}")  # a bug: `axes.bounded` makes them ordered
    return rng


def _profile(name: str, manifest: Manifest, graph: str, profile: DeviceProfile,
             phase: str) -> tuple[OptProfile, list[str]]:
    bounds = axis_bounds(manifest, profile, graph, phase)
    spec = manifest.graphs[graph]
    shapes, values = {}, {}
    for tensor in spec.inputs:
        if tensor.name in bounds.values:  # a 0-d shape tensor: one value
            lo, opt, hi = bounds.values[tensor.name]
            values[tensor.name] = ShapeRange((lo,), (opt,), (hi,))
            continue
        shapes[tensor.name] = _shape(tensor, bounds.shapes, graph)
    return OptProfile(name=name, shapes=shapes, values=values), bounds.warnings


def graph_phases(manifest: Manifest, graph: str) -> tuple[tuple[str, str], ...]:
    """(profile name, phase) of each optimisation profile a graph's engine gets."""
    if graph == "decoder":
        return (("decode", "decode"),) if "prefill" in manifest.graphs else (("prefill", "prefill"), ("decode", "decode"))
    if graph == "prefill":
        return (("prefill", "prefill"),)
    return (("default", "default"),)


def plan_shapes(manifest: Manifest, profile: DeviceProfile) -> tuple[dict[str, tuple[OptProfile, ...]], list[str]]:
    """THE decision whether an artifact's graphs can be planned for a device profile (`check` and
    `build` both call it): every graph's optimisation profiles, or a `UsageError` naming what cannot
    be bounded and the fix. -> ({graph: profiles}, warnings)."""
    out: dict[str, tuple[OptProfile, ...]] = {}
    warnings: list[str] = []
    for graph in manifest.graphs:
        planned = [_profile(name, manifest, graph, profile, phase) for name, phase in graph_phases(manifest, graph)]
        out[graph] = tuple(opt for opt, _ in planned)
        warnings += [w for _, ws in planned for w in ws if w not in warnings]
    return out, warnings


def plan_build(manifest: Manifest, profile: DeviceProfile, artifact: Path) -> BuildPlan:
    strongly_typed, flags, fp32_layers = precision_settings(profile, manifest.dtype)
    notes = []
    shapes, warnings = plan_shapes(manifest, profile)
    engines = []
    for graph, spec in manifest.graphs.items():
        engines.append(EnginePlan(
            graph=graph, onnx=spec.file, onnx_sha256=manifest.files[spec.file], plan=f"{graph}.plan",
            profiles=shapes[graph], strongly_typed=strongly_typed, builder_flags=flags, fp32_layer_types=fp32_layers,
            workspace_mb=profile.workspace_mb,
        ))
    if profile.dla_cores:
        notes.append(f"{profile.dla_cores} DLA core(s) available; tokedge builds for the GPU (DLA lacks "
                     "TopK/GatherND support needed by the reduction)")
    image = image_bounds(manifest)
    if image.tiled:
        notes.append(f"per-image layout: per image {image.partitions[0]}..{image.partitions[2]} partitions and "
                     f"{image.vision_tokens[0]}..{image.vision_tokens[2]} visual tokens before reduction "
                     f"({image.prompt_tokens[2]} at most in the prompt), from the manifest's layout")
    return BuildPlan(artifact=str(artifact), profile=profile.name, trt_version=profile.trt_version,
                     precision=profile.precision, engines=tuple(engines), notes=tuple(notes),
                     warnings=tuple(warnings))
