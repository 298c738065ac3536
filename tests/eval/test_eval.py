"""`tokedge eval` / `tokedge.eval.evaluate` end to end on self-made task files (tests/eval/eval_data.py):

- on a `--method none` artifact its answers equal, question by question, transformers' greedy
  `generate` on the saved preset checkpoint with the prompt built by transformers' own processor
  and chat template: LLaVA-1.5 (tiny-llava) and Qwen2.5-VL (tiny-qwen2.5-vl);
- every task format gives a well-formed result (keys, CI, FLOPs, predictions file) even on random
  weights; a bad task file is one line and exit 2 naming the file and the line;
- `tokedge eval` imports no torch;
- the lmms-eval model `tokedge` (entry point `lmms_eval.models`) runs a local lmms-eval task through
  lmms-eval's own command line (`lmms-eval --model tokedge ...`) offline and answers what `tokedge
  eval` answers.

The artifacts are the session's shared ones (tests/conftest.py): no export of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokedge.cli import main
from tokedge.eval import evaluate, load_task

from .eval_data import IMAGE_DIRS, write_tasks

KEYS = {"artifact", "artifact_sha256", "method", "budget", "task", "task_format", "metric", "score", "ci95", "n",
        "ttft_ms_median", "prefill_flops_per_example", "predictions", "metrics"}


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return root, write_tasks(root)


@pytest.fixture(scope="module")
def llava_none(artifacts):
    return artifacts("none", 576)


def _images(root: Path, fmt: str):
    return root / IMAGE_DIRS[fmt] if fmt in IMAGE_DIRS else None


# --- equal to transformers' generate -------------------------------------------------------------------


def test_llava_answers_equal_transformers_generate(llava_none, hf_tiny, tasks, tmp_path):
    import torch
    from PIL import Image

    _, specs = tasks
    model, processor = hf_tiny
    for fmt in ("pope", "mc"):  # yes/no and multiple choice (options in the prompt), 8 new tokens
        task = load_task(specs[fmt])
        result = evaluate(llava_none, task, out=tmp_path)
        for ex, rec in zip(task.examples, result.records):
            conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.prompt}]}]
            text = processor.apply_chat_template(conv, add_generation_prompt=True)
            inputs = processor(images=Image.open(ex.image).convert("RGB"), text=text, return_tensors="pt")
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=task.max_new_tokens, do_sample=False,
                                     pad_token_id=model.config.text_config.pad_token_id)
            expected = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            assert rec["prediction"] == expected, (fmt, ex.id)


def test_qwen2_5_vl_answers_equal_transformers_generate(qwen2_5_vl_artifact, hf_qwen2_5_vl, tasks, tmp_path):
    """The reference as tests/runtime/test_qwen2_5_vl_run.py builds it (transformers' AutoProcessor
    needs torchvision for its video processor): the tokenizer's chat template, `<|image_pad|>`
    expanded by the PIL image processor's grid, `mm_token_type_ids` for M-RoPE."""
    import torch
    from PIL import Image

    root, specs = tasks
    model, tok, image_processor = hf_qwen2_5_vl
    task = load_task(specs["textvqa"], images=_images(root, "textvqa"))  # VQA: 16 new tokens
    result = evaluate(qwen2_5_vl_artifact, task, out=tmp_path)
    assert result.n == len(task.examples) > 0
    for ex, rec in zip(task.examples, result.records):
        batch = image_processor(images=[Image.open(ex.image).convert("RGB")], return_tensors="pt")
        count = int(batch["image_grid_thw"][0].prod()) // 4
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.prompt}]}]
        text = tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tok(text.replace("<|image_pad|>", "<|image_pad|>" * count))["input_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 mm_token_type_ids=(ids == model.config.image_token_id).long(),
                                 pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                                 max_new_tokens=task.max_new_tokens, do_sample=False)
        expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert rec["prediction"] == expected, ex.id


# --- every format, the files, the CLI ------------------------------------------------------------------


def test_every_format_gives_a_well_formed_result(llava_none, tasks, tmp_path):
    root, specs = tasks
    for fmt, spec in specs.items():
        r = evaluate(llava_none, spec, out=tmp_path, images=_images(root, fmt.replace("mmbench", "mc")), limit=3)
        d = r.to_dict()
        assert KEYS <= set(d), fmt
        assert d["n"] == 3 and d["method"] == "none" and d["budget"] == 576
        lo, hi = d["ci95"]
        assert lo <= d["score"] <= hi, fmt
        assert d["metric"] in d["metrics"] and d["prefill_flops_per_example"] > 0 and d["ttft_ms_median"] > 0
        lines = Path(d["predictions"]).read_text().splitlines()
        assert len(lines) == 3
        assert {"id", "question", "prediction", "answers", "correct", "score"} <= set(json.loads(lines[0]))
        saved = json.loads((tmp_path / f"{llava_none.name}-{d['task']}.json").read_text())
        assert saved == json.loads(json.dumps(d))
    mme = evaluate(llava_none, specs["mme"], out=None)
    assert mme.metric == "perception" and {"color", "count", "OCR", "acc", "acc_plus"} <= set(mme.metrics)
    assert mme.n == 12 and mme.predictions is None  # 6 images x 2 questions, nothing written


def test_cli_prints_a_table_and_json(llava_none, tasks, tmp_path, capsys):
    _, specs = tasks
    assert main(["eval", str(llava_none), "--task", specs["pope"], "--limit", "2", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    head, row = out.splitlines()[:2]
    assert head.split()[:6] == ["artifact", "method", "budget", "task", "metric", "score"]
    assert row.split()[1:5] == ["none", "576", "pope-pope_random", "f1"]
    assert "weights are random" in err
    assert main(["eval", str(llava_none), "--task", specs["pope"], "--limit", "2", "--out", str(tmp_path),
                 "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)["results"]
    assert result["n"] == 2 and result["task_format"] == "pope"


@pytest.mark.parametrize(("content", "needle"), [
    ('{"question": "q", "label": "yes", "image": "images/scene0.png"}\nnot json\n', ":2: not valid JSON"),
    ('{"question": "q", "label": "maybe", "image": "images/scene0.png"}\n', ":1: label 'maybe' is not yes or no"),
    ('{"question": "q", "label": "yes", "image": "missing.png"}\n', "missing.png' does not exist"),
])
def test_a_bad_task_file_is_one_line_and_exit_2(llava_none, tasks, content, needle, capsys):
    root, _ = tasks
    bad = root / "bad.jsonl"
    bad.write_text(content)
    rc = main(["eval", str(llava_none), "--task", f"pope:{bad}", "--out", str(root / "never")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(bad) in err and needle in err, err
    assert not (root / "never").exists()


def test_eval_imports_no_torch(llava_none, tasks, tmp_path):
    _, specs = tasks
    code = ("import json, sys; from tokedge.cli import main; rc = main(sys.argv[1:]); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnx'));"
            "print(json.dumps({'rc': rc, 'heavy': heavy}))")
    proc = subprocess.run([sys.executable, "-c", code, "eval", str(llava_none), "--task", specs["pope"], "--limit",
                           "1", "--out", str(tmp_path), "--json"], capture_output=True, text=True, timeout=300, check=False)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"rc": 0, "heavy": []}, proc.stderr


# --- lmms-eval: the `tokedge` model ------------------------------------------------------------------


TASK_YAML = """task: tokedge_local_pope
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.pope_doc_to_text
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: 8
  temperature: 0
  do_sample: false
process_results: !function utils.pope_process_results
metric_list:
  - metric: pope_accuracy
    aggregation: !function utils.pope_aggregate_accuracy
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: "\\nAnswer the question using a single word or phrase."
"""

TASK_UTILS = """from PIL import Image
from lmms_eval.tasks.pope.utils import pope_aggregate_accuracy, pope_doc_to_text, pope_process_results  # noqa: F401


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]
"""


def test_lmms_eval_command_runs_a_local_task_on_an_artifact(llava_none, tasks, tmp_path):
    """`lmms-eval --model tokedge --model_args artifact=DIR --tasks T --include_path DIR`: lmms-eval's own
    command line, offline, finds the model through the entry point pyproject.toml declares
    (`lmms_eval.models`, as installed by `pip install -e .`) and runs a local task (a JSON dataset on
    disk, a task yaml beside it, lmms-eval's POPE utilities); its logged answers equal `tokedge eval`'s
    and its results hold the POPE metrics."""
    import importlib.metadata

    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (make lmms-eval)")
    if not any(e.name == "tokedge" for e in importlib.metadata.entry_points(group="lmms_eval.models")):
        pytest.skip("tokedge is not installed as a distribution here (pip install -e .): no lmms_eval.models entry")
    root, specs = tasks
    env = _local_pope_task(root, specs, tmp_path)
    command = [*LMMS_EVAL, "--model", "tokedge", "--model_args", f"artifact={llava_none}", "--tasks",
               "tokedge_local_pope", "--include_path", str(tmp_path / "task"), "--output_path", str(tmp_path / "out"),
               "--log_samples"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_lmms_output(tmp_path / "out", llava_none, specs)


def _local_pope_task(root: Path, specs: dict, where: Path) -> dict:
    """A local lmms-eval task over the self-made POPE questions: a JSON dataset on disk and a task yaml
    (lmms-eval's POPE utilities) in `where`/task; -> the environment that keeps lmms-eval offline."""
    rows = [json.loads(line) for line in Path(specs["pope"].split(":", 1)[1]).read_text().splitlines()]
    data = where / "pope.jsonl"
    data.write_text("".join(json.dumps({"question_id": r["question_id"], "question": r["text"], "answer": r["label"],
                                        "image": str(root / r["image"])}) + "\n" for r in rows))
    (where / "task").mkdir()
    (where / "task" / "tokedge_local_pope.yaml").write_text(TASK_YAML.format(data=data))
    (where / "task" / "utils.py").write_text(TASK_UTILS)
    return {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(where / "hf")}


LMMS_EVAL = [sys.executable, "-c", "import sys; from lmms_eval.cli.dispatch import main; sys.exit(main())"]


def _check_lmms_output(out: Path, artifact: Path, specs: dict) -> None:
    """lmms-eval's logged answers equal `tokedge eval`'s on the same questions; its results hold POPE's metrics."""
    (samples,) = out.rglob("*samples_tokedge_local_pope.jsonl")
    (results,) = out.rglob("*_results.json")
    logged = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda s: s["doc_id"])
    ours = evaluate(artifact, specs["pope"]).records
    assert [s["filtered_resps"] for s in logged] == [r["prediction"] for r in ours]
    assert {"pope_accuracy,none", "pope_f1_score,none"} <= set(json.loads(results.read_text())["results"]
                                                            ["tokedge_local_pope"])


def test_lmms_eval_openai_model_against_tokedge_serve(llava_none, tasks, tmp_path):
    """docs/eval.md's recipe: lmms-eval's own `openai` model (its command line) against a real `tokedge
    serve` of the artifact, on the same local task: the server's answers equal `tokedge eval`'s."""
    pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (make lmms-eval)")
    pytest.importorskip("dotenv", reason="python-dotenv (lmms-eval's openai model) is not installed (make lmms-eval)")
    from tests.serve.conftest import running_server
    from tokedge.serve.config import ServeConfig

    root, specs = tasks
    env = _local_pope_task(root, specs, tmp_path)
    with running_server(ServeConfig(artifact=llava_none, model_name="tokedge-under-test", warmup=False)) as (base, _):
        command = [*LMMS_EVAL, "--model", "openai", "--model_args",
                   f"model_version=tokedge-under-test,base_url={base}/v1,api_key=unused,num_concurrent=2",
                   "--tasks", "tokedge_local_pope", "--include_path", str(tmp_path / "task"), "--output_path",
                   str(tmp_path / "out"), "--log_samples"]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_lmms_output(tmp_path / "out", llava_none, specs)
