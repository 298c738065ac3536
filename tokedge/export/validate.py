"""Parity between the exported graphs (ONNX Runtime) and the transformers reference.

The reference is computed with transformers' own modules (eager attention for scores), the
selection of the method applied to its image features; the exported graphs are run through the
same numpy client the device runtime uses. Results are data (`ParityReport`), saved in the
manifest and printed by the CLI.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from tokedge.errors import ParityError

REFERENCE_FILE = "reference.npz"
DECODE_STEPS = 2


@dataclass(frozen=True)
class Tolerance:
    """Max abs differences allowed. fp16 artifacts leave image_embeds unchecked (None): a
    selection method may pick a different patch where two scores are within fp16 rounding, which
    moves whole rows; their parity is judged on logits and greedy tokens, the diff still reported.

    Quantized artifacts are judged by the scheme's distribution-level bounds instead (logits None,
    greedy tokens not required to match), calibrated on a real language model (docs/quantization.md):
    the mean KL divergence of the image prompts' logits rows from the fp32 reference (`kl_mean`) and
    the teacher-forced measure over the built-in text (`text_*`, `tokedge.fidelity`). Artifacts
    quantized before that record the older bounds (`logit_cosine`, `top1_agreement`) and are still
    judged by them. `gated` False (random-weight presets): measured and reported, never judged."""

    image_embeds: float | None
    logits: float | None
    logit_cosine: float | None = None
    top1_agreement: float | None = None
    kl_mean: float | None = None  # image prompts: mean KL (nats) of the prefill and step logits rows
    text_kl_mean: float | None = None  # built-in text: mean KL per token
    text_kl_p99: float | None = None  # built-in text: 99th percentile of the per-token KL
    text_top1: float | None = None  # built-in text: top-1 agreement with the fp32 artifact
    gated: bool = True

    @classmethod
    def for_dtype(cls, dtype: str) -> Tolerance:
        return cls(image_embeds=1e-3, logits=1e-3) if dtype == "fp32" else cls(image_embeds=None, logits=1e-1)

    @property
    def quantized(self) -> bool:
        return self.logit_cosine is not None or self.top1_agreement is not None or self.kl_mean is not None \
            or not self.gated

    def text_failures(self, text: dict) -> list[str]:
        """What the text measure (`Fidelity.to_dict()`) misses of these bounds."""
        out = []
        if self.text_kl_mean is not None and text["kl_mean"] > self.text_kl_mean:
            out.append(f"text KL mean {text['kl_mean']:.4f} > {self.text_kl_mean:g}")
        if self.text_kl_p99 is not None and text["kl_p99"] > self.text_kl_p99:
            out.append(f"text KL p99 {text['kl_p99']:.3f} > {self.text_kl_p99:g}")
        if self.text_top1 is not None and text["top1"] < self.text_top1:
            out.append(f"text top-1 {text['top1']:.1%} < {self.text_top1:.0%}")
        return out


def tolerance_dict(tol: Tolerance) -> dict:
    """The manifest's `reference.tolerance`: float artifacts keep the two keys older readers know."""
    return {k: v for k, v in asdict(tol).items()
            if (v is not None or k in ("image_embeds", "logits")) and not (k == "gated" and v)}


def tolerance_for(dtype: str, quant=None, gated: bool = True) -> Tolerance:
    """The tolerance an artifact is validated with: by dtype, or by quantization scheme (`QuantInfo`)."""
    base = Tolerance.for_dtype(dtype)
    if quant is None:
        return base
    bounds = quant.tolerance
    return Tolerance(image_embeds=None if "vision" in quant.graphs else base.image_embeds, logits=None,
                     logit_cosine=bounds.get("logit_cosine"), top1_agreement=bounds.get("top1_agreement"),
                     kl_mean=bounds.get("kl_mean"), text_kl_mean=bounds.get("text_kl_mean"),
                     text_kl_p99=bounds.get("text_kl_p99"), text_top1=bounds.get("text_top1"), gated=gated)


@dataclass(frozen=True)
class ParityCase:
    budget: int
    batch: int
    max_abs_image_embeds: float
    max_abs_prefill_logits: float
    max_abs_step_logits: float
    tokens_match: bool
    logit_cosine: float = 1.0  # worst cosine similarity of a logits row (prefill and steps)
    top1_agreement: float = 1.0  # share of logits rows whose argmax equals the reference's
    kl_mean: float = 0.0  # mean KL(reference || artifact) of the logits rows, nats
    kl_max: float = 0.0
    label: str = ""  # which sample: "image 640x480, 2340 visual tokens" (older manifests: none, shown by budget)

    def name(self) -> str:
        return self.label or f"budget {self.budget}"

    def numbers(self, tol: Tolerance) -> str:
        logits = max(self.max_abs_prefill_logits, self.max_abs_step_logits)
        if tol.kl_mean is not None or not tol.gated:  # quantized, judged (or measured) by KL
            judged = f"KL mean {self.kl_mean:.4f} (max {self.kl_max:.3f}), top-1 {self.top1_agreement:.0%}"
        elif tol.quantized:  # quantized before KL: the older bounds
            judged = f"cosine {self.logit_cosine:.4f}, top-1 {self.top1_agreement:.0%}"
        else:
            judged = f"tokens {'match' if self.tokens_match else 'DIFFER'}"
        return f"embeds {self.max_abs_image_embeds:.2e}, logits {logits:.2e}, " + judged

    def ok(self, tol: Tolerance) -> bool:
        if not tol.gated:
            return True
        if tol.image_embeds is not None and self.max_abs_image_embeds > tol.image_embeds:
            return False
        if tol.kl_mean is not None:  # quantized, judged by KL (the text measure is judged by the report)
            return self.kl_mean <= tol.kl_mean
        if tol.logit_cosine is not None or tol.top1_agreement is not None:  # quantized before KL: older bounds
            return (self.logit_cosine >= (tol.logit_cosine or 0.0)
                    and self.top1_agreement >= (tol.top1_agreement or 0.0))
        return (tol.logits is None or max(self.max_abs_prefill_logits, self.max_abs_step_logits) <= tol.logits) \
            and self.tokens_match


@dataclass(frozen=True)
class ParityReport:
    tolerance: Tolerance
    cases: list[ParityCase] = field(default_factory=list)
    text: dict | None = None  # the text measure (`tokedge.fidelity.Fidelity.to_dict()`), quantized artifacts

    @property
    def ok(self) -> bool:
        text_ok = self.text is None or not self.tolerance.gated or not self.tolerance.text_failures(self.text)
        return all(c.ok(self.tolerance) for c in self.cases) and text_ok

    def to_dict(self) -> dict:
        return {"ok": self.ok, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> ParityReport:
        return cls(Tolerance(**data["tolerance"]), [ParityCase(**c) for c in data.get("cases", [])],
                   data.get("text"))

    @property
    def quantized(self) -> bool:
        return self.tolerance.quantized

    def bound(self) -> str:
        tol = self.tolerance
        if not tol.gated:
            return "not gated: random weights"
        if tol.kl_mean is not None:
            return f"image KL mean <= {tol.kl_mean:g}" + (
                f", text KL mean <= {tol.text_kl_mean:g}, p99 <= {tol.text_kl_p99:g}, top-1 >= {tol.text_top1:.0%}"
                if tol.text_kl_mean is not None else "")
        if tol.quantized:
            return f"cosine >= {tol.logit_cosine:g}, top-1 >= {tol.top1_agreement:.0%}"
        return f"{tol.logits:g}"

    def _text_line(self) -> list[str]:
        from tokedge.fidelity import Fidelity

        return [] if self.text is None else [Fidelity.from_dict(self.text).line()]

    def summary(self) -> str:
        """One line (error messages): every case, labelled, the text measure, then the tolerance."""
        parts = [f"{c.name()}: {c.numbers(self.tolerance)}" for c in self.cases] + self._text_line()
        return "; ".join(parts) + f" (tolerance {self.bound()})"

    def lines(self) -> list[str]:
        """For a person: a header, then one short line per case and one for the text measure."""
        n = len(self.cases)
        verdict = "within" if self.ok else "NOT within"
        head = f"{n} case{'s' if n != 1 else ''} {verdict} tolerance {self.bound()}"
        return [head, *(f"  {c.name()}: {c.numbers(self.tolerance)}" for c in self.cases),
                *(f"  {line}" for line in self._text_line())]

    def raise_if_failed(self, what: str) -> None:
        if not self.ok:
            raise ParityError(f"{what}: exported graphs disagree with the reference beyond tolerance: {self.summary()}")


def _maxabs(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def _logit_rows(case: dict[str, np.ndarray]) -> np.ndarray:
    rows = [case["prefill_logits"].reshape(-1, case["prefill_logits"].shape[-1])]
    if case["step_logits"].size:
        rows.append(case["step_logits"].reshape(-1, case["step_logits"].shape[-1]))
    return np.concatenate(rows).astype(np.float64)


def logit_agreement(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> tuple[float, float]:
    """(worst row cosine, top-1 agreement) between two cases' prefill and step logits."""
    a, b = _logit_rows(expected), _logit_rows(actual)
    if a.shape != b.shape:
        return 0.0, 0.0
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    return float(cos.min()), float(np.mean(a.argmax(-1) == b.argmax(-1)))


def logit_kl(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> tuple[float, float]:
    """(mean, max) KL(expected || actual) over the prefill and step logits rows (full vocabulary)."""
    from tokedge.fidelity import row_kl

    a, b = _logit_rows(expected), _logit_rows(actual)
    if a.shape != b.shape:
        return float("inf"), float("inf")
    kl = row_kl(a, b)
    return float(kl.mean()), float(kl.max())


def case_label(case: dict[str, np.ndarray], manifest=None) -> str:
    """Which sample a recorded case is, for a person: its image's size (tiled and dynamic layouts
    record one image per case) or its prompts, the visual tokens the vision graph gave, and the
    artifact's keep ratio or runtime budget where it has one."""
    embeds = np.asarray(case["image_embeds"])
    tokens = int(embeds.shape[-2]) if embeds.ndim >= 2 else 0
    if "image" in case:
        height, width = np.asarray(case["image"]).shape[:2]
        label = f"image {width}x{height}, {tokens} visual tokens"
    else:
        rows = int(np.asarray(case["input_ids"]).shape[0])
        label = f"{rows} prompts x 1 image, {tokens} visual tokens each" if rows > 1 else f"1 image, {tokens} visual tokens"
    red = manifest.reduction if manifest is not None else None
    if red is not None and red.keep is not None:
        label += f" (keep {red.keep:g})"
    elif red is not None and red.budget_range is not None:
        label += f" (budget {int(case['budget'])})"
    return label


def compare(expected: dict[str, np.ndarray], actual: dict[str, np.ndarray], budget: int,
            label: str = "") -> ParityCase:
    cosine, top1 = logit_agreement(expected, actual)
    kl_mean, kl_max = logit_kl(expected, actual)
    return ParityCase(
        budget=budget,
        batch=int(expected["prefill_logits"].shape[0]),
        max_abs_image_embeds=_maxabs(expected["image_embeds"], actual["image_embeds"]),
        max_abs_prefill_logits=_maxabs(expected["prefill_logits"], actual["prefill_logits"]),
        max_abs_step_logits=_maxabs(expected["step_logits"], actual["step_logits"]),
        tokens_match=bool(np.array_equal(expected["tokens"], actual["tokens"])),
        logit_cosine=round(cosine, 6),
        top1_agreement=round(top1, 4),
        kl_mean=round(kl_mean, 6),
        kl_max=round(kl_max, 6),
        label=label,
    )


# --- the recorded reference (reference.npz) ------------------------------------------------------


def save_reference(path: Path, pixel_values: np.ndarray, cases: list[dict[str, np.ndarray]]) -> None:
    arrays = {"pixel_values": pixel_values}
    for i, case in enumerate(cases):
        arrays.update({f"case{i}.{k}": np.asarray(v) for k, v in case.items()})
    tmp = path.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def load_reference(source: Path | bytes, unpacked_limit: int | None = None
                   ) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    """The recorded reference (a path tokedge just wrote, or an artifact's verified bytes). The
    arrays' unpacked size is bounded before anything is decompressed (a small hostile .npz can
    otherwise unpack to gigabytes)."""
    import io
    import zipfile

    from tokedge.errors import ArtifactError
    from tokedge.safeio import DEFAULT_LIMITS

    limit = DEFAULT_LIMITS.reference_unpacked_bytes if unpacked_limit is None else unpacked_limit
    buffer = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    try:
        try:
            with zipfile.ZipFile(buffer) as archive:
                unpacked = sum(info.file_size for info in archive.infolist())
        except zipfile.BadZipFile:
            raise ArtifactError("the artifact's reference is not a valid .npz file; re-export the artifact") from None
        if unpacked > limit:
            raise ArtifactError(f"the artifact's reference unpacks to {unpacked} bytes, over the limit of {limit}; "
                                "it is not a reference tokedge writes")
        buffer.seek(0)
        try:
            with np.load(buffer, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise ArtifactError(f"the artifact's reference cannot be read ({type(exc).__name__}); "
                                "re-export the artifact") from None
    finally:
        buffer.close()
    if "pixel_values" not in arrays:
        raise ArtifactError("the artifact's reference has no pixel_values; re-export the artifact")
    cases: dict[int, dict[str, np.ndarray]] = {}
    for key, value in arrays.items():
        if key.startswith("case"):
            try:
                idx, name = key[4:].split(".", 1)
                cases.setdefault(int(idx), {})[name] = value
            except ValueError:
                raise ArtifactError(f"the artifact's reference has an unexpected entry '{key[:40]}'") from None
    return arrays["pixel_values"], [cases[i] for i in sorted(cases)]


def image_inputs(graphs, images: list[np.ndarray]) -> list:
    """Tiled layouts: recorded uint8 images [H, W, 3] -> the runtime's per-image vision inputs
    (preprocessing and packing or candidate plan from the manifest), as `tokedge run` builds them."""
    from PIL import Image

    from tokedge.layouts import prompt_inputs

    return prompt_inputs(graphs.manifest, [Image.fromarray(np.ascontiguousarray(image), "RGB") for image in images])


def greedy_arrays(graphs, pixel_values, input_ids: np.ndarray, attention_mask: np.ndarray,
                  steps: int, budget: int | None = None) -> dict[str, np.ndarray]:
    """Prefill then `steps` greedy decode steps through `generate` (the loop `tokedge run` uses),
    without stopping at EOS; returns the arrays parity checks compare. `pixel_values`: the
    single-view batch, or the per-image inputs of a tiled layout (`image_inputs`)."""
    from tokedge.runtime.generate import SamplingConfig, generate

    gen = generate(graphs, pixel_values, input_ids, attention_mask, SamplingConfig(max_new_tokens=steps + 1),
                   budget=budget if graphs.manifest.graphs["vision"].input("budget") is not None else None,
                   stop_at_eos=False, keep_logits=True)
    batch = input_ids.shape[0]
    embeds = gen.image_embeds
    return {
        "image_embeds": embeds if isinstance(embeds, np.ndarray) else np.stack(embeds),
        "prefill_logits": gen.prefill_logits,
        "tokens": np.array(gen.token_ids, dtype=np.int64).reshape(batch, -1),
        "step_logits": np.stack(gen.step_logits, axis=1) if gen.step_logits else np.zeros((batch, 0, 0)),
    }


def run_cases(graphs, pixel_values: np.ndarray, cases: list[dict[str, np.ndarray]], tol: Tolerance) -> ParityReport:
    """Run each recorded case through the artifact's graphs and compare with its expected arrays
    (a case with an `image` entry, tiled layouts, replays that image through the runtime's own
    preprocessing and plan; the others share the recorded `pixel_values`)."""
    report = ParityReport(tolerance=tol)
    for case in cases:
        budget = int(case["budget"])
        inputs = image_inputs(graphs, [case["image"]]) if "image" in case else pixel_values  # tiled: its own image
        actual = greedy_arrays(graphs, inputs, case["input_ids"], case["attention_mask"],
                               int(case["step_logits"].shape[1]), budget)
        report.cases.append(compare(case, actual, budget, case_label(case, graphs.manifest)))
    return report
