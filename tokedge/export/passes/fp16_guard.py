"""Pass: keep scores, softmax and TopK inputs in fp32 in fp16 graphs.

TensorRT 11 is strongly typed, so the precision of every tensor must be in the graph itself.
Pattern: Softmax or TopK whose data input is float16.
Check:   nothing else: any fp16 score tensor qualifies.
Rewrite: Cast to float32 before; for Softmax (and TopK's values) a Cast back to float16 after, so
         the consumers keep their types. Returns how many nodes were guarded.
"""

from __future__ import annotations

import onnx_ir as ir


def _cast(value: ir.Value, to: ir.DataType, name: str) -> ir.Node:
    node = ir.node("Cast", [value], {"to": to}, name=name)
    node.outputs[0].dtype = to
    node.outputs[0].shape = value.shape
    return node


def guard_fp16_scores(model: ir.Model) -> int:
    fired = 0
    for node in list(model.graph.all_nodes()):
        if node.op_type not in ("Softmax", "TopK"):
            continue
        x = node.inputs[0]
        if x is None or x.dtype != ir.DataType.FLOAT16:
            continue
        tag = f"{node.name or node.op_type}_guard{fired}"
        up = _cast(x, ir.DataType.FLOAT, f"{tag}_in_fp32")
        node.graph.insert_before(node, [up])
        node.replace_input_with(0, up.outputs[0])
        out = node.outputs[0]
        consumers = list(out.uses())
        down = _cast(out, ir.DataType.FLOAT16, f"{tag}_out_fp16")
        node.graph.insert_after(node, [down])
        out.dtype = ir.DataType.FLOAT
        for use in consumers:
            use.node.replace_input_with(use.idx, down.outputs[0])
        outputs = model.graph.outputs
        for i, graph_out in enumerate(outputs):
            if graph_out is out:  # the graph output keeps its name and fp16 type
                name = out.name
                out.name = f"{name}_fp32"
                down.outputs[0].name = name
                outputs[i] = down.outputs[0]
        fired += 1
    return fired
