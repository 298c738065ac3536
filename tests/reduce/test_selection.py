"""Each vision-side method against a straightforward reference written from its paper's
description (Python loops over samples and tokens), on the same random inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tokedge.reduce import get_method
from tokedge.reduce.base import VisionFeatures
from tokedge.reduce.tome import merge_schedule, merge_weighted

B, N, D, E = 2, 64, 12, 6


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        features=torch.randn(B, N, D, generator=g),
        cls_attention=torch.rand(B, N, generator=g),
        keys=torch.randn(B, N, E, generator=g),
        cls_token=torch.randn(B, 1, D, generator=g),
    )


def _vf(x):
    return VisionFeatures(project=lambda t: t, **x)


def _cos(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _ranked(scores):
    return sorted(range(len(scores)), key=lambda j: -float(scores[j]))


@pytest.mark.parametrize("k", [1, 7, 16, 63])
def test_cls_attn(k):
    x = _inputs(k)
    got = get_method("cls-attn").reduce(_vf(x), k, {})
    for b in range(B):
        keep = sorted(_ranked(x["cls_attention"][b])[:k])
        torch.testing.assert_close(got[b], x["features"][b, keep])


@pytest.mark.parametrize("k,contextual", [(16, None), (10, 3), (40, None)])
def test_visionzip(k, contextual):
    x = _inputs(k)
    opts = {"contextual": contextual}
    got = get_method("visionzip").reduce(_vf(x), k, opts)
    k_c = contextual or max(1, round(k * 10 / 64))
    dominant = k - 1 - k_c
    for b in range(B):
        order = _ranked(x["cls_attention"][b])
        dom, rest = sorted(order[:dominant]), sorted(order[dominant:])
        step = max(1, len(rest) // k_c)
        targets = rest[::step][:k_c]
        others = [t for t in rest if t not in targets]
        keys = x["keys"][b].numpy()
        assigned = {t: [] for t in targets}
        for o in others:
            sims = [_cos(keys[o], keys[t]) for t in targets]
            assigned[targets[int(np.argmax(sims))]].append(o)
        feats = x["features"][b].numpy()
        ctx = [feats[t] + (np.mean([feats[o] for o in assigned[t]], axis=0) if assigned[t] else 0) for t in targets]
        expected = np.concatenate([x["cls_token"][b].numpy(), feats[dom], np.stack(ctx)])
        np.testing.assert_allclose(got[b].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_divprune(k):
    x = _inputs(k)
    got = get_method("divprune").reduce(_vf(x), k, {})
    for b in range(B):
        feats = x["features"][b].numpy()
        dist = [[1 - _cos(feats[i], feats[j]) for j in range(N)] for i in range(N)]
        nearest = [sorted(dist[i])[1] for i in range(N)]
        picks = [int(np.argmax(nearest))]
        while len(picks) < k:
            best, best_score = None, -1.0
            for j in range(N):
                if j in picks:
                    continue
                score = min(dist[p][j] for p in picks)
                if score > best_score:
                    best, best_score = j, score
            picks.append(best)
        torch.testing.assert_close(got[b], x["features"][b, sorted(picks)])


def test_divprune_never_picks_a_duplicate_twice():
    x = _inputs(3)
    x["features"][:, 1] = x["features"][:, 0]  # exact duplicate tokens
    got = get_method("divprune").reduce(_vf(x), N - 1, {})
    for b in range(B):
        rows = {tuple(r.tolist()) for r in got[b]}
        assert len(rows) == N - 1


@pytest.mark.parametrize("k,ratio", [(16, 0.5), (9, 0.0), (30, 1.0), (21, 0.3)])
def test_vispruner(k, ratio):
    x = _inputs(k)
    got = get_method("vispruner").reduce(_vf(x), k, {"important": ratio})
    n_imp = min(k, round(k * ratio))
    for b in range(B):
        order = _ranked(x["cls_attention"][b])
        important, rest = order[:n_imp], sorted(order[n_imp:])
        feats = x["features"][b].numpy()
        while len(rest) > k - n_imp:
            a_set, b_set = rest[0::2], rest[1::2]
            r = min(len(a_set), len(rest) - (k - n_imp))
            best = {a: max((_cos(feats[a], feats[o]) for o in b_set), default=0.0) for a in a_set}
            dropped = sorted(a_set, key=lambda a: -best[a])[:r]
            rest = sorted(t for t in rest if t not in dropped)
        torch.testing.assert_close(got[b], x["features"][b, sorted(important + rest)])


@pytest.mark.parametrize("k", [1, 4, 9, 16, 25, 36, 49])
def test_pool_equals_adaptive_avg_pool(k):
    x = _inputs(k)
    got = get_method("pool").reduce(_vf(x), k, {})
    grid, side = int(math.isqrt(N)), int(math.isqrt(k))
    img = x["features"].transpose(1, 2).reshape(B, D, grid, grid)
    expected = torch.nn.functional.adaptive_avg_pool2d(img, side).reshape(B, D, k).transpose(1, 2)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("r,class_token", [(1, True), (5, True), (12, False), (16, True)])
def test_tome_step_matches_loop_reference(r, class_token):
    g = torch.Generator().manual_seed(r)
    t = 33
    x, metric = torch.randn(B, t, D, generator=g), torch.randn(B, t, E, generator=g)
    size = torch.randint(1, 4, (B, t, 1), generator=g).float()
    got_x, got_size = merge_weighted(x, size, metric, r, class_token)
    for b in range(B):
        a_idx, b_idx = list(range(0, t, 2)), list(range(1, t, 2))
        best = {}
        for a in a_idx:
            if class_token and a == 0:
                best[a] = (-math.inf, None)
                continue
            sims = [_cos(metric[b, a], metric[b, o]) for o in b_idx]
            best[a] = (max(sims), b_idx[int(np.argmax(sims))])
        by_similarity = sorted(a_idx, key=lambda a: -best[a][0])
        merged = by_similarity[:r]
        # ToMe keeps unmerged A tokens in edge order, re-sorted by position when there is a CLS token
        kept = sorted(by_similarity[r:]) if class_token else by_similarity[r:]
        rows, sizes = [], []
        for a in kept:
            rows.append(x[b, a].numpy())
            sizes.append(float(size[b, a]))
        for o in b_idx:
            group = [o] + [a for a in merged if best[a][1] == o]
            s = sum(float(size[b, m]) for m in group)
            rows.append(sum(x[b, m].numpy() * float(size[b, m]) for m in group) / s)
            sizes.append(s)
        np.testing.assert_allclose(got_x[b].numpy(), np.stack(rows), atol=1e-5)
        np.testing.assert_allclose(got_size[b, :, 0].numpy(), sizes)


@pytest.mark.parametrize("n,budget,layers", [(576, 64, 23), (576, 64, 5), (576, 18, 5), (576, 500, 3), (100, 1, 9)])
def test_tome_schedule_lands_on_budget(n, budget, layers):
    sched = merge_schedule(n, budget, layers)
    assert sched is not None and sum(sched) == n - budget
    tokens = n + 1
    for r in sched:
        assert 0 <= r <= (tokens - 1) // 2
        tokens -= r
    assert merge_schedule(576, 16, 5) is None


def test_unknown_and_bad_options():
    from tokedge.errors import UsageError

    with pytest.raises(UsageError, match="has no option 'foo'"):
        get_method("visionzip").parse_options({"foo": "1"})
    with pytest.raises(UsageError, match="expected float"):
        get_method("vispruner").parse_options({"important": "lots"})
    with pytest.raises(UsageError, match="between 0 and 1"):
        get_method("vispruner").parse_options({"important": "2"})
    with pytest.raises(UsageError, match="perfect square"):
        get_method("pool").check_budget(50, 576)
