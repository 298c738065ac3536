"""`random`: the kept positions equal an independent loop over the documented rule (numpy's
default_rng(seed).permutation(2**16), the n first scores, the k largest, ascending), in torch, in the
dynamic-resolution variant, and in an exported ONNX graph whose token count varies at run time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokedge.reduce import get_method
from tokedge.reduce.base import VisionFeatures


def loop_reference(n: int, k: int, seed: int) -> list[int]:
    """The rule written as a loop: score each position, repeatedly take the best remaining one."""
    perm = np.random.default_rng(seed).permutation(1 << 16)
    scores = {i: int(perm[i]) for i in range(n)}
    kept = []
    for _ in range(min(k, n)):
        best = max(scores, key=lambda i: scores[i])
        kept.append(best)
        del scores[best]
    return sorted(kept)


def _features(b: int, n: int, d: int = 4) -> torch.Tensor:
    # each token's features hold its own position, so the output shows which tokens were kept
    return torch.arange(n, dtype=torch.float32)[None, :, None].expand(b, n, d).clone()


@pytest.mark.parametrize(("n", "k", "seed"), [(576, 64, 0), (576, 64, 1), (100, 7, 0), (2880, 300, 123)])
def test_selection_equals_the_loop_reference(n, k, seed):
    method = get_method("random")
    vf = VisionFeatures(features=_features(2, n), project=lambda t: t)
    out = method.reduce(vf, k, method.parse_options({"seed": str(seed)}))
    expected = loop_reference(n, k, seed)
    assert out.shape == (2, k, 4)
    assert out[0, :, 0].long().tolist() == expected == out[1, :, 0].long().tolist()


def test_seeds_differ_and_the_choice_is_uniform_over_positions():
    a, b = loop_reference(576, 64, 0), loop_reference(576, 64, 1)
    assert a != b
    # over many seeds every position is kept about k/n of the time (uniform), none is favoured
    counts = np.zeros(64)
    for seed in range(400):
        counts[loop_reference(64, 16, seed)] += 1
    assert abs(counts.mean() - 400 * 16 / 64) < 1e-9 and counts.min() > 60 and counts.max() < 140


def test_indexed_variant_equals_the_loop_reference():
    method = get_method("random")
    vf = VisionFeatures(features=_features(1, 90), project=lambda t: t)
    tokens, index = method.reduce_indexed(vf, torch.tensor(20), {"seed": 5}, 20)
    assert index[0].tolist() == loop_reference(90, 20, 5)
    assert tokens[0, :, 0].long().tolist() == index[0].tolist()


def test_exported_graph_selects_the_same_tokens_at_any_token_count(tmp_path):
    """A static graph: the scores are a constant looked up by position, so one ONNX graph serves
    any n (LLaVA-NeXT's candidates, Qwen-VL's merged tokens)."""
    import onnxruntime as ort

    method = get_method("random")

    class Graph(torch.nn.Module):
        def forward(self, x):
            return method.reduce(VisionFeatures(features=x, project=lambda t: t), 16, {"seed": 3})

    path = tmp_path / "random.onnx"
    torch.onnx.export(Graph(), (_features(1, 200),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {1: "n"}}, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (200, 57, 1000):
        (y,) = session.run(None, {"x": _features(1, n).numpy()})
        assert y[0, :, 0].astype(int).tolist() == loop_reference(n, 16, 3)


def test_listed_as_a_pre_llm_method_with_a_seed_option():
    method = get_method("random")
    assert method.stage.value == "pre-llm" and method.scores_with == () and not method.keeps_all
    assert method.parse_options({}) == {"seed": 0}
