"""Graph passes, one per file, each `pass(model: ir.Model) -> int` (how many times it fired).

`PASSES` names them for `tokedge optimize --passes`; `DEFAULT_PASSES` run at export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx_ir as ir

from tokedge.errors import UsageError
from tokedge.export.passes.cleanup import fold_and_prune
from tokedge.export.passes.fp16_guard import guard_fp16_scores
from tokedge.export.passes.fuse_selection import fuse_selection
from tokedge.export.passes.indices_int32 import indices_to_int32
from tokedge.export.passes.ort_fusions import ort_fusions


@dataclass(frozen=True)
class GraphPass:
    name: str
    run: Callable[[ir.Model], int]
    summary: str
    onnxruntime_only: bool = False


PASSES = {
    p.name: p
    for p in (
        GraphPass("fuse-selection", fuse_selection, "TopK-selected gathers -> GatherND(batch_dims=1), no expanded index"),
        GraphPass("indices-int32", indices_to_int32, "int64 gather indices from TopK/ArgMax -> int32"),
        GraphPass("fp16-guard", guard_fp16_scores, "fp16 Softmax/TopK inputs computed in fp32"),
        GraphPass("fold", fold_and_prune, "constant folding and dead-node removal"),
        GraphPass("ort-fusions", ort_fusions, "ONNX Runtime transformer fusions (ONNX Runtime only)", True),
    )
}
DEFAULT_PASSES = ("fuse-selection", "indices-int32", "fp16-guard", "fold")


def get_passes(names: list[str]) -> list[GraphPass]:
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise UsageError(f"unknown pass '{unknown[0]}'; choose from: {', '.join(PASSES)}")
    return [PASSES[n] for n in names]


def _io_shapes(model: ir.Model) -> list[list | None]:
    return [None if v.shape is None else [d if isinstance(d, int) else str(d) for d in v.shape]
            for v in [*model.graph.inputs, *model.graph.outputs]]


def run_passes(model: ir.Model, names: list[str] | tuple[str, ...]) -> dict[str, int]:
    """Run passes in order; the graph's input and output shapes (the artifact contract, with its
    axis names) are restored after each, since shape inference inside a pass renames axes."""
    counts = {}
    for p in get_passes(list(names)):
        declared = _io_shapes(model)
        counts[p.name] = p.run(model)
        # by position: a pass may replace the graph's output values with new ones
        for value, dims in zip([*model.graph.inputs, *model.graph.outputs], declared):
            value.shape = None if dims is None else ir.Shape(dims)
    return counts
