"""Pass: turn the reduction's fixed TopK k into the `budget` graph input.

Pattern: the one TopK whose k is the constant the vision graph was traced with (a sentinel).
Check: exactly one such TopK, and the traced graph has no `budget` input yet.
Rewrite: add an int64 scalar input `budget`, clip it to the manifest's [min, max] range in-graph
(the runtime refuses out-of-range values before running; the clip keeps a bad value from reaching
TopK), reshape it to [1] and feed it to TopK. Downstream shapes already follow TopK's output,
because the reduction is written with shape-relative indexing. Returns how many TopKs were bound.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from tokedge.errors import PassRefused

BUDGET_INPUT = "budget"


def _topk_with_k(graph: ir.Graph, k: int) -> list[ir.Node]:
    found = []
    for node in graph.all_nodes():
        if node.op_type != "TopK" or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        tensor = ir.convenience.get_const_tensor(node.inputs[1])
        if tensor is not None and tensor.numpy().reshape(-1).tolist() == [k]:
            found.append(node)
    return found


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.val(name, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def bind_runtime_budget(model: ir.Model, sentinel_k: int, lo: int, hi: int) -> int:
    """sentinel_k: the TopK k the graph was traced with; [lo, hi]: the range the input is clipped to."""
    graph = model.graph
    if any(v.name == BUDGET_INPUT for v in graph.inputs):
        raise PassRefused("graph already has a 'budget' input")
    nodes = _topk_with_k(graph, sentinel_k)
    if len(nodes) != 1:
        raise PassRefused(f"expected one TopK with k={sentinel_k}, found {len(nodes)}")
    (topk,) = nodes
    budget = ir.val(BUDGET_INPUT, ir.DataType.INT64, ir.Shape([]))
    graph.inputs.append(budget)
    lo_v = _const(graph, "budget_min", np.array(lo, dtype=np.int64))
    hi_v = _const(graph, "budget_max", np.array(hi, dtype=np.int64))
    shape_v = _const(graph, "budget_k_shape", np.array([1], dtype=np.int64))
    clip = ir.node("Clip", [budget, lo_v, hi_v], name="budget_clip")
    reshape = ir.node("Reshape", [clip.outputs[0], shape_v], name="budget_as_k")
    graph.insert_before(topk, [clip, reshape])
    topk.replace_input_with(1, reshape.outputs[0])
    return 1
