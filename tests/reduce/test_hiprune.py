"""HiPrune (arXiv 2508.00553) against a loop reference written from the authors' code
(Danielement321/HiPrune `LLaVA/llava/model/llava_arch.py`, `encode_images`): anchors by received
attention in the object layer, their flat neighbours idx +- 1 and idx +- W clamped to the grid (the
authors' wrap and clamp kept), duplicates once, then registers by the feature layer's received
attention; raster order. End to end: the exported tiny LLaVA at two budgets against transformers'
own tower (eager attentions), the loop selection, its projector and `generate`."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.contract_client import ContractClient
from tests.export.test_parity import PROMPTS, assert_generates_from, eager_tower, hf_inputs
from tokedge.reduce import get_method
from tokedge.reduce.hiprune import anchor_count, object_layer, select_hiprune


def hiprune_loop(obj: list[float], deep: list[float], width: int, budget: int, alpha: float) -> list[int]:
    n = len(obj)
    anchors = sorted(range(n), key=lambda i: (-obj[i], i))[: round(budget * alpha / 5)]
    chosen = set()
    for i in anchors:
        for j in (i, i - 1, i + 1, i - width, i + width):
            chosen.add(min(max(j, 0), n - 1))
    registers = sorted((i for i in range(n) if i not in chosen), key=lambda i: (-deep[i], i))
    return sorted(chosen | set(registers[: budget - len(chosen)]))


@pytest.mark.parametrize("seed,width,budget,alpha", [(0, 24, 64, 0.1), (1, 24, 192, 0.1), (2, 24, 128, 0.1),
                                                     (3, 12, 40, 0.5), (4, 7, 20, 1.0), (5, 24, 100, 0.3)])
def test_selection_matches_the_loop(seed, width, budget, alpha):
    rng = np.random.default_rng(seed)
    n = width * width
    obj = rng.random((2, n)).astype(np.float32) / n
    deep = rng.random((2, n)).astype(np.float32) / n
    obj[1, [0, width - 1, n - 1, n - width]] = 1.0  # anchors on the corners: the clamp and the row wrap
    got = select_hiprune(torch.from_numpy(obj), torch.from_numpy(deep), width, budget, alpha)
    for b in range(2):
        assert got[b].tolist() == hiprune_loop(obj[b].tolist(), deep[b].tolist(), width, budget, alpha)


def test_anchor_counts_are_the_authors():
    """round(K * 0.1 / 5) with Python's round: 4, 3 and 1 anchors at 192, 128 and 64 tokens."""
    assert [anchor_count(k, 0.1) for k in (192, 128, 64)] == [4, 3, 1]
    assert anchor_count(125, 0.1) == 2  # 2.5 rounds half to even
    assert object_layer({}, 23) == 8  # CLIP-L to hidden_states[-2]: the authors' layer 9 (attentions[8])
    assert object_layer({"object_layer": 3}, 5) == 2 and object_layer({"object_layer": 40}, 5) == 4


def reference_features(model, pixel_values, k: int, layer: int) -> torch.Tensor:
    """transformers' eager tower: received attention (mean over heads and all queries, CLS key dropped)
    in attentions[layer] and in the feature layer, the loop selection, its projector."""
    out = eager_tower(model, pixel_values)
    feature_layer = model.config.vision_feature_layer
    feats = out.hidden_states[feature_layer][:, 1:]
    obj = out.attentions[layer].float().mean(dim=1).mean(dim=1)[:, 1:]
    deep = out.attentions[feature_layer].float().mean(dim=1).mean(dim=1)[:, 1:]
    rows = [feats[b, hiprune_loop(obj[b].tolist(), deep[b].tolist(), 24, k, 0.1)] for b in range(feats.shape[0])]
    with torch.no_grad():
        return model.model.multi_modal_projector(torch.stack(rows))


@pytest.mark.parametrize("budget,options,layer", [(64, (), 1), (192, (("object_layer", "3"),), 2)])
def test_export_matches_transformers_with_the_loop(budget, options, layer, artifacts, hf_tiny, test_images):
    """Default object layer of the tiny tower (5 layers to the feature layer): round(5 * 9/24) = 2."""
    model, processor = hf_tiny
    client = ContractClient(artifacts("hiprune", budget, options=options))
    pixel_values, ids, mask = hf_inputs(processor, test_images[:2], PROMPTS[:2], budget)
    feats = reference_features(model, pixel_values, budget, layer)
    got = client.image_embeds(pixel_values.numpy())
    np.testing.assert_allclose(got, feats.numpy(), atol=1e-4, rtol=0)
    assert_generates_from(client, model, pixel_values, ids, mask, feats)


def test_options_are_checked():
    from tokedge.errors import UsageError

    method = get_method("hiprune")
    assert method.parse_options({}) == {"alpha": 0.1, "object_layer": None}
    with pytest.raises(UsageError, match="object_layer=0: must be >= 1"):
        method.parse_options({"object_layer": "0"})
