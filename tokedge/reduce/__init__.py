"""Reduction methods: a registry of `Method` descriptions with pure tensor functions at their core."""

from __future__ import annotations

from tokedge.errors import UsageError
from tokedge.reduce import cls_attn, divprune, in_llm, none, pool, tome, visionzip, vispruner
from tokedge.reduce.base import Method, VisionFeatures

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        none.METHOD,
        cls_attn.METHOD,
        visionzip.METHOD,
        divprune.METHOD,
        vispruner.METHOD,
        pool.METHOD,
        tome.METHOD,
        in_llm.FASTV,
        in_llm.PDROP,
        in_llm.DART,
    )
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise UsageError(f"unknown method '{name}'; choose one of: {', '.join(METHODS)}") from None


__all__ = ["METHODS", "Method", "VisionFeatures", "get_method"]
