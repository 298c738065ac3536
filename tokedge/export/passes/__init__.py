"""Graph passes, one per file, each `pass(model: ir.Model, **params) -> int` (how many times it
fired). A pass that takes parameters declares their names; `run_passes` gets them as
`PassCall(name, params)`, checks them, and reports a refusal (`PassRefused`) as one line naming
the pass.

`PASSES` names them for `tokedge optimize --passes`; `DEFAULT_PASSES` run at export.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from tokedge.errors import PassRefused, UsageError
from tokedge.export.passes.cleanup import fold_and_prune
from tokedge.export.passes.fp16_guard import guard_fp16_scores
from tokedge.export.passes.fuse_matmuls import fuse_matmuls
from tokedge.export.passes.fuse_selection import fuse_selection
from tokedge.export.passes.indices_int32 import indices_to_int32
from tokedge.export.passes.ort_fusions import ort_fusions
from tokedge.export.passes.runtime_budget import bind_runtime_budget
from tokedge.export.passes.shape_simplify import simplify_reshapes


@dataclass(frozen=True)
class GraphPass:
    name: str
    run: Callable[..., int]  # (model, **params) -> times fired
    summary: str
    onnxruntime_only: bool = False
    params: tuple[str, ...] = ()  # parameter names the pass needs (none: runs on the graph alone)


@dataclass(frozen=True)
class PassCall:
    """A pass with its parameters, e.g. PassCall("runtime-budget", {"sentinel_k": 575, "lo": 16, "hi": 576})."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)


PASSES = {
    p.name: p
    for p in (
        GraphPass("fuse-selection", fuse_selection, "TopK-selected gathers -> GatherND(batch_dims=1), no expanded index"),
        GraphPass("indices-int32", indices_to_int32, "int64 gather indices from TopK/ArgMax -> int32"),
        GraphPass("fp16-guard", guard_fp16_scores, "fp16 Softmax/TopK inputs computed in fp32"),
        GraphPass("fold", fold_and_prune, "constant folding and dead-node removal"),
        GraphPass("fuse-matmuls", fuse_matmuls, "MatMuls reading one input with constant weights -> one MatMul "
                  "and a Split (q/k/v, gate/up)"),
        GraphPass("shape-simplify", simplify_reshapes, "Reshape sizes read from the input's own shape -> constants "
                  "with 0 (copy the dimension)"),
        GraphPass("ort-fusions", ort_fusions, "ONNX Runtime transformer fusions (ONNX Runtime only)", True),
        GraphPass("runtime-budget", bind_runtime_budget, "the selection's TopK k -> an int64 `budget` input "
                  "(export --dynamic-budget)", params=("sentinel_k", "lo", "hi")),
    )
}
DEFAULT_PASSES = ("fuse-selection", "indices-int32", "fp16-guard", "fold", "fuse-matmuls", "shape-simplify")


def _call(item: str | PassCall) -> PassCall:
    return item if isinstance(item, PassCall) else PassCall(item)


def get_passes(items: Sequence[str | PassCall]) -> list[tuple[GraphPass, dict[str, Any]]]:
    """Look passes up and check their parameters, before any graph is touched."""
    out = []
    for call in map(_call, items):
        if call.name not in PASSES:
            from tokedge.suggest import did_you_mean

            plain = [n for n, p in PASSES.items() if not p.params]
            raise UsageError(f"unknown pass '{call.name}'; {did_you_mean(call.name, plain)}"
                             f"choose from: {', '.join(plain)} (see `tokedge passes`)")
        p = PASSES[call.name]
        missing = [k for k in p.params if k not in call.params]
        extra = sorted(set(call.params) - set(p.params))
        if missing:
            raise UsageError(f"pass {p.name} needs parameters {', '.join(p.params)} and cannot run from "
                             f"--passes; {p.summary}")
        if extra:
            raise UsageError(f"pass {p.name} takes no parameter '{extra[0]}'")
        out.append((p, dict(call.params)))
    return out


def _io_shapes(model: ir.Model) -> list[list | None]:
    return [None if v.shape is None else [d if isinstance(d, int) else str(d) for d in v.shape]
            for v in [*model.graph.inputs, *model.graph.outputs]]


def run_passes(model: ir.Model, items: Sequence[str | PassCall], graph: str = "graph") -> dict[str, int]:
    """Run passes in order; the graph's input and output shapes (the artifact contract, with its
    axis names) are restored after each, since shape inference inside a pass renames axes. A pass
    that refuses the graph raises PassRefused naming the pass and the graph."""
    counts = {}
    for p, params in get_passes(items):
        declared = _io_shapes(model)
        try:
            counts[p.name] = p.run(model, **params)
        except PassRefused as exc:
            raise PassRefused(f"graph pass {p.name} refused {graph}.onnx: {exc}") from None
        # by position: a pass may replace the graph's output values with new ones; a pass that adds
        # inputs (runtime-budget) keeps the shapes it gave them
        io = [*model.graph.inputs[: len(declared) - len(model.graph.outputs)], *model.graph.outputs]
        for value, dims in zip(io, declared):
            value.shape = None if dims is None else ir.Shape(dims)
    return counts
