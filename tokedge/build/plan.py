"""Build planning, pure and TensorRT-free: shapes, optimisation profiles and precision flags per
graph from an artifact's manifest and a device profile. `--dry-run` and the tests run anywhere;
`tokedge.build.trt` turns a plan into engines (and imports this module, never the reverse).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from tokedge.artifact import Manifest, TensorSpec
from tokedge.errors import UsageError
from tokedge.memory import image_bounds
from tokedge.profiles import DeviceProfile

# layer types kept in fp32 under TensorRT 10.x builder precision flags (scores, softmax, TopK)
FP32_LAYERS = ("SOFTMAX", "TOPK", "REDUCE")
TYPICAL_TEXT_TOKENS = 64  # prompt text beside the image, for the `opt` shapes
PARTITIONS = "partitions"  # tiled layouts: the vision graph's views of one image (base view + tiles)
PACKING_INPUTS = ("pack_index", "pack_weight")  # tiled layouts: one row per visual token of the image


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


class _Axes:
    """min/opt/max for every symbolic axis name of the artifact, from the device profile and the
    manifest's visual layout (`memory.image_bounds`: partitions and visual tokens per image, read
    as data; a tiled layout's counts vary with the image size)."""

    def __init__(self, manifest: Manifest, profile: DeviceProfile, phase: str):
        red = manifest.reduction
        text = TYPICAL_TEXT_TOKENS
        image = image_bounds(manifest)
        fewest_visual, opt_visual, most_visual = image.prompt_tokens
        if image.tiled:
            prompt_visual = fewest_visual  # the smallest image must fit; larger ones are checked below
        else:
            prompt_visual = manifest.prompt.visual_tokens
            opt_visual = prompt_visual
        if profile.max_prompt_tokens <= prompt_visual:
            raise UsageError(f"profile {profile.name} allows {profile.max_prompt_tokens} prompt tokens, fewer than the "
                             f"artifact's {prompt_visual} visual tokens plus text")
        if red.budget_range:  # the fewest visual tokens a prompt can carry
            prompt_visual = max(red.budget_range[0], profile.budget_min)
        max_total = min(profile.max_sequence, manifest.model.max_position_embeddings)
        max_prompt = min(profile.max_prompt_tokens, max_total - 1)  # leave room for at least one new token
        if max_prompt <= prompt_visual:
            raise UsageError(f"profile {profile.name} leaves {max_prompt} prompt tokens, not more than the "
                             f"artifact's {prompt_visual} visual tokens")
        self.warnings: list[str] = []
        if image.tiled and most_visual >= max_prompt:
            self.warnings.append(
                f"profile {profile.name} allows {max_prompt} prompt tokens but the layout's largest image gives "
                f"{most_visual} visual tokens: images over {max_prompt - 1} visual tokens will not run on these "
                "engines (use a profile with a larger max_prompt_tokens, or a reduced artifact)")
        opt_prompt = min(max_prompt, opt_visual + text)
        self.ranges: dict[str, tuple[int, int, int]] = {"batch": (1, 1, profile.max_batch)}
        if phase == "decode":
            self.ranges["sequence"] = (1, 1, 1)
        elif phase == "prefill":
            self.ranges["sequence"] = (prompt_visual + 1, opt_prompt, max_prompt)
        else:  # embed: prompts and single decode tokens
            self.ranges["sequence"] = (1, opt_prompt, max_prompt)
        cut = {0: 0}
        for g, stage in enumerate(red.stages, start=1):
            cut[g] = red.full_tokens - stage["keep"]
        for g, removed in cut.items():
            suffix = "" if g == 0 else f".{g}"
            if phase == "decode":
                self.ranges["past_sequence" + suffix] = (1, opt_prompt - removed, max_total - 1 - removed)
                self.ranges["total_sequence" + suffix] = (2, opt_prompt - removed + 1, max_total - removed)
            else:
                self.ranges["past_sequence" + suffix] = (0, 0, 0)
                lo, opt, hi = self.ranges["sequence"]
                self.ranges["total_sequence" + suffix] = (lo, opt, hi)
                self.ranges["sequence" + suffix] = (max(1, lo - removed), max(1, opt - removed), hi - removed)
        # tiled layouts: the vision graph runs one image's partitions (base view + tiles) at a time,
        # and its packing plan has one row per visual token of that image
        self.ranges[PARTITIONS] = image.partitions
        if manifest.video is not None and manifest.video.kind == "frames":  # one video's frames at once
            self.ranges["frames"] = (1, manifest.video.default_frames, manifest.video.max_frames)
        self.image_tokens = image.vision_tokens
        if image.tiled and not red.budget_range:
            self.ranges["visual_tokens"] = image.vision_tokens
        merge = manifest.layout.merge_size
        if merge:  # dynamic resolution: one image's patches (m² per visual token) and merged tokens
            lo, opt, hi = image.vision_tokens
            self.ranges["patches"] = (lo * merge * merge, opt * merge * merge, hi * merge * merge)
            self.ranges["image_tokens"] = image.vision_tokens
        if red.stages:  # the prefill's image positions: every image token of a prompt, one image or several
            lo, opt, hi = image.vision_tokens
            self.ranges["image_tokens"] = (lo, opt, max(hi, max_prompt - 1))
        if red.budget_range:
            lo = max(red.budget_range[0], profile.budget_min)
            hi = min(red.budget_range[1], profile.budget_max)
            if lo > hi:
                raise UsageError(f"the artifact's budget range {red.budget_range[0]}..{red.budget_range[1]} and profile "
                                 f"{profile.name}'s {profile.budget_min}..{profile.budget_max} do not overlap")
            self.budget = (lo, min(max(red.budget, lo), hi), hi)
            self.ranges["visual_tokens"] = self.budget
        else:
            self.budget = None

    def shape(self, spec: TensorSpec) -> ShapeRange:
        mins, opts, maxs = [], [], []
        for dim in spec.shape:
            if isinstance(dim, int):
                lo = opt = hi = dim
            elif dim in self.ranges:
                lo, opt, hi = self.ranges[dim]
            else:
                raise UsageError(f"input {spec.name} has axis '{dim}' that tokedge build does not know how to bound")
            mins.append(lo)
            opts.append(opt)
            maxs.append(hi)
        return ShapeRange(tuple(mins), tuple(opts), tuple(maxs))


def _profile(name: str, manifest: Manifest, graph: str, profile: DeviceProfile,
             phase: str) -> tuple[OptProfile, list[str]]:
    axes = _Axes(manifest, profile, phase)
    spec = manifest.graphs[graph]
    shapes, values = {}, {}
    for tensor in spec.inputs:
        if tensor.name == "budget":
            assert axes.budget is not None
            lo, opt, hi = axes.budget
            values["budget"] = ShapeRange((lo,), (opt,), (hi,))  # a 0-d shape tensor: one value
            continue
        shapes[tensor.name] = axes.shape(tensor)
        if tensor.name in PACKING_INPUTS and not isinstance(tensor.shape[0], int):
            # rows = the image's visual tokens before reduction, whatever the axis is named (a
            # reduced graph may share the name with its budget)
            rng = shapes[tensor.name]
            lo, opt, hi = axes.image_tokens
            shapes[tensor.name] = ShapeRange((lo, *rng.min[1:]), (opt, *rng.opt[1:]), (hi, *rng.max[1:]))
    return OptProfile(name=name, shapes=shapes, values=values), axes.warnings


def plan_build(manifest: Manifest, profile: DeviceProfile, artifact: Path) -> BuildPlan:
    strongly_typed, flags, fp32_layers = precision_settings(profile, manifest.dtype)
    notes = []
    warnings: list[str] = []
    engines = []
    for graph, spec in manifest.graphs.items():
        if graph == "decoder":
            phases = (("decode", "decode"),) if "prefill" in manifest.graphs else (("prefill", "prefill"),
                                                                                   ("decode", "decode"))
        elif graph == "prefill":
            phases = (("prefill", "prefill"),)
        else:
            phases = (("default", "default"),)
        planned = [_profile(name, manifest, graph, profile, phase) for name, phase in phases]
        profiles = tuple(opt for opt, _ in planned)
        warnings += [w for _, ws in planned for w in ws if w not in warnings]
        engines.append(EnginePlan(
            graph=graph, onnx=spec.file, onnx_sha256=manifest.files[spec.file], plan=f"{graph}.plan",
            profiles=profiles, strongly_typed=strongly_typed, builder_flags=flags, fp32_layer_types=fp32_layers,
            workspace_mb=profile.workspace_mb,
        ))
    if profile.dla_cores:
        notes.append(f"{profile.dla_cores} DLA core(s) available; tokedge builds for the GPU (DLA lacks "
                     "TopK/GatherND support needed by the reduction)")
    image = image_bounds(manifest)
    if image.tiled:
        notes.append(f"tiled layout: per image {image.partitions[0]}..{image.partitions[2]} partitions and "
                     f"{image.vision_tokens[0]}..{image.vision_tokens[2]} visual tokens before reduction "
                     f"({image.prompt_tokens[2]} at most in the prompt), from the manifest's layout")
    return BuildPlan(artifact=str(artifact), profile=profile.name, trt_version=profile.trt_version,
                     precision=profile.precision, engines=tuple(engines), notes=tuple(notes),
                     warnings=tuple(warnings))
