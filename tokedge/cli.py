"""The `tokedge` command line: a thin Typer app. Each command parses, builds a config, calls one
library function and prints. Errors are mapped to one-line messages and exit codes in `main`."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer

from tokedge.errors import TokedgeError

app = typer.Typer(
    name="tokedge",
    help="Visual-token reduction for VLMs, exported to ONNX/TensorRT for edge GPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain click help: wraps to any width without cutting defaults, and "[export]" stays literal
    rich_markup_mode=None,
)


def _wrap_help_at_spaces_only() -> None:
    """Help wraps at spaces only, so values a user types (tiny-llava, jetson-orin-nano-8gb) are never
    split at a hyphen. click builds its TextWrapper with the stdlib default (hyphens break); this
    makes that default False for click's own wrapper class, nothing else."""
    import importlib

    for module in ("typer._click._textwrap", "click._textwrap"):
        try:
            cls = importlib.import_module(module).TextWrapper
        except (ImportError, AttributeError):  # pragma: no cover - depends on the typer release
            continue
        if getattr(cls.__init__, "_spaces_only", False):
            continue

        def init(self, *args, _original=cls.__init__, **kwargs):
            kwargs.setdefault("break_on_hyphens", False)
            _original(self, *args, **kwargs)

        init._spaces_only = True  # type: ignore[attr-defined]
        cls.__init__ = init


_wrap_help_at_spaces_only()

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout at the end.")]
ListJsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout (docs/cli.md).")]
ArtifactArg = Annotated[Path, typer.Argument(help="Artifact directory written by `tokedge export`.")]
QuantizeOpt = Annotated[Optional[str], typer.Option("--quantize", help="Weight-only quantization: int4 or int8.")]
QuantFormOpt = Annotated[str, typer.Option("--quant-form", help="matmulnbits (ONNX Runtime) or qdq (TensorRT).")]
GroupSizeOpt = Annotated[int, typer.Option("--group-size", help="Weights per quantization scale along K (default 32).")]
SymmetricOpt = Annotated[Optional[bool], typer.Option(
    "--symmetric/--asymmetric", help="Zero points or not (default: asymmetric for matmulnbits; qdq is symmetric).")]
AlgorithmOpt = Annotated[str, typer.Option("--quant-algorithm", help="rtn (round to nearest) or hqq (onnxruntime's HQQ).")]
Int8MatmulsOpt = Annotated[str, typer.Option(
    "--int8-matmuls",
    help="int4 mixed precision: keep these MatMuls int8: down_proj, first, last (layers), lm_head (the logits).")]
QuantGraphsOpt = Annotated[str, typer.Option("--quant-graphs", help="Graphs to quantize: decoder,prefill[,vision].")]
QuantLmHeadOpt = Annotated[Optional[bool], typer.Option(
    "--quantize-lm-head/--float-lm-head",
    help="The logits MatMul (lm_head) at the scheme's bits, or float (default: int8 under int4 matmulnbits, else float).")]
QuantEmbedOpt = Annotated[bool, typer.Option("--quantize-embeddings/--float-embeddings",
                                             help="Also quantize the token embeddings (matmulnbits only).")]
AccuracyOpt = Annotated[int, typer.Option("--accuracy-level", help="MatMulNBits compute: 4 = int8 (VNNI/AMX), 0 = float.")]
# where the graphs run (run, serve, verify, profile): docs/runtime.md "Backends"
BackendOpt = Annotated[str, typer.Option(
    help="onnxruntime (CPU), ort-cuda or ort-tensorrt (ONNX Runtime's GPU providers, onnxruntime-gpu), "
         "or tensorrt (engines from `tokedge build`).")]
EnginesOpt = Annotated[Optional[Path], typer.Option(help="Engines directory from `tokedge build` (tensorrt).")]
DeviceIdOpt = Annotated[int, typer.Option("--device-id", help="CUDA device for ort-cuda / ort-tensorrt.")]
DeviceProfileOpt = Annotated[Optional[str], typer.Option(
    "--device-profile", help="ort-tensorrt: device profile whose build plan gives the engines' shape ranges.")]
TrtCacheOpt = Annotated[Optional[Path], typer.Option(
    "--trt-cache", help="ort-tensorrt: engine cache directory (default: <artifact>.ort-trt-<profile>).")]
Fp16Opt = Annotated[bool, typer.Option("--fp16/--no-fp16", help="ort-tensorrt: allow fp16 kernels.")]


def _backend(name: str, engines: Optional[Path], threads: int, device_id: int, device_profile: Optional[str],
             trt_cache: Optional[Path], fp16: bool):
    from tokedge.runtime.backends import Backend

    return Backend(name=name, engines=engines, threads=threads, device_id=device_id, device_profile=device_profile,
                   cache_dir=trt_cache, fp16=fp16)


def _quant_config(scheme: str, form: str, group_size: int, graphs: str, lm_head: Optional[bool], embeddings: bool,
                  accuracy_level: int, symmetric: bool | None = None, algorithm: str = "rtn", int8: str = ""):
    from tokedge.export.quantize import QuantConfig

    cfg = QuantConfig(scheme=scheme, form=form, group_size=group_size,
                      graphs=tuple(g.strip() for g in graphs.split(",") if g.strip()), lm_head=lm_head,
                      embeddings=embeddings, accuracy_level=accuracy_level, symmetric=symmetric, algorithm=algorithm,
                      int8=tuple(m.strip() for m in int8.split(",") if m.strip()))
    cfg.check()
    return cfg


def _console():
    from rich.console import Console

    # soft_wrap: long lines (paths, parity summaries) are never hard-wrapped into a narrow terminal
    return Console(stderr=True, highlight=False, soft_wrap=True)


def fit_lines(line: str, width: int | None = None) -> list[str]:
    """A line for a person at the terminal's width ($COLUMNS; 80 when unknown): wrapped at spaces
    only, so no word, number or path is split; continuation lines are indented under it."""
    import shutil
    import textwrap

    width = width or shutil.get_terminal_size((80, 24)).columns
    if len(line) <= width:
        return [line]
    indent = " " * (len(line) - len(line.lstrip()) + 4)
    return textwrap.wrap(line, width=width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False)


def _print_parity(console, title: str, report) -> None:
    """`✓ TITLE: N cases within tolerance T`, then one line per case, labelled by its sample."""
    head, *cases = report.lines()
    mark = "[green]✓[/green]" if report.ok else "[red]✗[/red]"
    console.print(f"{mark} {title}: {head}")
    for line in cases:
        for piece in fit_lines(line):
            console.print(piece, markup=False)


@contextlib.contextmanager
def _stage_printer(enabled: bool):
    console = _console()

    @contextlib.contextmanager
    def stage(name: str) -> Iterator[None]:
        if not enabled:
            yield
            return
        start = time.perf_counter()
        with console.status(f"{name}..."):
            yield
        console.print(f"[green]✓[/green] {name} [dim]({time.perf_counter() - start:.1f} s)[/dim]")

    yield stage


@app.command("export", short_help="Export a LLaVA or Qwen-VL checkpoint to an ONNX artifact.")
def export_cmd(
    model: Annotated[str, typer.Argument(help="Hub id (llava-hf/llava-1.5-7b-hf, Qwen/Qwen2.5-VL-3B-Instruct), a checkpoint directory, or a random-weight preset: tiny-llava, tiny-llava-next, tiny-llava-onevision, tiny-qwen2.5-vl, tiny-qwen3-vl, tiny-smolvlm, tiny-internvl, tiny-gemma3.")],
    method: Annotated[str, typer.Option(help="Reduction method (see `tokedge methods`).")] = "none",
    budget: Annotated[Optional[int], typer.Option(help="Visual tokens that reach the LLM (default: all for none, 64 otherwise).")] = None,
    dynamic_budget: Annotated[Optional[str], typer.Option(help="MIN:MAX runtime range; --budget is the default.")] = None,
    option: Annotated[list[str], typer.Option("--option", help="Method option KEY=VALUE (repeatable), e.g. layer=3.")] = [],
    dtype: Annotated[str, typer.Option(help="fp32 or fp16 weights and activations.")] = "fp32",
    out: Annotated[Optional[Path], typer.Option(help="Artifact directory to create (default: ./<model>-<method>-<budget>).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing artifact at --out (whole).")] = False,
    trust_remote_code: Annotated[bool, typer.Option("--trust-remote-code", help="Allow code from the checkpoint to run.")] = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help="Load *.bin pickle weights (weights_only) when no safetensors exist.")] = False,
    validate: Annotated[bool, typer.Option(help="Check ONNX Runtime against transformers after export.")] = True,
    frames: Annotated[Optional[int], typer.Option(help="Temporal methods (evs, dycoke, fastvid, holitom): frames per video their graph takes.")] = None,
    quantize: QuantizeOpt = None,
    quant_form: QuantFormOpt = "matmulnbits",
    group_size: GroupSizeOpt = 32,
    symmetric: SymmetricOpt = None,
    quant_algorithm: AlgorithmOpt = "rtn",
    int8_matmuls: Int8MatmulsOpt = "",
    quant_graphs: QuantGraphsOpt = "decoder,prefill",
    quantize_lm_head: QuantLmHeadOpt = None,
    quantize_embeddings: QuantEmbedOpt = False,
    accuracy_level: AccuracyOpt = 4,
    device_profile: Annotated[Optional[str], typer.Option("--profile", help="Refuse an artifact whose engines this device profile cannot plan (with the fix); warn when its memory plan does not fit; on Qwen-VL without --max-pixels, default the largest image to what it holds.")] = None,
    max_pixels: Annotated[Optional[int], typer.Option("--max-pixels", help="Dynamic-resolution models (Qwen-VL): largest image in pixels; larger ones are resized down (default: 1280 visual tokens per image, ~1 MP, or less when --profile's device holds less; never above the checkpoint's).")] = None,
    keep: Annotated[Optional[float], typer.Option("--keep", help="Dynamic-resolution models (Qwen-VL): share of each image's tokens to keep, e.g. 0.5 (instead of --budget, a count per image).")] = None,
    max_tiles: Annotated[Optional[int], typer.Option("--max-tiles", help="Aspect-ratio tiled models (InternVL): at most this many tiles per image, plus the thumbnail (default: the image processor's max_patches, 12 on InternVL3).")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Export a LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL, SmolVLM, InternVL3 or Gemma 3 checkpoint to a reduction-aware ONNX artifact (vision, embed, decoder; prefill for in-LLM methods)."""
    from tokedge.export.pipeline import ExportConfig, export, parse_budget_range
    from tokedge.reduce.base import parse_option_pairs

    options = tuple(parse_option_pairs(option).items())
    rng = parse_budget_range(dynamic_budget) if dynamic_budget else None
    quant = (_quant_config(quantize, quant_form, group_size, quant_graphs, quantize_lm_head, quantize_embeddings,
                           accuracy_level, symmetric, quant_algorithm, int8_matmuls) if quantize else None)
    if out is None:
        from tokedge.reduce import get_method

        chosen = get_method(method)
        label = budget if budget is not None else (f"keep{keep:g}" if keep is not None
                                                   else "full" if chosen.keeps_all
                                                   else "video" if chosen.reduces_over_time else 64)
        out = Path(f"{Path(model.rstrip('/')).name}-{method}-{label}")
    cfg = ExportConfig(
        model=model, out=out, method=method, budget=budget, dynamic_budget=rng, dtype=dtype, force=force,
        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, validate=validate, options=options,
        quantize=quant, device_profile=device_profile, max_pixels=max_pixels, keep=keep, frames=frames,
        max_tiles=max_tiles,
    )
    with _stage_printer(enabled=True) as stage:
        result = export(cfg, progress=stage)
    m = result.manifest
    console = _console()
    if result.parity.get("cases"):
        from tokedge.export.validate import ParityReport

        _print_parity(console, "parity", ParityReport.from_dict(result.parity))
    kept = m.reduction.budget
    where = f" kept after LLM layer {m.reduction.stages[-1]['prune_layer']}" if m.reduction.stages else ""
    if m.reduction.keep is not None:
        kept = f"--keep {m.reduction.keep:g}: ceil({m.reduction.keep:g} x n) of each image's n, up to {kept}"
    from tokedge.layouts import layout_of

    where += layout_of(m).describe_budget()  # e.g. dynamic resolution: counts follow each image's size
    of = f"{m.reduction.full_tokens} visual tokens"
    from tokedge.reduce.base import Stage

    if m.video is not None and Stage(m.reduction.stage) is Stage.TEMPORAL:
        of = f"{m.video.default_frames * m.video.tokens_per_frame} frame tokens of a {m.video.default_frames}-frame video"
    console.print(
        f"wrote {result.out} ({m.reduction.method}, {kept} of {of}{where}"
        + (f", runtime budget {m.reduction.budget_range[0]}..{m.reduction.budget_range[1]}" if m.reduction.budget_range else "")
        + ")"
    )
    if m.quantization is not None:
        console.print(f"weights: {_quant_line(m.quantization)}")
        if m.weights is not None:
            console.print(f"note: {_random_note(m.weights)}")
    _say_random(m.weights, console)
    for note in result.notes:
        console.print(note)
    for w in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    if json_out:
        print(json.dumps({"artifact": str(result.out), "method": m.reduction.method, "budget": m.reduction.budget,
                          "keep": m.reduction.keep,
                          "budget_range": m.reduction.budget_range, "parity": result.parity, "seconds": result.seconds,
                          "quantization": dataclasses.asdict(m.quantization) if m.quantization else None,
                          "notes": result.notes, "warnings": result.warnings}))


def _quant_line(q) -> str:
    before = sum(v["before"] for v in q.weight_bytes.values())
    after = sum(v["after"] for v in q.weight_bytes.values())
    mixed = f", int8 {'+'.join(q.int8_matmuls)}" if q.int8_matmuls else ""
    return (f"{q.scheme} {q.form} (group {q.group_size}, {'symmetric' if q.symmetric else 'zero points'}, "
            f"{q.algorithm}{mixed}) on {', '.join(q.graphs)}: "
            f"{sum(q.quantized.values())} weights, {before / 2**20:.1f} -> {after / 2**20:.1f} MiB"
            + ("" if q.head_quantized else "; lm_head float")
            + ("" if q.embeddings else "; embeddings float"))


def _say_random(weights: Optional[str], console=None) -> None:
    """The random-weights notice, once, for commands that show output or numbers from an artifact
    (on stderr unless a console is given: stdout may be --json)."""
    from tokedge.artifact import random_weights_notice
    from tokedge.safeio import printable

    notice = random_weights_notice(weights)
    if notice is None:
        return
    for line in fit_lines(f"note: {printable(notice)}"):
        if console is not None:
            console.print(line, markup=False, highlight=False)
        else:
            print(line, file=sys.stderr)


def _random_note(weights: str) -> str:
    return (f"weights are {weights}: the quantization gate does not apply to them (measured and recorded, "
            "not judged; docs/quantization.md)")


@app.command("quantize", short_help="Weight-only int4/int8 quantization of an artifact.")
def quantize_cmd(
    artifact: ArtifactArg,
    out: Annotated[Path, typer.Option(help="Directory for the quantized artifact.")],
    scheme: Annotated[str, typer.Option("--scheme", help="int4 or int8.")] = "int4",
    quant_form: QuantFormOpt = "matmulnbits",
    group_size: GroupSizeOpt = 32,
    symmetric: SymmetricOpt = None,
    quant_algorithm: AlgorithmOpt = "rtn",
    int8_matmuls: Int8MatmulsOpt = "",
    quant_graphs: QuantGraphsOpt = "decoder,prefill",
    quantize_lm_head: QuantLmHeadOpt = None,
    quantize_embeddings: QuantEmbedOpt = False,
    accuracy_level: AccuracyOpt = 4,
    force: Annotated[bool, typer.Option(help="Replace an existing --out (whole).")] = False,
    validate: Annotated[bool, typer.Option(help="Check against the fp32 reference with the scheme's tolerance.")] = True,
    json_out: JsonFlag = False,
) -> None:
    """Quantize an fp32 artifact's linear weights (int4/int8), re-checked against its fp32 reference."""
    from tokedge.export.quantize import quantize_artifact

    cfg = _quant_config(scheme, quant_form, group_size, quant_graphs, quantize_lm_head, quantize_embeddings,
                        accuracy_level, symmetric, quant_algorithm, int8_matmuls)
    result = quantize_artifact(artifact, out, cfg, force=force, validate=validate)
    console = _console()
    console.print(f"weights: {_quant_line(result.info)}")
    from tokedge.artifact import read_manifest
    from tokedge.export.validate import ParityReport

    weights = read_manifest(result.out).weights
    if weights is not None:
        console.print(f"note: {_random_note(weights)}")
    if result.parity.get("cases"):
        _print_parity(console, "parity vs the fp32 reference", ParityReport.from_dict(result.parity))
    else:
        console.print("[yellow]warning:[/yellow] not validated (--no-validate)")
    console.print(f"wrote {result.out}")
    if json_out:
        print(json.dumps({"artifact": str(result.out), "quantization": dataclasses.asdict(result.info),
                          "parity": result.parity}))


@app.command("optimize", short_help="Run graph passes over an artifact into a new one.")
def optimize_cmd(
    artifact: ArtifactArg,
    out: Annotated[Path, typer.Option(help="Directory for the optimised artifact.")],
    passes: Annotated[str, typer.Option(help="Comma-separated passes (see --help of tokedge passes).")] =
    "fuse-selection,indices-int32,fp16-guard,fold",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --out (whole).")] = False,
    json_out: JsonFlag = False,
) -> None:
    """Run graph passes over an artifact, write a new one, and print what each pass changed."""
    from tokedge.export.optimize import optimize

    names = [p.strip() for p in passes.split(",") if p.strip()]
    result = optimize(artifact, out, names, force=force)
    console = _console()
    for graph in result.counts:
        console.print(result.describe(graph), markup=False)
    console.print(f"wrote {result.out} (parity re-checked against the export reference)")
    if json_out:
        print(json.dumps({"artifact": str(result.out), "counts": result.counts, "already_applied": result.earlier,
                          "ort_ops": result.ort_ops, "parity": result.parity}))


@app.command("passes", short_help="List the graph passes.")
def passes_cmd(json_out: ListJsonFlag = False) -> None:
    """List the graph passes `tokedge optimize --passes` accepts."""
    from tokedge.export.passes import DEFAULT_PASSES, PASSES

    rows = [{"name": p.name, "summary": p.summary, "default_at_export": p.name in DEFAULT_PASSES,
             "onnxruntime_only": p.onnxruntime_only} for p in PASSES.values()]
    if json_out:
        print(json.dumps({"passes": rows}))
        return
    _print_listing(rows, [("pass", "name"), ("at export", lambda r: "yes" if r["default_at_export"] else "no")],
                   detail="summary")


@app.command("build", short_help="Build TensorRT engines for a device profile.")
def build_cmd(
    artifact: ArtifactArg,
    profile: Annotated[str, typer.Option(help="Device profile name (see `tokedge profiles`) or a .toml file.")],
    out: Annotated[Optional[Path], typer.Option(help="Engines directory (default: <artifact>.engines-<profile>).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the build plan without TensorRT.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace existing engines (whole).")] = False,
    json_out: JsonFlag = False,
) -> None:
    """Build one TensorRT engine per graph with optimisation profiles from a device profile."""
    from tokedge.build import build

    plan, where, metas = build(artifact, profile, out=out, force=force, dry_run=dry_run)
    memory = _memory_plan(artifact, profile)
    if json_out:
        print(json.dumps({"dry_run": dry_run, "out": str(where), "plan": plan.to_dict(), "engines": metas,
                          "memory": memory.to_dict()}))
        return
    console = _console()
    console.print(("" if memory.fits else "[yellow]warning:[/yellow] ") + memory.summary())
    console.print(f"profile {plan.profile}: TensorRT {plan.trt_version}, {plan.precision}"
                  + (" (strongly typed)" if plan.engines and plan.engines[0].strongly_typed else
                     f", flags {', '.join(plan.engines[0].builder_flags) or 'none'}"))
    for engine in plan.engines:
        for opt in engine.profiles:
            console.print(f"  {engine.graph}.plan (profile: {opt.name})")
            for name, rng in {**opt.shapes, **opt.values}.items():
                console.print(f"    {name}: min {list(rng.min)} opt {list(rng.opt)} max {list(rng.max)}")
    for note in plan.notes:
        console.print(f"  note: {note}")
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    console.print(f"{'would write' if dry_run else 'wrote'} {where}")


def _memory_plan(artifact: Path, profile: str):
    from tokedge.artifact import load_artifact
    from tokedge.memory import plan_for_device
    from tokedge.profiles import load_profile

    return plan_for_device(load_artifact(artifact, check_hashes=False), load_profile(profile))


@app.command("memory", short_help="Memory plan of an artifact, checkpoint or named geometry on a device.")
def memory_cmd(
    target: Annotated[str, typer.Argument(help="Artifact directory, checkpoint directory (config.json only), hub id, "
                                               "or a named geometry (tokedge memory --list).")] = "",
    profile: Annotated[Optional[str], typer.Option(help="Device profile name (see `tokedge profiles`) or a .toml file.")] = None,
    method: Annotated[Optional[str], typer.Option(help="For a model (not an artifact): the reduction method it would be exported with (default none).")] = None,
    budget: Annotated[Optional[int], typer.Option(help="For a model: visual tokens per image that reach the LLM.")] = None,
    keep: Annotated[Optional[float], typer.Option(help="For a dynamic-resolution model: share of each image's tokens kept.")] = None,
    max_pixels: Annotated[Optional[int], typer.Option("--max-pixels", help="For a dynamic-resolution model: largest image in pixels.")] = None,
    quantize: Annotated[Optional[str], typer.Option(help="For a model: int4 or int8 decoder weights.")] = None,
    group_size: GroupSizeOpt = 128,
    text_tokens: Annotated[int, typer.Option(help="Prompt text tokens beside the image.")] = 64,
    headroom: Annotated[float, typer.Option(help="Share of device memory kept free (OS, CUDA context, libraries).")] = 0.2,
    list_geometries: Annotated[bool, typer.Option("--list", help="List the named geometries and exit.")] = False,
    json_out: JsonFlag = False,
) -> None:
    """Memory plan: weights + KV cache + activation peak, and the engine-build peak, against a
    device profile's memory. Exits 3 when it does not fit (the plan is printed first)."""
    from tokedge.errors import UsageError
    from tokedge.memory import EXIT_DOES_NOT_FIT, plan, resolve_target, size_text
    from tokedge.profiles import load_profile

    if list_geometries:
        from tokedge.architecture import named_geometries

        rows = {name: entry["source"] for name, entry in named_geometries().items()}
        if json_out:
            print(json.dumps({"geometries": [{"name": k, "source": v} for k, v in rows.items()]}))
        else:
            for name, source in rows.items():
                print(f"{name:<22} {source}")
        return
    if not target or profile is None:
        raise UsageError("give a TARGET (artifact, checkpoint directory, hub id or named geometry) and --profile")
    if not 0 <= headroom < 1:
        raise UsageError(f"--headroom {headroom} must be in [0, 1)")
    if text_tokens < 0:
        raise UsageError(f"--text-tokens {text_tokens} must be >= 0")
    device = load_profile(profile)
    resolved, measured = resolve_target(target, method=method, budget=budget, keep=keep, max_pixels=max_pixels,
                                        quantize=quantize, group_size=group_size)
    result = plan(resolved, device, headroom=headroom, text_tokens=text_tokens)
    if json_out:
        out = result.to_dict()
        if measured is not None:
            out["artifact_bytes_measured"] = measured
        print(json.dumps(out))
    else:
        print(result.summary())
        for note in result.notes:
            print(f"note: {note}")
        if measured is not None:
            predicted, on_disk = sum(result.artifact_bytes.values()), sum(measured.values())
            print(f"artifact graphs: predicted {size_text(predicted)}, on disk {size_text(on_disk)} "
                  f"({predicted / max(on_disk, 1):.3f}x; parameters {result.counted})")
    if not result.fits:
        raise typer.Exit(EXIT_DOES_NOT_FIT)


@app.command("check", short_help="Static TensorRT compatibility check (no GPU).")
def check_cmd(
    artifact: ArtifactArg,
    target: Annotated[str, typer.Option(help="trt-10.3 (JetPack 6) or trt-11.")] = "trt-10.3",
    json_out: JsonFlag = False,
) -> None:
    """Static TensorRT compatibility check of every op, attribute and dtype (no GPU needed)."""
    from tokedge.check import check_artifact
    from tokedge.errors import TokedgeError

    from tokedge.safeio import printable

    report = check_artifact(artifact, target)
    if json_out:
        print(json.dumps({"target": target, "ok": report.ok, "nodes_checked": report.nodes_checked,
                          "findings": [f.__dict__ for f in report.findings]}))
    else:
        for f in report.findings:
            print(printable(f.line()), file=sys.stderr)
        if report.ok:
            _console().print(f"{artifact}: {report.nodes_checked} nodes pass {target}")
    if not report.ok:
        first = report.findings[0]
        more = f" (and {len(report.findings) - 1} more)" if len(report.findings) > 1 else ""
        raise TokedgeError(f"{artifact} fails {target}: {first.line()}{more}")


@app.command("verify", short_help="Re-check hashes and parity against the reference.")
def verify_cmd(
    artifact: ArtifactArg,
    checkpoint: Annotated[Optional[str], typer.Option(help="Recompute the reference from this checkpoint (needs [export]).")] = None,
    backend: BackendOpt = "onnxruntime",
    device_id: DeviceIdOpt = 0,
    device_profile: DeviceProfileOpt = None,
    trt_cache: TrtCacheOpt = None,
    fp16: Fp16Opt = True,
    json_out: JsonFlag = False,
) -> None:
    """Re-check file hashes and the graphs' agreement with the recorded (or a fresh) reference."""
    from tokedge.errors import ParityError
    from tokedge.verify import verify

    report = verify(artifact, checkpoint=checkpoint,
                    backend=_backend(backend, None, 0, device_id, device_profile, trt_cache, fp16))
    if json_out:
        print(json.dumps(report.to_dict()))
    if not report.ok:  # the error line carries the summary: printed once
        against = f"a fresh reference from {checkpoint}" if checkpoint else "the recorded reference"
        raise ParityError(f"{artifact}: hashes ok, but the graphs disagree with {against}: {report.summary()}")
    if not json_out:
        _print_parity(_console(), "hashes ok; parity", report)
    from tokedge.artifact import read_manifest

    _say_random(read_manifest(artifact).weights)


@app.command("run", short_help="Generate text for images and prompts (no torch).")
def run_cmd(
    artifact: ArtifactArg,
    prompt: Annotated[list[str], typer.Option(help="Question or instruction: one for all images, or one per --image.")],
    image: Annotated[Optional[list[Path]], typer.Option(help="Image file; repeat for several images or a batch.")] = None,
    images_per_prompt: Annotated[Optional[str], typer.Option(
        help="Group the --image files into prompts, in order: 2,1 = two images for the first prompt, one for the next."
    )] = None,
    video: Annotated[Optional[Path], typer.Option(help="Video clip (PyAV/FFmpeg) or a directory of frame images.")] = None,
    frames: Annotated[Optional[int], typer.Option(help="Video: sample this many frames (default: the artifact's).")] = None,
    fps: Annotated[Optional[float], typer.Option(help="Video: sample this many frames per second of the clip.")] = None,
    frames_from_images: Annotated[bool, typer.Option(
        "--frames-from-images", help="The --image files are the frames of one video, in order.")] = False,
    keep: Annotated[Optional[float], typer.Option(help="Video: share of its visual tokens kept (reducing artifacts).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Stop after this many new tokens.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy; > 0 samples.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Seed for reproducible sampling.")] = None,
    budget: Annotated[Optional[int], typer.Option(
        help="Visual tokens, within the artifact's runtime range (video: frame tokens of the whole video).")] = None,
    backend: BackendOpt = "onnxruntime",
    engines: EnginesOpt = None,
    device_id: DeviceIdOpt = 0,
    device_profile: DeviceProfileOpt = None,
    trt_cache: TrtCacheOpt = None,
    fp16: Fp16Opt = True,
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads (0 = automatic).")] = 0,
    timeout: Annotated[Optional[float], typer.Option(help="Stop the generation after this many seconds (exit 1).")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Generate text for images (or one video) and a prompt from an exported artifact (no torch needed)."""
    from tokedge.runtime.ort_backend import check_threads
    from tokedge.runtime.pipeline import Pipeline, images_for_prompts
    from tokedge.safeio import printable_text

    check_threads(threads)
    choice = _backend(backend, engines, threads, device_id, device_profile, trt_cache, fp16)
    image = list(image or [])

    def stream(text: str) -> None:
        sys.stdout.write(printable_text(text))
        sys.stdout.flush()

    if video is not None or frames_from_images:
        source = _video_source(video, image, frames_from_images, prompt, images_per_prompt)
        with Pipeline.load(artifact, backend=choice) as pipe:
            clip = pipe.generate_video(source, prompt[0], frames=frames, fps=fps, budget=budget, keep=keep,
                                       max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                       top_p=top_p, seed=seed, on_text=None if json_out else stream, timeout=timeout)
        print(json.dumps(clip.to_dict()) if json_out else "")
        _say_random(pipe.manifest.weights)
        return
    if frames is not None or fps is not None or keep is not None:
        from tokedge.errors import UsageError

        raise UsageError("--frames, --fps and --keep apply to a video; pass --video (or --frames-from-images)")
    if not image:
        from tokedge.errors import UsageError

        raise UsageError("nothing to look at: pass --image FILE (repeatable) or --video CLIP")
    groups = images_for_prompts(image, prompt, images_per_prompt)

    with Pipeline.load(artifact, backend=choice) as pipe:
        result = pipe.generate(
            groups, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, budget=budget, on_text=None if json_out or len(prompt) > 1 else stream, timeout=timeout,
        )
    if json_out:
        print(json.dumps(result.to_dict()))
    elif len(prompt) > 1:
        for i, text in enumerate(result.texts):
            print(f"[{i}] {printable_text(text)}")
    else:
        print()
    _say_random(pipe.manifest.weights)


def _video_source(video: Optional[Path], image: list[Path], frames_from_images: bool, prompt: list[str],
                  images_per_prompt: Optional[str]):
    """`tokedge run`'s video flags -> what `Pipeline.generate_video` takes, or a one-line UsageError."""
    from tokedge.errors import UsageError

    if video is not None and image:
        raise UsageError("--video and --image cannot be combined; to pass frames as image files use "
                         "--frames-from-images with --image, without --video")
    if frames_from_images and video is not None:
        raise UsageError("--frames-from-images takes the frames from --image; drop --video")
    if frames_from_images and not image:
        raise UsageError("--frames-from-images needs the frames as --image files, in order")
    if len(prompt) != 1 or images_per_prompt is not None:
        raise UsageError("a video takes exactly one --prompt (and no --images-per-prompt)")
    if video is not None and video.is_file():
        from tokedge.runtime.video import refuse_still_image

        refuse_still_image(video)  # before the artifact loads: a photo is not a one-frame clip
    return video if video is not None else image


@app.command("serve", short_help="OpenAI-compatible HTTP server for an artifact.")
def serve_cmd(
    artifact: ArtifactArg,
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback needs --api-key or --insecure.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Concurrent requests decoded as one batch.")] = 4,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for a batch; more get 429.")] = 32,
    api_key: Annotated[Optional[str], typer.Option(help="Require 'Authorization: Bearer KEY'; visible to other local users in the process list: prefer $TOKEDGE_API_KEY or --api-key-file.")] = None,
    api_key_file: Annotated[Optional[Path], typer.Option(help="Read the API key from this file (its first line).")] = None,
    insecure: Annotated[bool, typer.Option(help="Allow a non-loopback --host without an API key.")] = False,
    model_name: Annotated[Optional[str], typer.Option(help="Model id clients send (default: the artifact directory name).")] = None,
    max_image_bytes: Annotated[int, typer.Option(help="Largest encoded image; larger gets 413.")] = 8 << 20,
    max_video_bytes: Annotated[int, typer.Option(help="Largest encoded video (video artifacts); larger gets 413.")] = 8 << 20,
    video_frames: Annotated[Optional[int], typer.Option(help="Frames sampled from a request's video (default: the artifact's count).")] = None,
    max_image_pixels: Annotated[int, typer.Option(help="Largest image in pixels (width x height); larger gets 413.")] = 40_000_000,
    max_request_pixels: Annotated[int, typer.Option(help="All images of one request together, in pixels; more gets 413.")] = 48_000_000,
    max_connections: Annotated[int, typer.Option(help="Open client connections; more are closed at once.")] = 256,
    request_timeout: Annotated[float, typer.Option(help="Seconds for a request's headers, and for its body, to arrive (408 after).")] = 30.0,
    shutdown_timeout: Annotated[float, typer.Option(help="Seconds SIGTERM waits for in-flight requests to finish.")] = 60.0,
    max_prompt_tokens: Annotated[int, typer.Option(help="Longest prompt in tokens, image included; longer gets 400.")] = 4096,
    max_tokens_limit: Annotated[int, typer.Option(help="Largest max_tokens a request may ask for.")] = 1024,
    default_max_tokens: Annotated[int, typer.Option(help="max_tokens when a request gives none.")] = 256,
    batch_wait_ms: Annotated[float, typer.Option(help="How long the first waiting request waits for others to batch with.")] = 10.0,
    allow_local_images: Annotated[Optional[Path], typer.Option(help="Let image_url / video_url name files under this directory.")] = None,
    allow_remote_images: Annotated[bool, typer.Option(help="Let image_url / video_url be an http(s) URL the server fetches.")] = False,
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads (0 = automatic).")] = 0,
    request_log: Annotated[bool, typer.Option("--request-log/--no-request-log", help="One line per request on stderr: method, status, tokens, TTFT, total ms.")] = True,
    backend: BackendOpt = "onnxruntime",
    engines: EnginesOpt = None,
    device_id: DeviceIdOpt = 0,
    device_profile: DeviceProfileOpt = None,
    trt_cache: TrtCacheOpt = None,
    fp16: Fp16Opt = True,
) -> None:
    """Serve an artifact over an OpenAI-compatible Chat Completions API (torch-free; docs/serve.md)."""
    from tokedge.serve import ServeConfig, serve

    key = _api_key(api_key, api_key_file)
    serve(ServeConfig(
        artifact=artifact, host=host, port=port, api_key=key, insecure=insecure, model_name=model_name,
        max_batch=max_batch, max_queue=max_queue, batch_wait_ms=batch_wait_ms, max_image_bytes=max_image_bytes,
        max_video_bytes=max_video_bytes, video_frames=video_frames, max_image_pixels=max_image_pixels,
        max_request_pixels=max_request_pixels, max_connections=max_connections,
        request_timeout_s=request_timeout, shutdown_timeout_s=shutdown_timeout,
        max_prompt_tokens=max_prompt_tokens, max_tokens_limit=max_tokens_limit,
        default_max_tokens=default_max_tokens, allow_local_images=allow_local_images,
        allow_remote_images=allow_remote_images, threads=threads, request_log=request_log,
        runtime=_backend(backend, engines, threads, device_id, device_profile, trt_cache, fp16),
    ))


def _api_key(flag: Optional[str], path: Optional[Path]) -> Optional[str]:
    """--api-key-file's first line, else --api-key, else $TOKEDGE_API_KEY (None when none is set)."""
    from tokedge.errors import UsageError

    if path is None:
        return flag if flag is not None else os.environ.get("TOKEDGE_API_KEY") or None
    if flag is not None:
        raise UsageError("pass the API key with --api-key-file or --api-key, not both")
    try:
        with open(path, "rb") as f:
            data = f.read(4097)
    except OSError as exc:
        raise UsageError(f"--api-key-file {path}: cannot read it ({exc.strerror})") from None
    lines = data.decode("utf-8", "replace").splitlines()
    if len(data) > 4096:
        raise UsageError(f"--api-key-file {path} is over 4 KiB; it should hold the key on one line")
    return lines[0].strip() if lines else ""


def _number_list(text: Optional[str], kind, message: str) -> tuple:
    """A comma-separated option (`--budgets 576,64`, `--keeps 1,0.5`) -> its numbers; UsageError(message)."""
    from tokedge.errors import UsageError

    try:
        return tuple(kind(v) for v in text.split(",") if v.strip()) if text else ()
    except ValueError:
        raise UsageError(message) from None


@app.command("profile", short_help="Latency, FLOPs and fidelity per budget, with plots.")
def profile_cmd(
    artifact: ArtifactArg,
    image: Annotated[Optional[list[Path]], typer.Option(help="Image(s) to profile with (repeatable).")] = None,
    video: Annotated[Optional[Path], typer.Option(help="Profile a video (clip or frame directory) instead of images.")] = None,
    frames: Annotated[Optional[int], typer.Option(help="Video: frames to sample (default: the artifact's).")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Prompt for every run.")] = None,
    budgets: Annotated[Optional[str], typer.Option(help="Comma-separated budgets, e.g. 576,192,64 (video: frame tokens per video).")] = None,
    backend: BackendOpt = "onnxruntime",
    engines: EnginesOpt = None,
    device_id: DeviceIdOpt = 0,
    device_profile: DeviceProfileOpt = None,
    trt_cache: TrtCacheOpt = None,
    fp16: Fp16Opt = True,
    runs: Annotated[int, typer.Option(help="Timed runs per budget and image.")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed runs first, per budget and image.")] = 2,
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per run.")] = 32,
    out: Annotated[Path, typer.Option(help="Directory for report.json, report.md and plots.")] = Path("profile-report"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing report in --out.")] = False,
    baseline: Annotated[Optional[str], typer.Option(help="Checkpoint to time in transformers, all visual tokens.")] = None,
    baseline_attention: Annotated[Optional[str], typer.Option(
        help="transformers attention for the baseline: sdpa (its default) or eager.")] = None,
    predict: Annotated[Optional[str], typer.Option(help="Device profile for a roofline prediction.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(
        help="Re-export budgets this artifact cannot run from this checkpoint, into <out>/artifacts.")] = None,
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads per session (0 = automatic).")] = 0,
    keeps: Annotated[Optional[str], typer.Option(help="Dynamic-resolution (Qwen-VL) artifacts: keep ratios to compare, e.g. 1,0.75,0.5 (1 = --method none); others re-export from --checkpoint.")] = None,
    eval_results: Annotated[Path | None, typer.Option("--eval-results", help="Directory of tokedge eval results (its --out, or a sweep's results/): those of the profiled artifacts add an accuracy section and pareto.png.")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Latency, memory, FLOPs and fidelity per budget; writes report.json, report.md and PNG plots."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tokedge.errors import UsageError
    from tokedge.report.profile import ProfileConfig, run_profile
    from tokedge.report.render import write_all

    budget_list = _number_list(budgets, int, f"--budgets '{budgets}' is not a comma-separated list of integers")
    keep_list = _number_list(keeps, float, f"--keeps '{keeps}' is not a comma-separated list of ratios like 1,0.75,0.5")
    if (out / "report.json").exists() and not force:
        raise UsageError(f"'{out}' already holds a report; choose another --out or pass --force to overwrite it")
    if video is not None:
        _profile_video(artifact, video, frames, prompt, budget_list, image, runs, warmup, max_new_tokens, out,
                       threads, json_out, (backend != "onnxruntime", baseline, predict, checkpoint, eval_results))
        return
    if frames is not None:
        raise UsageError("--frames applies to a video; pass --video")
    if not image:
        raise UsageError("give at least one --image (or --video) to profile with")
    prompt = prompt if prompt is not None else "Describe this image."
    if baseline_attention not in (None, "sdpa", "eager"):
        raise UsageError(f"--baseline-attention {baseline_attention} is not one of: sdpa, eager")
    cfg = ProfileConfig(artifact=artifact, images=tuple(image), prompt=prompt, budgets=budget_list, backend=backend,
                        engines=engines, runs=runs, warmup=warmup, max_new_tokens=max_new_tokens, baseline=baseline,
                        baseline_attention=baseline_attention, predict=predict, checkpoint=checkpoint,
                        reexport_dir=out / "artifacts", threads=threads, keeps=keep_list, eval_results=eval_results,
                        runtime=_backend(backend, engines, threads, device_id, device_profile, trt_cache, fp16))
    import shutil

    from tokedge.report.render import compute_lines, memory_lines, summary_lines, wrap

    width = shutil.get_terminal_size((80, 24)).columns
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=_console(), transient=True) as bar:
        task = bar.add_task("checking budgets", total=None)

        def tick(label: str, done: int, total: int) -> None:
            bar.update(task, description=label, completed=done, total=total)

        def say(line: str) -> None:  # re-exports and memory probes: a line each, above the bar
            bar.update(task, description=line.split(" (")[0])
            for part in wrap(line, width):
                bar.console.print(part, markup=False)

        report = run_profile(cfg, progress=tick, say=say)
    files = write_all(report, out)
    console = _console()

    def show(lines: list[str]) -> None:
        for line in lines:
            console.print(line, markup=False)

    if not any(f.suffix == ".png" for f in files):
        show(wrap("note: no plots: matplotlib is not installed (pip install 'tokedge[report]')", width))
    show(summary_lines(report, width))
    show(compute_lines(report, width))
    if report.quantization:
        from tokedge.artifact import QuantInfo

        show(wrap(f"weights: {_quant_line(QuantInfo(**report.quantization))}", width))
    show(memory_lines(report, width))
    from rich.markup import escape

    for w in report.warnings:
        lines = wrap(f"warning: {w}", width)
        console.print("[yellow]warning:[/yellow]" + escape(lines[0][len("warning:"):]), highlight=False)
        show(lines[1:])
    show(wrap("wrote " + ", ".join(str(f) for f in files), width))
    if json_out:
        print(json.dumps(report.to_dict()))


def _profile_video(artifact: Path, video: Path, frames: Optional[int], prompt: Optional[str], budgets: tuple,
                   image: Optional[list[Path]], runs: int, warmup: int, max_new_tokens: int, out: Path, threads: int,
                   json_out: bool, image_only: tuple) -> None:
    """`tokedge profile --video`: per-budget latency, tokens per frame and fidelity vs the unreduced run."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tokedge.errors import UsageError
    from tokedge.report.video_profile import VideoProfileConfig, run_video_profile, summary_lines, write_video_report

    if image:
        raise UsageError("--video and --image cannot be combined in one profile; run two profiles")
    if any(image_only):
        raise UsageError("--backend tensorrt, --baseline, --predict, --checkpoint and --eval-results are not available "
                         "with --video yet")
    cfg = VideoProfileConfig(artifact=artifact, video=video, frames=frames, budgets=budgets, runs=runs, warmup=warmup,
                             max_new_tokens=max_new_tokens, threads=threads,
                             prompt=prompt if prompt is not None else "Describe this video.")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=_console(), transient=True) as bar:
        task = bar.add_task("profiling", total=None)
        report = run_video_profile(cfg, progress=lambda label, done, total: bar.update(
            task, description=label, completed=done, total=total))
    files = write_video_report(report, out)
    console = _console()
    _say_random(report.weights, console)
    import shutil

    from rich.markup import escape

    from tokedge.report.render import wrap

    width = shutil.get_terminal_size((80, 24)).columns
    for line in summary_lines(report, width):
        console.print(line, markup=False)
    for w in report.warnings:
        lines = wrap(f"warning: {w}", width)
        console.print("[yellow]warning:[/yellow]" + escape(lines[0][len("warning:"):]), highlight=False)
        for line in lines[1:]:
            console.print(line, markup=False)
    for line in wrap("wrote " + ", ".join(str(f) for f in files), width):
        console.print(line, markup=False)
    if json_out:
        print(json.dumps(report.to_dict()))


@app.command("sweep", short_help="Export, evaluate and profile a grid of methods x budgets x tasks; one comparison report.")
def sweep_cmd(
    grid: Annotated[Path, typer.Option("--grid", help="Grid file (TOML): model, methods, budgets, tasks, quantize, limit; see docs/eval.md.")],
    out: Annotated[Path, typer.Option(help="Sweep directory: artifacts/, results/, profiles/, report.md, report.json, pareto.png. Rerunning into it computes only what is missing.")] = Path("sweep-out"),
    ray_address: Annotated[str | None, typer.Option("--ray", help="Run every job as a Ray task on this cluster (auto or HOST:PORT; needs tokedge[sweep]); --out must be a path every node sees.")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Export every (method, budget, quantization) of a grid, evaluate each artifact on each task,
    profile it, and write one comparison report with a Pareto plot. Resumable: finished points are
    cached by artifact hash, task and code version."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tokedge.report.render import wrap
    from tokedge.sweep.grid import load_grid
    from tokedge.sweep.run import SweepConfig, fail_once_from_env, run_sweep

    if ray_address is not None:
        from tokedge.errors import require

        require("ray", "sweep")
    cfg = SweepConfig(grid=load_grid(grid), out=out, ray_address=ray_address, fail_once=fail_once_from_env())
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=_console(), transient=True) as bar:
        task = bar.add_task("sweeping", total=None)
        report = run_sweep(cfg, progress=lambda label, done, total: bar.update(
            task, description=label, completed=done, total=total))
    import shutil

    width = shutil.get_terminal_size((80, 24)).columns
    console = _console()
    weights = next((r.get("weights") for r in report.records if r.get("weights")), None)
    _say_random(weights, console)
    lines = [(f"{len(report.ran)} job(s) ran, {len(report.cached)} cached, {len(report.failures)} failed "
              f"({report.engine}, {report.seconds:.1f} s)")]
    lines += [f"failed: {f['label']}: {f['error']} ({f['attempts']} attempts)" for f in report.failures]
    lines.append("wrote " + ", ".join(report.files))
    for line in lines:
        for part in wrap(line, width):
            console.print(part, markup=False)
    if json_out:
        print(json.dumps({"out": report.out, "engine": report.engine, "ran": report.ran, "cached": report.cached,
                          "failures": report.failures, "files": report.files, "seconds": report.seconds}))
    if report.failures:
        raise typer.Exit(1)


def _print_listing(rows: list[dict], columns: list[tuple[str, Any]], detail: Any = None) -> None:
    """A plain table for listing commands: the first column (the name a flag takes) is never cut;
    at widths too narrow for every column, each row's `detail` goes on its own indented line
    instead of being squeezed. Plain text, so `| cat` and CI logs show the same."""
    import shutil

    width = shutil.get_terminal_size((80, 24)).columns
    cells = [[str(get(r) if callable(get) else r[get]) for _, get in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (h, _) in enumerate(columns)]
    line = "  ".join(h.ljust(w) for (h, _), w in zip(columns, widths))
    table_width = len(line)
    details = [str(detail(r) if callable(detail) else r[detail]) for r in rows] if detail is not None else []
    inline = bool(details) and table_width + 2 + max(len(d) for d in details) <= width
    print((line + ("  " + (detail if isinstance(detail, str) else "") if inline else "")).rstrip())
    for i, c in enumerate(cells):
        text = "  ".join(v.ljust(w) for v, w in zip(c, widths))
        if inline:
            text += "  " + details[i]
        print(text.rstrip())
        if details and not inline:
            import textwrap

            print(textwrap.fill(details[i], width=max(40, width - 1), initial_indent="    ",
                                subsequent_indent="    ", break_on_hyphens=False))


@app.command("eval", short_help="Score artifacts on a local benchmark task (no torch).")
def eval_cmd(
    artifact: Annotated[list[Path], typer.Argument(help="Artifact directories (from tokedge export).")],
    task: Annotated[str, typer.Option(
        help="FORMAT:PATH, FORMAT one of pope, mme, gqa, vqav2, textvqa, mc, jsonl (docs/eval.md); a bare PATH "
             "is the generic JSONL (or an MME directory).")],
    limit: Annotated[int | None, typer.Option(help="Score only the first N examples.")] = None,
    out: Annotated[Path, typer.Option(help="Directory for each artifact's result JSON and predictions JSONL.")] = Path(
        "tokedge-eval"),
    images: Annotated[Path | None, typer.Option(
        help="Directory the task's image names are relative to (default: the task file's).")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(
        help="New tokens per answer (default: 8 for yes/no and multiple choice, 16 otherwise).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap confidence interval.")] = 0,
    backend: BackendOpt = "onnxruntime",
    engines: EnginesOpt = None,
    json_out: JsonFlag = False,
) -> None:
    """Run each artifact on the device runtime over a local task (greedy) and score it with the benchmark's metric."""
    from tokedge.eval import evaluate, load_task
    from tokedge.eval.render import table_lines

    choice = _backend(backend, engines, 0, 0, None, None, True)
    loaded = load_task(task, images=images, limit=limit)  # a bad task file fails before any artifact opens
    results = [evaluate(a, loaded, backend=choice, out=out, seed=seed, max_new_tokens=max_new_tokens)
               for a in artifact]
    compared = []
    if len(results) > 1:  # several artifacts: one comparison report (reference, random baseline, Pareto plots)
        from tokedge.report.compare import write_comparison

        compared = write_comparison([r.to_dict() for r in results], out / "comparison", title="tokedge eval")
    if json_out:
        print(json.dumps({"results": [r.to_dict() for r in results],
                          "comparison": [str(p) for p in compared]}))
    else:
        for line in table_lines(results):
            print(line)
        print(f"results and predictions in {out}/" + (f"; comparison in {out / 'comparison'}/" if compared else ""))
    for weights in dict.fromkeys(r.weights for r in results):
        _say_random(weights)


@app.command("profiles", short_help="List the device profiles.")
def profiles_cmd(json_out: ListJsonFlag = False) -> None:
    """List the device profiles (tokedge/profiles/*.toml); pass a name to --profile / --predict."""
    import dataclasses

    from tokedge.profiles import list_profiles

    profiles = list_profiles()
    if json_out:
        print(json.dumps({"profiles": [dataclasses.asdict(p) for p in profiles.values()]}))
        return
    rows = [dataclasses.asdict(p) for p in profiles.values()]
    _print_listing(rows, [
        ("profile", "name"), ("TRT", "trt_version"), ("prec", "precision"),
        ("mem GB", lambda r: f"{r['memory_gb']:g}"), ("TFLOP/s", lambda r: f"{r['fp16_tflops']:g}"),
        ("GB/s", lambda r: f"{r['bandwidth_gbs']:g}"), ("batch", "max_batch"),
        ("budgets", lambda r: f"{r['budget_min']}..{r['budget_max']}"),
    ])


@app.command("methods", short_help="List the reduction methods.")
def methods_cmd(json_out: ListJsonFlag = False) -> None:
    """List the reduction methods: where each acts, what it scores with, the families it exports for,
    whether it takes a runtime budget, and the code whose semantics it follows."""
    from tokedge.export.families import families_for
    from tokedge.reduce import METHODS

    rows = [
        {"name": m.name, "stage": m.stage.value, "scores_with": [s.value for s in m.scores_with],
         "families": families_for(m),
         "needs_attention": m.needs_attention, "static_counts": m.static_counts,
         "runtime_budget": m.supports_runtime_budget, "paper": m.paper, "reference": m.reference,
         "budget": m.budget_meaning, "summary": m.summary,
         "options": {k: {"type": o.type.__name__, "default": o.default, "help": o.help} for k, o in m.option_specs.items()}}
        for m in METHODS.values()
    ]
    if json_out:
        print(json.dumps({"methods": rows}))
        return
    _print_listing(rows, [
        ("method", "name"), ("acts", "stage"), ("dyn. budget", lambda r: "yes" if r["runtime_budget"] else "no"),
        ("scores with", lambda r: ", ".join(r["scores_with"]) or "-"),
    ], detail=lambda r: (f"{r['summary']} (arXiv {r['paper']})" if r["paper"] != "-" else r["summary"])
        + f"; families: {', '.join(r['families']) or 'none'}"
        + (f"; follows {r['reference']}" if r["reference"] != "-" else ""))


@app.command("doctor", short_help="What this machine has; which commands work here.")
def doctor_cmd(
    json_out: ListJsonFlag = False,
    root: Annotated[Path, typer.Option("--root", help="Read the system files under this directory instead of / (for testing).")] = Path("/"),
) -> None:
    """Python, CPU, memory, JetPack/L4T, CUDA, TensorRT, ONNX Runtime and its providers; the device
    profile that matches this machine (or the nearest); which commands work here and what to install
    for the others. Exit code 0 whatever it finds."""
    import shutil

    from tokedge.doctor import diagnose, render
    from tokedge.errors import UsageError

    if not root.is_dir():
        raise UsageError(f"--root {root}: not a directory")
    report = diagnose(root)
    if json_out:
        print(json.dumps(report.to_json()))
        return
    print(render(report, shutil.get_terminal_size((80, 24)).columns))


def _version_callback(value: bool) -> None:
    if value:
        import tokedge

        print(f"tokedge {tokedge.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version_callback, is_eager=True)] = False,
) -> None:
    """tokedge: export, build, run and profile token-reduced VLMs."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException (like KeyboardInterrupt) so that no `except
    Exception` swallows it and every `finally` / staging cleanup on the way out runs."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _install_signal_handlers() -> dict:
    """SIGINT/SIGTERM raise Interrupted once; further ones are ignored so cleanup finishes."""
    import signal

    def handler(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread (embedded use): leave signals alone
            pass
    return previous


def _quiet(debug: bool) -> None:
    """Keep stderr to tokedge's own one-line messages: library warnings (numpy, Pillow, torch)
    and ONNX Runtime's log lines are shown only with --debug. Pillow's decompression-bomb
    warning is an error either way."""
    import logging
    import warnings

    if not debug:
        warnings.simplefilter("ignore")
    # onnxruntime's Python tools (the quantizer) log through `logging`: shown only with --debug
    logging.getLogger("onnxruntime.quantization").setLevel(logging.DEBUG if debug else logging.ERROR)
    try:
        from PIL import Image

        warnings.simplefilter("error", Image.DecompressionBombWarning)
    except ImportError:  # pragma: no cover - pillow is a base dependency
        pass
    try:
        from tokedge.runtime.ort_backend import quiet_onnxruntime

        quiet_onnxruntime(debug)
    except ImportError:  # pragma: no cover - onnxruntime is a base dependency
        pass


def _say(message: str) -> None:
    """One line on stderr: artifact-provided text inside it cannot add lines or terminal escapes."""
    from tokedge.safeio import printable

    print(f"error: {printable(message, 2000)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app and map every error to one line and an exit code."""
    import signal

    try:  # recent typer vendors click as typer._click; older releases use click itself
        from typer._click.exceptions import ClickException  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover
        from click.exceptions import ClickException

    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere before a "--" (after the subcommand too): taken out here
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end] or os.environ.get("TOKEDGE_DEBUG") == "1"
    argv = [a for i, a in enumerate(argv) if not (a == "--debug" and i < end)]
    command = typer.main.get_command(app)
    previous = _install_signal_handlers()
    try:
        _quiet(debug)
        rv = command.main(args=argv, prog_name="tokedge", standalone_mode=False)
        return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
    except Interrupted as exc:
        name = "SIGINT" if exc.signum == signal.SIGINT else "SIGTERM"
        _say(f"interrupted ({name}); nothing was written, partial output removed")
        return 128 + exc.signum
    except TokedgeError as exc:
        if debug:
            raise
        _say(str(exc))
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        _say("aborted")
        return 130
    except ClickException as exc:
        if debug:
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":  # help was printed already
            return 0 if not argv else 2
        command_name = next((a for a in argv if not a.startswith("-")), "")
        _say(f"{exc.format_message()} (see `tokedge {command_name} --help`)".replace("  ", " "))
        return 2
    except KeyboardInterrupt:
        _say("interrupted (SIGINT); nothing was written, partial output removed")
        return 130
    except MemoryError:
        _say("out of memory; close other programs or use a smaller model or budget")
        return 1
    except (SystemExit, GeneratorExit):
        raise
    except ModuleNotFoundError as exc:  # an optional extra this command needs: name it
        from tokedge.errors import missing_extra

        if debug:
            raise
        named = missing_extra(exc, next((a for a in argv if not a.startswith("-")), ""))
        if named is None:
            _say(f"internal error: ModuleNotFoundError: {exc} (rerun with --debug for the traceback)")
            return 1
        _say(str(named))
        return named.exit_code
    except BaseException as exc:  # last resort (incl. Rust panics, which are BaseExceptions): one line
        if debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        _say(f"internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)")
        return 1
    finally:
        for sig, handler in previous.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
