"""`tokedge.onnx_graph` reads an ONNX file's structure without onnx or onnx-ir (the device install
has neither). Checked against onnx-ir's reading of the same bytes (an independent parser, the one
`check` used before): every node's name, op type, domain, inputs, outputs and integer attributes,
every value type onnx-ir knows, and the values of every constant, on exported graphs of several
families and on hand-made graphs with the encodings an exporter may choose (raw or typed fields,
packed INT4, float16 bit patterns, external data, negative integers, subgraphs)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from tokedge.artifact import open_artifact
from tokedge.onnx_graph import read_graph


def _ir_nodes(model: ir.Model):
    return list(model.graph.all_nodes())


def _assert_same(data: bytes, model: ir.Model, external: dict[str, bytes] | None = None) -> int:
    view = read_graph(data, "graph.onnx")
    ir_nodes = _ir_nodes(model)
    assert len(view.nodes) == len(ir_nodes)
    assert view.opsets.get("", 0) == model.opset_imports.get("", 0)
    typed = 0
    for ours, theirs in zip(view.nodes, ir_nodes):
        assert (ours.name, ours.op_type, ours.domain) == (theirs.name or "", theirs.op_type,
                                                         "" if theirs.domain == "ai.onnx" else theirs.domain)
        assert ours.inputs == [v.name if v is not None else "" for v in theirs.inputs]
        assert ours.outputs == [v.name for v in theirs.outputs]
        ints = {k: a.value for k, a in theirs.attributes.items() if a.type == ir.AttributeType.INT}
        assert ours.ints == ints
        for value in [*theirs.inputs, *theirs.outputs]:
            if value is None:
                continue
            if value.dtype is not None:  # where onnx-ir knows a type, ours is the same
                assert view.dtypes.get(value.name) == value.dtype.name, value.name
                typed += 1
            elif value.name in view.dtypes:  # we type only what the file itself types: Constant outputs
                assert value.name in view.constants, value.name
            producer = value.producer()
            if producer is not None and producer.op_type != "Constant":
                # onnx-ir also folds e.g. Shape of a static tensor; check reads constants where they
                # are stored (zero points, TopK's k), which the TopK test below pins down
                continue
            const = ir.convenience.get_const_tensor(value)
            if const is not None:
                ref = view.const(value.name)
                assert ref is not None, value.name
                np.testing.assert_array_equal(ref.numpy(external), const.numpy(), err_msg=value.name)
    for ours, theirs in zip(view.nodes, ir_nodes):  # what `check` reads: TopK's k, DequantizeLinear's zero point
        for index in ((1,) if ours.op_type == "TopK" else (2,) if ours.op_type == "DequantizeLinear" else ()):
            const = ir.convenience.get_const_tensor(theirs.inputs[index]) if len(theirs.inputs) > index \
                and theirs.inputs[index] is not None else None
            ref = view.const(ours.input(index))
            assert (const is None) == (ref is None), ours.name
            if const is not None and ref is not None:
                np.testing.assert_array_equal(ref.numpy(external), const.numpy())
    return typed


def _graph_bytes(artifact, name):
    verified = open_artifact(artifact)
    data, external = verified.graph_bytes(name)
    spec = verified.manifest.graphs[name]
    model = ir.load(artifact / spec.file)
    return data, model, external


@pytest.mark.parametrize("method,budget", [("cls-attn", 64), ("fastv", 64), ("none", None)])
def test_exported_llava_graphs_read_like_onnx_ir(artifacts, method, budget):
    art = artifacts(method, budget)
    typed = 0
    for name in open_artifact(art).manifest.graphs:
        typed += _assert_same(*_graph_bytes(art, name)[:2], external=_graph_bytes(art, name)[2])
    assert typed > 100


def test_exported_qwen_graphs_read_like_onnx_ir(artifacts, tiny_qwen2_5_vl_dir):
    art = artifacts("none", checkpoint=tiny_qwen2_5_vl_dir)
    for name in open_artifact(art).manifest.graphs:
        data, model, external = _graph_bytes(art, name)
        _assert_same(data, model, external)


def _handmade(tmp_path, external: bool):
    """DequantizeLinear with a packed INT4 weight and zero point (block_size), a float16 Constant,
    TopK with a Constant k, a negative int64 initializer in typed (not raw) fields, and an If
    whose branches are subgraphs."""
    w = helper.make_tensor("w", TensorProto.INT4, [4, 2], [-8, 7, 1, -1, 0, 3, -2, 5])
    zp = helper.make_tensor("zp", TensorProto.INT4, [2, 2], [0, 1, -3, 0])
    scale = numpy_helper.from_array(np.array([[0.5, 0.25], [1.0, 2.0]], np.float32), "scale")
    neg = helper.make_tensor("neg", TensorProto.INT64, [3], [-1, 5, -(1 << 40)])  # int64_data, not raw
    half = helper.make_tensor("h", TensorProto.FLOAT16, [2], [1.5, -2.0])  # bit patterns in int32_data
    big = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(64, 64), "big")
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["t_out"], name="then_id")], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [4, 2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e_out"], name="else_neg")], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [4, 2])])
    nodes = [
        helper.make_node("DequantizeLinear", ["w", "scale", "zp"], ["wd"], name="dq", axis=0, block_size=2),
        helper.make_node("Constant", [], ["k"], name="kconst", value=helper.make_tensor("kv", TensorProto.INT64, [1], [2])),
        helper.make_node("Constant", [], ["hc"], name="hconst", value=half),
        helper.make_node("TopK", ["wd", "k"], ["vals", "idx"], name="topk", axis=-1),
        helper.make_node("Add", ["x", "wd"], ["y0"], name="add"),
        helper.make_node("MatMul", ["y0", "big_slice"], ["y1"], name="mm"),
        helper.make_node("Slice", ["big", "neg", "neg"], ["big_slice"], name="slice"),
        helper.make_node("If", ["cond"], ["y2"], name="branch", then_branch=then_g, else_branch=else_g),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 2]),
                     helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y2", TensorProto.FLOAT, [4, 2]),
         helper.make_tensor_value_info("idx", TensorProto.INT64, [4, 2])],
        initializer=[w, zp, scale, neg, big],
        value_info=[helper.make_tensor_value_info("wd", TensorProto.FLOAT, [4, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    path = tmp_path / "m.onnx"
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, location="m.data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    blobs = {"m.data": (tmp_path / "m.data").read_bytes()} if external else {}
    return path.read_bytes(), ir.load(path), blobs


@pytest.mark.parametrize("external", [False, True])
def test_handmade_encodings_read_like_onnx_ir(tmp_path, external):
    data, model, blobs = _handmade(tmp_path, external)
    assert _assert_same(data, model, blobs) >= 6
    view = read_graph(data, "m.onnx")
    np.testing.assert_array_equal(view.const("zp").numpy(), [[0, 1], [-3, 0]])
    np.testing.assert_array_equal(view.const("neg").numpy(), [-1, 5, -(1 << 40)])
    np.testing.assert_array_equal(view.const("hc").numpy(), np.array([1.5, -2.0], np.float16))
    assert view.dtypes["w"] == "INT4" and view.dtypes["hc"] == "FLOAT16"
    assert {n.name for n in view.nodes[-2:]} == {"then_id", "else_neg"}  # subgraphs after their node
    if external:
        assert view.const("big").external is not None
        with pytest.raises(Exception, match="not provided"):
            view.const("big").numpy({})


def test_unreadable_bytes_are_one_line_error():
    from tokedge.errors import IntegrityError

    with pytest.raises(IntegrityError, match="not a readable ONNX file"):
        read_graph(b"\x0a\xff\xff\xff", "bad.onnx")
