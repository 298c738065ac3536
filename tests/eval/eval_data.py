"""Self-made task files in every format tokedge eval reads (no benchmark data can be downloaded):
PIL images of shapes, colours, counts and rendered text, a few examples per format."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")


def draw(shape: str, colour: str, count: int, text: str = "", size: int = 224):
    """`count` shapes of one colour on white, and optionally a word rendered below them."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    step = size // (count + 1)
    for i in range(count):
        cx, cy, r = step * (i + 1), size // 3, max(6, step // 3)
        box = (cx - r, cy - r, cx + r, cy + r)
        (d.ellipse if shape == "circle" else d.rectangle)(box, fill=COLOURS[colour])
    if text:
        d.text((size // 4, 2 * size // 3), text, fill="black")
    return img


def scenes():
    """Deterministic (shape, colour, count, word) tuples."""
    words = ("STOP", "OPEN", "EXIT", "CAFE")
    out = []
    for i in range(8):
        out.append((SHAPES[i % 2], list(COLOURS)[i % 4], 1 + i % 3, words[i % 4]))
    return out


def write_images(root: Path) -> list[tuple[str, tuple]]:
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for i, scene in enumerate(scenes()):
        name = f"scene{i}.png"
        draw(*scene).save(root / name)
        names.append((name, scene))
    return names


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# formats whose images live in their own directory, as in the real releases: pass it as `images`
IMAGE_DIRS = {"gqa": "gqa_images", "textvqa": "train_images"}


def write_tasks(root: Path, per_format: int = 4) -> dict[str, str]:
    """Every format under `root`; -> {format: --task spec}. IMAGE_DIRS: where the images of the
    GQA and TextVQA files are (`--images root/<dir>`)."""
    images = write_images(root / "images")
    sel = images[:per_format]
    specs = {}
    # POPE: JSONL with question/label/image, the real file's keys ("text" in the original files)
    pope = []
    for i, (name, (shape, colour, count, _)) in enumerate(sel):
        truth = i % 2 == 0
        asked = shape if truth else ("square" if shape == "circle" else "circle")
        pope.append({"question_id": i + 1, "image": f"images/{name}", "text": f"Is there a {asked} in the image?",
                     "label": "yes" if truth else "no", "category": "random"})
    specs["pope"] = "pope:" + str(_jsonl(root / "pope_random.json", pope))
    # MME: the release directory layout, two questions per image
    mme = root / "MME"
    for cat, (kind, pairs) in {"color": ("side", sel[:2]), "count": ("side", sel[2:per_format]),
                               "OCR": ("split", sel[:2])}.items():
        cdir = mme / cat
        img_dir = cdir / "images" if kind == "split" else cdir
        txt_dir = cdir / "questions_answers_YN" if kind == "split" else cdir
        img_dir.mkdir(parents=True, exist_ok=True)
        txt_dir.mkdir(parents=True, exist_ok=True)
        for name, (shape, colour, count, word) in pairs:
            draw(shape, colour, count, word).save(img_dir / name)
            if cat == "color":
                qs = [(f"Is the {shape} {colour}? Please answer yes or no.", "Yes"),
                      (f"Is the {shape} purple? Please answer yes or no.", "No")]
            elif cat == "count":
                qs = [(f"Are there {count} {shape}s in the image? Please answer yes or no.", "Yes"),
                      (f"Are there {count + 3} {shape}s in the image? Please answer yes or no.", "No")]
            else:
                qs = [(f'Does the image say "{word}"? Please answer yes or no.', "Yes"),
                      ('Does the image say "HELLO"? Please answer yes or no.', "No")]
            (txt_dir / (Path(name).stem + ".txt")).write_text("".join(f"{q}\t{a}\n" for q, a in qs), encoding="utf-8")
    specs["mme"] = "mme:" + str(mme)
    # GQA: the real {question id: {imageId, question, answer}} JSON, images <imageId>.jpg
    gqa_dir = root / "gqa_images"
    gqa_dir.mkdir(exist_ok=True)
    gqa = {}
    for i, (name, (shape, colour, count, _)) in enumerate(sel):
        draw(shape, colour, count).convert("RGB").save(gqa_dir / f"n{i}.jpg")
        gqa[f"q{i}"] = {"imageId": f"n{i}", "question": f"What colour is the {shape}?", "answer": colour}
    (root / "testdev_balanced_questions.json").write_text(json.dumps(gqa), encoding="utf-8")
    specs["gqa"] = f"gqa:{root / 'testdev_balanced_questions.json'}"
    # VQAv2-style JSONL: 10 human answers
    vqa = []
    for i, (name, (shape, colour, count, _)) in enumerate(sel):
        answers = [str(count)] * 7 + ["two", "many", "3"]
        vqa.append({"question_id": 100 + i, "image": f"images/{name}", "question": f"How many {shape}s are there?",
                    "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(answers)]})
    specs["vqav2"] = "vqav2:" + str(_jsonl(root / "vqav2.jsonl", vqa))
    # TextVQA: the real {"data": [...]} file, images <image_id>.jpg
    tv_dir = root / "train_images"
    tv_dir.mkdir(exist_ok=True)
    data = []
    for i, (name, (shape, colour, count, word)) in enumerate(sel):
        draw(shape, colour, count, word).convert("RGB").save(tv_dir / f"t{i}.jpg")
        data.append({"question_id": 200 + i, "image_id": f"t{i}", "question": "what word is written?",
                     "answers": [word.lower()] * 8 + [word, "sign"]})
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_name": "textvqa", "data": data}), encoding="utf-8")
    specs["textvqa"] = f"textvqa:{root / 'TextVQA_0.5.1_val.json'}"
    # multiple choice: JSONL and MMBench's TSV with base64 images
    mc, tsv = [], ["index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage"]
    for i, (name, (shape, colour, count, _)) in enumerate(sel):
        options = list(COLOURS)
        mc.append({"id": f"mc{i}", "image": f"images/{name}", "question": f"What colour is the {shape}?",
                   "options": options, "answer": "ABCD"[options.index(colour)]})
        buf = io.BytesIO()
        draw(shape, colour, count).save(buf, format="PNG")
        tsv.append("\t".join([str(i), f"What colour is the {shape}?", "nan", *options, "ABCD"[options.index(colour)],
                              "colour", base64.b64encode(buf.getvalue()).decode()]))
    specs["mc"] = "mc:" + str(_jsonl(root / "mc.jsonl", mc))
    (root / "mmbench_dev.tsv").write_text("\n".join(tsv) + "\n", encoding="utf-8")
    specs["mmbench"] = f"mc:{root / 'mmbench_dev.tsv'}"
    # generic JSONL, one line per metric
    generic = [
        {"id": "g0", "image": f"images/{sel[0][0]}", "question": "Is there a shape?", "answers": ["yes"],
         "metric": "yesno"},
        {"id": "g1", "image": f"images/{sel[1][0]}", "question": "What colour?", "answers": [sel[1][1][1]],
         "metric": "exact"},
        {"id": "g2", "image": f"images/{sel[2][0]}", "question": "How many?", "answers": [str(sel[2][1][2])] * 10,
         "metric": "vqa"},
        {"id": "g3", "image": f"images/{sel[3][0]}", "question": "Which colour?", "options": list(COLOURS),
         "answers": ["A"], "metric": "mc"},
    ]
    specs["jsonl"] = str(_jsonl(root / "generic.jsonl", generic))
    return specs
