"""Pass: fuse the token-selection gather into GatherND with batch_dims=1.

Pattern: GatherElements(data [b, n, d], Expand(Unsqueeze(idx [b, k], axes=[-1]), shape), axis=1),
         the way `x.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))` traces.
Check:   axis 1, the Unsqueeze adds the last axis, data has rank 3 and idx rank 2.
Rewrite: GatherND(data, Unsqueeze(idx, [-1]), batch_dims=1) -> [b, k, d], with no expanded
         [b, k, d] int64 index tensor in the graph (TensorRT and ONNX Runtime both run GatherND).
         The Unsqueeze is reused (it may feed several gathers); the Expand goes.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchResult


SAME_RANK = {"TopK", "Cast", "Transpose", "Slice", "Concat", "GatherElements", "Neg", "Abs", "Relu", "Softmax",
             "Add", "Sub", "Mul", "Div", "Where", "Max", "Min", "Clip"}


def _rank(value: ir.Value, depth: int = 0) -> int | None:
    """The value's rank, from its shape or (when shape inference left it open) its producers."""
    if value.shape is not None:
        return len(value.shape)
    node = value.producer()
    if node is None or depth > 8:
        return None
    if node.op_type == "GatherElements":
        return _rank(node.inputs[1], depth + 1)
    if node.op_type.startswith("Reduce"):
        inner = _rank(node.inputs[0], depth + 1)
        keep = node.attributes.get("keepdims")
        axes = node.attributes.get("axes")
        if inner is None or axes is None:
            return None
        return inner if (keep is None or keep.value) else inner - len(axes.value)
    if node.op_type in SAME_RANK:
        ranks = [_rank(v, depth + 1) for v in node.inputs if v is not None and v.const_value is None]
        known = [r for r in ranks if r is not None]
        return max(known) if known else None
    return None


class FuseSelectionGather(pattern.RewriteRuleClassBase):
    def pattern(self, op, data, unsqueezed, shape):
        return op.GatherElements(data, op.Expand(unsqueezed, shape), axis=1)

    def check(self, context, data, unsqueezed, shape, **_):
        result = MatchResult()
        unsq = unsqueezed.producer()
        if unsq is None or unsq.op_type != "Unsqueeze" or len(unsq.inputs) < 2:
            return result.fail("the expanded index is not an Unsqueeze")
        axes_value = ir.convenience.get_const_tensor(unsq.inputs[1])
        if axes_value is None or axes_value.numpy().reshape(-1).tolist() not in ([-1], [2]):
            return result.fail("Unsqueeze does not add the last axis")
        if _rank(data) != 3:
            return result.fail(f"data rank is {_rank(data)}, not 3")
        if _rank(unsq.inputs[0]) != 2:
            return result.fail(f"index rank is {_rank(unsq.inputs[0])}, not 2")
        return result

    def rewrite(self, op, data, unsqueezed, shape, **_):
        # the [b, k, 1] unsqueezed index is exactly GatherND's index with one batch dimension
        return op.GatherND(data, unsqueezed, batch_dims=1)


RULES = pattern.RewriteRuleSet([FuseSelectionGather.rule()])


def fuse_selection(model: ir.Model) -> int:
    """Returns how many selection gathers were fused."""
    from onnx_ir.passes.common import ShapeInferencePass

    ShapeInferencePass()(model)  # ranks for the check (run_passes restores the graph's IO shapes)
    return RULES.apply_to_model(model)
