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
from typing import Annotated, Iterator, Optional

import typer

from tokedge.errors import TokedgeError

app = typer.Typer(
    name="tokedge",
    help="Visual-token reduction for VLMs, exported to ONNX/TensorRT for edge GPUs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout at the end.")]
ArtifactArg = Annotated[Path, typer.Argument(help="Artifact directory written by `tokedge export`.")]
QuantizeOpt = Annotated[Optional[str], typer.Option("--quantize", help="Weight-only quantization: int4 or int8.")]
QuantFormOpt = Annotated[str, typer.Option("--quant-form", help="matmulnbits (ONNX Runtime) or qdq (TensorRT).")]
GroupSizeOpt = Annotated[int, typer.Option("--group-size", help="Weights per quantization scale along K.")]
QuantGraphsOpt = Annotated[str, typer.Option("--quant-graphs", help="Graphs to quantize: decoder,prefill[,vision].")]
QuantLmHeadOpt = Annotated[bool, typer.Option("--quantize-lm-head/--float-lm-head",
                                              help="Also quantize the logits MatMul (lm_head).")]
QuantEmbedOpt = Annotated[bool, typer.Option("--quantize-embeddings/--float-embeddings",
                                             help="Also quantize the token embeddings (matmulnbits only).")]
AccuracyOpt = Annotated[int, typer.Option("--accuracy-level", help="MatMulNBits compute: 4 = int8 (VNNI/AMX), 0 = float.")]


def _quant_config(scheme: str, form: str, group_size: int, graphs: str, lm_head: bool, embeddings: bool,
                  accuracy_level: int):
    from tokedge.export.quantize import QuantConfig

    cfg = QuantConfig(scheme=scheme, form=form, group_size=group_size,
                      graphs=tuple(g.strip() for g in graphs.split(",") if g.strip()), lm_head=lm_head,
                      embeddings=embeddings, accuracy_level=accuracy_level)
    cfg.check()
    return cfg


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


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


@app.command("export")
def export_cmd(
    model: Annotated[str, typer.Argument(help="Hub id (llava-hf/llava-1.5-7b-hf), llava-hf directory, or tiny-llava.")],
    method: Annotated[str, typer.Option(help="Reduction method (see `tokedge methods`).")] = "none",
    budget: Annotated[Optional[int], typer.Option(help="Visual tokens that reach the LLM (default: all for none, 64 otherwise).")] = None,
    dynamic_budget: Annotated[Optional[str], typer.Option(help="MIN:MAX runtime range; --budget is the default.")] = None,
    option: Annotated[list[str], typer.Option("--option", help="Method option KEY=VALUE (repeatable), e.g. layer=3.")] = [],
    dtype: Annotated[str, typer.Option(help="fp32 or fp16 weights and activations.")] = "fp32",
    out: Annotated[Optional[Path], typer.Option(help="Artifact directory to create (default: ./<model>-<method>-<budget>).")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing artifact at --out (whole).")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow code from the checkpoint to run.")] = False,
    allow_pickle: Annotated[bool, typer.Option(help="Load *.bin pickle weights (weights_only) when no safetensors exist.")] = False,
    validate: Annotated[bool, typer.Option(help="Check ONNX Runtime against transformers after export.")] = True,
    quantize: QuantizeOpt = None,
    quant_form: QuantFormOpt = "matmulnbits",
    group_size: GroupSizeOpt = 128,
    quant_graphs: QuantGraphsOpt = "decoder,prefill",
    quantize_lm_head: QuantLmHeadOpt = False,
    quantize_embeddings: QuantEmbedOpt = False,
    accuracy_level: AccuracyOpt = 4,
    device_profile: Annotated[Optional[str], typer.Option("--profile", help="Warn when this device profile cannot hold the artifact (memory plan).")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Export a LLaVA checkpoint to a reduction-aware ONNX artifact (vision, embed, decoder)."""
    from tokedge.export.pipeline import ExportConfig, export, parse_budget_range
    from tokedge.reduce.base import parse_option_pairs

    options = tuple(parse_option_pairs(option).items())
    rng = parse_budget_range(dynamic_budget) if dynamic_budget else None
    quant = (_quant_config(quantize, quant_form, group_size, quant_graphs, quantize_lm_head, quantize_embeddings,
                           accuracy_level) if quantize else None)
    if out is None:
        label = budget if budget is not None else ("full" if method == "none" else 64)
        out = Path(f"{Path(model.rstrip('/')).name}-{method}-{label}")
    cfg = ExportConfig(
        model=model, out=out, method=method, budget=budget, dynamic_budget=rng, dtype=dtype, force=force,
        trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, validate=validate, options=options,
        quantize=quant, device_profile=device_profile,
    )
    with _stage_printer(enabled=True) as stage:
        result = export(cfg, progress=stage)
    m = result.manifest
    console = _console()
    if result.parity.get("cases"):
        from tokedge.export.validate import ParityCase, ParityReport, Tolerance

        report = ParityReport(Tolerance(**result.parity["tolerance"]), [ParityCase(**c) for c in result.parity["cases"]])
        console.print(f"[green]✓[/green] parity: {report.summary()}")
    kept = m.reduction.budget
    where = (f" kept after LLM layer {m.reduction.stages[-1]['prune_layer']}" if m.reduction.stage == "in-llm" else "")
    console.print(
        f"wrote {result.out} ({m.reduction.method}, {kept} of {m.reduction.full_tokens} visual tokens{where}"
        + (f", runtime budget {m.reduction.budget_range[0]}..{m.reduction.budget_range[1]}" if m.reduction.budget_range else "")
        + ")"
    )
    if m.quantization is not None:
        console.print(f"weights: {_quant_line(m.quantization)}")
    for w in result.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    if json_out:
        print(json.dumps({"artifact": str(result.out), "method": m.reduction.method, "budget": m.reduction.budget,
                          "budget_range": m.reduction.budget_range, "parity": result.parity, "seconds": result.seconds,
                          "quantization": dataclasses.asdict(m.quantization) if m.quantization else None,
                          "warnings": result.warnings}))


def _quant_line(q) -> str:
    before = sum(v["before"] for v in q.weight_bytes.values())
    after = sum(v["after"] for v in q.weight_bytes.values())
    return (f"{q.scheme} {q.form} (group {q.group_size}, symmetric, {q.algorithm}) on {', '.join(q.graphs)}: "
            f"{sum(q.quantized.values())} weights, {before / 2**20:.1f} -> {after / 2**20:.1f} MiB"
            + ("" if q.lm_head else "; lm_head float") + ("" if q.embeddings else "; embeddings float"))


@app.command("quantize")
def quantize_cmd(
    artifact: ArtifactArg,
    out: Annotated[Path, typer.Option(help="Directory for the quantized artifact.")],
    scheme: Annotated[str, typer.Option("--scheme", help="int4 or int8.")] = "int4",
    quant_form: QuantFormOpt = "matmulnbits",
    group_size: GroupSizeOpt = 128,
    quant_graphs: QuantGraphsOpt = "decoder,prefill",
    quantize_lm_head: QuantLmHeadOpt = False,
    quantize_embeddings: QuantEmbedOpt = False,
    accuracy_level: AccuracyOpt = 4,
    force: Annotated[bool, typer.Option(help="Replace an existing --out (whole).")] = False,
    validate: Annotated[bool, typer.Option(help="Check against the fp32 reference with the scheme's tolerance.")] = True,
    json_out: JsonFlag = False,
) -> None:
    """Quantize an fp32 artifact's linear weights (int4/int8), re-checked against its fp32 reference."""
    from tokedge.export.quantize import quantize_artifact

    cfg = _quant_config(scheme, quant_form, group_size, quant_graphs, quantize_lm_head, quantize_embeddings,
                        accuracy_level)
    result = quantize_artifact(artifact, out, cfg, force=force, validate=validate)
    console = _console()
    console.print(f"weights: {_quant_line(result.info)}")
    from tokedge.export.validate import ParityCase, ParityReport, Tolerance

    if result.parity.get("cases"):
        report = ParityReport(Tolerance(**result.parity["tolerance"]), [ParityCase(**c) for c in result.parity["cases"]])
        console.print(f"[green]✓[/green] parity vs the fp32 reference: {report.summary()}")
    else:
        console.print("[yellow]warning:[/yellow] not validated (--no-validate)")
    console.print(f"wrote {result.out}")
    if json_out:
        print(json.dumps({"artifact": str(result.out), "quantization": dataclasses.asdict(result.info),
                          "parity": result.parity}))


@app.command("optimize")
def optimize_cmd(
    artifact: ArtifactArg,
    out: Annotated[Path, typer.Option(help="Directory for the optimised artifact.")],
    passes: Annotated[str, typer.Option(help="Comma-separated passes (see --help of tokedge passes).")] =
    "fuse-selection,indices-int32,fp16-guard,fold",
    force: Annotated[bool, typer.Option(help="Replace an existing --out (whole).")] = False,
    json_out: JsonFlag = False,
) -> None:
    """Run graph passes over an artifact, write a new one, and print what each pass changed."""
    from tokedge.export.optimize import optimize

    names = [p.strip() for p in passes.split(",") if p.strip()]
    result = optimize(artifact, out, names, force=force)
    console = _console()
    for graph, per in result.counts.items():
        console.print(f"{graph}: " + ", ".join(f"{p} fired {n}x" for p, n in per.items()))
    console.print(f"wrote {result.out} (parity re-checked against the export reference)")
    if json_out:
        print(json.dumps({"artifact": str(result.out), "counts": result.counts, "parity": result.parity}))


@app.command("passes")
def passes_cmd() -> None:
    """List the graph passes `tokedge optimize --passes` accepts."""
    from tokedge.export.passes import DEFAULT_PASSES, PASSES

    for p in PASSES.values():
        tag = " (default at export)" if p.name in DEFAULT_PASSES else ""
        print(f"{p.name:16s} {p.summary}{tag}")


@app.command("build")
def build_cmd(
    artifact: ArtifactArg,
    profile: Annotated[str, typer.Option(help="Device profile name (see `tokedge profiles`) or a .toml file.")],
    out: Annotated[Optional[Path], typer.Option(help="Engines directory (default: <artifact>.engines-<profile>).")] = None,
    dry_run: Annotated[bool, typer.Option(help="Print the build plan without TensorRT.")] = False,
    force: Annotated[bool, typer.Option(help="Replace existing engines (whole).")] = False,
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
    console.print(f"{'would write' if dry_run else 'wrote'} {where}")


def _memory_plan(artifact: Path, profile: str):
    from tokedge.artifact import load_artifact
    from tokedge.memory import plan_for_device
    from tokedge.profiles import load_profile

    return plan_for_device(load_artifact(artifact, check_hashes=False), load_profile(profile))


@app.command("memory")
def memory_cmd(
    target: Annotated[str, typer.Argument(help="Artifact directory, or a model geometry: llava-1.5-7b.")],
    profile: Annotated[str, typer.Option(help="Device profile name (see `tokedge profiles`) or a .toml file.")],
    quantize: Annotated[Optional[str], typer.Option(help="For a geometry: int4 or int8 decoder weights.")] = None,
    group_size: GroupSizeOpt = 128,
    budget: Annotated[Optional[int], typer.Option(help="For a geometry: visual tokens in the prompt (default: all).")] = None,
    text_tokens: Annotated[int, typer.Option(help="Prompt text tokens beside the image.")] = 64,
    headroom: Annotated[float, typer.Option(help="Share of device memory kept free (OS, CUDA context, workspace).")] = 0.2,
    json_out: JsonFlag = False,
) -> None:
    """Memory plan: weights + KV cache + activation peak against a device profile's memory."""
    from tokedge.errors import UsageError
    from tokedge.memory import DTYPE_BYTES, GEOMETRIES, WeightScheme, plan_for_device, plan_memory
    from tokedge.profiles import load_profile

    if not 0 <= headroom < 1:
        raise UsageError(f"--headroom {headroom} must be in [0, 1)")
    device = load_profile(profile)
    if target in GEOMETRIES:
        if quantize not in (None, "int4", "int8"):
            raise UsageError(f"--quantize {quantize} is not supported; use int4 or int8")
        geometry = GEOMETRIES[target]
        value = max(DTYPE_BYTES.get(device.precision, 2.0), 2.0)
        scheme = WeightScheme(float_bytes=value, bits=int(quantize[3:]) if quantize else None, group_size=group_size)
        full = (geometry.image_size // geometry.patch_size) ** 2
        plan = plan_memory(geometry, ("vision", "embed", "decoder"), scheme, device=device.name,
                           memory_gb=device.memory_gb, visual_tokens=budget or full, new_tokens=device.max_new_tokens,
                           batch=device.max_batch, text_tokens=text_tokens, value_bytes=value, headroom=headroom)
    else:
        from tokedge.artifact import load_artifact

        if not Path(target).exists():
            raise UsageError(f"'{target}' is neither an artifact directory nor a known geometry "
                             f"({', '.join(GEOMETRIES)})")
        if quantize or budget:
            raise UsageError("--quantize and --budget apply to a geometry; an artifact carries its own")
        plan = plan_for_device(load_artifact(Path(target), check_hashes=False), device, headroom=headroom,
                               text_tokens=text_tokens)
    if json_out:
        print(json.dumps(plan.to_dict()))
    else:
        print(plan.summary())
        for note in plan.notes:
            print(f"note: {note}")


@app.command("check")
def check_cmd(
    artifact: ArtifactArg,
    target: Annotated[str, typer.Option(help="trt-10.3 (JetPack 6) or trt-11.")] = "trt-10.3",
    json_out: JsonFlag = False,
) -> None:
    """Static TensorRT compatibility check of every op, attribute and dtype (no GPU needed)."""
    from tokedge.check import check_artifact
    from tokedge.errors import TokedgeError

    report = check_artifact(artifact, target)
    if json_out:
        print(json.dumps({"target": target, "ok": report.ok, "nodes_checked": report.nodes_checked,
                          "findings": [f.__dict__ for f in report.findings]}))
    else:
        for f in report.findings:
            print(f.line(), file=sys.stderr)
        if report.ok:
            _console().print(f"{artifact}: {report.nodes_checked} nodes pass {target}")
    if not report.ok:
        first = report.findings[0]
        more = f" (and {len(report.findings) - 1} more)" if len(report.findings) > 1 else ""
        raise TokedgeError(f"{artifact} fails {target}: {first.line()}{more}")


@app.command("verify")
def verify_cmd(
    artifact: ArtifactArg,
    checkpoint: Annotated[Optional[str], typer.Option(help="Recompute the reference from this checkpoint (needs [export]).")] = None,
    json_out: JsonFlag = False,
) -> None:
    """Re-check file hashes and the graphs' agreement with the recorded (or a fresh) reference."""
    from tokedge.errors import ParityError
    from tokedge.verify import verify

    report = verify(artifact, checkpoint=checkpoint)
    if json_out:
        print(json.dumps(report.to_dict()))
    else:
        _console().print(f"hashes ok; parity: {report.summary()}")
    if not report.ok:
        raise ParityError(f"{artifact}: graphs disagree with the reference: {report.summary()}")


@app.command("run")
def run_cmd(
    artifact: ArtifactArg,
    image: Annotated[list[Path], typer.Option(help="Image file; repeat with --prompt for a batch.")],
    prompt: Annotated[list[str], typer.Option(help="Question or instruction; one per --image.")],
    max_new_tokens: Annotated[int, typer.Option(help="Stop after this many new tokens.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy; > 0 samples.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Seed for reproducible sampling.")] = None,
    budget: Annotated[Optional[int], typer.Option(help="Visual tokens, within the artifact's runtime range.")] = None,
    backend: Annotated[str, typer.Option(help="onnxruntime or tensorrt.")] = "onnxruntime",
    engines: Annotated[Optional[Path], typer.Option(help="Engines directory from `tokedge build` (tensorrt).")] = None,
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads (0 = automatic).")] = 0,
    json_out: JsonFlag = False,
) -> None:
    """Generate text for an image and a prompt from an exported artifact (no torch needed)."""
    from tokedge.runtime.ort_backend import OrtOptions
    from tokedge.runtime.pipeline import Pipeline

    def stream(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    with Pipeline.load(artifact, backend=backend, options=OrtOptions(intra_op_threads=threads),
                       engines=engines) as pipe:
        result = pipe.generate(
            image, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, budget=budget, on_text=None if json_out or len(prompt) > 1 else stream,
        )
    if json_out:
        print(json.dumps(result.to_dict()))
    elif len(prompt) > 1:
        for i, text in enumerate(result.texts):
            print(f"[{i}] {text}")
    else:
        print()


@app.command("profile")
def profile_cmd(
    artifact: ArtifactArg,
    image: Annotated[list[Path], typer.Option(help="Image(s) to profile with (repeatable).")],
    prompt: Annotated[str, typer.Option(help="Prompt for every run.")] = "Describe this image.",
    budgets: Annotated[Optional[str], typer.Option(help="Comma-separated budgets, e.g. 576,192,64.")] = None,
    backend: Annotated[str, typer.Option(help="onnxruntime or tensorrt.")] = "onnxruntime",
    engines: Annotated[Optional[Path], typer.Option(help="Engines directory from `tokedge build` (tensorrt).")] = None,
    runs: Annotated[int, typer.Option(help="Timed runs per budget and image.")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed runs first.")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per run.")] = 32,
    out: Annotated[Path, typer.Option(help="Directory for report.json, report.md and plots.")] = Path("profile-report"),
    baseline: Annotated[Optional[str], typer.Option(help="Checkpoint for the transformers eager baseline.")] = None,
    predict: Annotated[Optional[str], typer.Option(help="Device profile for a roofline prediction.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option(help="Re-export budgets outside the artifact from here.")] = None,
    threads: Annotated[int, typer.Option(help="ONNX Runtime intra-op threads per session (0 = automatic).")] = 0,
    json_out: JsonFlag = False,
) -> None:
    """Latency, memory, FLOPs and fidelity per budget; writes report.json, report.md and PNG plots."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tokedge.report.profile import ProfileConfig, run_profile
    from tokedge.report.render import write_all

    try:
        budget_list = tuple(int(b) for b in budgets.split(",") if b.strip()) if budgets else ()
    except ValueError:
        from tokedge.errors import UsageError

        raise UsageError(f"--budgets '{budgets}' is not a comma-separated list of integers") from None
    cfg = ProfileConfig(artifact=artifact, images=tuple(image), prompt=prompt, budgets=budget_list, backend=backend,
                        engines=engines, runs=runs, warmup=warmup, max_new_tokens=max_new_tokens, baseline=baseline, predict=predict,
                        checkpoint=checkpoint, threads=threads)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=_console(), transient=True) as bar:
        task = bar.add_task("profiling", total=None)

        def tick(label: str, done: int, total: int) -> None:
            bar.update(task, description=label, completed=done, total=total)

        report = run_profile(cfg, progress=tick)
    files = write_all(report, out)
    console = _console()
    for r in report.results:
        console.print(f"budget {r.budget:>4}: TTFT {r.ttft_ms:7.1f} ms  vision {r.vision_ms:6.1f}  prefill "
                      f"{r.prefill_ms:6.1f}  decode {r.decode_ms_per_token:6.2f} ms/token")
        if r.share_of_gemm_peak:
            console.print("             " + "  ".join(
                f"{stage} {r.achieved_gflops_per_s[stage]:.0f} GFLOP/s ({r.share_of_gemm_peak[stage]:.0%})"
                for stage in ("vision", "prefill", "decode")) + f" of {report.gemm_peak_gflops_per_s:.0f} GFLOP/s GEMM peak")
    if report.quantization:
        from tokedge.artifact import QuantInfo

        console.print(f"weights: {_quant_line(QuantInfo(**report.quantization))}")
    if report.memory:
        size = report.memory["artifact_bytes"]
        console.print(f"artifact graphs {size['measured'] / 2**20:.1f} MiB, predicted {size['predicted'] / 2**20:.1f} MiB "
                      f"({size['ratio']:.2f}x)" + (f"; CPU peak RSS {report.memory['cpu']['peak_rss_bytes'] / 2**20:.0f} MiB, "
                                                    f"predicted working set {report.memory['cpu']['predicted_bytes'] / 2**20:.0f} MiB"
                                                    if "cpu" in report.memory else ""))
        if "device_summary" in report.memory:
            console.print(report.memory["device_summary"])
    for w in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}")
    console.print(f"wrote {', '.join(str(f) for f in files)}")
    if json_out:
        print(json.dumps(report.to_dict()))


@app.command("profiles")
def profiles_cmd(json_out: JsonFlag = False) -> None:
    """List the device profiles (tokedge/profiles/*.toml)."""
    import dataclasses

    from tokedge.profiles import list_profiles

    profiles = list_profiles()
    if json_out:
        print(json.dumps([dataclasses.asdict(p) for p in profiles.values()]))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("profile", "TensorRT", "precision", "memory GB", "FP16 TFLOP/s", "GB/s", "max batch", "budgets")
    for p in profiles.values():
        table.add_row(p.name, p.trt_version, p.precision, f"{p.memory_gb:g}", f"{p.fp16_tflops:g}",
                      f"{p.bandwidth_gbs:g}", str(p.max_batch), f"{p.budget_min}..{p.budget_max}")
    Console().print(table)


@app.command("methods")
def methods_cmd(json_out: JsonFlag = False) -> None:
    """List the reduction methods: where each acts, what it needs, whether counts are static."""
    from tokedge.reduce import METHODS

    rows = [
        {"name": m.name, "stage": m.stage, "needs_attention": m.needs_attention,
         "static_counts": m.static_counts, "runtime_budget": m.supports_runtime_budget, "paper": m.paper,
         "budget": m.budget_meaning, "summary": m.summary,
         "options": {k: {"type": o.type.__name__, "default": o.default, "help": o.help} for k, o in m.option_specs.items()}}
        for m in METHODS.values()
    ]
    if json_out:
        print(json.dumps(rows))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("method", "acts", "attention", "static", "runtime budget", "paper (arXiv)", "summary")
    for r in rows:
        table.add_row(r["name"], r["stage"], "yes" if r["needs_attention"] else "no", "yes" if r["static_counts"] else "no",
                      "yes" if r["runtime_budget"] else "no", r["paper"], r["summary"])
    Console().print(table)


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


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app and map every error to one line and an exit code."""
    try:  # recent typer vendors click as typer._click; older releases use click itself
        from typer._click.exceptions import ClickException  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover
        from click.exceptions import ClickException

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("TOKEDGE_DEBUG") == "1"
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="tokedge", standalone_mode=False)
        return 0
    except TokedgeError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 130
    except ClickException as exc:
        if debug:
            raise
        if type(exc).__name__ == "NoArgsIsHelpError":  # help was printed already
            return 0 if not argv else 2
        command_name = next((a for a in argv if not a.startswith("-")), "")
        print(f"error: {exc.format_message()} (see `tokedge {command_name} --help`)".replace("  ", " "), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # last resort: still one line unless --debug
        if debug:
            raise
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"error: internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
