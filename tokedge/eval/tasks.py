"""Benchmark files on disk -> `Example` records. No hub, no network: every format is read from local
files, and a line that cannot be used is refused in one line naming the file, the line and the fix
(`InputError`, exit 2).

A task is named `FORMAT:PATH` (`pope:coco_pope_random.json`), or just `PATH` for the generic JSONL
(and for an MME directory). Images are looked up relative to `images` when given, else to the
task file's directory (MME: each category's directory). Formats:

| format | file | fields |
|---|---|---|
| `pope` | POPE's JSONL (`coco_pope_{random,popular,adversarial}.json`) or a JSON list | `question`/`text`, `label`/`answer` (yes/no), `image`, `question_id`, `category` |
| `mme` | MME's release directory (`<category>/images/*.jpg` + `questions_answers_YN/*.txt`, or `<category>/*.jpg` + `*.txt` side by side), or a JSONL | `question_id` (the image), `category`, `question`, `answer` (Yes/No), `image` |
| `gqa` | GQA's `*_questions.json` (`{qid: {imageId, question, answer}}`, images `<imageId>.jpg`) or a JSONL | `question_id`, `image`, `question`, `answer` |
| `vqav2` | JSONL | `question_id`, `image`, `question`, `answers` (10 strings, or VQA's `{answer: ...}` objects) |
| `textvqa` | TextVQA's `TextVQA_0.5.1_val.json` (`{"data": [...]}`, images `<image_id>.jpg`) or a JSONL | `question_id`, `image`/`image_id`, `question`, `answers` |
| `mc` | JSONL, or MMBench's TSV (base64 images) | `id`/`index`, `image`, `question`, `options` (list or `{A: ...}`; TSV: columns A-D), `answer` (a letter), `hint` |
| `jsonl` | JSONL | `image`, `question`, `answers` (list), `metric` (`vqa`, `exact`, `yesno`, `mc`), `options` for mc, `id` |
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tokedge.errors import InputError, UsageError

FORMATS = ("pope", "mme", "gqa", "vqav2", "textvqa", "mc", "jsonl")
METRICS = ("yesno", "mme", "exact", "vqa", "textvqa", "mc")
TASK_FILE_BYTES = 512 << 20  # a task file larger than this is refused (the real ones are < 100 MiB)

SHORT = "\nAnswer the question using a single word or phrase."  # lmms-eval's post_prompt for short answers
LETTER = "\nAnswer with the option's letter from the given choices directly."  # MMBench, ScienceQA
MME_ASK = " Please answer yes or no."  # in MME's questions; lmms-eval replaces it with SHORT


@dataclass(frozen=True)
class Example:
    """One question. `image` a path or a decoded PIL image (MMBench TSV); `prompt` what the model
    is asked (question + the task's suffix, options for multiple choice); `answers` the ground
    truth (yes/no, a letter, or the human answers); `group` the resampling unit (MME: the image);
    `metric` one of METRICS."""

    id: str
    image: object
    question: str
    prompt: str
    answers: tuple[str, ...]
    metric: str
    category: str = ""
    group: str = ""
    letters: tuple[str, ...] = ()
    source: str = ""  # "file:line", for messages


@dataclass(frozen=True)
class Task:
    """A task read from disk: its name (for file names), format, main metric, how many new tokens
    its answers need, and its examples."""

    name: str
    format: str
    path: Path
    examples: list[Example]
    max_new_tokens: int
    metric: str  # the main metric's name in the result (f1, perception, accuracy, vqa_accuracy...)
    extra: dict = field(default_factory=dict)


def parse_spec(spec: str) -> tuple[str, Path]:
    """`FORMAT:PATH` or `PATH` -> (format, path). A bare path is the generic JSONL, or MME when
    it is a directory."""
    head, sep, rest = spec.partition(":")
    if sep and head in FORMATS:
        return head, Path(rest)
    path = Path(spec)
    if sep and not path.exists() and "/" not in head and "\\" not in head:
        raise UsageError(f"--task '{spec}': unknown format '{head}'; use one of {', '.join(FORMATS)} as FORMAT:PATH")
    return ("mme" if path.is_dir() else "jsonl"), path


def load_task(spec: str | Path, *, images: Path | str | None = None, limit: int | None = None) -> Task:
    """Read a task (see the module docstring for the formats). `limit`: the first N examples."""
    fmt, path = parse_spec(str(spec))
    if not path.exists():
        raise InputError(f"task file '{path}' does not exist; pass --task FORMAT:PATH to a local file "
                         "(docs/eval.md, 'Real benchmark files')")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be >= 1 (got {limit})")
    root = Path(images) if images is not None else None
    reader = _READERS[fmt]
    examples: list[Example] = []
    for ex in reader(path, root):
        examples.append(ex)
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise InputError(f"task file '{path}' holds no examples; check the file and its format ({fmt})")
    name = path.stem if path.is_file() else path.name
    metric = {"pope": "f1", "mme": "perception", "gqa": "exact_match", "vqav2": "vqa_accuracy",
              "textvqa": "vqa_accuracy", "mc": "accuracy", "jsonl": "score"}[fmt]
    if fmt == "mme" and not any(e.category in _perception() for e in examples):
        metric = "cognition"
    tokens = {"pope": 8, "mme": 8, "mc": 8}.get(fmt, 16)
    if fmt == "jsonl" and all(e.metric in ("yesno", "mc") for e in examples):
        tokens = 8
    return Task(name=f"{fmt}-{name}", format=fmt, path=path, examples=examples, max_new_tokens=tokens, metric=metric)


def _perception():
    from tokedge.eval.metrics import MME_PERCEPTION

    return MME_PERCEPTION


# --- reading ----------------------------------------------------------------------------------------


def _fail(where: str, what: str, fix: str) -> InputError:
    return InputError(f"{where}: {what}; {fix}")


def _read_text(path: Path) -> str:
    try:
        if path.stat().st_size > TASK_FILE_BYTES:
            raise InputError(f"task file '{path}' is larger than {TASK_FILE_BYTES >> 20} MiB; split it or pass --limit "
                             "on a smaller file")
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"task file '{path}' is not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise InputError(f"task file '{path}' cannot be read: {exc.strerror or exc}") from None


def _records(path: Path, fix: str) -> Iterator[tuple[str, dict]]:
    """(where, object) for each record of a JSONL file, or of a JSON file holding a list (or a
    {"data": [...]} / {"questions": [...]} object, or a {id: record} mapping)."""
    text = _read_text(path)
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("["):
            raise _fail(f"{path}:{exc.lineno}", f"not valid JSON ({exc.msg})", fix) from None
        whole = None  # JSON lines
    if isinstance(whole, dict):
        for key in ("data", "questions", "annotations"):
            if isinstance(whole.get(key), list):
                whole = whole[key]
                break
        else:
            if whole and all(isinstance(v, dict) for v in whole.values()):  # GQA: {question id: record}
                whole = [{"question_id": k, **v} for k, v in whole.items()]
            else:
                whole = None  # one JSON line
    if whole is not None:
        if not isinstance(whole, list):
            raise _fail(str(path), "is JSON but not a list of records", fix)
        for i, rec in enumerate(whole):
            if not isinstance(rec, dict):
                raise _fail(f"{path} record {i + 1}", "is not an object", fix)
            yield f"{path} record {i + 1}", rec
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _fail(f"{path}:{n}", f"not valid JSON ({exc.msg})", fix) from None
        if not isinstance(rec, dict):
            raise _fail(f"{path}:{n}", "is not a JSON object", fix)
        yield f"{path}:{n}", rec


def _field(rec: dict, names: tuple[str, ...], where: str, fix: str, kind=str):
    for name in names:
        value = rec.get(name)
        if value is not None:
            if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, kind):
                raise _fail(where, f"field '{name}' is a {type(value).__name__}, not a {kind.__name__}", fix)
            return value
    raise _fail(where, f"has no '{names[0]}' field" + (f" (or {', '.join(names[1:])})" if names[1:] else ""), fix)


def _image(value: str, base: Path, root: Path | None, where: str) -> Path:
    path = Path(value)
    if not path.is_absolute():
        path = (root or base) / path
    if not path.is_file():
        raise _fail(where, f"image '{path}' does not exist",
                    "pass --images DIR (the directory the image names are relative to) or fix the name")
    return path


def _read_pope(path: Path, root: Path | None) -> Iterator[Example]:
    fix = "POPE lines need question (or text), label (or answer: yes/no) and image (docs/eval.md)"
    for i, (where, rec) in enumerate(_records(path, fix)):
        question = _field(rec, ("question", "text"), where, fix)
        label = _field(rec, ("label", "answer"), where, fix).strip().lower()
        if label not in ("yes", "no"):
            raise _fail(where, f"label '{label}' is not yes or no", fix)
        image = _image(_field(rec, ("image",), where, fix), path.parent, root, where)
        qid = str(rec.get("question_id", i + 1))
        yield Example(id=qid, image=image, question=question, prompt=question.strip() + SHORT, answers=(label,),
                      metric="yesno", category=str(rec.get("category", "")), source=where)


def _read_mme(path: Path, root: Path | None) -> Iterator[Example]:
    if path.is_file():
        fix = "MME lines need question_id (the image), category, question, answer (Yes/No) and image"
        for i, (where, rec) in enumerate(_records(path, fix)):
            image = _image(_field(rec, ("image",), where, fix), path.parent, root, where)
            yield _mme_example(rec, where, fix, image, i)
        return
    fix = "an MME directory holds <category>/images + questions_answers_YN, or <category>/*.jpg with *.txt beside"
    categories = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not categories:
        raise _fail(str(path), "holds no category directories", fix)
    for cat in categories:
        texts = cat / "questions_answers_YN"
        pictures = cat / "images" if texts.is_dir() else cat
        if not texts.is_dir():
            texts = cat
        for txt in sorted(texts.glob("*.txt")):
            image = next((p for p in sorted(pictures.glob(txt.stem + ".*")) if p.suffix.lower() != ".txt"), None)
            if image is None:
                raise _fail(str(txt), f"has no image named {txt.stem}.* in '{pictures}'", fix)
            for n, line in enumerate(_read_text(txt).splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.split("\t")
                if len(parts) < 2:
                    raise _fail(f"{txt}:{n}", "is not 'question<TAB>answer'", fix)
                rec = {"question_id": f"{cat.name}/{image.name}", "category": cat.name, "question": parts[0],
                       "answer": parts[1]}
                yield _mme_example(rec, f"{txt}:{n}", fix, image, n)


def _mme_example(rec: dict, where: str, fix: str, image: Path, index: int) -> Example:
    question = _field(rec, ("question",), where, fix)
    answer = _field(rec, ("answer",), where, fix).strip().lower().replace(".", "")
    if answer not in ("yes", "no"):
        raise _fail(where, f"answer '{answer}' is not Yes or No", fix)
    category = _field(rec, ("category",), where, fix)
    group = _field(rec, ("question_id", "image"), where, fix)
    prompt = question.strip().replace(MME_ASK, "") + SHORT
    return Example(id=f"{group}#{index}", image=image, question=question, prompt=prompt,
                   answers=(answer,), metric="mme", category=category, group=f"{category}/{group}", source=where)


def _read_gqa(path: Path, root: Path | None) -> Iterator[Example]:
    fix = "GQA records need question, answer and imageId (or image) (docs/eval.md)"
    for i, (where, rec) in enumerate(_records(path, fix)):
        question = _field(rec, ("question",), where, fix)
        answer = _field(rec, ("answer",), where, fix)
        name = rec.get("image") or (f"{rec['imageId']}.jpg" if rec.get("imageId") is not None else None)
        if name is None:
            raise _fail(where, "has no 'image' or 'imageId' field", fix)
        yield Example(id=str(rec.get("question_id", i + 1)), image=_image(str(name), path.parent, root, where),
                      question=question, prompt=question + SHORT, answers=(answer,), metric="exact", source=where)


def _answers(rec: dict, where: str, fix: str) -> tuple[str, ...]:
    raw = rec.get("answers")
    if not isinstance(raw, list) or not raw:
        raise _fail(where, "has no 'answers' list", fix)
    out = []
    for a in raw:
        a = a.get("answer") if isinstance(a, dict) else a
        if not isinstance(a, (str, int, float)) or isinstance(a, bool):
            raise _fail(where, "an entry of 'answers' is not a string (or an {answer: ...} object)", fix)
        out.append(str(a))
    return tuple(out)


def _read_vqa(path: Path, root: Path | None, textvqa: bool) -> Iterator[Example]:
    name = "TextVQA" if textvqa else "VQAv2"
    fix = f"{name} records need question, answers (the 10 human answers) and image (or image_id) (docs/eval.md)"
    for i, (where, rec) in enumerate(_records(path, fix)):
        question = _field(rec, ("question",), where, fix)
        image = rec.get("image") or (f"{rec['image_id']}.jpg" if rec.get("image_id") is not None else None)
        if image is None:
            raise _fail(where, "has no 'image' or 'image_id' field", fix)
        # TextVQA's lmms-eval prompt capitalises the question's first letter (and lowers the rest)
        prompt = (question.capitalize() if textvqa else question) + SHORT
        yield Example(id=str(rec.get("question_id", i + 1)), image=_image(str(image), path.parent, root, where),
                      question=question, prompt=prompt, answers=_answers(rec, where, fix),
                      metric="textvqa" if textvqa else "vqa", source=where)


def options_prompt(question: str, options: list[str], hint: str = "") -> tuple[str, tuple[str, ...]]:
    """MMBench / ScienceQA's prompt: the hint, the question, "A. option" lines, the letter instruction."""
    letters = tuple(chr(ord("A") + i) for i in range(len(options)))
    lines = "\n".join(f"{letter}. {text}" for letter, text in zip(letters, options))
    context = f"{hint}\n" if hint else ""
    return f"{context}{question}\n{lines}{LETTER}", letters


def _mc_options(rec: dict, where: str, fix: str) -> list[str]:
    raw = rec.get("options")
    if isinstance(raw, dict):
        keys = sorted(k for k in raw if isinstance(k, str) and len(k) == 1 and k.isalpha())
        raw = [raw[k] for k in keys]
    elif raw is None:  # MMBench columns
        raw = [rec[k] for k in "ABCDEFGH" if isinstance(rec.get(k), str) and rec[k].strip() and rec[k] != "nan"]
    if not isinstance(raw, list) or len(raw) < 2 or not all(isinstance(o, str) for o in raw):
        raise _fail(where, "needs at least two 'options' (a list of strings or {A: ..., B: ...})", fix)
    return raw


def _mc_example(rec: dict, where: str, fix: str, image, i: int) -> Example:
    question = _field(rec, ("question",), where, fix)
    options = _mc_options(rec, where, fix)
    hint = rec.get("hint") if isinstance(rec.get("hint"), str) and rec.get("hint") != "nan" else ""
    prompt, letters = options_prompt(question, options, hint or "")
    answer = _field(rec, ("answer",), where, fix).strip().upper()
    if answer not in letters:
        raise _fail(where, f"answer '{answer}' is not one of the option letters {', '.join(letters)}", fix)
    return Example(id=str(rec.get("id", rec.get("index", i + 1))), image=image, question=question, prompt=prompt,
                   answers=(answer,), metric="mc", category=str(rec.get("category", "")), letters=letters,
                   source=where)


def _read_mc(path: Path, root: Path | None) -> Iterator[Example]:
    fix = "multiple-choice records need image, question, options and answer (a letter) (docs/eval.md)"
    if path.suffix.lower() == ".tsv":
        yield from _read_mmbench_tsv(path, fix)
        return
    for i, (where, rec) in enumerate(_records(path, fix)):
        image = _image(_field(rec, ("image",), where, fix), path.parent, root, where)
        yield _mc_example(rec, where, fix, image, i)


def _read_mmbench_tsv(path: Path, fix: str) -> Iterator[Example]:
    import csv

    from PIL import Image

    rows = csv.DictReader(io.StringIO(_read_text(path)), delimiter="\t")
    for i, rec in enumerate(rows):
        where = f"{path}:{i + 2}"
        data = _field(rec, ("image",), where, fix)
        try:
            image = Image.open(io.BytesIO(base64.b64decode(data, validate=False)))
            image.load()
        except Exception:  # noqa: BLE001 - any undecodable cell is the same input error
            raise _fail(where, "its 'image' column is not a base64-encoded image", fix) from None
        yield _mc_example(dict(rec), where, fix, image.convert("RGB"), i)


def _read_jsonl(path: Path, root: Path | None) -> Iterator[Example]:
    fix = "generic lines need image, question, answers (a list) and metric (vqa, exact, yesno or mc) (docs/eval.md)"
    for i, (where, rec) in enumerate(_records(path, fix)):
        metric = _field(rec, ("metric",), where, fix)
        if metric not in ("vqa", "exact", "yesno", "mc"):
            raise _fail(where, f"metric '{metric}' is not one of vqa, exact, yesno, mc", fix)
        image = _image(_field(rec, ("image",), where, fix), path.parent, root, where)
        if metric == "mc":
            rec = {**rec, "answer": rec.get("answer") or (_answers(rec, where, fix)[0])}
            yield _mc_example(rec, where, fix, image, i)
            continue
        question = _field(rec, ("question",), where, fix)
        answers = _answers(rec, where, fix)
        if metric == "yesno" and answers[0].strip().lower() not in ("yes", "no"):
            raise _fail(where, f"a yesno answer must be yes or no (got '{answers[0]}')", fix)
        if metric == "yesno":
            answers = (answers[0].strip().lower(),)
        suffix = rec["suffix"] if isinstance(rec.get("suffix"), str) else SHORT
        yield Example(id=str(rec.get("id", i + 1)), image=image, question=question, prompt=question + suffix,
                      answers=answers, metric=metric, category=str(rec.get("category", "")), source=where)


_READERS = {
    "pope": _read_pope, "mme": _read_mme, "gqa": _read_gqa, "mc": _read_mc, "jsonl": _read_jsonl,
    "vqav2": lambda p, r: _read_vqa(p, r, textvqa=False), "textvqa": lambda p, r: _read_vqa(p, r, textvqa=True),
}
