"""Every graph pass: ONNX Runtime outputs before and after agree, the expected pattern fired, and a
near-miss graph is left alone. Plus: exported artifacts of every pre-LLM method carry no expanded
selection index, `tokedge optimize` re-checks parity, `tokedge check` passes clean artifacts."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from tokedge.cli import main
from tokedge.export.passes import run_passes
from tokedge.reduce.select import gather_tokens, topk_sorted


def _trace(module, example, tmp_path, name="m") -> ir.Model:
    path = tmp_path / f"{name}.onnx"
    torch.onnx.export(module, example, str(path), dynamo=False, input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "b"}}, opset_version=17)
    return ir.load(path)


def _run(model: ir.Model, tmp_path, feed, name="run"):
    path = tmp_path / f"{name}.onnx"
    ir.save(model, path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)


def _ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph.all_nodes()]


class Select(torch.nn.Module):
    def __init__(self, k, axis=1):
        super().__init__()
        self.k, self.axis = k, axis

    def forward(self, x):
        idx = topk_sorted(x.mean(-1), self.k)
        if self.axis == 1:
            return gather_tokens(x, idx)
        # near miss: the index is unsqueezed in the middle, not the last axis
        return x.gather(1, idx.unsqueeze(1).expand(-1, x.shape[1], -1)[:, : self.k])


def test_fuse_selection_fires_and_agrees(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 30, 8)).astype(np.float32)
    model = _trace(Select(7), (torch.from_numpy(x),), tmp_path)
    before = _run(model, tmp_path, {"x": x}, "before")
    assert run_passes(model, ["fuse-selection"]) == {"fuse-selection": 1}
    ops = _ops(model)
    assert "GatherND" in ops and "GatherElements" not in ops and "Expand" not in ops
    np.testing.assert_array_equal(_run(model, tmp_path, {"x": x}, "after")[0], before[0])


def test_fuse_selection_leaves_near_miss(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 30, 30)).astype(np.float32)
    model = _trace(Select(7, axis=2), (torch.from_numpy(x),), tmp_path)
    before = _run(model, tmp_path, {"x": x}, "before")
    assert run_passes(model, ["fuse-selection"]) == {"fuse-selection": 0}
    np.testing.assert_array_equal(_run(model, tmp_path, {"x": x}, "after")[0], before[0])


def _gather_graph(indices_from_topk: bool) -> ir.Model:
    nodes = []
    if indices_from_topk:
        nodes.append(helper.make_node("TopK", ["x", "k"], ["vals", "idx"], axis=1))
        index = "idx"
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 10])]
    else:
        index = "ids"
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 10]),
                  helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 3])]
    nodes.append(helper.make_node("GatherElements", ["x", index], ["y"], axis=1))
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor("k", TensorProto.INT64, [1], [3])])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9))


def test_indices_int32(tmp_path):
    x = np.random.default_rng(1).standard_normal((2, 10)).astype(np.float32)
    model = _gather_graph(True)
    before = _run(model, tmp_path, {"x": x}, "before")
    assert run_passes(model, ["indices-int32"]) == {"indices-int32": 1}
    cast = next(n for n in model.graph.all_nodes() if n.op_type == "Cast")
    assert cast.attributes["to"].value == ir.DataType.INT32
    np.testing.assert_array_equal(_run(model, tmp_path, {"x": x}, "after")[0], before[0])
    near = _gather_graph(False)  # indices from a graph input: bounds unknown, left as int64
    assert run_passes(near, ["indices-int32"]) == {"indices-int32": 0}


def _fp16_graph(dtype) -> ir.Model:
    nodes = [helper.make_node("Softmax", ["x"], ["p"], axis=-1), helper.make_node("TopK", ["p", "k"], ["v", "i"], axis=-1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", dtype, [2, 16])],
                              [helper.make_tensor_value_info("v", dtype, [2, 4]),
                               helper.make_tensor_value_info("i", TensorProto.INT64, [2, 4])],
                              [helper.make_tensor("k", TensorProto.INT64, [1], [4])])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9))


def test_fp16_guard(tmp_path):
    x = np.random.default_rng(2).standard_normal((2, 16)).astype(np.float16) * 4
    model = _fp16_graph(TensorProto.FLOAT16)
    before = _run(model, tmp_path, {"x": x}, "before")
    assert run_passes(model, ["fp16-guard"]) == {"fp16-guard": 2}
    softmax = next(n for n in model.graph.all_nodes() if n.op_type == "Softmax")
    topk = next(n for n in model.graph.all_nodes() if n.op_type == "TopK")
    assert softmax.inputs[0].dtype == ir.DataType.FLOAT and topk.inputs[0].dtype == ir.DataType.FLOAT
    after = _run(model, tmp_path, {"x": x}, "after")
    assert after[0].dtype == np.float16
    np.testing.assert_allclose(after[0], before[0], atol=2e-3)
    np.testing.assert_array_equal(after[1], before[1])
    assert run_passes(_fp16_graph(TensorProto.FLOAT), ["fp16-guard"]) == {"fp16-guard": 0}


def test_fold_removes_constant_work(tmp_path):
    nodes = [helper.make_node("Add", ["c1", "c2"], ["c3"]), helper.make_node("Mul", ["x", "c3"], ["y"]),
             helper.make_node("Neg", ["x"], ["unused"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
                              [helper.make_tensor("c1", TensorProto.FLOAT, [3], [1, 2, 3]),
                               helper.make_tensor("c2", TensorProto.FLOAT, [3], [1, 1, 1])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9))
    x = np.array([1, 2, 3], np.float32)
    before = _run(model, tmp_path, {"x": x}, "before")
    assert run_passes(model, ["fold"]) == {"fold": 2}
    assert _ops(model) == ["Mul"]
    np.testing.assert_array_equal(_run(model, tmp_path, {"x": x}, "after")[0], before[0])
    assert run_passes(model, ["fold"]) == {"fold": 0}  # nothing left to fold


def test_ort_fusions_on_a_vision_graph(artifacts, tmp_path):
    art = artifacts("cls-attn", 64)
    model = ir.load(art / "vision.onnx")
    x = np.load(art / "reference.npz")["pixel_values"]
    before = _run(model, tmp_path, {"pixel_values": x}, "before")
    fired = run_passes(model, ["ort-fusions"])["ort-fusions"]
    assert fired > 0 and any(n.domain == "com.microsoft" for n in model.graph.all_nodes())
    np.testing.assert_allclose(_run(model, tmp_path, {"pixel_values": x}, "after")[0], before[0], atol=1e-4)


@pytest.mark.parametrize("method", ["cls-attn", "visionzip", "divprune", "vispruner", "pool"])
def test_exported_pre_llm_graphs_have_no_expanded_selection_index(artifacts, method):
    art = artifacts(method, 64)
    model = onnx.load(art / "vision.onnx")
    producers = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type == "GatherElements":
            assert producers.get(node.input[1]) is None or producers[node.input[1]].op_type != "Expand", node.name
    fired = {o["pass"]: o["fired"] for o in json.loads((art / "tokedge.json").read_text())["optimizations"]
             if o["graph"] == "vision"}
    assert fired["fuse-selection"] >= (0 if method == "pool" else 1)


def test_optimize_writes_new_artifact_with_parity(artifacts, tmp_path, capsys):
    art = artifacts("visionzip", 64)
    out = tmp_path / "opt"
    assert main(["optimize", str(art), "--out", str(out), "--passes", "fold,ort-fusions", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["parity"]["ok"] and summary["counts"]["vision"]["ort-fusions"] > 0
    assert main(["verify", str(out)]) == 0
    capsys.readouterr()
    assert main(["check", str(out), "--target", "trt-10.3"]) == 1  # com.microsoft ops are ONNX Runtime only
    assert "com.microsoft" in capsys.readouterr().err
    # a dry-run build of what check rejects says so; a clean artifact's does not
    assert main(["build", str(out), "--profile", "jetson-orin-nano-8gb", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "com.microsoft" in err and "trt-10.3" in err
    assert main(["build", str(art), "--profile", "jetson-orin-nano-8gb", "--dry-run"]) == 0
    assert "warning:" not in capsys.readouterr().err
    assert main(["optimize", str(art), "--out", str(out), "--passes", "nope"]) == 2
    capsys.readouterr()
    # passes that already ran at export are reported as such, not as "fired 0x"
    assert main(["optimize", str(art), "--out", str(tmp_path / "again"), "--passes", "fold,ort-fusions"]) == 0
    err = capsys.readouterr().err
    vision = next(line for line in err.splitlines() if line.startswith("vision:"))
    assert "fold had already run" in vision and "ort-fusions fired" in vision


@pytest.mark.parametrize("target", ["trt-10.3", "trt-11"])
@pytest.mark.parametrize("method,budget", [("none", 576), ("cls-attn", 64), ("visionzip", 64), ("divprune", 64),
                                           ("vispruner", 64), ("pool", 64), ("tome", 128), ("fastv", 64),
                                           ("pdrop", 64), ("dart", 64)])
def test_check_passes_clean_artifacts(artifacts, method, budget, target, capsys):
    assert main(["check", str(artifacts(method, budget)), "--target", target]) == 0


def test_check_names_planted_unsupported_op(artifacts, tmp_path, capsys):
    import shutil

    from tokedge.artifact import MANIFEST_NAME, sha256_file

    art = tmp_path / "art"
    shutil.copytree(artifacts("cls-attn", 64), art)
    model = onnx.load(art / "vision.onnx")
    model.graph.node.append(helper.make_node("Unique", ["pixel_values"], ["u"], name="planted_unique"))
    onnx.save(model, art / "vision.onnx")
    manifest = json.loads((art / MANIFEST_NAME).read_text())
    manifest["files"]["vision.onnx"] = sha256_file(art / "vision.onnx")
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    for target in ("trt-10.3", "trt-11"):
        assert main(["check", str(art), "--target", target]) == 1
        err = capsys.readouterr().err
        assert "planted_unique" in err and "Unique" in err
    assert main(["check", str(art), "--target", "trt-9"]) == 2


def test_ort_fusions_leave_a_graph_without_patterns(tmp_path):
    nodes = [helper.make_node("Add", ["x", "x"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9))
    assert run_passes(model, ["ort-fusions"]) == {"ort-fusions": 0}
    assert _ops(model) == ["Add"]


def test_ort_fusions_count_what_is_in_the_written_graphs(artifacts, tmp_path, capsys):
    """Issue 28 item 7: a decoder whose MatMul + Transpose became FusedMatMul was reported "fired 0x"
    (onnxscript counts only its transformer fusions). The count must equal the com.microsoft nodes
    found in the written graphs, read back independently with onnx."""
    art = artifacts("cls-attn", 64)
    out = tmp_path / "ort"
    assert main(["optimize", str(art), "--out", str(out), "--passes", "ort-fusions", "--json"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["parity"]["ok"]
    for graph, counts in summary["counts"].items():
        before = [n for n in onnx.load(art / f"{graph}.onnx").graph.node if n.domain == "com.microsoft"]
        after = [n for n in onnx.load(out / f"{graph}.onnx").graph.node if n.domain == "com.microsoft"]
        assert not before
        assert counts["ort-fusions"] == len(after), graph
        assert summary["ort_ops"][graph] == {op: sum(n.op_type == op for n in after) for op in {n.op_type for n in after}}
    decoder_ops = summary["ort_ops"]["decoder"]
    assert decoder_ops.get("FusedMatMul", 0) > 0 and summary["counts"]["decoder"]["ort-fusions"] > 0
    decoder_line = next(line for line in captured.err.splitlines() if line.startswith("decoder:"))
    assert f"ort-fusions fired {summary['counts']['decoder']['ort-fusions']}x" in decoder_line
    assert f"FusedMatMul {decoder_ops['FusedMatMul']}" in decoder_line


class Heads(torch.nn.Module):
    """Attention's reshapes as traced: split heads with sizes read from the input, merge them back
    after a transpose, and one reshape whose size is not the input's own (left alone)."""

    def forward(self, x):
        b, n = x.shape[0], x.shape[1]
        h = x.reshape(b, n, -1, 4).transpose(1, 2)  # [b, heads, n, 4]
        merged = (h * 2).transpose(1, 2)
        out = merged.reshape(merged.shape[0], merged.shape[1], -1)  # through the Transpose: dims 0, 1
        other = x.reshape(n, b, -1)  # sizes from other positions: not the data's own dimension there
        return out + other.transpose(0, 1)


def test_shape_simplify_makes_own_dimension_reshapes_constant(tmp_path):
    path = tmp_path / "heads.onnx"
    torch.onnx.export(Heads(), (torch.randn(2, 3, 8),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b", 1: "n"}}, opset_version=17)
    model = ir.load(path)
    before = _ops(model)
    feeds = [{"x": np.random.default_rng(i).standard_normal(shape).astype(np.float32)}
             for i, shape in enumerate([(2, 3, 8), (1, 5, 8), (4, 1, 8)])]
    want = [_run(model, tmp_path, f, "before")[0] for f in feeds]
    counts = run_passes(model, ["shape-simplify"])
    assert counts == {"shape-simplify": 2}  # split and merge; the (n, b, -1) reshape keeps its sizes
    reshapes = [n for n in model.graph.all_nodes() if n.op_type == "Reshape"]
    targets = sorted(tuple(n.inputs[1].const_value.numpy()) for n in reshapes if n.inputs[1].const_value is not None)
    assert targets == [(0, 0, -1), (0, 0, -1, 4)] and len(reshapes) == 3
    assert _ops(model).count("Shape") < before.count("Shape")
    for f, w in zip(feeds, want):  # every batch and length, not only the traced one
        np.testing.assert_array_equal(_run(model, tmp_path, f, "after")[0], w)


def test_grouped_attention_equals_transformers_repeat_kv_attention():
    """The decoder's grouped-query attention (no K/V copies) against transformers' own eager
    attention, which repeats K and V per query head (`repeat_kv`)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from tokedge.export.primitives import grouped_attention

    torch.manual_seed(0)
    b, kv, groups, s, t, d = 2, 3, 3, 4, 9, 16
    q, k, v = torch.randn(b, kv * groups, s, d), torch.randn(b, kv, t, d), torch.randn(b, kv, t, d)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, :3] = False  # a left-padded row
    allowed = (torch.arange(t)[None, :] <= torch.arange(s)[:, None] + (t - s))[None, None] & mask[:, None, None, :]
    bias = torch.where(allowed, 0.0, torch.finfo(torch.float32).min / 2)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = groups, False
    want, _ = eager_attention_forward(module, q, k, v, bias, scaling=d**-0.5)  # [b, s, H, d]
    got = grouped_attention(q, k, v, d**-0.5, bias, kv, groups, d)  # [b, H, s, d]
    torch.testing.assert_close(got.transpose(1, 2), want, rtol=0, atol=1e-5)


def test_fuse_matmuls_merges_projections_of_one_input(tmp_path):
    """q/k/v-like MatMuls of one input become one MatMul and a Split (named after the first, with a
    /fused prefix; a weight used twice is one block); a MatMul whose weight is a graph input, and one
    whose output is a graph output, stay as they are."""
    rng = np.random.default_rng(0)
    k = 8
    weights = {f"w{i}": rng.standard_normal((k, n)).astype(np.float32) for i, n in enumerate((8, 4, 4))}
    nodes = [helper.make_node("MatMul", ["x", f"w{i}"], [f"p{i}"], name=f"/proj_{i}/MatMul") for i in range(3)]
    # the same product again (a pruning prefill scores a layer's q/k/v, then runs the layer): one block for both
    nodes += [helper.make_node("MatMul", ["x", "w0"], ["p3"], name="/again/MatMul"),
              helper.make_node("Add", ["p0", "p3"], ["a"]), helper.make_node("Concat", ["a", "p1", "p2"], ["cat"], axis=-1),
              helper.make_node("MatMul", ["x", "dyn"], ["d"], name="/dyn/MatMul"),
              helper.make_node("MatMul", ["x", "w_out"], ["y_out"], name="/out/MatMul")]
    f32 = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", f32, ["b", k]), helper.make_tensor_value_info("dyn", f32, [k, 3])],
        [helper.make_tensor_value_info(n, f32, None) for n in ("cat", "d", "y_out")],
        [onnx.numpy_helper.from_array(w, name) for name, w in weights.items()]
        + [onnx.numpy_helper.from_array(rng.standard_normal((k, 2)).astype(np.float32), "w_out")])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9))
    feed = {"x": rng.standard_normal((3, k)).astype(np.float32), "dyn": rng.standard_normal((k, 3)).astype(np.float32)}
    want = _run(model, tmp_path, feed, "before")
    assert run_passes(model, ["fuse-matmuls"]) == {"fuse-matmuls": 3}
    matmuls = {n.name: n for n in model.graph.all_nodes() if n.op_type == "MatMul"}
    assert sorted(matmuls) == ["/dyn/MatMul", "/fused/proj_0/MatMul", "/out/MatMul"] and _ops(model).count("Split") == 1
    assert matmuls["/fused/proj_0/MatMul"].inputs[1].const_value.shape == (k, 16)  # w0 once: 8 + 4 + 4 columns
    for got, expected in zip(_run(model, tmp_path, feed, "after"), want):
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert run_passes(model, ["fuse-matmuls"]) == {"fuse-matmuls": 0}
