"""Pass: Reshape targets computed from the input's own shape -> constants with ONNX's 0 ("copy this
dimension"). Traced modules reshape with sizes read from a tensor at run time (`x.reshape(b, n, H,
d)` with `b, n = x.shape[:2]` becomes Shape -> Gather -> Unsqueeze -> Concat -> Reshape); where a
gathered size is the data input's own dimension at the same position (directly, or through a
Transpose), it is written as 0 and the target becomes a constant, so the chain disappears. On a
decode step of a 30-layer decoder that is over a thousand of its ~2,900 kernels, each a few
microseconds of ONNX Runtime overhead. Reshapes with `allowzero`, a literal 0 in the target, or a
size from anywhere else are left as they are. Returns how many Reshapes became constant."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def _ints(value: ir.Value | None) -> np.ndarray | None:
    """A constant int tensor (initializer or Constant node) as a 1-D numpy array, else None."""
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None and value.producer() is not None and value.producer().op_type == "Constant":
        attr = value.producer().attributes.get("value")
        tensor = attr.value if attr is not None else None
    if tensor is None:
        return None
    array = np.asarray(tensor.numpy())
    return array.reshape(-1).astype(np.int64) if array.dtype.kind in "iu" else None


def _dim_of(value: ir.Value) -> tuple[ir.Value, int] | None:
    """(S, j) when `value` is a 1-element size read as dimension j of S: Unsqueeze(Gather(Shape(S), j))."""
    node = value.producer()
    if node is None or node.op_type != "Unsqueeze" or node.domain not in ("", "ai.onnx"):
        return None
    axes = _ints(node.inputs[1]) if len(node.inputs) > 1 else None
    if axes is None:
        attr = node.attributes.get("axes")
        axes = np.asarray(attr.value) if attr is not None else None
    if axes is None or list(axes) != [0]:
        return None
    gather = node.inputs[0].producer() if node.inputs[0] is not None else None
    if gather is None or gather.op_type != "Gather" or gather.attributes.get_int("axis", 0) != 0:
        return None
    index = _ints(gather.inputs[1])
    shape = gather.inputs[0].producer() if gather.inputs[0] is not None else None
    if index is None or index.size != 1 or shape is None or shape.op_type != "Shape":
        return None
    start = shape.attributes.get_int("start", 0)
    if start < 0 or "end" in shape.attributes and shape.attributes.get_int("end", 0) < 0:
        return None
    j = int(index[0]) + start
    return (shape.inputs[0], j) if j >= 0 else None


def _same_dim(data: ir.Value, position: int, source: ir.Value, j: int) -> bool:
    """Whether dimension `position` of `data` is dimension `j` of `source`: the same value, or a
    Transpose of it whose permutation brings `j` to `position`."""
    for _ in range(8):
        if data is source:
            return position == j
        node = data.producer()
        if node is None or node.op_type != "Transpose":
            return False
        perm = node.attributes.get_ints("perm")
        if perm is None or position >= len(perm):
            return False
        data, position = node.inputs[0], int(perm[position])
    return False


def simplify_reshapes(model: ir.Model) -> int:
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    fired = 0
    for node in list(model.graph.all_nodes()):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        if node.attributes.get_int("allowzero", 0) != 0:
            continue
        data, target = node.inputs[0], node.inputs[1]
        concat = target.producer() if target is not None else None
        if data is None or concat is None or concat.op_type != "Concat" or concat.attributes.get_int("axis", 0) != 0:
            continue
        sizes: list[int] = []
        ok = True
        for part in concat.inputs:
            fixed = _ints(part)
            if fixed is not None:
                if (fixed == 0).any():  # a literal 0 means size 0 to the tracer, "copy" to ONNX: leave it
                    ok = False
                    break
                sizes.extend(int(v) for v in fixed)
                continue
            dim = _dim_of(part) if part is not None else None
            if dim is None or not _same_dim(data, len(sizes), *dim):
                ok = False
                break
            sizes.append(0)
        if not ok or 0 not in sizes:
            continue
        const = ir.Value(name=f"{target.name or node.name}_static",
                         const_value=ir.tensor(np.asarray(sizes, dtype=np.int64), name=f"{target.name or node.name}_static"))
        model.graph.register_initializer(const)
        node.replace_input_with(1, const)
        fired += 1
    RemoveUnusedNodesPass()(model)
    return fired
