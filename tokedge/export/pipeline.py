"""`tokedge export`: checkpoint -> three ONNX graphs + manifest, validated against transformers.

Everything is written into a staging directory beside the target and renamed into place at the
end, so a failed or killed export leaves no artifact behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tokedge
from tokedge.artifact import (
    Manifest,
    ReductionInfo,
    check_target,
    hash_tree,
    staged_directory,
    write_manifest,
)
from tokedge.errors import InputError, UsageError
from tokedge.reduce import METHODS, get_method
from tokedge.reduce.base import Method, VisionGeometry

if TYPE_CHECKING:
    from tokedge.export.quantize import QuantConfig

DTYPES = ("fp32", "fp16")
DEFAULT_VIDEO_KEEP = 0.25  # reducing artifacts keep this share of a video's tokens unless told otherwise
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ExportConfig:
    model: str  # hub id, local llava-hf directory, or a built-in preset name ("tiny-llava")
    out: Path
    method: str = "none"
    budget: int | None = None  # None: all visual tokens for `none`, 64 for reduction methods
    dynamic_budget: tuple[int, int] | None = None  # [min, max] of the vision graph's `budget` input
    dtype: str = "fp32"
    force: bool = False  # replace an existing artifact (whole)
    trust_remote_code: bool = False
    allow_pickle: bool = False  # load *.bin weights (with torch weights_only)
    external_data_threshold: int = 1 << 30  # graphs with more weight bytes get a .onnx.data file
    validate: bool = True
    passes: tuple[str, ...] | None = None  # graph passes after tracing; None = DEFAULT_PASSES
    options: tuple[tuple[str, str], ...] = ()  # method options as given (`--option key=value`)
    quantize: QuantConfig | None = None  # weight-only quantization after tracing (None: float weights)
    device_profile: str | None = None  # warn when this device profile cannot hold the artifact
    max_pixels: int | None = None  # dynamic-resolution layouts: largest image (pixels); None: the edge default (pixel_budget_stage)
    keep: float | None = None  # dynamic-resolution layouts: keep ratio per image (--keep), instead of --budget
    frames: int | None = None  # temporal methods: the frame count their video graph is fixed to (None: default)
    max_tiles: int | None = None  # aspect-ratio tiled layouts: most tiles per image (None: the processor's)


@dataclass
class ExportResult:
    out: Path
    manifest: Manifest
    parity: dict
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # summary lines (the pixel budget chosen and how to raise it)


Progress = Callable[[str], contextlib.AbstractContextManager]


@contextlib.contextmanager
def _quiet_stage(name: str) -> Iterator[None]:
    yield


def parse_budget_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(part) for part in text.split(":"))
    except ValueError:
        raise UsageError(f"--dynamic-budget '{text}' is not MIN:MAX (for example 16:576)") from None
    if lo > hi:
        raise UsageError(f"--dynamic-budget {text}: MIN is larger than MAX")
    return lo, hi


def resolve_model(source: str) -> Path | None:
    """Local directory for `source` (building a preset if needed), or None for a hub id."""
    from tokedge.export.presets import PRESETS, resolve_preset

    preset = resolve_preset(source)
    if preset is not None:
        return preset
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(f"'{source}' is a file; pass the checkpoint directory (with config.json) or a hub id")
    if HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        from tokedge.export.hf import offline_checkpoint

        return offline_checkpoint(source)  # None: online, transformers downloads it
    from tokedge.suggest import did_you_mean

    hint = did_you_mean(source, PRESETS).strip()
    raise InputError(f"'{source}' is not a directory, a built-in preset ({', '.join(PRESETS)}) or a hub id "
                     f"(owner/name)" + (f"; {hint}" if hint else ""))


def check_flags(cfg: ExportConfig, method: Method) -> dict:
    """What can be checked from the flags alone (before the checkpoint is even read); -> options."""
    options = method.parse_options(dict(cfg.options))
    if cfg.dtype not in DTYPES:
        raise UsageError(f"--dtype {cfg.dtype} is not supported; use one of {', '.join(DTYPES)}")
    if cfg.dynamic_budget is not None and not method.supports_runtime_budget:
        able = ", ".join(m.name for m in METHODS.values() if m.supports_runtime_budget)
        raise UsageError(f"--method {method.name} cannot take a runtime budget (methods that can: {able}); "
                         "drop --dynamic-budget and export one artifact per budget")
    return options


def check_request(cfg: ExportConfig, method: Method, full_tokens: int,
                  geometry: VisionGeometry | None = None, dynamic: bool = False) -> tuple[int, tuple[int, int] | None, dict]:
    """Budget, runtime range and options, checked before any weights load."""
    options = check_flags(cfg, method)
    budget = cfg.budget if cfg.budget is not None else method.default_budget(full_tokens)
    if cfg.keep is not None:  # a ratio per image: the recorded budget is the count at the largest image
        from tokedge.reduce.quota import TokenBudget

        if cfg.budget is not None:
            raise UsageError("give --budget (tokens per image) or --keep (a share of each image's tokens), not both")
        if method.keeps_all:
            raise UsageError("--method none keeps every visual token; drop --keep or choose a reduction method")
        if cfg.dynamic_budget is not None:
            raise UsageError("--keep already adapts to each image; drop --dynamic-budget")
        budget = TokenBudget(keep=cfg.keep).per_image(full_tokens)
    method.check_budget(budget, full_tokens, geometry, dynamic)
    rng = cfg.dynamic_budget
    if rng is not None:
        lo, hi = rng
        if not (1 <= lo <= budget <= hi <= full_tokens):
            raise UsageError(
                f"--dynamic-budget {lo}:{hi} must satisfy 1 <= MIN <= --budget ({budget}) <= MAX <= {full_tokens}"
            )
    return budget, rng, options


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"tokedge": tokedge.__version__}
    for dist in ("torch", "transformers", "onnx", "onnxscript", "onnx-ir", "onnxruntime"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[dist] = md.version(dist)
    return out


@dataclass
class _Export:
    """What the stages of one export share: the request as checked (`plan_export`), then what each
    later stage adds. Each stage reads the fields before it and sets its own."""

    cfg: ExportConfig
    method: Method
    out: Path
    timed: Callable[[str], contextlib.AbstractContextManager]
    family: Any = None
    spec: Any = None
    local: Path | None = None
    temporal: Method | None = None  # a video-only method (its graph reduces videos; images keep every token)
    video_options: dict = field(default_factory=dict)
    temporal_budget: int | None = None
    temporal_frames: int | None = None
    counts_per_image: bool = False  # the layout's images each give their own count
    resizes: bool = False  # the layout resizes images to a pixel budget (--max-pixels, --keep apply)
    full: int = 0
    budget: int = 0
    rng: tuple[int, int] | None = None
    options: dict = field(default_factory=dict)
    plan: Any = None  # in-LLM pruning plan
    loaded: Any = None
    vision_tokens: int = 0
    trace_k: int = 0
    pixel_values: Any = None
    cases: list = field(default_factory=list)
    budgets: list = field(default_factory=list)
    video_case: Any = None
    torch_dtype: Any = None
    modules: dict = field(default_factory=dict)
    specs: dict = field(default_factory=dict)
    video: Any = None  # the manifest's video record
    notes: list = field(default_factory=list)  # summary lines for the user (ExportResult.notes)

    @property
    def protect(self) -> tuple:
        source = Path(self.cfg.model) if Path(self.cfg.model).exists() else None
        return (source, self.local)


def export(cfg: ExportConfig, progress: Progress = _quiet_stage) -> ExportResult:
    """Run the whole export; raises TokedgeError subclasses on bad input or failed parity. A script
    of stages: every check once, load, transformers' reference cases, modules with complete trace
    specs, then trace / passes / manifest / quantize / validate into a staged directory, written
    atomically."""
    seconds: dict[str, float] = {}
    job = plan_export(cfg, _timer(progress, seconds))
    load_checkpoint_stage(job)
    reference_stage(job)
    modules_stage(job)
    with staged_directory(job.out, force=cfg.force, protect=job.protect) as stage:
        graphs, optimizations = trace_stage(job, stage)
        manifest = manifest_stage(job, stage, graphs, optimizations)
        manifest, parity = validate_stage(job, stage, manifest)
        manifest = finish_stage(job, stage, manifest, parity)
    return ExportResult(out=job.out, manifest=manifest, parity=parity, seconds=seconds, warnings=_warnings(job, manifest),
                        notes=job.notes)


def _timer(progress: Progress, seconds: dict[str, float]):
    def timed(name: str):
        @contextlib.contextmanager
        def run() -> Iterator[None]:
            start = time.perf_counter()
            with progress(name):
                yield
            seconds[name] = round(time.perf_counter() - start, 3)

        return run()

    return timed


def _check_family_flags(cfg: ExportConfig, family, layout_class) -> None:
    """Flags that only some families or layouts take, refused in one line on the others."""
    if cfg.dtype == "fp16" and getattr(family, "fp16_refusal", None):
        raise UsageError(f"--dtype fp16: {family.fp16_refusal}")
    if cfg.max_pixels is not None and not layout_class.takes_max_pixels:
        raise UsageError(f"--max-pixels applies to dynamic-resolution models (Qwen-VL); this {family.name} "
                         "checkpoint has a fixed image geometry: drop --max-pixels")
    if cfg.max_tiles is not None and not layout_class.takes_max_tiles:
        raise UsageError(f"--max-tiles applies to aspect-ratio tiled models (InternVL); this {family.name} "
                         "checkpoint has no tile range: drop --max-tiles")
    if cfg.keep is not None and not layout_class.takes_max_pixels:
        raise UsageError(f"--keep applies to dynamic-resolution models (Qwen-VL), where images give different "
                         f"token counts; this {family.name} checkpoint has a fixed count: use --budget")


def plan_export(cfg: ExportConfig, timed) -> _Export:
    """Every check that needs no weights, once: flags, method, family and its layout, budget, the
    in-LLM plan when the config names the decoder's layers, and the output directory."""
    from tokedge.export.families import inspect_checkpoint
    from tokedge.layouts import image_layout_class

    job = _Export(cfg=cfg, method=get_method(cfg.method), out=Path(cfg.out), timed=timed)
    if job.method.reduces_over_time:  # a video-only method: images keep every token, the method reduces videos
        job.temporal, job.video_options = job.method, check_temporal(cfg, job.method)
        job.temporal_budget, job.temporal_frames = cfg.budget, cfg.frames
        job.cfg = cfg = replace(cfg, method="none", budget=None, options=())
        job.method = get_method("none")
    elif cfg.frames is not None:
        raise UsageError(f"--frames fixes a temporal method's video graph; --method {job.method.name} takes any frame "
                         "count at run time: drop --frames")
    check_flags(cfg, job.method)  # wrong flags are reported first, before "already exists" or any loading
    if cfg.quantize is not None:
        cfg.quantize.check()
        if cfg.dtype != "fp32":
            raise UsageError("--quantize starts from fp32 weights; drop --dtype fp16")
    if cfg.device_profile:
        from tokedge.profiles import load_profile

        load_profile(cfg.device_profile)
    job.local = resolve_model(cfg.model)  # config only: cheap, so no progress stage for it
    job.family, job.spec = inspect_checkpoint(cfg.model, job.local, cfg.trust_remote_code)
    if job.temporal is not None and job.family.video is None:
        job.temporal.refuse_without_video(job.family.name)
    job.family.check_method(job.method)
    layout_class = image_layout_class(job.spec.layout.kind)
    job.counts_per_image, job.resizes = layout_class.counts_per_image, layout_class.takes_max_pixels
    _check_family_flags(cfg, job.family, layout_class)
    job.full = job.spec.full_tokens
    # a vision-side budget is out of the layout's unit where it has one (split tiles: each view's tokens)
    unit = layout_class.of_record(job.spec.layout).budget_full() if job.method.reduces_in_vision else None
    job.budget, job.rng, job.options = check_request(cfg, job.method, unit or job.full, job.spec.geometry,
                                                     job.resizes)
    if job.method.prunes_in_llm and job.spec.text_layers is not None:  # layer options checked before loading
        from tokedge.reduce.in_llm import plan_for

        job.plan = plan_for(job.method, job.budget, job.full, job.spec.text_layers, job.options)
        _check_keep_stages(cfg, job.method, job.plan)
    check_target(job.out, cfg.force, protect=job.protect)  # after the flags, before anything heavy
    return job


def load_checkpoint_stage(job: _Export) -> None:
    """The weights; what the loaded processor changes (a dynamic layout's pixel range sets the largest
    image's count), the temporal graph's checks, and the in-LLM plan from the loaded decoder."""
    cfg, family = job.cfg, job.family
    with job.timed("load checkpoint"):
        import torch

        job.loaded = family.load(cfg.model, job.local, trust_remote_code=cfg.trust_remote_code,
                                 allow_pickle=cfg.allow_pickle)
        job.loaded = pixel_budget_stage(job)
        if cfg.max_tiles is not None:
            most = job.loaded.spec.layout.max_tiles
            job.loaded = job.family.with_max_tiles(job.loaded, cfg.max_tiles)
            job.notes.append(f"images: up to {cfg.max_tiles} tiles (+ a thumbnail), {job.loaded.spec.full_tokens} "
                             f"visual tokens each, --max-tiles; the checkpoint's processor takes up to {most}")
    if job.loaded.spec.full_tokens != job.full:
        # the pixel range (and --max-pixels) or the tile range comes with the image processor
        job.full = job.loaded.spec.full_tokens
        from tokedge.layouts import image_layout_class

        layout_class = image_layout_class(job.loaded.spec.layout.kind)
        unit = layout_class.of_record(job.loaded.spec.layout).budget_full() if job.method.reduces_in_vision else None
        job.budget, job.rng, job.options = check_request(cfg, job.method, unit or job.full, job.spec.geometry,
                                                         job.resizes)
    if job.temporal is not None:  # frame count and budget checked before the reference runs (cheap: nothing traced)
        probe = family.video(job.loaded, torch.float32, job.temporal.needs)[3]
        temporal_graph(job.temporal, probe, job.video_options, job.temporal_budget, 1, torch.float32,
                       job.temporal_frames)
    if job.method.prunes_in_llm and job.plan is None:
        from tokedge.reduce.in_llm import plan_for

        if job.loaded.spec.text_layers is None:
            raise InputError(f"cannot tell how many decoder layers '{cfg.model}' has; its config names none")
        job.plan = plan_for(job.method, job.budget, job.full, job.loaded.spec.text_layers, job.options)
    _check_keep_stages(cfg, job.method, job.plan)
    job.vision_tokens = job.method.vision_tokens(job.budget, job.full)  # in-LLM methods prune inside the decoder
    job.trace_k = job.vision_tokens if job.rng is None else (job.rng[1] if job.rng[1] < job.full else job.full - 1)


def reference_stage(job: _Export) -> None:
    """transformers' outputs the artifact is validated against: one case per example image for
    layouts whose images give their own counts, else one batch of the example views (per budget)."""
    from tokedge.export.reference import (
        EXAMPLE_PROMPTS,
        example_images,
        pixel_values_for,
        reference_case,
        render_prompt,
    )
    from tokedge.export.validate import DECODE_STEPS

    loaded, method, family = job.loaded, job.method, job.family
    pruning = family.modules(loaded, method, job.trace_k, job.options, job.plan) if method.prunes_in_llm else None
    with job.timed("reference (transformers)"):
        if job.counts_per_image:
            import numpy as np

            job.pixel_values, job.budgets = np.zeros((0, 3, 1, 1), dtype=np.float32), [job.budget]
            job.cases = anyres_cases(loaded, method, job.budget, job.options, DECODE_STEPS, pruning, keep=job.cfg.keep)
        else:
            job.pixel_values = pixel_values_for(loaded, example_images(2))
            prompts = [render_prompt(loaded, q) for q in EXAMPLE_PROMPTS]
            job.budgets = [job.budget] if job.rng is None else sorted({job.rng[0], job.budget, job.rng[1]})
            if pruning is not None:
                from tokedge.export.reference import reference_pruned

                job.cases = [reference_pruned(loaded, pruning, job.pixel_values, prompts, job.budget, job.full,
                                              DECODE_STEPS)]
            else:
                job.cases = [reference_case(loaded, method, job.pixel_values, prompts, k, DECODE_STEPS, job.options)
                             for k in job.budgets]
    if job.cfg.validate and family.video_case is not None:  # transformers' video features on a small clip
        with job.timed("reference video (transformers)"):
            job.video_case = family.video_case(loaded)


def modules_stage(job: _Export) -> None:
    """The torch modules to trace, each with its complete trace spec (the family's own where it has
    one), plus the video graph and the manifest's video record of families that take video."""
    import torch

    from tokedge.export import onnx_export as ox

    cfg, family, loaded = job.cfg, job.family, job.loaded
    job.torch_dtype = torch.float16 if cfg.dtype == "fp16" else torch.float32
    if cfg.dtype == "fp16":
        loaded.model.half()
    info, pre = family.model_info(loaded), family.preprocess(loaded)
    job.modules = family.modules(loaded, job.method, job.trace_k, job.options, job.plan)
    job.specs = ox.trace_specs(info, pre.crop_size, job.torch_dtype, job.vision_tokens if job.rng is None else ox.TOKENS,
                               plan=job.plan, full_tokens=job.full, position_rows=loaded.spec.layout.position_rows,
                               deepstack_levels=loaded.spec.layout.deepstack_levels,
                               token_blocks=bool(getattr(family, "image_blocks", False)))
    vision_spec = family.vision_trace_spec(loaded, job.torch_dtype, job.modules["vision"])
    if vision_spec is not None:
        job.specs["vision"] = vision_spec
    if job.plan is not None and family.prefill_trace_spec is not None:  # a family's own prefill inputs
        job.specs["prefill"] = family.prefill_trace_spec(loaded, job.plan, job.torch_dtype)
    if family.video is None:
        return
    temporal = job.temporal
    video_graph, video_module, video_spec, video = family.video(
        loaded, job.torch_dtype, *(() if temporal is None else (temporal.needs,)))
    job.video = replace(video, keep_ratio=1.0 if job.method.keeps_all else DEFAULT_VIDEO_KEEP)
    if video_module is not None:  # None: the video runs through a graph already exported (Qwen: "vision")
        job.modules = {**job.modules, video_graph: video_module}
        job.specs[video_graph] = video_spec
    if temporal is not None:  # its graph, fixed to one frame count; the record's frame counts follow it
        from tokedge.runtime.video_pipeline import TEMPORAL_GRAPH

        job.video, job.modules[TEMPORAL_GRAPH], job.specs[TEMPORAL_GRAPH], job.temporal_budget = temporal_graph(
            temporal, job.video, job.video_options, job.temporal_budget, info.hidden_size, job.torch_dtype,
            job.temporal_frames)


def trace_stage(job: _Export, stage: Path) -> tuple[dict, list[dict]]:
    """Each module traced to ONNX, a runtime budget made an input, graph passes, saved. -> (graph
    specs, the passes that fired)."""
    from tokedge.export import onnx_export as ox
    from tokedge.export.passes import DEFAULT_PASSES, PassCall, run_passes

    passes = DEFAULT_PASSES if job.cfg.passes is None else job.cfg.passes
    graphs, optimizations = {}, []
    for name in job.modules:
        with job.timed(f"trace {name}.onnx"):
            model = ox.trace_to_ir(job.modules[name], job.specs[name])
            if name == "vision" and job.rng is not None:
                run_passes(model, [PassCall("runtime-budget", {"sentinel_k": job.trace_k, "lo": job.rng[0],
                                                               "hi": job.rng[1]})], graph=name)
            ox.finish(model)
            for pass_name, fired in run_passes(model, passes, graph=name).items():
                optimizations.append({"graph": name, "pass": pass_name, "fired": fired})
            file, data = ox.save_graph(model, stage, name, job.cfg.external_data_threshold)
            graphs[name] = ox.graph_spec(model, file, data)
    return graphs, optimizations


def manifest_stage(job: _Export, stage: Path, graphs: dict, optimizations: list[dict]) -> Manifest:
    """The tokenizer, the reference cases and the manifest; refused here (nothing written) when
    `--profile` cannot plan engines for it."""
    from tokedge.export import onnx_export as ox
    from tokedge.export.presets import random_weights
    from tokedge.export.validate import (
        DECODE_STEPS,
        REFERENCE_FILE,
        Tolerance,
        save_reference,
        tolerance_dict,
    )

    cfg, family, loaded, method, temporal = job.cfg, job.family, job.loaded, job.method, job.temporal
    loaded.processor.tokenizer.backend_tokenizer.save(str(stage / "tokenizer.json"))
    save_reference(stage / REFERENCE_FILE, job.pixel_values, job.cases)
    recorded = method if temporal is None else temporal  # a temporal method's budget is its video's
    reduction = ReductionInfo(
        method=recorded.name, budget=job.budget if temporal is None else job.temporal_budget, full_tokens=job.full,
        stage=recorded.stage.value, budget_range=job.rng, options=job.options if temporal is None else job.video_options,
        stages=tuple(dataclasses.asdict(s) for s in job.plan.stages) if job.plan else (),
        merge_schedule=tuple(job.modules["vision"].schedule or ()),
        scores_with=tuple(s.value for s in recorded.scores_with),
        supports_runtime_budget=recorded.supports_runtime_budget, keep=cfg.keep,
    )
    manifest = Manifest(
        # the oldest format that reads it: the layout's (2 tiled, 3 dynamic resolution), at least 2 for
        # prefill graphs with `image_keep`
        format_version=max(family.layout(loaded).format_version, 2 if job.plan is not None else 1),
        tokedge_version=tokedge.__version__, dtype=cfg.dtype, model=family.model_info(loaded), reduction=reduction,
        graphs=graphs, preprocess=family.preprocess(loaded), prompt=family.prompt(loaded, job.vision_tokens),
        versions=_versions(), opset=ox.OPSET,
        reference={"file": REFERENCE_FILE, "tolerance": tolerance_dict(Tolerance.for_dtype(cfg.dtype)),
                   "budgets": job.budgets, "decode_steps": DECODE_STEPS},
        files={}, optimizations=tuple(optimizations), layout=family.layout(loaded), video=job.video,
        weights=random_weights(cfg.model, loaded.model.config),
    )
    if cfg.device_profile:  # engines must hold every shape the runtime will feed: refuse now, with the fix
        from tokedge.build.plan import plan_shapes
        from tokedge.profiles import load_profile

        plan_shapes(manifest, load_profile(cfg.device_profile))
    return manifest


def validate_stage(job: _Export, stage: Path, manifest: Manifest) -> tuple[Manifest, dict]:
    """Quantize (when asked: the fp32 side of the text measure first), then run the staged artifact
    through the device's own prompt path against the reference cases (and the video graph against
    transformers'; a quantized artifact also over the built-in text). -> (manifest, parity)."""
    from tokedge.export.validate import Tolerance, run_cases, tolerance_dict, tolerance_for
    from tokedge.runtime.graphs import ArtifactGraphs

    cfg = job.cfg
    tol = Tolerance.for_dtype(cfg.dtype)
    text_ref = quant = None
    if cfg.quantize is not None:
        from tokedge.export.quantize import quantize_graphs, record_text_reference

        if cfg.validate:
            with job.timed("fp32 text reference (quantization measure)"):
                text_ref, text_record = record_text_reference(stage, manifest)
            manifest = replace(manifest, reference={**manifest.reference, "text": text_record})
        with job.timed(f"quantize ({cfg.quantize.scheme}, {cfg.quantize.form})"):
            manifest, quant = quantize_graphs(stage, manifest, cfg.quantize, cfg.external_data_threshold)
        tol = tolerance_for(cfg.dtype, quant, gated=manifest.weights is None)
        manifest = replace(manifest, reference={**manifest.reference, "tolerance": tolerance_dict(tol)})
    if not job.cases:
        return manifest, {"skipped": True, "reason": "no reference case"}
    if not cfg.validate:
        return manifest, {"skipped": True}
    with job.timed("validate (ONNX Runtime vs transformers)"):
        with ArtifactGraphs(stage, manifest) as runtime_graphs:
            report = run_cases(runtime_graphs, job.pixel_values, job.cases, tol)
            if text_ref is not None:
                from tokedge.fidelity import measure

                report = replace(report, text=measure(runtime_graphs, text_ref).to_dict())
            video_parity = check_video_graph(runtime_graphs, job.video_case, tol)
        report.raise_if_failed("export validation failed")
    if quant is not None:
        from tokedge.export.quantize import fidelity_record

        manifest = replace(manifest, quantization=replace(quant, fidelity=fidelity_record(report)))
    parity = report.to_dict()
    if video_parity is not None:
        parity["video"] = video_parity
    return manifest, parity


def finish_stage(job: _Export, stage: Path, manifest: Manifest, parity: dict) -> Manifest:
    """The architecture record of the final graphs, the parity at export, every file's hash, the
    manifest written (the staged directory is renamed into place when the `with` ends)."""
    from tokedge.export.architecture import record_architecture

    manifest = record_architecture(stage, manifest, job.loaded.model.config.to_dict())  # graphs are final here
    manifest = replace(manifest, reference={**manifest.reference, "parity_at_export": parity}, files=hash_tree(stage))
    write_manifest(stage, manifest)
    return manifest


def pixel_budget_stage(job: _Export):
    """The largest image a dynamic-resolution artifact takes: --max-pixels, else the layout's edge
    default (`default_pixel_limit`: 1280 visual tokens), capped by what --profile's device holds; the
    checkpoint's own max_pixels (12.8 MP on the hub's Qwen2.5-VL) is an upper bound, never the default.
    Adds the summary line that says which and how to raise it."""
    from tokedge.layouts import image_layout_class

    cfg, loaded = job.cfg, job.loaded
    layout = image_layout_class(loaded.spec.layout.kind).of_record(loaded.spec.layout)
    checkpoint = layout.pixel_limit()
    if checkpoint is None:  # fixed views (--max-pixels was refused in plan_export)
        return loaded
    if cfg.max_pixels is not None:
        chosen, why = cfg.max_pixels, "--max-pixels"
    else:
        device = _device_pixel_limit(job, checkpoint) if cfg.device_profile else None
        chosen = layout.default_pixel_limit(device)
        edge = layout.default_pixel_limit()
        why = ("the checkpoint's max_pixels" if chosen == checkpoint else
               f"what --profile {cfg.device_profile} holds (tokedge's edge default: {edge})" if chosen != edge else
               "tokedge's edge default")
        why += "" if chosen == checkpoint else f"; the checkpoint takes up to {checkpoint}"
    loaded = job.family.with_max_pixels(loaded, chosen)
    tokens = image_layout_class(loaded.spec.layout.kind).of_record(loaded.spec.layout).bounds().tokens[2]
    job.notes.append(f"images: up to {chosen} pixels ({tokens} visual tokens) each, {why}; larger images are "
                     "resized down at run time" + ("" if cfg.max_pixels is not None else
                                                    "; raise or lower it with --max-pixels N"))
    return loaded


def _device_pixel_limit(job: _Export, checkpoint: int) -> int | None:
    """The largest image --profile's device holds for this checkpoint, method and weights
    (`memory.profile_pixel_limit` on the loaded config, planned as `tokedge memory` plans a checkpoint)."""
    from tokedge import architecture as arch
    from tokedge.memory import profile_pixel_limit, target_for_geometry
    from tokedge.profiles import load_profile

    cfg, record = job.cfg, job.loaded.spec.layout
    geometry = arch.from_config(job.loaded.model.config.to_dict(),
                                {"min_pixels": int(record.min_pixels), "max_pixels": checkpoint},
                                name=cfg.model, source=cfg.model)
    method = None if job.method.reduces_over_time else job.method.name
    target = target_for_geometry(geometry, method, keep=cfg.keep,
                                 quantize=cfg.quantize.scheme if cfg.quantize is not None else None)
    return profile_pixel_limit(target, load_profile(cfg.device_profile))


def _warnings(job: _Export, manifest: Manifest) -> list[str]:
    warnings = list(job.family.export_warnings(job.loaded))
    if job.cfg.device_profile:
        from tokedge.memory import plan_for_device
        from tokedge.profiles import load_profile

        plan = plan_for_device(manifest, load_profile(job.cfg.device_profile))
        if not plan.fits:
            warnings.append(plan.summary() + "; quantize (--quantize int4) or pick a larger device")
    return warnings


def reduced_dynamic_cases(loaded, method: Method, budget: int, options: dict, steps: int,
                          keep: float | None) -> list[dict]:
    """Pre-LLM methods on dynamic-resolution layouts: per example image, tokedge's torch reduced
    vision module keeps the image's count (its tokens and kept indices), transformers' language
    model runs the prompt with those tokens at their unreduced M-RoPE columns."""
    import numpy as np
    import torch

    from tokedge.export.reference import (
        EXAMPLE_PROMPTS,
        _recorded,
        anyres_example_images,
        instruction_reference,
        render_prompt,
        tokenize,
    )
    from tokedge.reduce import get_method
    from tokedge.reduce.quota import TokenBudget

    family = loaded.family
    per_image = TokenBudget(keep=keep) if keep is not None else TokenBudget(count=budget)
    cases = []
    for i, image in enumerate(anyres_example_images()):
        full = int(family.reference_features(loaded, get_method("none"), [image], budget).shape[1])
        count = per_image.per_image(full)
        ids, mask = tokenize(loaded, [render_prompt(loaded, EXAMPLE_PROMPTS[i % 2])], count)
        extra = {"instruction": instruction_reference(loaded, ids, mask)[0]} if method.takes_instruction else {}
        feats, index = family.reduced_reference_features(loaded, method, image, count, options, budget, **extra)
        with torch.no_grad():
            prefill, tokens, step_logits = family.reference_logits(
                loaded, torch.from_numpy(ids), torch.from_numpy(mask), feats, steps, images=[image], kept=[index])
        cases.append({"image": _recorded(image), "budget": np.array(budget, dtype=np.int64), "input_ids": ids,
                      "attention_mask": mask, "image_embeds": feats.float().numpy(),
                      "prefill_logits": prefill.numpy(), "step_logits": torch.stack(step_logits, dim=1).numpy(),
                      "tokens": tokens.numpy()})
    return cases


def _check_keep_stages(cfg: ExportConfig, method: Method, plan) -> None:
    if cfg.keep is not None and plan is not None and len(plan.stages) > 1:
        raise UsageError(f"--method {method.name} prunes in {len(plan.stages)} stages of fixed counts; "
                         "give --budget (tokens per image) instead of --keep")


def check_temporal(cfg: ExportConfig, method: Method) -> dict:
    """A temporal method's flags, before anything loads; -> its options."""
    if cfg.dynamic_budget is not None:
        raise UsageError(f"--method {method.name} fixes its counts at export: drop --dynamic-budget")
    if cfg.frames is not None and not 1 <= cfg.frames:
        raise UsageError(f"--frames {cfg.frames}: use 1 or more frames")
    return method.parse_options(dict(cfg.options))


def temporal_graph(method: Method, video, options: dict, budget: int | None, hidden: int, dtype, frames: int | None):
    """-> (the video record for F frames, the method's graph, its trace spec, K tokens it keeps).

    The graph is fixed to F frames (--frames, else the record's default) and keeps K of the F*n
    frame tokens: --budget, else the default keep ratio (the method's floor may raise it)."""
    import torch

    from tokedge.export.onnx_export import TraceSpec
    from tokedge.reduce.frames import temporal_module

    frames = frames or video.default_frames
    if frames > video.max_frames:
        raise UsageError(f"--frames {frames}: this model takes at most {video.max_frames} frames per video")
    n = video.tokens_per_frame
    if budget is None:  # (a count option of the method, e.g. evs pruning_rate, takes precedence)
        budget = max(n, int(DEFAULT_VIDEO_KEEP * frames * n))
    kept = method.temporal_count(frames, n, budget, options)
    inputs, example = ("video_embeds",), (torch.rand(frames, n, hidden, dtype=dtype),)
    if "received_attention" in method.needs:  # the video graph's extra output (fastvid)
        inputs, example = inputs + ("received_attention",), example + (torch.rand(frames, n),)
    spec = TraceSpec(inputs=inputs, outputs=("video_tokens", "video_kept"), example=example, dynamic_axes={},
                     output_shapes={"video_tokens": (kept, hidden), "video_kept": (kept,)})
    video = replace(video, default_frames=frames, max_frames=frames, keep_ratio=kept / (frames * n))
    return video, temporal_module(method, frames, n, budget, options), spec, kept


def check_video_graph(graphs, case, tol) -> dict | None:
    """The video graph (ONNX Runtime) against transformers' `get_video_features` on `case`
    (pixels, features with the newline last): its frame tokens + newline, max abs difference.
    Fails the export beyond the image-embeddings tolerance (fp16: reported, not judged)."""
    import numpy as np

    from tokedge.errors import ParityError

    video = graphs.manifest.video
    if case is None or video is None:
        return None
    pixels, expected = case
    out = graphs.runners[video.graph].infer({"pixel_values_videos": pixels})
    got = np.concatenate([out["video_embeds"].reshape(-1, out["video_embeds"].shape[-1]), out["newline"]])
    diff = float(np.max(np.abs(got.astype(np.float64) - expected))) if got.shape == expected.shape else float("inf")
    ok = tol.image_embeds is None or diff <= tol.image_embeds
    if not ok:
        raise ParityError(f"export validation failed: the video graph's tokens differ from transformers' "
                          f"get_video_features by {diff:.3g} (tolerance {tol.image_embeds})")
    return {"frames": int(pixels.shape[0]), "max_abs_video_embeds": diff, "ok": ok}


def anyres_cases(loaded, method: Method, budget: int, options: dict, steps: int,
                 pruning_modules: dict | None = None, keep: float | None = None) -> list[dict]:
    """Reference cases for a tiled layout: one per example image that has enough candidates for
    the budget (a reduced graph keeps `budget` of them), each with its own prompt. In-LLM methods
    (`pruning_modules`: the fp32 prefill and decoder) take transformers' unreduced features and
    prune inside tokedge's torch prefill, as their single-view cases do."""
    from tokedge.export.reference import (
        EXAMPLE_PROMPTS,
        anyres_example_images,
        reference_image_case,
        render_prompt,
    )
    from tokedge.runtime.layout import candidate_plan, pack_plan, plan_image

    def candidates(image) -> int:  # methods that keep all tokens never ask
        from tokedge.layouts import image_layout_class

        record = loaded.family.layout(loaded)
        if not record.pinpoints:  # the layout's own count (split tiles: every view's tokens)
            return image_layout_class(record.kind).of_record(record).image_counts(image)[1]
        layout = record.anyres()  # tiled: the candidates leave the newline rows out
        plan = plan_image(layout, image.height, image.width)
        return int(candidate_plan(layout, plan, *pack_plan(layout, plan))[0].shape[0])

    images = anyres_example_images()
    from tokedge.layouts import image_layout_class

    dynamic = image_layout_class(loaded.family.layout(loaded).kind).takes_max_pixels  # counts per image size
    if dynamic and method.reduces_in_vision:
        return reduced_dynamic_cases(loaded, method, budget, options, steps, keep)
    usable = [image for image in images if method.keeps_all or dynamic or candidates(image) >= budget]
    if not usable:
        most = max(candidates(image) for image in images)
        raise UsageError(f"--budget {budget} is more than the {most} visual tokens the largest image gives before "
                         f"reduction (newlines aside); use --budget <= {most}")
    if pruning_modules is not None:
        from tokedge.export.reference import reference_pruned_from_ids, tokenize
        from tokedge.reduce import get_method
        from tokedge.reduce.quota import TokenBudget

        cases = []
        per_image = None
        if dynamic:  # dynamic resolution: the prefill keeps a count or a share of each image's tokens
            per_image = TokenBudget(keep=keep) if keep is not None else TokenBudget(count=budget)
        for i, image in enumerate(usable):
            if dynamic:  # the processor's resize decides the count
                count = int(loaded.family.reference_features(loaded, get_method("none"), [image], budget).shape[1])
            else:  # the layout's own count from the image size (tiled: base + map + newlines)
                record = loaded.family.layout(loaded)
                count = image_layout_class(record.kind).of_record(record).image_counts(image)[1]
            count = loaded.family.image_placeholders(loaded, image, count)  # with the layout's text, if any
            ids, mask = tokenize(loaded, [render_prompt(loaded, EXAMPLE_PROMPTS[i % 2])], count)
            cases.append(reference_pruned_from_ids(loaded, pruning_modules, None, ids, mask, budget, steps,
                                                   image=image, per_image=per_image))
        return cases
    return [reference_image_case(loaded, method, image, render_prompt(loaded, EXAMPLE_PROMPTS[i % 2]), budget, steps,
                                 options) for i, image in enumerate(usable)]


__all__ = ["ExportConfig", "ExportResult", "export", "parse_budget_range", "resolve_model"]
