"""Quantization fidelity measured the way llama.cpp's `perplexity --kl-divergence` measures it.

A quantized artifact and its fp32 original read the same built-in text (`tokedge/data/eval_text.txt`,
written for tokedge, no chat template), teacher-forced: `rows` sequences of `context + steps` tokens
run as one batch, the first `context` tokens as the prompt, then one decode step per token, so each
of the `rows x steps` measured positions predicts the next token of the text. Per position:

- KL(P_fp32 || Q_quantized) of the next-token distributions,
- whether the top-1 tokens agree,
- the negative log-likelihood of the text's token (perplexity = exp of its mean).

Reported: mean and p99 KL, top-1 agreement, perplexity of both and its change.

The fp32 side is recorded once (`fidelity.npz` in the quantized artifact: the token ids, each
position's top-`TOP_K` fp32 token ids and log-probabilities, the fp32 NLL), so `tokedge verify` can
repeat the measure on the device with ONNX Runtime and numpy only. KL is computed over those
top-K tokens plus one bucket for the rest of the vocabulary: a lower bound of the full-vocabulary
KL that equals it when the tail holds no mass; tests/export/test_quant_real_lm.py measures the gap
on the real language model (docs/quantization.md).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

FIDELITY_FILE = "fidelity.npz"
EVAL_TEXT = "eval_text.txt"
TOP_K = 128  # fp32 tokens recorded per position


@dataclass(frozen=True)
class TextPlan:
    """How much of the built-in text is read: `rows x steps` measured positions."""

    rows: int = 8  # sequences, run as one batch
    context: int = 16  # prompt tokens of each sequence before its first measured position
    steps: int = 64  # measured positions per sequence


@dataclass(frozen=True)
class Fidelity:
    """The measure's result (data: saved in the manifest, printed by export, quantize and verify)."""

    tokens: int  # measured positions
    kl_mean: float  # mean KL(fp32 || this artifact), nats per token
    kl_p99: float
    kl_max: float
    top1: float  # share of positions whose top-1 token equals fp32's
    ppl_reference: float  # perplexity of the fp32 artifact on the text
    ppl: float  # perplexity of this artifact

    @property
    def ppl_change(self) -> float:
        return self.ppl / self.ppl_reference - 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "ppl_change": round(self.ppl_change, 6)}

    @classmethod
    def from_dict(cls, data: dict) -> Fidelity:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    def line(self) -> str:
        return (f"text ({self.tokens} tokens): KL mean {self.kl_mean:.4f}, p99 {self.kl_p99:.3f}, top-1 "
                f"{self.top1:.1%}, perplexity {self.ppl_reference:.2f} -> {self.ppl:.2f} ({self.ppl_change:+.1%})")


@dataclass(frozen=True)
class TextReference:
    """The fp32 side of the measure, as stored in `fidelity.npz`."""

    ids: np.ndarray  # [rows, context + steps] int64, the text's tokens
    context: int
    top_ids: np.ndarray  # [rows, steps, K] int32, fp32's most likely tokens per position
    top_logp: np.ndarray  # [rows, steps, K] float32, their log-probabilities
    nll: np.ndarray  # [rows, steps] float32, fp32's NLL of the text's next token

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, ids=self.ids, context=np.array(self.context), top_ids=self.top_ids,
                            top_logp=self.top_logp, nll=self.nll)
        tmp.replace(path)

    @classmethod
    def load(cls, data: bytes, unpacked_limit: int = 64 << 20) -> TextReference:
        """From an artifact's verified bytes, the unpacked size bounded before decompression."""
        from tokedge.errors import ArtifactError

        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                unpacked = sum(info.file_size for info in archive.infolist())
            if unpacked > unpacked_limit:
                raise ArtifactError(f"the artifact's {FIDELITY_FILE} unpacks to {unpacked} bytes, over the limit of "
                                    f"{unpacked_limit}; it is not a file tokedge writes")
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in ("ids", "context", "top_ids", "top_logp", "nll")}
        except (KeyError, ValueError, OSError, EOFError, zipfile.BadZipFile):
            raise ArtifactError(f"the artifact's {FIDELITY_FILE} cannot be read; re-quantize the artifact") from None
        ref = cls(ids=arrays["ids"].astype(np.int64), context=int(arrays["context"]),
                  top_ids=arrays["top_ids"].astype(np.int64), top_logp=arrays["top_logp"].astype(np.float64),
                  nll=arrays["nll"].astype(np.float64))
        rows, steps = ref.nll.shape
        if ref.ids.shape != (rows, ref.context + steps) or ref.top_ids.shape[:2] != (rows, steps) \
                or ref.top_ids.shape != ref.top_logp.shape or ref.context < 1:
            raise ArtifactError(f"the artifact's {FIDELITY_FILE} has inconsistent shapes; re-quantize the artifact")
        return ref


def eval_text() -> str:
    return resources.files("tokedge.data").joinpath(EVAL_TEXT).read_text(encoding="utf-8")


def text_ids(tokenizer_json: str, plan: TextPlan = TextPlan(), text: str | None = None) -> np.ndarray:
    """The built-in text as `plan.rows` consecutive sequences of `context + steps` tokens."""
    from tokenizers import Tokenizer

    from tokedge.errors import UsageError

    ids = Tokenizer.from_str(tokenizer_json).encode(text if text is not None else eval_text(),
                                                     add_special_tokens=False).ids
    width = plan.context + plan.steps
    if len(ids) < plan.rows * width:
        raise UsageError(f"the evaluation text gives {len(ids)} tokens, fewer than {plan.rows} x {width}")
    return np.asarray(ids[: plan.rows * width], dtype=np.int64).reshape(plan.rows, width)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _positions(graphs, ids: np.ndarray, context: int):
    """Teacher-forced log-probabilities [rows, vocab], one per measured position (the prompt's last
    logits, then one decode step per token of the text)."""
    from tokedge.runtime.driver import prefill, prepare_text, stepper

    steps = ids.shape[1] - context
    logits, state = prefill(graphs, prepare_text(graphs, ids[:, :context]), room=steps + 1)
    step = stepper(graphs, state)
    for s in range(steps):
        yield _log_softmax(logits)
        if s + 1 < steps:
            logits = step(ids[:, context + s])


def record_reference(graphs, ids: np.ndarray, context: int, top_k: int = TOP_K) -> TextReference:
    """Run the fp32 artifact over `ids` and keep what the measure needs from it."""
    rows, steps = ids.shape[0], ids.shape[1] - context
    top_ids = np.zeros((rows, steps, top_k), dtype=np.int32)
    top_logp = np.zeros((rows, steps, top_k), dtype=np.float32)
    nll = np.zeros((rows, steps), dtype=np.float32)
    for s, logp in enumerate(_positions(graphs, ids, context)):
        k = min(top_k, logp.shape[-1])
        part = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
        order = np.argsort(-np.take_along_axis(logp, part, -1), axis=-1, kind="stable")
        best = np.take_along_axis(part, order, -1)
        top_ids[:, s, :k], top_logp[:, s, :k] = best, np.take_along_axis(logp, best, -1)
        nll[:, s] = -logp[np.arange(rows), ids[:, context + s]]
    return TextReference(ids=ids, context=context, top_ids=top_ids, top_logp=top_logp, nll=nll)


def kl_top_k(ref_logp: np.ndarray, ref_ids: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """KL(P || Q) per row over P's top-K tokens plus one bucket for the rest of the vocabulary.
    `ref_logp`/`ref_ids`: [rows, K]; `logq`: [rows, vocab] log-probabilities."""
    p = np.exp(ref_logp)
    q_logp = np.take_along_axis(logq, ref_ids, -1)
    kl = (p * (ref_logp - q_logp)).sum(-1)
    p_tail = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
    q_tail = np.clip(1.0 - np.exp(q_logp).sum(-1), 1e-30, 1.0)
    tail = np.where(p_tail > 1e-12, p_tail * (np.log(np.maximum(p_tail, 1e-30)) - np.log(q_tail)), 0.0)
    return np.maximum(kl + tail, 0.0)


def measure(graphs, ref: TextReference) -> Fidelity:
    """Run this artifact over the recorded text and compare it with the recorded fp32 side."""
    rows = ref.ids.shape[0]
    kl, agree, nll = [], [], []
    for s, logq in enumerate(_positions(graphs, ref.ids, ref.context)):
        kl.append(kl_top_k(ref.top_logp[:, s], ref.top_ids[:, s], logq))
        agree.append(logq.argmax(-1) == ref.top_ids[:, s, 0])
        nll.append(-logq[np.arange(rows), ref.ids[:, ref.context + s]])
    kls = np.concatenate(kl)
    return Fidelity(tokens=int(kls.size), kl_mean=round(float(kls.mean()), 6),
                    kl_p99=round(float(np.percentile(kls, 99)), 6), kl_max=round(float(kls.max()), 6),
                    top1=round(float(np.mean(np.concatenate(agree))), 6),
                    ppl_reference=round(float(np.exp(ref.nll.mean())), 4),
                    ppl=round(float(np.exp(np.mean(np.concatenate(nll)))), 4))


def row_kl(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Full-vocabulary KL(softmax(expected) || softmax(actual)) per logits row ([..., vocab])."""
    a = _log_softmax(expected.reshape(-1, expected.shape[-1]))
    b = _log_softmax(actual.reshape(-1, actual.shape[-1]))
    return np.maximum((np.exp(a) * (a - b)).sum(-1), 0.0)


__all__ = ["FIDELITY_FILE", "Fidelity", "TextPlan", "TextReference", "eval_text", "kl_top_k",
           "measure", "record_reference", "row_kl", "text_ids"]
