"""Acceptance of the method set: every method exports at 16 and 192 where it allows (64 is the
matrix's, tests/matrix; methods with their own two-budget tests against transformers: `COVERED`),
`tokedge verify` passes, `tokedge run --json` reports the kept count and generates; graphs have no
data-dependent ops and every constant TopK k is <= 3840 (TensorRT's limit)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tokedge.cli import main
from tokedge.reduce import METHODS

# 64 is the family x method matrix's budget on tiny-llava (tests/matrix: export, verify, run with the
# visual token count, these graph checks, and every other command), so it is not exported again here
BUDGETS = [16, 192]  # the smallest and a large budget (128 took the same paths: dropped for CI time)
NOT_ALLOWED = {("pool", 192): "perfect square", ("tome", 16): "cannot merge down"}
DATA_DEPENDENT = {"NonZero", "Unique", "Compress", "Loop", "If", "Scan"}
# `random` is cls-attn's TopK + sort over constant scores: its other budgets add ~30 s of CI and
# nothing the one budget (and tests/reduce/test_random.py's token counts) does not show;
ONE_BUDGET = {"random": 16}
# methods whose own tests export two budgets against transformers with a loop selection while the
# matrix exports, verifies and runs them at 64 with these graph checks: nothing left for this file
COVERED = {"hiprune": "tests/reduce/test_hiprune.py (64, 192)", "holov": "tests/reduce/test_holov.py (64, 128)",
           "cdpruner": "tests/reduce/test_cdpruner.py (16, 32)", "todre": "tests/reduce/test_todre.py (32, 128)",
           # tiled images only: refused on this file's LLaVA-1.5 (the matrix checks the one-line refusal)
           "globalcom2": "tests/reduce/test_globalcom2.py (292, 732 on LLaVA-NeXT)"}


def _cases():
    for name in METHODS:
        if name == "none" or METHODS[name].reduces_over_time or name in COVERED:  # video-only: refused below
            continue
        for k in [ONE_BUDGET[name]] if name in ONE_BUDGET else BUDGETS:
            yield pytest.param(name, k, id=f"{name}-{k}")


@pytest.fixture(scope="module")
def image(tmp_path_factory, test_images):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    test_images[1].save(path)
    return path


def _topk_constant_ks(path):
    model = onnx.load(path)
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            value = onnx.helper.get_attribute_value(node.attribute[0])
            consts[node.output[0]] = numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else \
                np.asarray(value)
    return model, [int(consts[n.input[1]].reshape(-1)[0]) for n in model.graph.node
                   if n.op_type == "TopK" and n.input[1] in consts]


@pytest.mark.slow
@pytest.mark.parametrize("method,budget", list(_cases()))
def test_method_exports_verifies_and_runs(method, budget, artifacts, tiny_llava_dir, image, tmp_path, capsys):
    if (method, budget) in NOT_ALLOWED:
        rc = main(["export", str(tiny_llava_dir), "--method", method, "--budget", str(budget), "--out",
                   str(tmp_path / "a")])
        assert rc == 2 and NOT_ALLOWED[(method, budget)] in capsys.readouterr().err
        return
    art = artifacts(method, budget)
    assert main(["verify", str(art), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["run", str(art), "--image", str(image), "--prompt", "What is this?", "--max-new-tokens", "4",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # vision-side methods: the vision graph's output length; in-LLM methods: read from the KV-cache
    # lengths after the pruning prefill (full prompt minus pruned tokens), so an in-LLM graph that
    # did not prune reports 576 here and fails
    assert out["visual_tokens"] == budget
    assert len(out["token_ids"]) >= 1
    assert_static_graphs(art)


def assert_static_graphs(art) -> None:
    """No data-dependent ops in any graph, every constant TopK k within TensorRT's 3840."""
    manifest = json.loads((art / "tokedge.json").read_text())
    for name, graph in manifest["graphs"].items():
        model, ks = _topk_constant_ks(art / graph["file"])
        ops = {n.op_type for n in model.graph.node}
        assert not ops & DATA_DEPENDENT, f"{name}.onnx has {ops & DATA_DEPENDENT}"
        assert all(k <= 3840 for k in ks), f"{name}.onnx TopK k {ks}"


@pytest.mark.parametrize("method", [name for name, m in METHODS.items() if m.reduces_over_time])
def test_temporal_methods_refuse_image_exports(method, tiny_llava_dir, tmp_path, capsys):
    rc = main(["export", str(tiny_llava_dir), "--method", method, "--out", str(tmp_path / "a")])
    err = capsys.readouterr().err.strip()
    needle = "reduces video tokens across frames and llava"
    assert rc == 2 and f"--method {method} " in err and needle in err and "\n" not in err
    assert not (tmp_path / "a").exists()


def test_methods_command_lists_every_method(capsys):
    assert main(["methods", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["methods"]}
    assert set(rows) == {"none", "cls-attn", "hired", "visionzip", "divprune", "vispruner", "pool", "tome", "fastv",
                         "pdrop", "dart", "evs", "dycoke", "fastvid", "holitom", "random", "hiprune", "holov", "vidcom2", "cdpruner", "todre",
                         "globalcom2"}
    assert rows["hired"]["options"]["alpha"]["default"] == 0.5
    assert rows["tome"]["stage"] == "in-vit" and rows["fastv"]["stage"] == "in-llm"
    assert rows["fastv"]["needs_attention"] and not rows["dart"]["needs_attention"]
    assert rows["fastv"]["options"]["layer"]["default"] == 2
    assert all(r["paper"] for r in rows.values())
    # the families each exports for (the matrix checks these against what export does) and the code followed
    assert rows["vidcom2"]["families"] == ["llava_onevision"] and rows["holov"]["families"] == ["llava"]
    assert rows["hiprune"]["families"] == rows["cdpruner"]["families"] == ["llava", "qwen2_5_vl", "qwen3_vl"]
    assert rows["hiprune"]["reference"] == "Danielement321/HiPrune" and rows["none"]["reference"] == "-"
    assert rows["globalcom2"]["families"] == ["llava_next"]
    assert rows["globalcom2"]["scores_with"] == ["cls-logits", "thumbnail-guide"]
