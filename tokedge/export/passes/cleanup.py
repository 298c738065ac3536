"""Pass: constant folding and dead-node removal (onnxscript's folder, onnx-ir's unused-node pass).
Returns how many nodes the graph lost."""

from __future__ import annotations

import onnx_ir as ir


def fold_and_prune(model: ir.Model) -> int:
    from onnx_ir.passes.common import RemoveUnusedNodesPass
    from onnxscript.optimizer import fold_constants

    before = sum(1 for _ in model.graph.all_nodes())
    fold_constants(model)
    RemoveUnusedNodesPass()(model)
    return before - sum(1 for _ in model.graph.all_nodes())
