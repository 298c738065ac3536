"""DyCoke's TTM against a loop reference written from the paper and the authors' `dycole_ttm`
(docs/research/video.md 4.2): pass A over frame pairs, pass B over windows of four, each pruned frame
keeping its m least similar tokens (float64 cosine, stable ascending sort), frames concatenated in
order. The reference walks the authors' frame list the way their code does (slot j holds frame j,
pass B overwrites slot i+2) and tracks which (frame, token) each kept vector came from."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tokedge.errors import UsageError
from tokedge.reduce import get_method
from tokedge.reduce.dycoke import schedule, select_dycoke
from tokedge.reduce.frames import VideoTokens

N = 196


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b) / (max(math.sqrt(float(a @ a)), 1e-8) * max(math.sqrt(float(b @ b)), 1e-8))


def _least_similar(x: np.ndarray, frame: int, anchor: int, m: int) -> list[tuple[int, int]]:
    sims = [(_cos(x[frame, j], x[anchor, j]), j) for j in range(x.shape[1])]
    order = sorted(sims, key=lambda s: (s[0], s[1]))  # ascending similarity, ties: lower position
    return [(frame, j) for _, j in order[:m]]


def reference_ttm(x: np.ndarray, m: int) -> list[int]:
    """The authors' two passes (m tokens per pruned frame), as flat indices in raster order."""
    frames, n, _ = x.shape
    slots = [[(f, j) for j in range(n)] for f in range(frames)]
    out = [None] * frames
    i = 0
    while i < frames - 1:  # pass A: pairs
        out[i] = slots[i]
        out[i + 1] = _least_similar(x, i + 1, i, m)
        i += 2
    for i in range(0, frames - 4, 4):  # pass B: windows of four; the last one is skipped when F % 4 == 0
        out[i + 2] = _least_similar(x, i + 2, i, m)
    kept = [f * n + j for slot in out if slot is not None for f, j in slot]
    return sorted(kept)


def reference_budget(x: np.ndarray, budget: int) -> list[int]:
    """tokedge's budget mode written out: the authors' pruned frames share budget - whole*n (first
    pruned frames one more); below that, chained windows (each window start against the previous
    window start, the last window's third frame too) leave only frame 0 whole."""
    frames, n, _ = x.shape
    against = {}
    for i in range(0, frames - 1, 2):
        against[i + 1] = i
    for i in range(0, frames - 4, 4):
        against[i + 2] = i
    if budget < (frames - len(against)) * n:
        against = {}
        for i in range(0, frames - 1, 2):
            against[i + 1] = i
        for w in range(0, frames, 4):
            if w + 2 < frames:
                against[w + 2] = w
            if w >= 4:
                against[w] = w - 4
    whole = [f for f in range(frames) if f not in against]
    pruned = sorted(against)
    share = budget - len(whole) * n
    kept = [(f, j) for f in whole for j in range(n)]
    for r, f in enumerate(pruned):
        m = share // len(pruned) + (1 if r < share % len(pruned) else 0)
        kept += _least_similar(x, f, against[f], m)
    return sorted(f * n + j for f, j in kept)


def _video(frames: int, d: int = 16, seed: int = 0) -> np.ndarray:
    """Each frame drifts from the previous one by a different amount per position (distinct similarities)."""
    rng = np.random.default_rng(seed)
    x = np.empty((frames, N, d), dtype=np.float32)
    x[0] = rng.standard_normal((N, d))
    for t in range(1, frames):
        x[t] = x[t - 1] + rng.uniform(0.05, 1.5, (N, 1)) * rng.standard_normal((N, d))
    return x


@pytest.mark.parametrize("frames,ratio,expected", [(8, 0.7, 878), (16, 0.7, 1618), (32, 0.7, 3098), (8, 0.5, 1078),
                                                   (32, 0.5, 4018)])
def test_authors_counts(frames, ratio, expected):
    assert schedule(frames, N, prune_ratio=ratio).total == expected


def test_paper_vector():
    """4 tokens a frame, k = 0.5: the authors' kept indices (their order: ascending similarity)."""
    x = np.array([[[math.cos(0.3 * f * j + 0.1 * j), math.sin(0.3 * f * j + 0.1 * j)] for j in range(4)]
                  for f in range(8)], dtype=np.float32)
    authors = [0, 1, 2, 3, 7, 6, 11, 10, 15, 14, 16, 17, 18, 19, 23, 22, 24, 25, 26, 27, 31, 30]
    got = select_dycoke(torch.from_numpy(x), schedule(8, 4, prune_ratio=0.5)).tolist()
    assert got == sorted(authors) == reference_ttm(x, 2)


@pytest.mark.parametrize("ratio", [0.7, 0.75, 0.9])
@pytest.mark.parametrize("frames", [8, 32])
def test_authors_mode_matches_loop_reference(frames, ratio):
    x = _video(frames, seed=frames)
    plan = schedule(frames, N, prune_ratio=ratio)
    got = select_dycoke(torch.from_numpy(x), plan).tolist()
    assert got == reference_ttm(x, int((1 - ratio) * N))


@pytest.mark.parametrize("keep", [0.25, 0.1])
@pytest.mark.parametrize("frames", [8, 32])
def test_budget_matches_loop_reference(frames, keep):
    x = _video(frames, seed=100 + frames)
    budget = max(N, int(keep * frames * N))  # the first frame is the floor (F=8, keep 0.1: frame 0 only)
    got, kept = get_method("dycoke").temporal(VideoTokens(torch.from_numpy(x)), budget, {"prune_ratio": None})
    want = reference_budget(x, budget)
    assert len(want) == budget and kept.tolist() == want
    np.testing.assert_array_equal(got.numpy(), x.reshape(-1, x.shape[-1])[want])


def test_budget_above_the_authors_floor_keeps_their_windows():
    """keep 0.5 at F=8 (784 >= 3 whole frames): the authors' pairs and windows, m spread over 5 frames."""
    x = _video(8, seed=3)
    plan = schedule(8, N, budget=784)
    assert plan.anchors == (None, 0, 0, 2, None, 4, None, 6) and plan.total == 784
    assert select_dycoke(torch.from_numpy(x), plan).tolist() == reference_budget(x, 784)


def test_refusals():
    with pytest.raises(UsageError, match="even frame count"):
        schedule(7, N, budget=500)
    with pytest.raises(UsageError, match="--budget 196..1568"):
        schedule(8, N, budget=100)


def test_onnx_runtime_breaks_ties_like_the_reference(tmp_path):
    """One-hot tokens: similarities are exactly 0 or 1, so each pruned frame's cut falls inside ties;
    the exported graph must keep the lower positions, as the stable reference does."""
    import onnxruntime as ort

    frames, n = 8, 16
    rng = np.random.default_rng(7)
    x = np.zeros((frames, n, n), dtype=np.float32)
    x[0, np.arange(n), np.arange(n)] = 1
    for t in range(1, frames):
        x[t] = x[t - 1]
        moved = rng.choice(n, 6, replace=False)
        x[t, moved] = x[t, np.roll(moved, 1)]
    plan = schedule(frames, n, budget=40)  # chained: 16 + 7 frames sharing 24 tokens (4 each, 3 with 3)

    class Graph(torch.nn.Module):
        def forward(self, v):
            return select_dycoke(v, plan)

    path = tmp_path / "dycoke.onnx"
    torch.onnx.export(Graph(), (torch.from_numpy(x),), str(path), dynamo=False, input_names=["v"],
                      output_names=["keep"], opset_version=17)
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"v": x})
    assert got.tolist() == reference_budget(x, 40)
