"""ToDRE stage 1 (arXiv 2505.18757 v2, Algorithm 1; no code released) against a loop written from the
paper's algorithm: unit vectors, the pivot by the highest CLS attention (tiled images: among the
base view), then k - 1 times the token with the smallest cumulative similarity to the picks; picks
in raster order. Plain Python over float64. End to end: the tiny LLaVA export at two budgets against
transformers' tower, its projector and `generate`."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.contract_client import ContractClient
from tests.export.test_parity import PROMPTS, assert_generates_from, eager_tower, hf_inputs
from tokedge.reduce.todre import maxsum_picks


def todre_loop(x: np.ndarray, pivot_score: list[float], k: int, pivots: list[int] | None = None) -> list[int]:
    """x [n, d] projected tokens, pivot_score [n]; `pivots`: the tokens that may be the pivot (all)."""
    n = len(x)
    unit = [x[i] / math.sqrt(float(x[i] @ x[i])) for i in range(n)]
    allowed = range(n) if pivots is None else pivots
    p = max(allowed, key=lambda i: (pivot_score[i], -i))
    picks = [p]
    s = [float(unit[i] @ unit[p]) for i in range(n)]
    for _ in range(k - 1):
        c = min((i for i in range(n) if i not in picks), key=lambda i: (s[i], i))
        picks.append(c)
        s = [s[i] + float(unit[i] @ unit[c]) for i in range(n)]
    return sorted(picks)


@pytest.mark.parametrize("seed,n,d,k", [(0, 50, 16, 10), (1, 120, 32, 40), (2, 30, 8, 29)])
def test_selection_matches_the_loop(seed, n, d, k):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, n, d)).astype(np.float32)
    score = rng.random((2, n)).astype(np.float32)
    got = torch.sort(maxsum_picks(torch.from_numpy(x), torch.from_numpy(score), k - 1), dim=-1).values
    for b in range(2):
        assert got[b].tolist() == todre_loop(x[b].astype(np.float64), score[b].tolist(), k)


def test_max_sum_is_not_max_min():
    """Two tight clusters and one far token: max-sum (ToDRE v2) and farthest-first (v1, DivPrune)
    can part ways; the loop and the graph agree on max-sum."""
    rng = np.random.default_rng(3)
    a = rng.normal(0, 0.05, (10, 4)) + [1, 0, 0, 0]
    b = rng.normal(0, 0.05, (10, 4)) + [0, 1, 0, 0]
    x = np.concatenate([a, b, [[0.0, 0.0, 1.0, 0.2]]]).astype(np.float32)[None]
    score = np.zeros((1, 21), np.float32)
    score[0, 0] = 1.0
    got = torch.sort(maxsum_picks(torch.from_numpy(x), torch.from_numpy(score), 3), dim=-1).values[0].tolist()
    assert got == todre_loop(x[0].astype(np.float64), score[0].tolist(), 4) and 0 in got and 20 in got
    unit = x[0] / np.linalg.norm(x[0], axis=1, keepdims=True)
    farthest = [0]  # v1's greedy k-center from the same pivot: the largest distance to the nearest pick
    for _ in range(3):
        nearest = (1 - unit @ unit[farthest].T).min(axis=1)
        nearest[farthest] = -1
        farthest.append(int(nearest.argmax()))
    assert sorted(farthest) != got


@pytest.mark.parametrize("budget", [32, 128])
def test_export_matches_transformers_with_the_loop(budget, artifacts, hf_tiny, test_images):
    model, processor = hf_tiny
    client = ContractClient(artifacts("todre", budget))
    pixel_values, ids, mask = hf_inputs(processor, test_images[:2], PROMPTS[:2], budget)
    out = eager_tower(model, pixel_values)
    layer = model.config.vision_feature_layer
    with torch.no_grad():
        embeds = model.model.multi_modal_projector(out.hidden_states[layer][:, 1:])
    cls = out.attentions[layer][:, :, 0, 1:].float().mean(dim=1)
    feats = torch.stack([embeds[b, todre_loop(embeds[b].double().numpy(), cls[b].tolist(), budget)] for b in range(2)])
    np.testing.assert_allclose(client.image_embeds(pixel_values.numpy()), feats.numpy(), atol=1e-4, rtol=0)
    assert_generates_from(client, model, pixel_values, ids, mask, feats)
