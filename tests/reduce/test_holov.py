"""HoloV (arXiv 2510.02912) against a loop reference written from the authors' `HoloV` function
(obananas/HoloV `llava/model/utils.py`): raster bands, per-band similarity variance scaled to the
band's attention, floor allocation plus one each for the heaviest bands, top CLS attention per band
in descending order, zero vectors where a band's surplus is lost. Plain Python over float64 NumPy,
ties to the lower index. End to end: the tiny LLaVA export at two budgets against transformers'
eager tower, the loop selection on its projected tokens and `generate`."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.contract_client import ContractClient
from tests.export.test_parity import PROMPTS, assert_generates_from, eager_tower, hf_inputs
from tokedge.reduce import get_method
from tokedge.reduce.holov import crop_count, select_holov


def holov_loop(x: np.ndarray, attn: np.ndarray, budget: int, crops: int) -> list[int | None]:
    """One view: x [n, D], attn [n] -> the kept token per output row (None: a zero row)."""
    n = len(attn)
    bands, start = [], 0
    for c in range(crops):
        size = n // crops + (1 if c < n % crops else 0)
        bands.append(list(range(start, start + size)))
        start += size
    scores = []
    for band in bands:
        m = len(band)
        f = [x[i] / (math.sqrt(float(x[i] @ x[i])) + 1e-6) for i in band]
        var = []
        for p in range(m):
            row = [0.0 if p == q else float(f[p] @ f[q]) for q in range(m)]
            mean = sum(row) / (m - 1)
            var.append(sum((v - mean) ** 2 for v in row) / (m - 1))
        a = [float(attn[i]) * 1e3 for i in band]
        scaling = (sum(abs(v) for v in a) / m) / (sum(abs(v) for v in var) / m + 1e-6)
        scores.append(sum(a[p] + 0.09 * var[p] * scaling for p in range(m)) / m)
    total = sum(scores) + 1e-6
    weights = [s / total for s in scores]
    alloc = [math.floor(w * budget) for w in weights]
    left = budget - sum(alloc)
    for c in sorted(range(crops), key=lambda c: (-weights[c], c))[:max(left, 0)]:
        alloc[c] += 1
    out: list[int | None] = []
    for band, k in zip(bands, alloc):
        # the authors: `patch` as it is (raster) when alloc >= its size, else topk(attention) (descending)
        out += band if k >= len(band) else sorted(band, key=lambda i: (-attn[i], i))[:k]
    return out + [None] * (budget - len(out))


@pytest.mark.parametrize("seed,n,budget,crops", [(0, 576, 64, 16), (1, 576, 128, 8), (2, 100, 20, 5),
                                                 (3, 96, 30, 7), (4, 576, 192, 5)])
def test_selection_matches_the_loop(seed, n, budget, crops):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, n, 12)).astype(np.float32)
    attn = (rng.random((2, n)) ** 3).astype(np.float32) / n
    attn[1, :n // crops] *= 40  # one band takes most of the attention: its surplus is lost, zero rows
    index, real = select_holov(torch.from_numpy(x), torch.from_numpy(attn), budget, crops)
    for b in range(2):
        expected = holov_loop(x[b].astype(np.float64), attn[b].astype(np.float64), budget, crops)
        got = [int(i) if r else None for i, r in zip(index[b].tolist(), real[b].tolist())]
        assert got == expected
    if n // crops < budget:  # the concentrated band's share exceeds its size: its surplus is lost, zero rows
        assert not real[1].all()


def test_crop_counts_are_the_authors():
    """16 bands at 64 of 576 (their LLaVA call), their Qwen formula elsewhere: 8 at 128, 5 at 192."""
    assert [crop_count(576, k) for k in (64, 128, 192)] == [16, 8, 5]
    assert crop_count(576, 64, {"crops": 4}) == 4


def reference_features(model, pixel_values, k: int) -> torch.Tensor:
    out = eager_tower(model, pixel_values)
    layer = model.config.vision_feature_layer
    with torch.no_grad():
        embeds = model.model.multi_modal_projector(out.hidden_states[layer][:, 1:])
    attn = out.attentions[layer][:, :, 0, 1:].float().mean(dim=1)
    rows = []
    for b in range(embeds.shape[0]):
        kept = holov_loop(embeds[b].double().numpy(), attn[b].double().numpy(), k, crop_count(576, k))
        rows.append(torch.stack([embeds[b, i] if i is not None else torch.zeros_like(embeds[b, 0]) for i in kept]))
    return torch.stack(rows)


@pytest.mark.parametrize("budget", [64, 128])
def test_export_matches_transformers_with_the_loop(budget, artifacts, hf_tiny, test_images):
    model, processor = hf_tiny
    client = ContractClient(artifacts("holov", budget))
    pixel_values, ids, mask = hf_inputs(processor, test_images[:2], PROMPTS[:2], budget)
    feats = reference_features(model, pixel_values, budget)
    np.testing.assert_allclose(client.image_embeds(pixel_values.numpy()), feats.numpy(), atol=1e-4, rtol=0)
    assert_generates_from(client, model, pixel_values, ids, mask, feats)


def test_budget_and_options_are_checked():
    from tokedge.errors import UsageError

    method = get_method("holov")
    assert method.parse_options({}) == {"crops": None}
    with pytest.raises(UsageError, match="use --budget >= 4"):
        method.check_budget(3, 576)
