"""HiRED (arXiv 2408.10945), deployment variant: the budget split on hand cases (largest remainder,
caps, ties, no votes), the selection against a plain-loop reference written from the spec in
docs/methods.md, the base-view region map on hand-computed canvases, and the single-view variant."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from tokedge.reduce import get_method
from tokedge.reduce.base import VisionFeatures
from tokedge.reduce.hired import select_hired, split_budget, tile_quotas


def quotas_loop(weights, remaining, caps):
    """Largest remainder with exact fractions, leftover to the largest remainders (ties: lower
    tile), then each capped."""
    total = sum(weights)
    if total == 0:
        return [0] * len(weights)
    exact = [Fraction(remaining * w, total) for w in weights]
    floors = [int(e) for e in exact]
    leftover = remaining - sum(floors)
    by_remainder = sorted(range(len(weights)), key=lambda t: (-(exact[t] - floors[t]), t))
    for t in by_remainder[:leftover]:
        floors[t] += 1
    return [min(q, c) for q, c in zip(floors, caps)]


@pytest.mark.parametrize("weights,remaining,caps,expected", [
    ([3, 1, 0, 0], 10, [99] * 4, [8, 2, 0, 0]),  # 7.5 / 2.5: tie of remainders -> lower tile
    ([1, 1, 1], 2, [99] * 3, [1, 1, 0]),  # all remainders equal: the first two tiles
    ([2, 1], 7, [99, 99], [5, 2]),  # 4.67 / 2.33: the larger remainder gets the leftover
    ([1, 1], 10, [3, 99], [3, 5]),  # capped; the 2 lost are filled later, anywhere
    ([0, 0, 0], 9, [99] * 3, [0, 0, 0]),  # no votes: no quotas (the fill takes the best tokens)
    ([5, 0, 3, 0], 0, [9] * 4, [0, 0, 0, 0]),
])
def test_tile_quotas_hand_cases(weights, remaining, caps, expected):
    got = tile_quotas(torch.tensor(weights), remaining, torch.tensor(caps)).tolist()
    assert got == expected == quotas_loop(weights, remaining, caps)


def test_tile_quotas_random_against_the_loop():
    rng = np.random.default_rng(0)
    for _ in range(200):
        t = int(rng.integers(1, 7))
        weights = rng.integers(0, 40, t).tolist()
        caps = rng.integers(0, 300, t).tolist()
        remaining = int(rng.integers(0, 600))
        got = tile_quotas(torch.tensor(weights), remaining, torch.tensor(caps)).tolist()
        assert got == quotas_loop(weights, remaining, caps)


def test_split_budget():
    assert split_budget(585, 576, 0.5) == (292, 288)
    assert split_budget(2000, 576, 0.5) == (576, 288)  # the base view holds at most its own tokens
    assert split_budget(100, 576, 0.25) == (25, 432)


def hired_loop(partition, score, early_base, base_tile, tiles, budget, alpha):
    """The spec in plain Python: partition/score per candidate, early_base/base_tile per base token."""
    n = len(early_base)
    b0 = min(int(budget * alpha), n)
    k0 = int(n * (1 - alpha))
    votes = sorted(range(n), key=lambda i: (-early_base[i], i))[:k0]
    weights = [0] * tiles
    for i in votes:
        weights[base_tile[i]] += 1
    caps = [sum(1 for p in partition if p == t + 1) for t in range(tiles)]
    quota = [b0] + quotas_loop(weights, budget - b0, caps)
    kept = []
    for part in range(tiles + 1):
        members = sorted((c for c in range(len(score)) if partition[c] == part), key=lambda c: (-score[c], c))
        kept += members[: quota[part]]
    rest = sorted((c for c in range(len(score)) if c not in kept), key=lambda c: (-score[c], c))
    kept += rest[: budget - len(kept)]
    return sorted(kept)


def _image_like(seed, n=36, tiles=4, per_tile=(36, 30, 12, 0)):
    """A base view of n tokens, then tiles with the given candidate counts (a last tile cropped away)."""
    rng = np.random.default_rng(seed)
    partition = [0] * n + [t + 1 for t in range(tiles) for _ in range(per_tile[t])]
    score = rng.random(len(partition)).astype(np.float32)
    early = rng.random(n).astype(np.float32)
    base_tile = rng.integers(0, tiles, n)
    return partition, score, early, base_tile


@pytest.mark.parametrize("seed,budget,alpha", [(0, 40, 0.5), (1, 23, 0.5), (2, 60, 0.3), (3, 100, 0.5),
                                               (4, 7, 0.8), (5, 113, 0.5)])
def test_select_hired_matches_the_loop(seed, budget, alpha):
    partition, score, early, base_tile = _image_like(seed)
    tiles = 4
    onehot = torch.nn.functional.one_hot(torch.from_numpy(base_tile), tiles)
    got = select_hired(torch.from_numpy(score), torch.from_numpy(early), torch.tensor(partition), onehot, budget,
                       alpha).tolist()
    expected = hired_loop(partition, score.tolist(), early.tolist(), base_tile.tolist(), tiles, budget, alpha)
    assert got == expected and len(got) == budget


def test_caps_are_filled_with_the_best_remaining_tokens():
    """Every base token votes for tile 3, which has no candidates: its quota is lost to the cap and
    the best remaining tokens anywhere make up the count."""
    partition, score, early, _ = _image_like(9)
    base_tile = np.full(36, 3)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(base_tile), 4)
    got = select_hired(torch.from_numpy(score), torch.from_numpy(early), torch.tensor(partition), onehot, 30,
                       0.5).tolist()
    base_best = sorted(range(36), key=lambda c: -score[c])[:15]
    assert set(base_best) <= set(got) and len(got) == 30
    rest = sorted((c for c in range(len(score)) if c not in base_best), key=lambda c: -score[c])[:15]
    assert sorted(base_best + rest) == got


def test_single_view_keeps_the_top_cls_attention():
    """LLaVA-1.5 (one view): the authors' modeling_llava.py keeps the top B by the feature layer's
    CLS attention."""
    g = torch.Generator().manual_seed(0)
    feats, cls = torch.randn(2, 50, 8, generator=g), torch.rand(2, 50, generator=g)
    got = get_method("hired").reduce(VisionFeatures(features=feats, project=lambda t: t, cls_attention=cls), 12,
                                     {"alpha": 0.5})
    for b in range(2):
        keep = sorted(sorted(range(50), key=lambda j: -float(cls[b, j]))[:12])
        torch.testing.assert_close(got[b], feats[b, keep])


def test_alpha_option_is_checked():
    from tokedge.errors import UsageError

    method = get_method("hired")
    assert method.parse_options({}) == {"alpha": 0.5}
    with pytest.raises(UsageError, match="alpha=1.0: must be between 0 and 1"):
        method.parse_options({"alpha": "1.0"})


def _layout():
    from tokedge.runtime.layout import AnyresLayout

    return AnyresLayout(tile=336, patch_grid=24, pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336),
                                                             (336, 1008)))


def test_base_regions_on_hand_computed_canvases():
    """A square image fills a 2x2 canvas: tile = 2*(row >= 12) + (col >= 12). A 300x200 (WxH) image
    sits on a 336x672 canvas resized to 336x504 with 84 px on each side: base column c's centre is
    at x = 84 + (c + 0.5) * 21, so columns 0..11 land in tile 0 and 12..23 in tile 1."""
    from tokedge.runtime.layout import base_regions, plan_image

    layout = _layout()
    square = base_regions(layout, plan_image(layout, 1000, 1000)).reshape(24, 24)
    r, c = np.mgrid[0:24, 0:24]
    np.testing.assert_array_equal(square, 2 * (r >= 12) + (c >= 12))
    wide = plan_image(layout, 200, 300)
    assert wide.canvas == (336, 672) and wide.resized == (336, 504) and wide.offset == (0, 84)
    np.testing.assert_array_equal(base_regions(layout, wide).reshape(24, 24), np.broadcast_to(c >= 12, (24, 24)))
