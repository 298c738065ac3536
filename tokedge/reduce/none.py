"""`none`: keep every visual token (576 for LLaVA-1.5). The full-token baseline."""

from __future__ import annotations

from tokedge.reduce.base import Method, VisionFeatures


def keep_all(vf: VisionFeatures, k: int):
    """[b, n, d] -> [b, n, d], unchanged (k == n)."""
    return vf.features


METHOD = Method(
    name="none",
    stage="none",
    paper="-",
    summary="keep all visual tokens (baseline)",
    reduce=keep_all,
    budget_meaning="all visual tokens",
)
