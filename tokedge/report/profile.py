"""`tokedge profile`: latency, memory, FLOPs and fidelity per budget, as data (`ProfileReport`)
that renders to report.json, report.md and PNG plots."""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from tokedge.artifact import load_artifact
from tokedge.errors import InputError, UsageError
from tokedge.reduce.base import Stage
from tokedge.report import flops as fl
from tokedge.report.machine import PEAK_MEASURE, describe, gemm_peak_gflops
from tokedge.report.stats import p10, p90, spread_warning

STAGES = ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token")


@dataclass(frozen=True)
class ProfileConfig:
    artifact: Path
    images: tuple[Path, ...]
    prompt: str = "Describe this image."
    budgets: tuple[int, ...] = ()  # () = the artifact's budget, plus its runtime range ends
    backend: str = "onnxruntime"
    engines: Path | None = None  # engines directory for backend "tensorrt"
    runs: int = 5
    warmup: int = 2  # untimed runs per budget and image before timing
    max_new_tokens: int = 32
    baseline: str | None = None  # checkpoint: transformers at full tokens, same inputs
    baseline_attention: str | None = None  # None: transformers' default (SDPA); "eager" to match old reports
    predict: str | None = None  # device profile name or .toml: roofline prediction
    checkpoint: str | None = None  # re-export budgets outside the artifact's range from here (else refuse)
    reexport_dir: Path | None = None  # where those re-exports go (the CLI: <--out>/artifacts)
    threads: int = 0  # ONNX Runtime intra-op threads per session (0 = ONNX Runtime decides)
    # dynamic-resolution artifacts: keep ratios to compare instead of budgets; 1 = `--method none`
    # (all tokens, the fidelity reference); others re-export the artifact's method with --keep
    keeps: tuple[float, ...] = ()
    runtime: object | None = None  # a tokedge.runtime.backends.Backend (GPU providers...); None: from backend/engines/threads
    eval_results: Path | None = None  # a directory of `tokedge eval` results: those of these artifacts join the report

    def choice(self):
        from tokedge.runtime.backends import Backend

        if self.runtime is not None:
            return self.runtime
        return Backend(name=self.backend, engines=Path(self.engines) if self.engines else None, threads=self.threads)


@dataclass
class BudgetResult:
    budget: int
    backend: str
    visual_tokens: int
    artifact: str
    ttft_ms: float
    vision_ms: float
    prefill_ms: float
    preprocess_ms: float
    decode_ms_per_token: float
    tokens_per_s: float
    p90: dict[str, float]
    peak_rss_mb: float
    reduction_ms: float | None  # the reduction's own ops in the vision graph (ONNX Runtime profiler)
    prompt_tokens: int
    flops: dict[str, float]  # GFLOP per stage: vision, prefill, decode_per_token
    achieved_gflops_per_s: dict[str, float]
    fidelity: dict[str, float] | None = None  # vs the full-token output
    predicted: dict | None = None  # roofline on a device profile: labelled predicted
    speedup_vs_baseline: dict[str, float | None] | None = None  # decode None: the baseline decoded nothing
    token_ids: list[list[int]] = field(default_factory=list)
    share_of_gemm_peak: dict[str, float] = field(default_factory=dict)  # achieved / measured GEMM peak per stage
    # one entry per image: its size, partitions the vision graph ran, visual tokens (vision graph /
    # reaching the LLM's last layer), median stage times, FLOPs and fidelity; with a tiled layout
    # every image has its own counts (`visual_tokens` above is then the largest image's)
    per_image: list[dict] = field(default_factory=list)
    method: str = ""  # the method that ran (with --keeps, `none` for keep 1)
    keep: float | None = None  # its keep ratio per image (dynamic-resolution artifacts exported with --keep)
    p10: dict[str, float] = field(default_factory=dict)  # per stage, beside `p90`: the spread of the timed rounds
    # peak_rss_mb: see ProfileReport.memory_measure; this is the same process before loading the artifact
    rss_before_load_mb: float | None = None

    def label(self) -> str:
        """The row label in reports: the budget (and the tokens the LLM saw when they differ), or
        the method and its keep ratio for dynamic-resolution artifacts."""
        return str(self.budget) if self.keep is None else row_label(self.budget, self.keep, self.method)


@dataclass
class ProfileReport:
    artifact: str
    method: str
    images: list[str]
    prompt: str
    runs: int
    warmup: int
    max_new_tokens: int
    machine: dict
    gemm_peak_gflops_per_s: float
    results: list[BudgetResult] = field(default_factory=list)
    baseline: dict | None = None
    fidelity_reference: str | None = None
    predicted_on: dict | None = None
    tegrastats: dict | None = None
    warnings: list[str] = field(default_factory=list)
    threads: int = 0  # ONNX Runtime intra-op threads (0 = automatic)
    quantization: dict | None = None  # the artifact's weight scheme (manifest `quantization`)
    weights: str | None = None  # manifest `weights`: "random (preset tiny-llava)" for a preset's random weights
    memory: dict | None = None  # predicted vs measured artifact bytes and CPU peak; the device plan with --predict
    runtime: dict | None = None  # the --backend choice and the execution providers the sessions used
    # how rows were timed and what peak_rss_mb measures (the defaults describe reports written before)
    timing: str = "sequential: each row's runs one after another"
    memory_measure: str = "peak RSS of the profiling process so far (cumulative over the rows run before)"
    fidelity_note: str | None = None  # why fidelity is n/a and how to get it
    gemm_peak_measure: str = "numpy's BLAS, fp32 1024x1024 matmul, best of 5"
    # eval results of the profiled artifacts (--eval-results DIR; tokedge.report.compare.accuracy_for)
    accuracy: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ProfileReport":
        data = dict(data)
        data["results"] = [BudgetResult(**r) for r in data.get("results", [])]
        return cls(**data)


def fidelity(reference: list[list[int]], tokens: list[list[int]]) -> dict[str, float]:
    """first_token_agreement: share of images whose first token equals the reference's;
    token_overlap: share of the reference's tokens also produced (multiset intersection)."""
    first = [bool(r and t and r[0] == t[0]) for r, t in zip(reference, tokens)]
    overlaps = []
    for r, t in zip(reference, tokens):
        common = sum((Counter(r) & Counter(t)).values())
        overlaps.append(common / len(r) if r else float(not t))
    return {"first_token_agreement": sum(first) / len(first), "token_overlap": sum(overlaps) / len(overlaps)}


def reduction_ms(artifact: Path, vision_file: str, feed: dict, runs: int = 3) -> float:
    """Time ONNX Runtime spends in vision-graph nodes outside the tower and the projector."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(artifact.parent / ".tokedge-profile")
    so.log_severity_level = 3
    session = ort.InferenceSession(str(artifact / vision_file), so, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feed)
    trace = Path(session.end_profiling())
    try:
        events = json.loads(trace.read_text())
    finally:
        trace.unlink(missing_ok=True)
    total = 0.0
    for ev in events:
        name = ev.get("name", "")
        if ev.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        node = name[: -len("_kernel_time")]
        if not node.startswith(("/tower/", "/projector/", "/embeddings")):
            total += ev.get("dur", 0) / 1000.0
    return total / runs


KERNELS_PER_LAYER = 10  # norm, QKV, rotary, attention (2), output, norm, MLP (2), residual: after fusion
OVERHEAD_BOUND = 0.5  # a prediction whose floor is more than half of it says little about the device


def predict(manifest, profile, budget: int, prompt_tokens: int, new_tokens: int, *, partitions: int = 1,
            visual: int | None = None) -> dict:
    """Roofline prediction per stage: max(FLOPs / peak, bytes / bandwidth, latency floor), where the
    floor is one engine call plus KERNELS_PER_LAYER kernels per layer at the profile's launch time.
    `overhead_bound` is set when the floors dominate: then the model is too small for the roofline
    to mean much, and the report says so instead of quoting a rate. `partitions` and `visual`
    (visual tokens entering the LLM) describe the image when its layout tiles it (default: one
    view, `budget` tokens; in-LLM methods: all of them)."""
    bpv = 2  # engines run in fp16 on the device
    peak, bw = profile.fp16_tflops * 1e12, profile.bandwidth_gbs * 1e9
    m, red = manifest.model, manifest.reduction
    in_llm = Stage(red.stage) is Stage.IN_LLM
    if visual is None:
        visual = red.full_tokens if in_llm else budget
    kept = budget if in_llm else visual  # in the cache after in-LLM pruning: the kept tokens
    v = fl.vision_cost(manifest, budget, partitions=partitions)
    p = fl.prefill_cost(manifest, prompt_tokens, visual)
    context = prompt_tokens + kept + new_tokens // 2  # in-LLM: the cache holds the kept tokens
    d = fl.decode_cost(manifest, context)
    scale = bpv / fl.bytes_per_value(manifest)
    launch, call = profile.kernel_launch_us * 1e-6, profile.call_overhead_us * 1e-6
    floors = {
        "vision": call + (m.vision_layers * KERNELS_PER_LAYER + 2) * launch,
        "prefill": 2 * call + (m.num_layers * KERNELS_PER_LAYER + 2) * launch,  # embed + decoder
        "decode": 2 * call + (m.num_layers * KERNELS_PER_LAYER + 2) * launch,
    }
    from tokedge.memory import quantized_weight_share

    vq, dq = quantized_weight_share(manifest)  # quantized weights move fewer bytes than fp16 ones
    shares = {"vision": vq, "prefill": dq, "decode": dq}
    ms, bound, memory_ms = {}, {}, {}
    for k, cost in {"vision": v, "prefill": p, "decode": d}.items():
        compute, memory = cost.flops / peak, cost.bytes * scale * shares[k] / bw
        memory_ms[k] = round(memory * 1e3, 6)
        ms[k] = max(compute, memory, floors[k]) * 1e3
        bound[k] = "latency floor" if floors[k] >= max(compute, memory) else ("compute" if compute >= memory else "memory")
    overhead_bound = floors["decode"] > OVERHEAD_BOUND * ms["decode"] * 1e-3
    return {"ttft_ms": ms["vision"] + ms["prefill"], "vision_ms": ms["vision"], "prefill_ms": ms["prefill"],
            "decode_ms_per_token": ms["decode"], "tokens_per_s": 1e3 / ms["decode"], "device": profile.name,
            "bound": bound, "floor_ms": {k: round(f * 1e3, 4) for k, f in floors.items()}, "memory_ms": memory_ms,
            "overhead_bound": overhead_bound,
            "kind": "predicted (roofline lower bound, fp16, with kernel-launch and call floors)"}


@dataclass(frozen=True)
class ImageCounts:
    """One image under an artifact's layout: what the vision graph runs and what reaches the LLM."""

    width: int
    height: int
    partitions: int  # views the vision graph runs (1 for a single view; base + tiles when tiled)
    vision_tokens: int  # visual tokens the vision graph packs, before reduction
    placeholders: int  # image tokens in the prompt (what the LLM's first layer sees)
    llm_tokens: int  # image tokens the last decoder layer attends to (after in-LLM pruning)


def image_counts(manifest, image, runtime_budget: int | None) -> ImageCounts:
    """Counts for one image, from the manifest's layout (`runtime.layout.plan_image` for tiled
    layouts) and reduction: read as data, whichever family exported it."""
    from tokedge.layouts import layout_of
    from tokedge.memory import prompt_tokens_for

    red = manifest.reduction
    budget = runtime_budget if runtime_budget is not None else red.budget
    layout = layout_of(manifest)
    parts, full = layout.image_counts(image)
    placeholders = prompt_tokens_for(manifest, full, runtime_budget)
    llm = budget if Stage(red.stage) is Stage.IN_LLM else placeholders
    return ImageCounts(image.width, image.height, parts, full, placeholders, llm)


def vision_feed(manifest, image, runtime_budget: int | None) -> dict:
    """The vision graph's inputs for one image, as the runtime builds them (the layout's feed)."""
    from tokedge.layouts import layout_of

    feed = layout_of(manifest).vision_feed(image)
    if manifest.graphs["vision"].input("budget") is not None:
        feed["budget"] = np.array(runtime_budget or manifest.reduction.budget, dtype=np.int64)
    return feed


def _stage_gflops(manifest, budget: int, c: ImageCounts, prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """GFLOP per stage for one image: the tower over its partitions, the prefill over its
    placeholders plus the text, one decode step at mid-generation."""
    merge = manifest.layout.merge_size
    patches = c.vision_tokens * merge * merge if merge else None  # dynamic resolution: the image's own patches
    if patches is not None:  # dynamic resolution: the image's own count enters the LLM, not the largest image's
        budget = c.placeholders
    v = fl.vision_cost(manifest, budget, partitions=c.partitions, patches=patches)
    p = fl.prefill_cost(manifest, prompt_tokens, c.placeholders)
    d = fl.decode_cost(manifest, prompt_tokens + c.llm_tokens + new_tokens // 2)
    return {"vision": v.flops / 1e9, "prefill": p.flops / 1e9, "decode_per_token": d.flops / 1e9}


def default_budgets(manifest) -> list[int]:
    red = manifest.reduction
    if red.budget_range:
        lo, hi = red.budget_range
        return sorted({hi, red.budget, lo}, reverse=True)
    return [red.budget]


@dataclass(frozen=True)
class Entry:
    """One row of a profile: a budget (or a keep ratio) and the artifact that runs it. `export`:
    the ExportConfig of a re-export from --checkpoint, checked (no weights read) before any runs."""

    budget: int | None  # None: the artifact's own (--keeps)
    keep: float | None  # --keeps ratio
    artifact: Path
    runtime_budget: int | None  # fed to the artifact; None = its own
    export: object | None = None
    note: str = ""  # said in the report's warnings when the row ran a re-export


def row_label(budget: int, keep: float | None, method: str, visual_tokens: int | None = None) -> str:
    """The row label in the terminal and progress: the budget (with the visual tokens the LLM saw
    when they differ, as for a tiled layout), or a keep ratio with the method."""
    if keep is None:
        return f"budget {budget}" + (f" ({visual_tokens} tokens)" if visual_tokens not in (None, budget) else "")
    return "none (all tokens)" if keep >= 1.0 else f"{method} keep {keep:g}"


def plan_entries(cfg: ProfileConfig, manifest) -> list[Entry]:
    """Every row of the profile, each checked before anything is exported or run: budgets this
    artifact cannot run need --checkpoint (and torch), and the re-export of each is planned with
    export's own checks (budget range, method limits, layout), so a bad budget is refused in one
    line before the first re-export starts."""
    if cfg.keeps and cfg.budgets:
        raise UsageError("give --budgets or --keeps, not both")
    if cfg.keeps:
        entries = [_entry_for_keep(cfg, manifest, keep) for keep in cfg.keeps]
    else:
        budgets = list(cfg.budgets) or default_budgets(manifest)
        outside = [k for k in budgets if not _runtime_budget(manifest, k)[0]]
        if outside and not cfg.checkpoint:
            red = manifest.reduction
            have = f"{red.budget_range[0]}..{red.budget_range[1]}" if red.budget_range else str(red.budget)
            raise UsageError(
                f"budget(s) {', '.join(map(str, outside))} are outside this artifact ({have}); pass --checkpoint "
                f"{manifest.model.source} to re-export them into the report folder, or export with --dynamic-budget"
            )
        entries = [_entry_for(cfg, manifest, k) for k in budgets]
    exports = [e for e in entries if e.export is not None and not (e.artifact / "tokedge.json").is_file()]
    if exports:
        import contextlib

        from tokedge.export.pipeline import plan_export
        from tokedge.layouts import layout_of
        from tokedge.reduce import get_method

        limit = layout_of(manifest).largest_reduced_budget()  # tiled: export's example canvases bound it
        for e in exports:
            what = f"--keeps {e.keep:g}" if e.keep is not None else f"budget {e.budget}"
            try:
                plan_export(e.export, lambda name: contextlib.nullcontext())
                if limit is not None and e.budget is not None and e.budget > limit \
                        and not get_method(e.export.method).keeps_all:
                    raise UsageError(f"--budget {e.budget} is more than the {limit} visual tokens the largest image "
                                     f"gives before reduction (newlines aside); use --budget <= {limit}")
            except (UsageError, InputError) as exc:
                raise type(exc)(f"{what} cannot be re-exported from '{e.export.model}': {exc}") from None
    return entries


def export_entries(entries: list[Entry], say: Callable[[str], None] | None = None) -> None:
    """Re-export the rows that need it, one line each before it starts (they take a while)."""
    todo = [e for e in entries if e.export is not None and not (e.artifact / "tokedge.json").is_file()]
    if not todo:
        return  # nothing to export: torch stays unimported (profile runs on the base install)
    from tokedge.export.pipeline import export

    for i, e in enumerate(todo, 1):
        what = f"--keeps {e.keep:g}" if e.keep is not None else f"budget {e.budget}"
        if say:
            say(f"re-exporting {what} ({i}/{len(todo)}) from {e.export.model} into {e.artifact}")
        try:
            export(e.export)
        except InputError as exc:
            raise InputError(f"re-exporting {what} from '{e.export.model}' failed: {exc}") from None


@dataclass
class _Row:
    """What the interleaved rounds collect for one entry."""

    label: str
    samples: dict[str, list[float]]
    per_image: list[dict[str, list[float]]]
    tokens: list[list[int]] = field(default_factory=list)
    llm_tokens: list[int] = field(default_factory=list)


def run_rounds(entries: list[Entry], pipes: dict, images: list, cfg: ProfileConfig, labels: list[str],
               progress: Callable[[str, int, int], None] | None = None) -> list[_Row]:
    """Interleaved timing, as bench/run_bench.py does: every session is loaded, and each round runs
    every row once per image (the order rotates by one each round), so load from other work on the
    machine falls on every row alike instead of on whichever budget ran while it lasted. The first
    `warmup` rounds are untimed; the greedy tokens come from the first timed round."""
    rows = [_Row(label, {s: [] for s in STAGES}, [{s: [] for s in STAGES} for _ in images]) for label in labels]
    rounds = cfg.warmup + cfg.runs
    total, done = rounds * len(entries) * len(images), 0
    for i in range(rounds):
        order = list(range(len(entries)))
        order = order[i % len(order):] + order[: i % len(order)]
        for n in order:
            e, row = entries[n], rows[n]
            for j, img in enumerate(images):
                res = pipes[e.artifact].generate(img, cfg.prompt, max_new_tokens=cfg.max_new_tokens,
                                                 budget=e.runtime_budget)
                done += 1
                if progress:
                    progress(f"round {i + 1}/{rounds}: {row.label}", done, total)
                if i >= cfg.warmup:
                    for s in STAGES:
                        value = getattr(res.timings, s)
                        row.samples[s].append(value)
                        row.per_image[j][s].append(value)
                if i == cfg.warmup:
                    row.tokens.append(res.token_ids[0])
                    row.llm_tokens.append(res.visual_tokens)
    return rows


def measure_memory(entry: Entry, choice, images: tuple[Path, ...], prompt: str, max_new_tokens: int) -> dict:
    """Peak RSS of a fresh Python process that loads this row's artifact and runs every image once
    (`tokedge.report.memprobe`): its own peak, not the profiling process's peak so far, and the
    RSS it had before loading (interpreter and libraries)."""
    import subprocess
    import sys

    request = {"artifact": str(entry.artifact), "backend": _backend_dict(choice), "images": [str(p) for p in images],
               "prompt": prompt, "budget": entry.runtime_budget, "max_new_tokens": max_new_tokens}
    done = subprocess.run([sys.executable, "-m", "tokedge.report.memprobe"], input=json.dumps(request),
                          capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise InputError(f"measuring memory for {entry.artifact} in a fresh process failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _backend_dict(choice) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(choice).items()}


MEMORY_MEASURE = ("peak RSS of a fresh process per row that loads its artifact and runs each image once "
                  "(interpreter and libraries included; 'before load' is that process before the artifact)")


TIMING = ("interleaved: all sessions loaded, each round runs every row once per image (order rotating), "
          "warm-up rounds first; medians with p10..p90 over the timed rounds")


def run_profile(cfg: ProfileConfig, progress: Callable[[str, int, int], None] | None = None,
                say: Callable[[str], None] | None = None) -> ProfileReport:
    """`progress(label, done, total)` after every timed or warm-up run and before each row's memory
    measurement; `say(line)` before each re-export."""
    import contextlib

    from tokedge.layouts import layout_of
    from tokedge.runtime.pipeline import Pipeline
    from tokedge.runtime.preprocess import load_image

    manifest = load_artifact(cfg.artifact)
    if cfg.runs < 1 or cfg.warmup < 0:
        raise UsageError("--runs must be >= 1 and --warmup >= 0")
    from tokedge.runtime.ort_backend import check_threads

    check_threads(cfg.threads)
    choice = cfg.choice()
    choice.check()
    if not cfg.images:
        raise UsageError("give at least one --image to profile with")
    images = [load_image(p) for p in cfg.images]
    device_profile = None
    if cfg.predict:
        from tokedge.profiles import load_profile

        device_profile = load_profile(cfg.predict)
    evals = None
    if cfg.eval_results is not None:  # a wrong directory fails before anything is measured
        from tokedge.report.compare import load_eval_results

        evals = load_eval_results(cfg.eval_results)
    entries = plan_entries(cfg, manifest)  # every budget checked before the first re-export
    export_entries(entries, say)

    report = ProfileReport(
        artifact=str(cfg.artifact), method=manifest.reduction.method, images=[str(p) for p in cfg.images],
        prompt=cfg.prompt, runs=cfg.runs, warmup=cfg.warmup, max_new_tokens=cfg.max_new_tokens,
        machine=describe(), gemm_peak_gflops_per_s=round(gemm_peak_gflops(cfg.threads), 1),
        predicted_on=dataclasses.asdict(device_profile) if device_profile else None, threads=cfg.threads,
        quantization=dataclasses.asdict(manifest.quantization) if manifest.quantization else None,
        weights=manifest.weights,
        runtime=choice.describe(), timing=TIMING, memory_measure=MEMORY_MEASURE, gemm_peak_measure=PEAK_MEASURE,
    )
    report.warnings += [e.note for e in entries if e.note]
    from tokedge.report.tegrastats import Sampler

    with Sampler() as sampler, contextlib.ExitStack() as stack:
        pipes = {}
        for e in entries:
            if e.artifact not in pipes:
                pipes[e.artifact] = stack.enter_context(Pipeline.load(e.artifact, backend=choice))
        first = next(iter(pipes.values()))
        report.runtime = {**choice.describe(), "providers": first.providers()}
        rowinfo = []  # per entry: its manifest, budget, keep and label
        for e in entries:
            pm = pipes[e.artifact].manifest
            k = pm.reduction.budget if e.budget is None else e.budget
            keep = _row_keep(pm, e.keep)
            rowinfo.append((pm, k, keep, row_label(k, keep, pm.reduction.method)))
        rows = run_rounds(entries, pipes, images, cfg, [info[3] for info in rowinfo], progress)
        extras = []  # per entry: prompt tokens and the reduction's own time, with its sessions open
        for e, (pm, k, keep, label) in zip(entries, rowinfo):
            counts = [image_counts(pm, img, e.runtime_budget) for img in images]
            placeholders = counts[0].placeholders
            encoded = pipes[e.artifact].encoder.encode([cfg.prompt], [layout_of(pm).placeholder(placeholders)])
            prompt_tokens = int(encoded.attention_mask.sum()) - placeholders  # text tokens beside the image
            red_ms = None
            stage = Stage(pm.reduction.stage)
            if stage in (Stage.PRE_LLM, Stage.IN_VIT):
                feed = vision_feed(pm, images[0], e.runtime_budget)
                spec = pm.graphs["vision"].input("instruction")
                if spec is not None:  # the prompt's text, as the runtime feeds it (runtime.driver)
                    from tokedge.runtime.driver import prompt_instruction

                    text = pipes[e.artifact].graphs.embed(encoded.input_ids)
                    row = prompt_instruction(text, encoded.input_ids, encoded.attention_mask, pm.model,
                                             [1]).astype(spec.dtype)
                    feed["instruction"] = row if len(spec.shape) == 2 else row[0]  # per-image graphs: [hidden]
                red_ms = round(reduction_ms(Path(e.artifact), pm.graphs["vision"].file, feed), 3)
            elif stage is Stage.NONE:
                red_ms = 0.0
            extras.append((counts, prompt_tokens, red_ms))
    summary = sampler.summary()
    memories = []
    for n, e in enumerate(entries):
        if progress:
            progress(f"memory of {rowinfo[n][3]}, in a fresh process", n, len(entries))
        memories.append(measure_memory(e, choice, cfg.images, cfg.prompt, cfg.max_new_tokens))

    for e, info, row, extra, mem in zip(entries, rowinfo, rows, extras, memories):
        report.results.append(_budget_result(cfg, report, e, info, row, extra, mem, choice.name, device_profile))
    from tokedge.memory import profile_memory

    report.memory = profile_memory(cfg.artifact, manifest, device_profile, report.results)
    if report.memory.get("device") and not report.memory["device"]["fits"]:
        report.warnings.append(report.memory["device_summary"])
    if summary is not None:
        report.tegrastats = dataclasses.asdict(summary)
        if summary.throttled:
            report.warnings.append("GPU clocks dropped during the run (thermal or power throttling): "
                                   "timings are pessimistic; check nvpmodel / jetson_clocks")

    if cfg.baseline:
        from tokedge.report.baseline import transformers_baseline

        base = transformers_baseline(cfg.baseline, images, cfg.prompt, cfg.runs, cfg.warmup, cfg.max_new_tokens,
                                     attention=cfg.baseline_attention)
        report.baseline = dataclasses.asdict(base)
        for name, key in (("TTFT", "ttft_ms"), ("decode", "decode_ms_per_token")):
            warning = spread_warning(f"baseline {name}", base.samples[key])
            if warning:
                report.warnings.append(warning)
        decoded = bool(base.samples["decode_ms_per_token"])
        if not decoded:  # no decode time to compare with: say so instead of a 0x
            report.warnings.append("baseline decode: transformers stopped at an end-of-sequence token before a "
                                   "second token in every run, so there is no decode speed to compare (the decode "
                                   "speedup is null); use a --prompt that makes the model answer at length")
        for r in report.results:
            r.speedup_vs_baseline = {
                "ttft": round(base.ttft_ms / r.ttft_ms, 2) if r.ttft_ms else 0.0,
                "decode": round(base.decode_ms_per_token / r.decode_ms_per_token, 2)
                if r.decode_ms_per_token and decoded else None,
            }
    _set_fidelity(report, cfg, manifest)
    if evals is not None:
        from tokedge.report.compare import accuracy_for

        report.accuracy = accuracy_for(report.to_dict(), evals)
        if not report.accuracy:
            report.warnings.append(f"no eval result in {cfg.eval_results} is of the profiled artifact(s) "
                                   "(matched by manifest sha256): run `tokedge eval` on them first")
    overhead = [r.budget for r in report.results if r.predicted and r.predicted["overhead_bound"]]
    if overhead and device_profile is not None:
        report.warnings.append(
            f"the {device_profile.name} prediction is bound by kernel-launch and call floors, not by the model "
            "(too small for a roofline to mean much): its rates are upper limits, measure on the device")
    return report


def _budget_result(cfg: ProfileConfig, report: ProfileReport, e: Entry, info: tuple, row: _Row, extra: tuple,
                   mem: dict, backend: str, device_profile) -> BudgetResult:
    """One row's result from its timed rounds: medians and spread per stage, per-image entries,
    FLOPs and the achieved rate against the GEMM peak, its memory, the prediction. Spread
    warnings go to `report.warnings`."""
    pm, k, keep, label = info
    counts, prompt_tokens, red_ms = extra
    samples = row.samples
    counts = [dataclasses.replace(c, llm_tokens=t) for c, t in zip(counts, row.llm_tokens)]
    for name, key in (("TTFT", "ttft_ms"), ("decode", "decode_ms_per_token")):
        warning = spread_warning(f"{label} {name}", samples[key])
        if warning:
            report.warnings.append(warning)
    med = {s: statistics.median(v) for s, v in samples.items()}
    per_image = []
    for path, c, own in zip(cfg.images, counts, row.per_image):
        own_med = {s: statistics.median(v) for s, v in own.items()}
        g = _stage_gflops(pm, k, c, prompt_tokens, cfg.max_new_tokens)
        per_image.append({
            "image": str(path), "width": c.width, "height": c.height, "partitions": c.partitions,
            "vision_tokens": c.vision_tokens, "visual_tokens": c.llm_tokens,
            **{s: round(own_med[s], 3) for s in STAGES},
            "flops": {key: round(val, 4) for key, val in g.items()},
        })
    # the images' mean FLOPs against the median times of all runs (exact for one image or a
    # single-view layout, where every image costs the same)
    gflops = {key: sum(_stage_gflops(pm, k, c, prompt_tokens, cfg.max_new_tokens)[key] for c in counts)
              / len(counts) for key in ("vision", "prefill", "decode_per_token")}
    largest = max(counts, key=lambda c: c.llm_tokens)
    achieved = {
        "vision": gflops["vision"] / (med["vision_ms"] / 1e3) if med["vision_ms"] else 0.0,
        "prefill": gflops["prefill"] / (med["prefill_ms"] / 1e3) if med["prefill_ms"] else 0.0,
        "decode": gflops["decode_per_token"] / (med["decode_ms_per_token"] / 1e3)
        if med["decode_ms_per_token"] else 0.0,
    }
    peak = report.gemm_peak_gflops_per_s
    return BudgetResult(
        budget=k, backend=backend, visual_tokens=largest.llm_tokens, artifact=str(e.artifact),
        ttft_ms=med["ttft_ms"], vision_ms=med["vision_ms"], prefill_ms=med["prefill_ms"],
        preprocess_ms=med["preprocess_ms"], decode_ms_per_token=med["decode_ms_per_token"],
        tokens_per_s=1e3 / med["decode_ms_per_token"] if med["decode_ms_per_token"] else 0.0,
        p90={s: p90(v) for s, v in samples.items()}, p10={s: p10(v) for s, v in samples.items()},
        peak_rss_mb=round(mem["peak_rss_mb"], 1), rss_before_load_mb=round(mem["rss_before_load_mb"], 1),
        reduction_ms=red_ms, prompt_tokens=prompt_tokens,
        flops={key: round(val, 4) for key, val in gflops.items()},
        achieved_gflops_per_s={key: round(val, 2) for key, val in achieved.items()},
        predicted=predict(pm, device_profile, k, prompt_tokens, cfg.max_new_tokens,
                          partitions=largest.partitions, visual=largest.placeholders)
        if device_profile else None,
        token_ids=row.tokens,
        share_of_gemm_peak={key: round(val / peak, 3) for key, val in achieved.items()} if peak else {},
        per_image=per_image, method=pm.reduction.method, keep=keep,
    )


def _row_keep(pm, keep: float | None) -> float | None:
    """The keep ratio a row is labelled with: the --keeps ratio, else a dynamic-resolution
    artifact's own (its `budget` is the largest image's count, not what ran)."""
    from tokedge.layouts import layout_of

    if keep is not None:
        return 1.0 if keep >= 1.0 else pm.reduction.keep
    if not layout_of(pm).takes_max_pixels:
        return None
    if pm.reduction.keep is not None:
        return pm.reduction.keep
    return 1.0 if Stage(pm.reduction.stage) is Stage.NONE else None


def _set_fidelity(report: ProfileReport, cfg: ProfileConfig, manifest) -> None:
    """Fidelity against a full-token reference: the row at every token, else the transformers
    baseline; without either, `fidelity_note` says why there is none and how to get it."""
    full = manifest.reduction.full_tokens
    in_llm = Stage(manifest.reduction.stage) is Stage.IN_LLM
    if cfg.keeps:
        reference = next((r for r in report.results if r.keep == 1.0), None)
    else:
        reference = next((r for r in report.results if r.budget == full and not in_llm), None)
    ref_tokens = None
    if reference is not None:
        report.fidelity_reference = ("tokedge with --method none" if cfg.keeps or reference.keep is not None
                                     else f"tokedge at {full} tokens")
        ref_tokens = reference.token_ids
    elif report.baseline:
        report.fidelity_reference = "transformers baseline (all tokens), image by image"
        ref_tokens = report.baseline["token_ids"]
    if ref_tokens:
        for r in report.results:
            r.fidelity = fidelity(ref_tokens, r.token_ids)
            for j, entry in enumerate(r.per_image):
                entry["fidelity"] = fidelity(ref_tokens[j:j + 1], r.token_ids[j:j + 1])
        return
    from tokedge.layouts import layout_of

    source = cfg.checkpoint or manifest.model.source
    limit = layout_of(manifest).largest_reduced_budget()
    keeps = sorted({r.keep for r in report.results if r.keep is not None}, reverse=True)
    if keeps:  # dynamic resolution: the recorded budget is only the largest image's bound
        report.fidelity_note = (
            f"fidelity n/a: no run with every visual token to compare with; pass --baseline {source} (transformers "
            f"at all tokens) or --keeps 1,{','.join(f'{k:g}' for k in keeps)} with --checkpoint (a --method none "
            "re-export)")
        return
    if cfg.keeps:
        also = " or add 1 to --keeps (a --method none re-export)"
    elif in_llm:
        also = ""  # an in-LLM artifact at every token still runs its pruning graph: not a reference
    elif _runtime_budget(manifest, full)[0]:
        also = f" or add {full} to --budgets"
    elif limit is not None and limit < full:
        also = (f"; a {manifest.reduction.method} export of this tiled model cannot keep all {full} (it stops at "
                f"{limit}), so only --baseline gives a reference")
    else:
        also = f" or add {full} to --budgets with --checkpoint (re-exported)"
    report.fidelity_note = (f"fidelity n/a: no run with all {full} visual tokens to compare with; pass --baseline "
                            f"{source} (transformers at all tokens){also}")


def _runtime_budget(manifest, k: int) -> tuple[bool, int | None]:
    """(whether the artifact can run budget k, the runtime budget to feed: None = its own)."""
    red = manifest.reduction
    if red.budget_range and red.budget_range[0] <= k <= red.budget_range[1]:
        return True, k
    return k == red.budget, None


def _export_config(what: str, **fields):
    """The ExportConfig of a re-export, refusing in one line where export is not installed."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise UsageError(f"{what} needs a re-export, and re-exporting needs tokedge[export] (torch) installed") \
            from None
    from tokedge.export.pipeline import ExportConfig

    return ExportConfig(**fields)


def _entry_for_keep(cfg: ProfileConfig, manifest, keep: float) -> Entry:
    """The row that keeps `keep` of each image's tokens: this artifact when it does (keep 1 = an
    artifact of `--method none`), else a re-export of its method (or of none, for keep 1) from
    --checkpoint into cfg.reexport_dir."""
    from tokedge.layouts import layout_of

    red = manifest.reduction
    if not layout_of(manifest).takes_max_pixels:
        raise UsageError("--keeps applies to dynamic-resolution artifacts (Qwen-VL), whose images give different "
                         "token counts; use --budgets")
    if not 0.0 < keep <= 1.0:
        raise UsageError(f"--keeps {keep:g} is out of range: use ratios in (0, 1], 1 for all tokens (--method none)")
    full, keeps_all = keep >= 1.0, Stage(red.stage) is Stage.NONE
    if (full and keeps_all) or (red.keep is not None and abs(red.keep - keep) < 1e-9):
        return Entry(None, keep, Path(cfg.artifact), None)
    if not full and keeps_all:
        raise UsageError(f"this artifact keeps every token; to compare --keeps {keep:g}, profile an artifact of a "
                         "reduction method (e.g. --method dart --keep 0.75) with --checkpoint")
    if not cfg.checkpoint:
        raise UsageError(f"--keeps {keep:g} needs another export of this model; pass --checkpoint {manifest.model.source}"
                         " to re-export it into the report folder")
    where = cfg.reexport_dir or Path(cfg.artifact).parent
    out = where / (f"{Path(cfg.artifact).name}-none" if full else f"{Path(cfg.artifact).name}-keep-{keep:g}")
    options = () if full else tuple((key, str(v)) for key, v in red.options.items() if v not in (None, ""))
    export = _export_config(f"--keeps {keep:g}", model=cfg.checkpoint, out=out, method="none" if full else red.method,
                            keep=None if full else keep, force=True, options=options,
                            max_pixels=manifest.layout.max_pixels)
    note = f"keep {keep:g} ran a re-export from {cfg.checkpoint} ({'none' if full else red.method}) at {out}"
    return Entry(None, keep, out, None, export, note)


def _entry_for(cfg: ProfileConfig, manifest, k: int) -> Entry:
    """The row for budget k: this artifact (and the runtime budget to feed) when it can run k,
    else a re-export from --checkpoint into cfg.reexport_dir."""
    can_run, runtime = _runtime_budget(manifest, k)
    if can_run:
        return Entry(k, None, Path(cfg.artifact), runtime)
    red = manifest.reduction
    source = cfg.checkpoint or manifest.model.source
    where = cfg.reexport_dir or Path(cfg.artifact).parent
    out = where / f"{Path(cfg.artifact).name}-budget-{k}"
    export = _export_config(f"budget {k}", model=source, out=out, method=red.method, budget=k, force=True,
                            options=tuple((key, str(v)) for key, v in red.options.items() if v not in (None, "")))
    return Entry(k, None, out, None, export, f"budget {k} is outside {cfg.artifact}: ran a re-export from {source} at {out}")
