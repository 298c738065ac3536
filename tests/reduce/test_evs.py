"""EVS against a loop reference written from vLLM's `compute_retention_mask` description
(docs/research/video.md 4.1): per-token dissimilarity to the previous frame, first frame 255,
stable descending order, first k kept, output in original order. Counts against vLLM's formula."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tokedge.reduce.evs import evs_count, select_evs


def reference_keep(x: np.ndarray, k: int) -> list[int]:
    frames, n, _ = x.shape
    score = {}
    for t in range(frames):
        for j in range(n):
            if t == 0:
                score[(t, j)] = 255.0
                continue
            a, b = x[t, j].astype(np.float64), x[t - 1, j].astype(np.float64)
            na = max(math.sqrt(float(a @ a)), 1e-8)
            nb = max(math.sqrt(float(b @ b)), 1e-8)
            score[(t, j)] = 1.0 - float(a @ b) / (na * nb)
    flat = [(score[(t, j)], t * n + j) for t in range(frames) for j in range(n)]
    order = sorted(flat, key=lambda s: (-s[0], s[1]))  # descending, ties: lower flat index
    return sorted(i for _, i in order[:k])


@pytest.mark.parametrize("frames,rate,expected", [(8, 0.5, 784), (8, 0.75, 392), (8, 0.9, 196),
                                                  (32, 0.6, 2508), (32, 0.75, 1568), (32, 0.9, 627)])
def test_count_matches_vllm(frames, rate, expected):
    assert evs_count(196, frames, rate) == expected


def _video(frames: int, n: int = 196, d: int = 24, changed: float = 0.4, seed: int = 0) -> np.ndarray:
    """Frames that copy the previous frame except a random `changed` share of positions."""
    rng = np.random.default_rng(seed)
    x = np.empty((frames, n, d), dtype=np.float32)
    x[0] = rng.standard_normal((n, d))
    for t in range(1, frames):
        x[t] = x[t - 1]
        moved = rng.random(n) < changed
        x[t, moved] = rng.standard_normal((int(moved.sum()), d))
    return x


@pytest.mark.parametrize("keep", [0.25, 0.1])
@pytest.mark.parametrize("frames", [8, 32])
def test_select_matches_loop_reference(frames, keep):
    x = _video(frames, seed=frames)
    k = evs_count(196, frames, 1 - keep)
    got = select_evs(torch.from_numpy(x), k).tolist()
    assert len(got) == k
    assert got == reference_keep(x, k)
    assert set(range(196)) <= set(got)  # the first frame is always whole


def test_onnx_topk_breaks_ties_by_lower_index(tmp_path):
    """One-hot tokens make dissimilarities exactly 0 or 1: the cut falls inside a run of ties, where
    the exported graph must keep the lower flat indices, as the stable reference does."""
    import onnxruntime as ort

    frames, n = 4, 16
    x = np.zeros((frames, n, n), dtype=np.float32)
    rng = np.random.default_rng(5)
    x[0, np.arange(n), np.arange(n)] = 1
    for t in range(1, frames):
        x[t] = x[t - 1]
        moved = rng.choice(n, 6, replace=False)
        x[t, moved] = x[t, np.roll(moved, 1)]  # a permutation of one-hot rows: those positions now differ
    k = 16 + 7  # the first frame plus 7 of the 18 tied "changed" tokens

    class Graph(torch.nn.Module):
        def forward(self, v):
            return select_evs(v, k)

    path = tmp_path / "evs.onnx"
    torch.onnx.export(Graph(), (torch.from_numpy(x),), str(path), dynamo=False, input_names=["v"],
                      output_names=["keep"], opset_version=17)
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"v": x})
    assert got.tolist() == reference_keep(x, k)
