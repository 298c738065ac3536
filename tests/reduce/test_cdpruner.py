"""CDPruner (arXiv 2506.10967) against a loop reference written from the authors' `encode_images`
(Theia-4869/CDPruner `llava/model/llava_arch.py`): cosine similarity of the projected tokens,
min-max relevance, kernel diag(r) S diag(r), the fast greedy MAP loop (argmax, Cholesky row,
d2 -= e^2, -inf on the pick), sorted picks; with tokedge's documented relevance space (the
instruction's mean token embedding, as OpenVINO GenAI) and its spent-gain rule. Plain Python over
float64 NumPy. End to end: the tiny LLaVA export at two budgets against transformers' tower, its
projector, its input embeddings for the instruction, the loop and `generate`."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tests.contract_client import ContractClient
from tests.export.test_parity import PROMPTS, assert_generates_from, eager_tower, hf_inputs
from tokedge.reduce import get_method
from tokedge.reduce.cdpruner import select_cdpruner


def cdpruner_loop(x: np.ndarray, q: np.ndarray, k: int, negate: bool = False, spent: float = 1e-4) -> list[int]:
    """x [n, d] projected tokens, q [d] instruction -> the k picks, ascending."""
    n = len(x)
    unit = [x[i] / math.sqrt(float(x[i] @ x[i])) for i in range(n)]
    qn = q / math.sqrt(float(q @ q))
    cos = [float(u @ qn) for u in unit]
    r = [-c if negate else c for c in cos]
    lo, hi = min(r), max(r)
    r = [(v - lo + 1e-6) / max(hi - lo, 1e-12) for v in r]
    kernel = [[r[i] * float(unit[i] @ unit[j]) * r[j] for j in range(n)] for i in range(n)]
    d2 = [kernel[i][i] for i in range(n)]
    rows: list[list[float]] = []
    picks = []
    for _ in range(k):
        j = max(range(n), key=lambda i: (d2[i], -i))  # argmax, the first index on ties
        picks.append(j)
        if d2[j] > spent:
            e = [(kernel[j][i] - sum(c[j] * c[i] for c in rows)) / math.sqrt(d2[j]) for i in range(n)]
        else:  # nothing left to span: no update
            e = [0.0] * n
        rows.append(e)
        d2 = [v - e_i * e_i for v, e_i in zip(d2, e)]
        d2 = [v if v > spent else 0.0 for v in d2]
        d2[j] = -math.inf
        for p in picks:
            d2[p] = -math.inf
    return sorted(picks)


@pytest.mark.parametrize("seed,n,d,k,negate", [(0, 60, 48, 8, False), (1, 80, 96, 20, False), (2, 50, 64, 30, True),
                                               (3, 120, 160, 40, False)])
def test_selection_matches_the_loop(seed, n, d, k, negate):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, n, d)).astype(np.float32) + 0.5
    q = rng.standard_normal((2, d)).astype(np.float32)
    got = select_cdpruner(torch.from_numpy(x), torch.from_numpy(q), k, negate)
    for b in range(2):
        assert got[b].tolist() == cdpruner_loop(x[b].astype(np.float64), q[b].astype(np.float64), k, negate)


def test_picks_beyond_the_kernel_rank_go_in_raster_order():
    """Six distinct tokens repeated: after six picks every gain is spent (the authors' sqrt would be
    NaN); the rest are the lowest indices not picked."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((6, 32)).astype(np.float32)
    x = np.concatenate([base] * 5)[None]
    q = rng.standard_normal((1, 32)).astype(np.float32)
    got = select_cdpruner(torch.from_numpy(x), torch.from_numpy(q), 10, False)[0].tolist()
    assert got == cdpruner_loop(x[0].astype(np.float64), q[0].astype(np.float64), 10)
    assert len({i % 6 for i in got}) == 6  # the six distinct tokens first


def test_the_first_pick_is_the_most_relevant_token():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 40, 16)).astype(np.float32)
    q = x[0, 17] * 3
    assert 17 in select_cdpruner(torch.from_numpy(x), torch.from_numpy(q[None]), 1, False)[0].tolist()


@pytest.mark.parametrize("budget", [16, 32])
def test_export_matches_transformers_with_the_loop(budget, artifacts, hf_tiny, test_images):
    """The instruction from transformers' own input embeddings over each prompt's text tokens."""
    model, processor = hf_tiny
    client = ContractClient(artifacts("cdpruner", budget))
    pixel_values, ids, mask = hf_inputs(processor, test_images[:2], PROMPTS[:2], budget)
    out = eager_tower(model, pixel_values)
    with torch.no_grad():
        embeds = model.model.multi_modal_projector(out.hidden_states[model.config.vision_feature_layer][:, 1:])
        text = (mask == 1) & (ids != model.config.image_token_id)
        emb = model.get_input_embeddings()(ids)
        instruction = (emb * text[..., None]).sum(1) / text.sum(1, keepdim=True)
    feats = torch.stack([embeds[b, cdpruner_loop(embeds[b].double().numpy(), instruction[b].double().numpy(), budget)]
                         for b in range(2)])
    got = client.image_embeds(pixel_values.numpy(), instruction=instruction.numpy())
    np.testing.assert_allclose(got, feats.numpy(), atol=1e-4, rtol=0)
    assert_generates_from(client, model, pixel_values, ids, mask, feats)


def test_negate_option_is_checked():
    from tokedge.errors import UsageError

    method = get_method("cdpruner")
    assert method.parse_options({}) == {"negate": 0}
    with pytest.raises(UsageError, match="negate=2: use 0 or 1"):
        method.parse_options({"negate": "2"})
