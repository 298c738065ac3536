"""Pass: int64 gather indices to int32, which TensorRT prefers.

Pattern: Gather / GatherElements whose indices are int64 and come (directly, or through
         Unsqueeze / Reshape / Expand) from TopK or ArgMax/ArgMin indices.
Check:   the index values are bounded by a tensor axis, so int32 cannot overflow.
Rewrite: Cast(indices, to=INT32) before the gather. Returns how many gathers were rewritten.
"""

from __future__ import annotations

import onnx_ir as ir

GATHERS = ("Gather", "GatherElements")  # GatherND takes int64 indices only (ONNX spec)
SOURCES = ("TopK", "ArgMax", "ArgMin")
PASS_THROUGH = ("Unsqueeze", "Reshape", "Expand", "Squeeze", "Concat")


def _from_index_source(value: ir.Value, depth: int = 0) -> bool:
    node = value.producer()
    if node is None or depth > 6:
        return False
    if node.op_type in SOURCES:
        if node.op_type != "TopK" or value is node.outputs[1]:
            return True
        return _from_index_source(node.inputs[0], depth + 1)  # sorting indices: its values are indices
    if node.op_type in PASS_THROUGH:
        return all(_from_index_source(v, depth + 1) for v in node.inputs[:1] if v is not None)
    return False


def indices_to_int32(model: ir.Model) -> int:
    fired = 0
    for node in list(model.graph.all_nodes()):
        if node.op_type not in GATHERS or len(node.inputs) < 2:
            continue
        idx = node.inputs[1]
        if idx is None or idx.dtype not in (ir.DataType.INT64, None) or not _from_index_source(idx):
            continue
        cast = ir.node("Cast", [idx], {"to": ir.DataType.INT32}, name=f"{node.name or node.op_type}_indices_int32_{fired}")
        cast.outputs[0].dtype = ir.DataType.INT32
        cast.outputs[0].shape = idx.shape
        node.graph.insert_before(node, [cast])
        node.replace_input_with(1, cast.outputs[0])
        fired += 1
    return fired
