"""`evaluate`: an artifact through the device runtime (`Pipeline`, the code of `tokedge run`; no
torch) over a local task, scored with the benchmark's metric. Results are data (`EvalResult`,
saved as JSON beside a predictions JSONL); renderers read those."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tokedge.eval import metrics as m
from tokedge.eval.tasks import Example, Task, load_task

if TYPE_CHECKING:
    from tokedge.runtime.backends import Backend

SCHEMA = 1
RESAMPLES = 1000  # bootstrap draws for the 95% interval


@dataclass
class EvalResult:
    """One artifact on one task. Stable keys (`to_dict`, schema 1; keys are only ever added):

    artifact             the artifact directory (as given)
    artifact_sha256      sha256 of its manifest (tokedge.json): which export this was
    method, budget       the reduction method and budget the manifest records (keep: `keep`)
    task, task_format    the task's name (FORMAT-STEM) and format (pope, mme, gqa, vqav2, textvqa, mc, jsonl)
    metric, score        the main metric's name and value (pope: f1; mme: perception, or cognition
                         when the task has no perception category, in MME points; gqa: exact_match;
                         vqav2/textvqa: vqa_accuracy; mc: accuracy; jsonl: score, the mean of each line's
                         metric); fractions in 0..1 except MME's points
    ci95                 [lo, hi] percentile bootstrap of `score` (1000 draws, `seed`; MME resamples images)
    n                    examples scored
    metrics              every sub-metric (pope: accuracy, precision, recall, f1, yes_ratio; mme:
                         perception, cognition, acc, acc_plus and each category's score; ...)
    ttft_ms_median       median time to first token per example (ms)
    prefill_flops_per_example   mean analytic prefill FLOPs per example (tokedge.report.flops)
    predictions          path of the predictions JSONL (id, question, prediction, answers, correct,
                         score, label), or None when nothing was written
    weights              the manifest's weights note ("random (preset ...)") or None
    backend, seed, max_new_tokens, elapsed_s, schema
    """

    artifact: str
    artifact_sha256: str
    method: str
    budget: int | None
    keep: float | None
    task: str
    task_format: str
    metric: str
    score: float
    ci95: tuple[float, float]
    n: int
    metrics: dict[str, float]
    ttft_ms_median: float
    prefill_flops_per_example: float
    predictions: str | None
    weights: str | None = None
    backend: str = "onnxruntime"
    seed: int = 0
    max_new_tokens: int = 16
    elapsed_s: float = 0.0
    schema: int = SCHEMA
    records: list[dict] = field(default_factory=list, repr=False)  # per example; not in to_dict

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("records")
        d["ci95"] = list(self.ci95)
        return d

    @classmethod
    def from_dict(cls, data: dict) -> EvalResult:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "records"}
        known["ci95"] = tuple(known.get("ci95") or (float("nan"), float("nan")))
        return cls(**known)

    @classmethod
    def load(cls, path: Path | str) -> EvalResult:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def evaluate(artifact: Path | str, task: str | Path | Task, *, limit: int | None = None,
             backend: str | Backend = "onnxruntime", out: Path | str | None = None, seed: int = 0,
             images: Path | str | None = None, max_new_tokens: int | None = None,
             on_example: Callable[[int, int], None] | None = None) -> EvalResult:
    """Run `artifact` over `task` and score it.

    artifact: an artifact directory (`tokedge export`); opened with `Pipeline.load(artifact, backend)`,
        hashes checked; `backend` a name or a full `Backend` choice (engines for "tensorrt").
    task: `FORMAT:PATH`, a generic JSONL path, or a `Task` from `load_task` (read once, reused).
    limit: the first N examples. images: the directory image names are relative to (default: the
        task file's). max_new_tokens: default the task's (8 for yes/no and multiple choice, 16 else).
    out: a directory; writes `<artifact>-<task>.json` (the result) and
        `<artifact>-<task>.predictions.jsonl` atomically (created when missing; <artifact> is the
        directory's name, so artifacts of the same name in different places need different `out`). None: nothing is written (`predictions` is None).
    seed: the bootstrap's. Greedy decoding, batch 1, one example at a time.
    on_example(done, total): progress after each example.
    -> EvalResult (see its docstring for the keys)."""
    from PIL import Image

    from tokedge.runtime.pipeline import Pipeline
    from tokedge.runtime.preprocess import load_image

    started = time.perf_counter()
    if not isinstance(task, Task):
        task = load_task(task, images=images, limit=limit)
    elif limit is not None:
        task = dataclasses.replace(task, examples=task.examples[:limit])
    tokens = max_new_tokens or task.max_new_tokens
    with Pipeline.load(artifact, backend=backend) as pipe:
        sha = pipe.manifest_sha256
        predictions, ttfts, flops = [], [], []
        for i, ex in enumerate(task.examples):
            image = ex.image if isinstance(ex.image, Image.Image) else load_image(str(ex.image))
            result = pipe.generate(image, ex.prompt, max_new_tokens=tokens)  # greedy (temperature 0)
            predictions.append(result.text)
            ttfts.append(result.timings.ttft_ms)
            flops.append(_prefill_flops(pipe, ex, image))
            if on_example is not None:
                on_example(i + 1, len(task.examples))
        manifest = pipe.manifest
    scored = [score_example(ex, p) for ex, p in zip(task.examples, predictions)]
    subs = aggregate(task, scored)
    main = task.metric
    ci = m.bootstrap_ci(scored, lambda rows: aggregate(task, rows)[main], seed=seed, resamples=RESAMPLES)
    red = manifest.reduction
    result = EvalResult(
        artifact=str(artifact), artifact_sha256=sha, method=red.method, budget=red.budget, keep=red.keep,
        task=task.name, task_format=task.format, metric=main, score=subs[main], ci95=ci, n=len(scored),
        metrics=subs, ttft_ms_median=float(statistics.median(ttfts)) if ttfts else 0.0,
        prefill_flops_per_example=float(sum(flops) / len(flops)) if flops else 0.0, predictions=None,
        weights=manifest.weights, backend=backend if isinstance(backend, str) else backend.name, seed=seed,
        max_new_tokens=tokens,
        records=[_record(ex, p, s) for ex, p, s in zip(task.examples, predictions, scored)])
    result.elapsed_s = time.perf_counter() - started
    if out is not None:
        write_result(result, Path(out))
    return result


def score_example(ex: Example, prediction: str) -> m.Scored:
    """One prediction scored by its example's metric (see tokedge.eval.metrics)."""
    truth = ex.answers[0]
    if ex.metric == "yesno":
        label = m.pope_label(prediction)
        return m.Scored(float(label == truth), label=label, truth=truth, category=ex.category, unit=ex.group)
    if ex.metric == "mme":
        label = m.mme_label(prediction)
        return m.Scored(float(label == truth), label=label, truth=truth, category=ex.category, unit=ex.group)
    if ex.metric == "mc":
        label = m.choice_letter(prediction, ex.letters)
        return m.Scored(float(label == truth), label=label, truth=truth, category=ex.category, unit=ex.group)
    if ex.metric == "exact":
        return m.Scored(m.exact_match(prediction, ex.answers), category=ex.category, unit=ex.group)
    return m.Scored(m.vqa_accuracy(prediction, ex.answers, tokenize=ex.metric == "textvqa"), category=ex.category,
                    unit=ex.group)


def aggregate(task: Task, rows: Sequence[m.Scored]) -> dict[str, float]:
    """The task's metrics over scored rows (the bootstrap calls it on resamples)."""
    n = len(rows)
    mean = sum(r.score for r in rows) / n if n else 0.0
    if task.format == "pope":
        return m.pope_scores([r.label for r in rows], [r.truth for r in rows])
    if task.format == "mme":
        return m.mme_scores([(r.category, r.unit, r.score == 1.0) for r in rows])
    if task.format == "gqa":
        return {"exact_match": mean}
    if task.format in ("vqav2", "textvqa"):
        return {"vqa_accuracy": mean}
    if task.format == "mc":
        return {"accuracy": mean}
    return {"score": mean}


def _record(ex: Example, prediction: str, s: m.Scored) -> dict:
    rec = {"id": ex.id, "question": ex.question, "prediction": prediction, "answers": list(ex.answers),
           "correct": s.score == 1.0, "score": s.score}
    if s.label:
        rec["label"] = s.label
    if ex.category:
        rec["category"] = ex.category
    return rec


def _prefill_flops(pipe, ex: Example, image) -> float:
    """Analytic prefill FLOPs of one example: its text tokens plus the visual tokens its image
    puts in the prompt (tokedge.report.flops.prefill_cost; in-LLM methods prune inside it)."""
    from tokedge.report.flops import prefill_cost
    from tokedge.report.profile import image_counts

    counts = image_counts(pipe.manifest, image, None)
    from tokedge.layouts import layout_of

    enc = pipe.encoder.encode([ex.prompt], [layout_of(pipe.manifest).placeholder(counts.placeholders)])
    text_tokens = int(enc.attention_mask.sum()) - counts.placeholders
    return prefill_cost(pipe.manifest, text_tokens, counts.placeholders).flops


def result_stem(result: EvalResult) -> str:
    return f"{Path(result.artifact).name}-{result.task}"


def write_result(result: EvalResult, out: Path) -> None:
    """`out/<stem>.predictions.jsonl` then `out/<stem>.json`, each written atomically."""
    from tokedge.safeio import write_atomic

    out.mkdir(parents=True, exist_ok=True)
    stem = result_stem(result)
    preds = out / f"{stem}.predictions.jsonl"
    write_atomic(preds, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.records))
    result.predictions = str(preds)
    write_atomic(out / f"{stem}.json", json.dumps(result.to_dict(), indent=2) + "\n")
