"""Benchmark metrics, pure functions of predictions and ground truth (no I/O, no model).

Each is written from the benchmark's own definition; tests/eval/test_metrics.py checks them
against lmms-eval's scoring functions on the same predictions.

- POPE (arXiv 2305.10355, its evaluate.py): a prediction is "no" when its first sentence has the
  word "no", "No" or "not", else "yes"; accuracy, precision, recall and F1 with "yes" the positive
  class, and the yes-ratio (share of predictions that are "yes").
- MME (arXiv 2306.13394, eval_tool/calculation.py): a prediction is yes/no/other by its first
  characters; per category, acc = share of questions right and acc+ = share of images with both
  of their questions right, the category's score is 100 x (acc + acc+); perception and cognition
  are sums over their categories.
- VQA accuracy (VQAv2, TextVQA; the official vqaEval.py and EvalAI's processor): answers and
  prediction normalised (punctuation, articles, number words, contractions); for each of the 10
  leave-one-out subsets of the human answers, min(#matching / 3, 1); the mean over subsets.
- Exact match (GQA): lower case, punctuation removed, surrounding spaces dropped, then equal.
- Multiple choice (MMBench, ScienceQA): the option letter read from the prediction, equal to the
  answer letter.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np

# --- POPE -------------------------------------------------------------------------------------------


def pope_label(prediction: str) -> str:
    """"yes" or "no" as POPE's evaluation reads a free-form answer: only its first sentence counts,
    commas are dropped, and any of the words "no", "No", "not" makes it a no."""
    first = prediction.split(".")[0].replace(",", "")
    words = first.split(" ")
    return "no" if any(w in ("no", "No", "not") for w in words) else "yes"


def pope_scores(predicted: Sequence[str], truth: Sequence[str]) -> dict[str, float]:
    """Labels ("yes"/"no") -> accuracy, precision, recall, f1, yes_ratio (fractions; 0 where undefined)."""
    pairs = list(zip(predicted, truth))
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    fn = sum(p == "no" and t == "yes" for p, t in pairs)
    right = sum(p == t for p, t in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(pairs)
    return {"accuracy": right / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(p == "yes" for p, _ in pairs) / n if n else 0.0}


# --- MME --------------------------------------------------------------------------------------------

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_label(prediction: str) -> str:
    """"yes", "no" or "other": the whole answer when it is yes/no (or y/n), else whichever of
    "yes"/"no" appears in its first four characters (lower case, periods removed)."""
    text = prediction.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def mme_scores(rows: Sequence[tuple[str, str, bool]]) -> dict[str, float]:
    """rows: (category, image id, right) per question -> {perception, cognition, acc, acc_plus,
    <category>: score}. Scores in MME's points (a category: 0..200); acc and acc_plus in 0..1 over
    every question / every image of every category."""
    by_image: dict[tuple[str, str], list[bool]] = {}
    for category, image, right in rows:
        by_image.setdefault((category, image), []).append(right)
    per_category: dict[str, list[tuple[float, float]]] = {}
    for (category, _), answers in by_image.items():
        per_category.setdefault(category, []).append((sum(answers) / len(answers), float(all(answers))))
    out: dict[str, float] = {}
    for category, images in per_category.items():
        acc = sum(a for a, _ in images) / len(images)
        plus = sum(p for _, p in images) / len(images)
        out[category] = 100.0 * (acc + plus)
    out["perception"] = sum(v for k, v in out.items() if k in MME_PERCEPTION)
    out["cognition"] = sum(v for k, v in out.items() if k in MME_COGNITION)
    n_rows = len(rows)
    out["acc"] = sum(r for _, _, r in rows) / n_rows if n_rows else 0.0
    out["acc_plus"] = sum(all(a) for a in by_image.values()) / len(by_image) if by_image else 0.0
    return out


# --- VQA accuracy -----------------------------------------------------------------------------------

_STRIPPED = set(';/[]"{}()=+\\_->@`,?!<')  # VQA's punctuation list
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_DIGIT_COMMA = re.compile(r"\d,+\d")


@cache
def _contractions() -> dict[str, str]:
    from importlib.resources import files

    text = files("tokedge.data").joinpath("vqa_contractions.txt").read_text(encoding="utf-8")
    return dict(line.split(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))


def _punctuation(text: str) -> str:
    """VQA's punctuation rule: a mark is deleted where it touches a space in the answer (or when
    the answer has digits grouped by commas), else it becomes a space; a period is deleted unless a
    digit follows it (1.5 stays, "yes." loses it)."""
    glued = _DIGIT_COMMA.search(text) is not None
    out = text
    for mark in _STRIPPED:
        if mark not in out:
            continue
        delete = glued or f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if delete else " ")
    return "".join(ch for i, ch in enumerate(out) if ch != "." or (i + 1 < len(out) and out[i + 1].isdigit()))


def _words(text: str) -> str:
    """Lower case; number words as digits; articles dropped; contractions given their apostrophes."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    table = _contractions()
    return " ".join(table.get(w, w) for w in words if w not in _ARTICLES)


def vqa_normalize(answer: str, *, tokenize: bool = False) -> str:
    """An answer as VQA compares it. `tokenize` (TextVQA, EvalAI's processor) first lower-cases
    and drops commas and question marks and splits "'s" off its word."""
    text = answer
    if tokenize:
        text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _words(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str], *, tokenize: bool = False) -> float:
    """Mean over the leave-one-out subsets of the human answers of min(#subset answers equal to the
    prediction / 3, 1): with 10 answers, the 10 subsets of 9. Both sides normalised."""
    if not answers:
        return 0.0
    pred = vqa_normalize(prediction, tokenize=tokenize)
    gts = [vqa_normalize(a, tokenize=tokenize) for a in answers]
    hits = sum(g == pred for g in gts)
    # the subset without answer i holds hits - (gts[i] == pred) matches
    return float(np.mean([min(1.0, (hits - (g == pred)) / 3.0) for g in gts]))


# --- exact match (GQA) ------------------------------------------------------------------------------

_NO_PUNCT = str.maketrans("", "", string.punctuation)


def exact_normalize(text: str) -> str:
    return text.lower().translate(_NO_PUNCT).strip()


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer (GQA has one)."""
    pred = exact_normalize(prediction)
    return float(any(exact_normalize(a) == pred for a in answers))


# --- multiple choice --------------------------------------------------------------------------------


def choice_letter(prediction: str, letters: Sequence[str]) -> str:
    """The option letter a prediction names, "" when none: a letter standing alone at the start
    ("B", "B.", "(B) cat", "B: cat"), else after "answer is"/"answer:", else in parentheses, else
    the last letter standing alone as a word."""
    text = prediction.strip().strip(",.!?;:'\"").strip()
    if not text:
        return ""
    pattern = "|".join(re.escape(x) for x in letters)
    start = re.match(rf"^\(?({pattern})(?![A-Za-z])", text)
    if start:
        return start.group(1)
    phrase = re.search(rf"answer(?: is|:)\s*\(?({pattern})(?![A-Za-z])", text, re.IGNORECASE)
    if phrase:
        return phrase.group(1)
    paren = re.findall(rf"\(({pattern})\)", text)
    if paren:
        return paren[-1]
    alone = re.findall(rf"(?<![A-Za-z])({pattern})(?![A-Za-z])", text)
    return alone[-1] if alone else ""


def choice_match(prediction: str, answer: str, letters: Sequence[str]) -> float:
    return float(choice_letter(prediction, letters) == answer.strip().upper())


# --- aggregation and confidence ---------------------------------------------------------------------


@dataclass(frozen=True)
class Scored:
    """One example's outcome: `score` in 0..1 (VQA accuracy may be fractional), `label` what the
    metric read from the prediction (yes/no, a letter; "" when not used), `unit` the resampling
    unit of the bootstrap (MME: the image, whose two questions count together)."""

    score: float
    label: str = ""
    truth: str = ""
    category: str = ""
    unit: str = ""
    extra: dict = field(default_factory=dict)


Aggregate = Callable[[Sequence[Scored]], dict[str, float]]


def bootstrap_ci(rows: Sequence[Scored], aggregate: Callable[[Sequence[Scored]], float], *, seed: int = 0,
                 resamples: int = 1000, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap of `aggregate` over resampling units (rows sharing `unit` move together,
    a row with an empty unit is its own): `resamples` draws with replacement from a seeded
    generator, the (1-level)/2 and (1+level)/2 quantiles. (nan, nan) for no rows."""
    if not rows:
        return (float("nan"), float("nan"))
    groups: dict[str, list[Scored]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.unit or f"#{i}", []).append(row)
    units = list(groups.values())
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(units), size=(resamples, len(units)))
    values = np.array([aggregate([r for j in draw for r in units[j]]) for draw in draws], dtype=np.float64)
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))
