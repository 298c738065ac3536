"""Pass: ONNX Runtime transformer fusions (attention, RMSNorm, rotary, GELU...) for the
ONNX Runtime CPU/CUDA path, via onnxscript's ort_fusions. The fused ops live in the com.microsoft
domain, so an artifact optimised with this pass is for ONNX Runtime only (`tokedge check` refuses
it for TensorRT). Returns how many fusions fired."""

from __future__ import annotations

import onnx_ir as ir


def ort_fusions(model: ir.Model) -> int:
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    _, counts = optimize_for_ort(model)
    return int(sum(counts.values()))
