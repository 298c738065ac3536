"""`none`: keep every visual token (576 for LLaVA-1.5). The full-token baseline."""

from __future__ import annotations

from tokedge.reduce.base import Method, Stage, VisionFeatures


def keep_all(vf: VisionFeatures, k: int, options: dict):
    """[b, n, d] -> [b, n, hidden]: every token, projected."""
    return vf.project(vf.features)


METHOD = Method(
    name="none",
    stage=Stage.NONE,
    paper="-",
    summary="keep all visual tokens (baseline)",
    reduce=keep_all,
    budget_meaning="all visual tokens",
)
