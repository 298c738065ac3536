"""`tokedge profile --video`: per-stage latency, tokens per frame after reduction and fidelity vs
the unreduced run, per per-video budget, as data (`VideoProfileReport`) rendered to report.json and
report.md.

The clip is decoded and preprocessed once (`video_inputs`, timed as `decode_preprocess_ms`); each
budget then runs the same frames through `generate_video` (the path `tokedge run --video` takes)
`warmup + runs` times. The unreduced run (budget = every frame token) is always profiled first and
is the fidelity reference: first-token agreement, token overlap, prefill top-1 agreement and the
largest prefill-logit difference. Timings are measurements of this machine; nothing here asserts
speed.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tokedge.errors import UsageError
from tokedge.report.machine import describe, peak_rss_mb
from tokedge.report.profile import fidelity
from tokedge.report.stats import p90, spread_warning
from tokedge.safeio import write_atomic

STAGES = ("vision_ms", "reduce_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token")
DEFAULT_SHARES = (0.5, 0.25, 0.1)  # budgets profiled by default: these shares of the video's tokens


@dataclass(frozen=True)
class VideoProfileConfig:
    artifact: Path
    video: Path  # clip file or frame directory
    frames: int | None = None  # None: the artifact's default frame count
    fps: float | None = None
    prompt: str = "Describe this video."
    budgets: tuple[int, ...] = ()  # frame tokens per video; () = every token, then DEFAULT_SHARES of them
    runs: int = 3
    warmup: int = 1
    max_new_tokens: int = 16
    threads: int = 0


@dataclass
class VideoBudgetResult:
    budget: int  # frame tokens of the video reaching the LLM (newline not counted)
    keep_share: float  # budget / (frames * tokens_per_frame)
    placeholders: int  # `<video>` tokens in the prompt
    visual_tokens: int  # video tokens the LLM's last layer attends to (newline included)
    prompt_tokens: int  # the whole prompt
    kept_per_frame: list[int] | None  # frame tokens kept per frame (None: in-LLM pruning picks inside the prefill)
    tokens_per_frame: float  # mean frame tokens per frame reaching the LLM
    medians_ms: dict[str, float]  # STAGES -> median over the timed runs
    p90_ms: dict[str, float]
    tokens_per_s: float
    peak_rss_mb: float  # the profiling process's peak so far (cumulative over the budgets run before)
    token_ids: list[int] = field(default_factory=list)
    fidelity: dict[str, float] | None = None  # vs the unreduced run


@dataclass
class VideoProfileReport:
    artifact: str
    method: str
    stage: str
    video: str
    frames: int
    frame_indices: list[int]
    tokens_per_frame: int  # before reduction
    full_tokens: int  # frames * tokens_per_frame
    prompt: str
    runs: int
    warmup: int
    max_new_tokens: int
    machine: dict
    decode_preprocess_ms: float  # decoding, sampling and preprocessing the frames (once)
    results: list[VideoBudgetResult] = field(default_factory=list)
    fidelity_reference: str = ""
    warnings: list[str] = field(default_factory=list)
    kind: str = "video"
    # what each result's peak_rss_mb is (image profiles measure each budget in a fresh process)
    memory_measure: str = "peak RSS of the profiling process so far (cumulative over the budgets run before)"
    weights: str | None = None  # manifest `weights`: "random (preset ...)" for a preset's random weights

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> VideoProfileReport:
        data = dict(data)
        data["results"] = [VideoBudgetResult(**r) for r in data.get("results", [])]
        return cls(**data)


def video_budgets(full: int, given: tuple[int, ...], reduces: bool, fixed: int | None = None) -> list[int]:
    """The unreduced budget first, then the given ones (or the default shares), largest first.
    `fixed`: a temporal method's graph keeps exactly this many (the only reduced budget)."""
    if fixed is not None:
        if set(given) - {full, fixed}:
            raise UsageError(f"this artifact's temporal graph keeps {fixed} of {full} frame tokens (fixed at export): "
                             f"--budgets {fixed} (and {full}, unreduced) only; export one artifact per budget")
        return sorted({full, fixed}, reverse=True)
    if given:
        bad = [k for k in given if not 1 <= k <= full]
        if bad:
            raise UsageError(f"--budgets {', '.join(map(str, bad))} out of range for this video: use 1..{full} "
                             "frame tokens per video")
        if not reduces and set(given) != {full}:
            raise UsageError(f"this artifact keeps every visual token (--method none): the only budget is {full}; "
                             "profile an artifact exported with a reduction method")
        return sorted({full, *given}, reverse=True)
    if not reduces:
        return [full]
    return sorted({full, *(max(1, int(share * full)) for share in DEFAULT_SHARES)}, reverse=True)


def prefill_fidelity(reference: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """Prefill logits against the unreduced run's: top-1 agreement (export validation's metric) and
    the largest absolute difference."""
    from tokedge.export.validate import logit_agreement

    empty = np.zeros((0,), dtype=np.float32)
    _, top1 = logit_agreement({"prefill_logits": reference, "step_logits": empty},
                              {"prefill_logits": logits, "step_logits": empty})
    return {"prefill_top1_agreement": top1, "max_abs_prefill_logits": float(np.max(np.abs(reference - logits)))}


def run_video_profile(cfg: VideoProfileConfig,
                      progress: Callable[[str, int, int], None] | None = None) -> VideoProfileReport:
    from tokedge.reduce.base import Stage
    from tokedge.runtime.generate import SamplingConfig, Timings
    from tokedge.runtime.ort_backend import OrtOptions, check_threads
    from tokedge.runtime.pipeline import Pipeline
    from tokedge.runtime.video_pipeline import generate_video, video_inputs, video_plan, video_record

    if cfg.runs < 1 or cfg.warmup < 0:
        raise UsageError("--runs must be >= 1 and --warmup >= 0")
    check_threads(cfg.threads)
    with Pipeline.load(cfg.artifact, options=OrtOptions(intra_op_threads=cfg.threads)) as pipe:
        manifest = pipe.manifest
        info = video_record(manifest)
        t0 = time.perf_counter()
        inputs = video_inputs(manifest, cfg.video, cfg.frames, cfg.fps)
        decode_ms = (time.perf_counter() - t0) * 1e3
        unreduced = video_plan(manifest, inputs.frames, inputs=inputs)  # the video layout counts the tokens
        full = unreduced.full
        stage = Stage(manifest.reduction.stage)
        budgets = video_budgets(full, tuple(cfg.budgets), stage is not Stage.NONE,
                                manifest.reduction.budget if stage is Stage.TEMPORAL else None)
        report = VideoProfileReport(
            artifact=str(cfg.artifact), method=manifest.reduction.method, stage=stage.value, video=str(cfg.video),
            frames=inputs.frames, frame_indices=inputs.indices.tolist(), tokens_per_frame=unreduced.tokens_per_frame,
            full_tokens=full, prompt=cfg.prompt, runs=cfg.runs, warmup=cfg.warmup,
            max_new_tokens=cfg.max_new_tokens, machine=describe(), decode_preprocess_ms=round(decode_ms, 3),
            fidelity_reference=f"the same artifact at {full} frame tokens (no reduction)", weights=manifest.weights,
        )
        sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens)
        total, done = len(budgets) * (cfg.warmup + cfg.runs), 0
        reference_tokens, reference_logits = None, None
        for k in budgets:
            plan = video_plan(manifest, inputs.frames, budget=k if stage is not Stage.NONE else None, inputs=inputs)
            enc = pipe.encoder.encode_video(cfg.prompt, info.video_token, info.video_token_id, plan.placeholders)
            samples: dict[str, list[float]] = {s: [] for s in STAGES}
            gen = None
            for i in range(cfg.warmup + cfg.runs):
                timings = Timings()
                gen = generate_video(pipe.graphs, inputs, plan, enc.input_ids, enc.attention_mask, sampling,
                                     timings=timings)
                done += 1
                if progress:
                    progress(f"budget {k}", done, total)
                if i >= cfg.warmup:
                    for s in STAGES:
                        samples[s].append(gen.reduce_ms if s == "reduce_ms" else getattr(gen.timings, s))
            assert gen is not None
            for name, key in (("TTFT", "ttft_ms"), ("decode", "decode_ms_per_token")):
                warning = spread_warning(f"budget {k} {name}", samples[key])
                if warning:
                    report.warnings.append(warning)
            med = {s: round(statistics.median(v), 3) for s, v in samples.items()}
            logits = gen.prefill_logits[0]
            if reference_tokens is None:
                reference_tokens, reference_logits = gen.token_ids[0], logits
            fid = {**fidelity([reference_tokens], [gen.token_ids[0]]), **prefill_fidelity(reference_logits, logits)}
            report.results.append(VideoBudgetResult(
                budget=plan.keep, keep_share=round(plan.keep / full, 4), placeholders=plan.placeholders,
                visual_tokens=gen.visual_tokens, prompt_tokens=int(enc.input_ids.shape[1]),
                kept_per_frame=gen.kept_per_frame, tokens_per_frame=round(plan.keep / inputs.frames, 2),
                medians_ms=med, p90_ms={s: round(p90(v), 3) for s, v in samples.items()},
                tokens_per_s=round(1e3 / med["decode_ms_per_token"], 2) if med["decode_ms_per_token"] else 0.0,
                peak_rss_mb=round(peak_rss_mb(), 1), token_ids=gen.token_ids[0], fidelity=fid,
            ))
    return report


def markdown(report: VideoProfileReport) -> str:
    from tokedge.artifact import random_weights_notice

    m = report.machine
    notice = random_weights_notice(report.weights)
    lines = [
        f"# tokedge profile --video: {Path(report.artifact).name} ({report.method}, {report.stage})",
        "",
        *([f"> **Random weights.** {notice[0].upper()}{notice[1:]}.", ""] if notice else []),
        (f"Machine: {m.get('cpu')} ({m.get('cores')} cores, {m.get('memory_gb')} GiB). Video: {report.video}, "
         f"{report.frames} frames (indices {report.frame_indices[:4]}{' ...' if report.frames > 4 else ''}), "
         f"{report.tokens_per_frame} tokens per frame before reduction ({report.full_tokens} per video). "
         f"Decode + sample + preprocess: {report.decode_preprocess_ms:.1f} ms (once). Prompt: \"{report.prompt}\"; "
         f"{report.runs} runs after {report.warmup} warm-up, {report.max_new_tokens} new tokens. "
         "Medians (p90 in brackets), milliseconds."),
        "",
        ("| budget | share | tokens/frame | prompt tokens | vision | reduction | prefill | TTFT | decode/token "
         "| tokens/s | fidelity first / overlap / prefill top-1 / max logit diff |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.results:
        f = r.fidelity or {}
        fid = (f"{f['first_token_agreement']:.2f} / {f['token_overlap']:.2f} / {f['prefill_top1_agreement']:.2f} / "
               f"{f['max_abs_prefill_logits']:.3g}") if f else "n/a"
        md, p = r.medians_ms, r.p90_ms
        lines.append(
            f"| {r.budget} | {r.keep_share:.2f} | {r.tokens_per_frame:.1f} | {r.prompt_tokens} | {md['vision_ms']:.1f} "
            f"| {md['reduce_ms']:.2f} | {md['prefill_ms']:.1f} ({p['prefill_ms']:.1f}) | {md['ttft_ms']:.1f} "
            f"({p['ttft_ms']:.1f}) | {md['decode_ms_per_token']:.2f} | {r.tokens_per_s:.1f} | {fid} |")
    per_frame = [r for r in report.results if r.kept_per_frame is not None and r.budget < report.full_tokens]
    if per_frame:
        units = len(per_frame[0].kept_per_frame or [])  # per frame, or per temporal group (Qwen-VL: pairs)
        name = "f" if units == report.frames else "g"
        lines += ["", "## Tokens per frame after reduction" if name == "f" else
                  f"## Tokens per temporal group ({report.frames // max(units, 1)} frames each) after reduction", "",
                  "| budget | " + " | ".join(f"{name}{i}" for i in range(units)) + " |",
                  "|---|" + "---|" * units]
        lines += [f"| {r.budget} | " + " | ".join(map(str, r.kept_per_frame)) + " |" for r in per_frame]
    lines += ["", f"Fidelity compares greedy output and prefill logits with {report.fidelity_reference}."]
    if report.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in report.warnings]
    return "\n".join(lines) + "\n"


def video_latency_figure(report: VideoProfileReport):
    """Top: stacked vision / reduction / prefill per budget (frame tokens per video, at their values)
    with whiskers to the TTFT p90; bottom: decode ms/token (median and p90) from 0."""
    import matplotlib.pyplot as plt

    results = sorted(report.results, key=lambda r: r.budget)
    xs = [r.budget for r in results]
    gaps = [b - a for a, b in itertools.pairwise(xs) if b > a] or [max(xs)]
    width = max(1.0, 0.6 * min(gaps))
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    bottom = [0.0] * len(results)
    for stage, color in (("vision_ms", "#3182bd"), ("reduce_ms", "#756bb1"), ("prefill_ms", "#e6550d")):
        values = [r.medians_ms[stage] for r in results]
        ax.bar(xs, values, width=width, bottom=bottom, label=stage.replace("_ms", ""), color=color)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.errorbar(xs, [r.medians_ms["ttft_ms"] for r in results],
                yerr=[[0.0] * len(results), [max(0.0, r.p90_ms["ttft_ms"] - r.medians_ms["ttft_ms"]) for r in results]],
                fmt="none", ecolor="#444444", capsize=3, label="TTFT p90")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.08)
    ax.set_ylabel("time to first token (ms)")
    ax.legend(loc="upper left", fontsize=7, frameon=False)
    ax.set_title(f"{report.method} ({report.stage}), {report.frames} frames: latency by stage (medians)")
    ax2.plot(xs, [r.medians_ms["decode_ms_per_token"] for r in results], "k.-", label="decode ms/token (median)")
    ax2.plot(xs, [r.p90_ms["decode_ms_per_token"] for r in results], "k:", linewidth=1, label="decode p90")
    ax2.set_ylim(0, ax2.get_ylim()[1] * 1.15)
    ax2.set_ylabel("decode (ms/token)")
    ax2.legend(loc="lower left", fontsize=7, frameon=False, ncol=2)
    ax2.set_xticks(xs)
    ax2.set_xticklabels([str(x) for x in xs], fontsize=8)
    ax2.set_xlim(0, max(xs) * 1.05 + 1)
    ax2.set_xlabel(f"frame tokens per video (of {report.full_tokens})")
    fig.tight_layout()
    return fig


def video_tokens_figure(report: VideoProfileReport):
    """Frame tokens kept per frame, one line per reduced budget (pre-LLM methods: the kept count of
    every frame; others: the mean per frame)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    units = report.frames
    for r in sorted(report.results, key=lambda r: -r.budget):
        counts = r.kept_per_frame if r.kept_per_frame is not None else [r.tokens_per_frame] * report.frames
        units = len(counts)  # Qwen-VL counts per temporal group (frames in pairs), the others per frame
        ax.plot(list(range(units)), counts, ".-", label=f"budget {r.budget} ({r.keep_share:.0%})")
    ax.set_ylim(0, report.tokens_per_frame * 1.08)
    ax.set_xlabel("frame" if units == report.frames else f"temporal group ({report.frames // max(units, 1)} frames each)")
    ax.set_ylabel("frame tokens reaching the LLM")
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(f"{report.method}: tokens per frame after reduction")
    fig.tight_layout()
    return fig


def video_plots(report: VideoProfileReport, out: Path) -> list[Path]:
    """latency.png and tokens.png (nothing when matplotlib is not installed or nothing was run)."""
    if not report.results:
        return []
    from tokedge.report.render import write_figures

    return write_figures(report, out, (("latency.png", video_latency_figure), ("tokens.png", video_tokens_figure)))


def write_video_report(report: VideoProfileReport, out: Path) -> list[Path]:
    """report.json, report.md, latency.png and tokens.png in `out` (each written atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, text in (("report.json", json.dumps(report.to_dict(), indent=2) + "\n"), ("report.md", markdown(report))):
        path = out / name
        write_atomic(path, text)
        files.append(path)
    return files + video_plots(report, out)


def summary_lines(report: VideoProfileReport, width: int = 80) -> list[str]:
    """Per budget one row, broken between fields to fit `width` columns (never mid-word)."""
    from tokedge.report.render import fit

    lines = []
    for r in report.results:
        same = "=" if r.fidelity and r.fidelity["first_token_agreement"] == 1 else "!="
        lines += fit([f"budget {r.budget:>5} ({r.keep_share:.0%}): {r.tokens_per_frame:.1f} tokens/frame,",
                      f"prefill {r.medians_ms['prefill_ms']:.1f} ms, TTFT {r.medians_ms['ttft_ms']:.1f} ms,",
                      f"first token {same} unreduced"], width)
    return lines
