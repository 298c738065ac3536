"""HoliTom against a loop reference written from the paper and the authors' code
(docs/research/video.md 4.4): the windows' dynamic programme (checked against brute force over every
segmentation), static masks, per-frame dynamic tokens by attention, DPC-kNN centres of each window's
static tokens and their merge. float64 loops, stable sorts (ties: lower index); tokedge's exact
budget split (integer largest remainder) written out independently."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tokedge.reduce import get_method
from tokedge.reduce.frames import VideoTokens
from tokedge.reduce.holitom import holitom, plan, windows

N = 196


def _cos(a, b) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b) / (max(math.sqrt(float(a @ a)), 1e-8) * max(math.sqrt(float(b @ b)), 1e-8))


def ref_windows(sim: np.ndarray, tau: float):
    """The authors' `select_static_windows` (loops)."""
    frames = sim.shape[0] + 1

    def gain(s, e):
        return sum(all(sim[t, j] > tau for t in range(s, e)) for j in range(sim.shape[1])) * (e - s)

    dp, prev = [0] * frames, [0] * frames
    for i in range(frames):
        best, best_j = (dp[i - 1] if i > 0 else 0), i
        for size in range(2, i + 2):
            j = i - size
            value = (dp[j] if j >= 0 else 0) + gain(j + 1, i)
            if value > best:
                best, best_j = value, j + 1
        dp[i], prev[i] = best, best_j
    out, i = [], frames - 1
    while i >= 0:
        out.append((prev[i], i))
        i = prev[i] - 1
    return out[::-1], dp[-1]


def brute_force_best(sim: np.ndarray, tau: float) -> int:
    frames = sim.shape[0] + 1
    best = 0
    for cuts in itertools.product([0, 1], repeat=frames - 1):
        bounds, start = [], 0
        for t, c in enumerate(cuts):
            if c:
                bounds.append((start, t))
                start = t + 1
        bounds.append((start, frames - 1))
        saved = sum(sum(all(sim[t, j] > tau for t in range(s, e)) for j in range(sim.shape[1])) * (e - s)
                    for s, e in bounds)
        best = max(best, saved)
    return best


def reference(x: np.ndarray, attn: np.ndarray, budget: int, tau=0.8, beta=0.6):
    """-> (sorted output keys (frame, slot), output vectors, source flat indices)."""
    frames, n, width = x.shape
    sim = np.array([[_cos(x[t, j], x[t + 1, j]) for j in range(n)] for t in range(frames - 1)])
    wins, reduced = ref_windows(sim, tau)
    if frames * n - reduced < budget:
        wins = [(t, t) for t in range(frames)]
    units = []  # (kind, window or frame, size) in order: window static, then its frames' dynamic
    static = {}
    for s, e in wins:
        mask = [e > s and all(sim[t, j] > tau for t in range(s, e)) for j in range(n)]
        static[(s, e)] = [j for j in range(n) if mask[j]]
        units.append(("static", (s, e), len(static[(s, e)])))
        for t in range(s, e + 1):
            units.append(("dynamic", t, n - len(static[(s, e)])))
    total = sum(u[2] for u in units)
    floors = [budget * u[2] // total for u in units]
    rests = [budget * u[2] % total for u in units]
    extra = budget - sum(floors)
    order = sorted(range(len(units)), key=lambda i: (-rests[i], i))
    counts = {i: floors[i] + (1 if i in order[:extra] else 0) for i in range(len(units))}
    out = {}
    for i, (kind, where, size) in enumerate(units):
        k = counts[i]
        if kind == "dynamic":
            t = where
            s, e = next(w for w in wins if w[0] <= t <= w[1])
            dynamic = [j for j in range(n) if j not in static[(s, e)]]
            top = sorted(dynamic, key=lambda j: (-attn[t, j], j))[:k]
            for j in top:
                out[(t, 1, j)] = (x[t, j].astype(np.float64), t * n + j)
            continue
        (s, e), pos = where, static[where]
        if k == 0:
            continue
        tokens = {j: x[s:e + 1, j].astype(np.float64).mean(axis=0) for j in pos}
        dist = {(a, b): math.sqrt(float((tokens[a] - tokens[b]) @ (tokens[a] - tokens[b]))) / math.sqrt(width)
                for a in pos for b in pos}
        kk = min(7, k)
        rho = {a: math.exp(-sum(sorted(dist[(a, b)] ** 2 for b in pos)[:kk]) / kk) for a in pos}
        far = max(dist.values())
        score = {}
        for a in pos:
            denser = [dist[(a, b)] for b in pos if rho[b] > rho[a]]
            score[a] = rho[a] * (min(denser) if denser else far)
        centres = sorted(sorted(pos, key=lambda a: (-score[a], a))[:k])
        joined = {c: [] for c in centres}
        for a in pos:
            if a in centres:
                continue
            nearest = min(centres, key=lambda c: (dist[(a, c)], c))
            joined[nearest].append(tokens[a])
        for c in centres:
            value = tokens[c] if not joined[c] else beta * tokens[c] + (1 - beta) * np.mean(joined[c], axis=0)
            out[(s, 0, c)] = (value, s * n + c)
    keys = sorted(out)
    return keys, np.stack([out[k][0] for k in keys]), [out[k][1] for k in keys]


def _video(frames: int, d: int = 12, seed: int = 0, still: float = 0.5):
    """A background whose positions stay nearly still (a share `still` of them), the rest moving,
    with a scene change half way: static windows of several frames with designed static sets."""
    rng = np.random.default_rng(seed)
    x = np.empty((frames, N, d), dtype=np.float32)
    fixed = rng.random(N) < still
    for t in range(frames):
        if t in (0, frames // 2):
            base = rng.standard_normal((N, d))
        x[t] = np.where(fixed[:, None], base + rng.standard_normal((N, d)) * 0.05, rng.standard_normal((N, d)))
    return x, rng.random((frames, N)).astype(np.float32)


def test_windows_research_vector_and_brute_force():
    """docs/research/video.md 4.4: F=5, 3 positions, tau .8 -> windows [(0,2),(3,4)], 7 saved."""
    sim = np.array([[.9, .9, .1], [.9, .9, .9], [.1, .1, .1], [.9, .95, .9]])
    first, last, reduced = windows(torch.from_numpy(sim), 0.8)
    assert list(zip(first.tolist(), last.tolist())) == [(0, 2), (0, 2), (0, 2), (3, 4), (3, 4)]
    assert int(reduced) == 7 == brute_force_best(sim, 0.8)
    assert ref_windows(sim, 0.8) == ([(0, 2), (3, 4)], 7)
    at_tau = np.array([[.75, .9, .9], [.9, .75, .9], [.9, .9, .9]])  # exactly tau is not static (strict >)
    first, last, reduced = windows(torch.from_numpy(at_tau), 0.75)
    assert int(reduced) == ref_windows(at_tau, 0.75)[1] == brute_force_best(at_tau, 0.75) == 5
    rng = np.random.default_rng(2)
    for _ in range(5):
        sim = rng.uniform(0.6, 1.0, (5, 4))
        got = windows(torch.from_numpy(sim), 0.8)
        wins, saved = ref_windows(sim, 0.8)
        assert int(got[2]) == saved == brute_force_best(sim, 0.8)
        assert sorted(set(zip(got[0].tolist(), got[1].tolist()))) == wins


@pytest.mark.parametrize("keep", [0.25, 0.1])
@pytest.mark.parametrize("frames", [8, 32])
def test_matches_loop_reference(frames, keep):
    x, attn = _video(frames, seed=frames)
    budget = int(keep * frames * N)
    got, source = holitom(torch.from_numpy(x), torch.from_numpy(attn), plan(frames, N, budget))
    keys, want, want_source = reference(x, attn, budget)
    assert len(keys) == budget == got.shape[0]
    assert source.tolist() == want_source
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-5)
    assert sum(1 for k in keys if k[1] == 0) >= 10  # static centres exist: the windows step is exercised


def test_still_video_falls_back_to_single_frames():
    """Every frame identical: the windows would leave 196 tokens, fewer than the budget."""
    x, attn = _video(4, seed=1, still=1.0)
    x[:] = x[0]
    budget = 300
    got, source = holitom(torch.from_numpy(x), torch.from_numpy(attn), plan(4, N, budget))
    keys, want, want_source = reference(x, attn, budget)
    assert source.tolist() == want_source and all(k[1] == 1 for k in keys)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-5)


def test_registered_and_onnx_runtime_matches_the_reference(tmp_path):
    import onnx
    import onnxruntime as ort

    method = get_method("holitom")
    options = method.parse_options({})
    x, attn = _video(6, seed=4)
    budget = 300

    class Graph(torch.nn.Module):
        def forward(self, v, a):
            return method.temporal(VideoTokens(v, a), budget, options)

    path = tmp_path / "holitom.onnx"
    torch.onnx.export(Graph(), (torch.from_numpy(x), torch.from_numpy(attn)), str(path), dynamo=False,
                      input_names=["v", "a"], output_names=["tokens", "source"], opset_version=17)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert not ops & {"NonZero", "Unique", "Compress", "Loop", "If", "Scan"}
    tokens, source = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"v": x, "a": attn})
    _, want, want_source = reference(x, attn, budget)
    assert source.tolist() == want_source
    np.testing.assert_allclose(tokens, want, rtol=0, atol=1e-5)
