"""The runtime-budget pass: fires once on a traced selection graph, ONNX Runtime agrees with the
fixed-k graph at that k, and refuses graphs that do not match its pattern."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch

from tokedge.errors import PassRefused, TokedgeError, UsageError
from tokedge.export.passes import PassCall, run_passes
from tokedge.export.passes.runtime_budget import bind_runtime_budget
from tokedge.reduce.select import gather_tokens, topk_sorted


class Select(torch.nn.Module):
    def __init__(self, k: int, second_topk: bool = False):
        super().__init__()
        self.k, self.second = k, second_topk

    def forward(self, x):
        scores = x.mean(-1)
        out = gather_tokens(x, topk_sorted(scores, self.k))
        if self.second:
            out = out + gather_tokens(x, topk_sorted(-scores, self.k))
        return out


def _trace(module, tmp_path) -> ir.Model:
    path = tmp_path / "m.onnx"
    torch.onnx.export(module, (torch.randn(2, 20, 4),), str(path), dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b"}}, opset_version=17)
    return ir.load(path)


def _run(model: ir.Model, tmp_path, feed) -> np.ndarray:
    path = tmp_path / "run.onnx"
    ir.save(model, path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_binds_budget_and_matches_fixed_graphs(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 20, 4)).astype(np.float32)
    dynamic = _trace(Select(7), tmp_path)
    assert bind_runtime_budget(dynamic, 7, 2, 20) == 1
    for k in (2, 5, 7, 13, 20):
        fixed = _run(_trace(Select(k), tmp_path), tmp_path, {"x": x}) if k < 20 else x
        got = _run(dynamic, tmp_path, {"x": x, "budget": np.array(k, dtype=np.int64)})
        np.testing.assert_array_equal(got, fixed)
    clipped = _run(dynamic, tmp_path, {"x": x, "budget": np.array(50, dtype=np.int64)})
    assert clipped.shape == (2, 20, 4)


def test_refuses_near_misses(tmp_path):
    with pytest.raises(PassRefused, match="found 0"):
        bind_runtime_budget(_trace(Select(7), tmp_path), 8, 1, 20)
    with pytest.raises(PassRefused, match="found 2"):
        bind_runtime_budget(_trace(Select(7, second_topk=True), tmp_path), 7, 1, 20)
    model = _trace(Select(7), tmp_path)
    bind_runtime_budget(model, 7, 1, 20)
    with pytest.raises(PassRefused, match="already"):
        bind_runtime_budget(model, 7, 1, 20)


def test_runtime_budget_runs_through_the_registry_with_parameters(tmp_path, capsys):
    x = np.random.default_rng(1).standard_normal((2, 20, 4)).astype(np.float32)
    model = _trace(Select(7), tmp_path)
    assert run_passes(model, [PassCall("runtime-budget", {"sentinel_k": 7, "lo": 2, "hi": 20})]) == {"runtime-budget": 1}
    assert _run(model, tmp_path, {"x": x, "budget": np.array(3, dtype=np.int64)}).shape == (2, 3, 4)
    # a refusal is a TokedgeError naming the pass and the graph: the CLI prints it as one line
    with pytest.raises(PassRefused, match="runtime-budget refused vision.onnx: .*found 0") as info:
        run_passes(_trace(Select(7), tmp_path), [PassCall("runtime-budget", {"sentinel_k": 8, "lo": 1, "hi": 20})],
                   graph="vision")
    assert isinstance(info.value, TokedgeError) and len(str(info.value).splitlines()) == 1
    with pytest.raises(UsageError, match="needs parameters"):
        run_passes(_trace(Select(7), tmp_path), ["runtime-budget"])
    from tokedge.cli import main

    assert main(["optimize", str(tmp_path), "--out", str(tmp_path / "o"), "--passes", "runtime-budget"]) == 2
    assert "needs parameters" in capsys.readouterr().err
