"""VidCom2 against a loop reference written from the authors' code (xuyang-liu16/VidCom2
`token_compressor/vidcom2/vidcom2.py`: low-variance channels, multi-scale Gaussian similarity to
the video and frame centres, softmax(0.01) frame scales, per-frame most-unique tokens) and vLLM's
exact-count step (`vllm/multimodal/video_prune/vidcom2.py`): plain Python over float64 NumPy, ties
keep the lower flat index. Counts against vLLM's formula; hand cases for the frame budgets."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tokedge.errors import UsageError
from tokedge.reduce import get_method
from tokedge.reduce.vidcom2 import frame_counts, select_vidcom2, target_count

ALPHAS = [2.0**k for k in range(-3, 2)]


def _gauss(x: np.ndarray, c: np.ndarray) -> float:
    d2 = float(((x - c) ** 2).sum())
    return sum(math.exp(-d2 / (2 * a)) for a in ALPHAS)


def reference(x: np.ndarray, target: int, retention: float) -> list[int]:
    frames, n, dim = x.shape
    flat = x.reshape(frames * n, dim).astype(np.float64)
    var = flat.var(axis=0)  # population variance per channel
    channels = sorted(range(dim), key=lambda c: (var[c], c))[: max(1, int(dim * 0.5))]
    tokens = flat[:, channels]
    tokens = tokens / np.maximum(np.linalg.norm(tokens, axis=1, keepdims=True), 1e-12)
    tokens = tokens.reshape(frames, n, -1)
    video_centre = tokens.reshape(frames * n, -1).mean(axis=0)
    sim, frame_score = {}, []
    for t in range(frames):
        frame_centre = tokens[t].mean(axis=0)
        v = [_gauss(tokens[t, j], video_centre) for j in range(n)]
        frame_score.append(-sum(v) / n)
        for j in range(n):
            sim[t * n + j] = v[j] + _gauss(tokens[t, j], frame_centre)
    top = max(frame_score)
    e = [math.exp((s - top) / 0.01) for s in frame_score]
    probs = [v / sum(e) for v in e]
    mean_p = sum(probs) / frames
    kept = []
    for t in range(frames):
        scale = min(retention * (1 + probs[t] - mean_p), 1.0)
        k = min(max(round(scale * n), 1), n)  # Python round: half to even, as torch.round
        order = sorted(range(t * n, (t + 1) * n), key=lambda i: (sim[i], i))
        kept += order[:k]
    if len(kept) > target:  # vLLM: drop the kept tokens with the highest similarity, anywhere
        by_sim = sorted(kept, key=lambda i: (-sim[i], -i))
        kept = [i for i in kept if i not in set(by_sim[: len(kept) - target])]
    elif len(kept) < target:  # add the dropped tokens with the lowest similarity
        rest = sorted((i for i in range(frames * n) if i not in set(kept)), key=lambda i: (sim[i], i))
        kept += rest[: target - len(kept)]
    return sorted(kept)


def _video(frames: int, n: int, d: int = 16, seed: int = 0, static: int = 0) -> np.ndarray:
    """Random frames drifting from a shared base; the first `static` frames repeat frame 0 exactly."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, d)).astype(np.float32)
    x = np.stack([base + rng.standard_normal((n, d)).astype(np.float32) * rng.uniform(0.1, 1.5)
                  for _ in range(frames)])
    x[1:static] = x[0]
    return x


@pytest.mark.parametrize("frames,n,rate", [(8, 49, 0.75), (8, 49, 0.85), (6, 36, 0.5), (4, 20, 0.9), (32, 25, 0.75)])
def test_select_matches_the_loop_reference(frames, n, rate):
    x = _video(frames, n, seed=frames * n)
    target, retention = target_count(frames, n, None, {"pruning_rate": rate})
    got = select_vidcom2(torch.from_numpy(x), target, retention).tolist()
    assert len(got) == target
    assert got == reference(x, target, retention)


@pytest.mark.parametrize("budget", [40, 97, 200])
def test_budget_keeps_exactly_budget_tokens(budget):
    frames, n = 8, 49
    x = _video(frames, n, seed=budget, static=3)  # three identical frames: ties everywhere among them
    target, retention = target_count(frames, n, budget, {})
    assert target == budget and retention == budget / (frames * n)
    got = select_vidcom2(torch.from_numpy(x), target, retention).tolist()
    assert got == reference(x, target, retention)


@pytest.mark.parametrize("frames,rate,expected", [(8, 0.75, 392), (32, 0.75, 1568), (32, 0.85, 940), (4, 0.999, 4)])
def test_count_matches_vllm(frames, rate, expected):
    assert target_count(frames, 196, None, {"pruning_rate": rate})[0] == expected


def test_frame_budgets_follow_the_authors_scales():
    """One frame far from the video centre takes ~2R of its tokens, the others R(1 - 1/F); the
    authors' total drifts (1553 of 1568 for 32 OneVision frames at R = 0.25), hence vLLM's fix-up."""
    s = torch.zeros(32)
    s[5] = 1.0  # the most unique frame: the softmax at temperature 0.01 is one-hot
    ks = frame_counts(s, 196, 0.25).tolist()
    assert ks[5] == round(0.25 * (2 - 1 / 32) * 196) == 96
    assert all(k == 47 for i, k in enumerate(ks) if i != 5) and sum(ks) == 1553


def test_budget_out_of_range_is_refused():
    with pytest.raises(UsageError, match=r"use --budget 8\.\.392"):
        target_count(8, 49, 7, {})
    method = get_method("vidcom2")
    assert method.parse_options({"pruning_rate": "0.75"}) == {"pruning_rate": 0.75}
    with pytest.raises(UsageError, match="pruning_rate"):
        method.parse_options({"pruning_rate": "1.5"})
