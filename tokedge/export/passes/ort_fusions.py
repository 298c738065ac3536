"""Pass: ONNX Runtime transformer fusions (attention, RMSNorm, rotary, GELU, FusedMatMul...) for the
ONNX Runtime CPU/CUDA path, via onnxscript's ort_fusions. The fused ops live in the com.microsoft
domain, so an artifact optimised with this pass is for ONNX Runtime only (`tokedge check` refuses
it for TensorRT).

Returns how many fused nodes it produced: the com.microsoft nodes in the graph after it minus
those before, per op type. onnxscript's own counts cover only its transformer fusions, not the
pattern rules it applies afterwards (MatMul + Transpose -> FusedMatMul, softmax rewrites), so a
graph full of FusedMatMul used to be reported as "fired 0x"."""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir

ORT_DOMAIN = "com.microsoft"


def ort_nodes(model: ir.Model) -> Counter:
    """op type -> how many com.microsoft nodes the graph (subgraphs included) and its functions hold."""
    nodes = [*model.graph.all_nodes(), *(n for f in model.functions.values() for n in f)]
    return Counter(n.op_type for n in nodes if n.domain == ORT_DOMAIN)


def ort_fusions(model: ir.Model) -> int:
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    before = ort_nodes(model)
    optimize_for_ort(model)
    after = ort_nodes(model)
    return sum(max(0, after[op] - before[op]) for op in after)
