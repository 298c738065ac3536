"""ToMe `--option schedule=even|early`: both land on the budget within each layer's cap; early
merges as much as each layer allows first (fewer tokens in later layers: fewer vision FLOPs); an
early-schedule export validates against its reference and its vision graph runs fewer tokens."""

from __future__ import annotations

import numpy as np
import pytest

from tokedge.artifact import load_artifact
from tokedge.errors import UsageError
from tokedge.reduce import get_method
from tokedge.reduce.tome import merge_schedule
from tokedge.report import flops as fl


@pytest.mark.parametrize("n,budget,layers", [(576, 64, 23), (576, 64, 5), (576, 18, 5), (576, 500, 3), (100, 1, 9)])
def test_early_schedule_front_loads_within_caps(n, budget, layers):
    even, early = merge_schedule(n, budget, layers), merge_schedule(n, budget, layers, mode="early")
    assert sum(early) == sum(even) == n - budget
    tokens, tokens_even = n + 1, n + 1
    work_early = work_even = 0
    for r, r_even in zip(early, even):
        cap = (tokens - 1) // 2
        assert r == min(cap, n - budget - (n + 1 - tokens))  # as much as the layer allows, until the budget
        work_early, work_even = work_early + tokens, work_even + tokens_even  # tokens each layer runs on
        tokens, tokens_even = tokens - r, tokens_even - r_even
    assert work_early <= work_even


def test_schedule_option_is_checked():
    method = get_method("tome")
    assert method.parse_options({})["schedule"] == "even"
    assert method.parse_options({"schedule": "early"})["schedule"] == "early"
    with pytest.raises(UsageError, match="schedule must be even or early"):
        method.parse_options({"schedule": "late"})


def test_early_export_validates_and_costs_fewer_vision_flops(artifacts):
    even = load_artifact(artifacts("tome", 128))
    early_art = artifacts("tome", 128, options=(("schedule", "early"),))
    early = load_artifact(early_art)
    assert early.reduction.options["schedule"] == "early"
    assert early.reference["parity_at_export"]["ok"]
    assert fl.vision_cost(early, 128).flops < fl.vision_cost(even, 128).flops
    # and the exported graph runs, landing on the budget
    from tokedge.runtime.graphs import ArtifactGraphs

    with ArtifactGraphs(early_art, early) as graphs:
        out = graphs.vision(np.random.default_rng(0).random((1, 3, 336, 336), dtype=np.float32))
    assert out.shape[1] == 128
