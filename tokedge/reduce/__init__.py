"""Reduction methods: a registry of `Method` descriptions with pure tensor functions at their core.

The registry loads lazily (the methods import torch); `tokedge.reduce.base` (the `Method`
description, `Stage`, `Signal`) stays importable on the torch-free device path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokedge.errors import UsageError

if TYPE_CHECKING:
    from tokedge.reduce.base import Method

_METHODS: dict[str, Method] | None = None


def _registry() -> dict[str, Method]:
    global _METHODS
    if _METHODS is None:
        from tokedge.reduce import (
            cdpruner,
            cls_attn,
            divprune,
            dycoke,
            evs,
            fastvid,
            globalcom2,
            hired,
            hiprune,
            holitom,
            holov,
            in_llm,
            none,
            pool,
            random_tokens,
            todre,
            tome,
            vidcom2,
            visionzip,
            vispruner,
        )

        _METHODS = {
            m.name: m
            for m in (none.METHOD, cls_attn.METHOD, hired.METHOD, globalcom2.METHOD, hiprune.METHOD, holov.METHOD, cdpruner.METHOD, todre.METHOD, visionzip.METHOD, divprune.METHOD, vispruner.METHOD,
                      pool.METHOD, random_tokens.METHOD, tome.METHOD, in_llm.FASTV, in_llm.PDROP, in_llm.DART, evs.METHOD, dycoke.METHOD,
                      fastvid.METHOD, holitom.METHOD, vidcom2.METHOD)
        }
    return _METHODS


def get_method(name: str) -> Method:
    methods = _registry()
    if name in methods:
        return methods[name]
    from tokedge.suggest import did_you_mean

    hint = did_you_mean(name, methods)
    raise UsageError(f"unknown method '{name}'; {hint}choose one of: {', '.join(methods)} (see `tokedge methods`)")


def __getattr__(name: str):
    if name == "METHODS":
        return _registry()
    if name in ("Method", "VisionFeatures"):
        from tokedge.reduce import base

        return getattr(base, name)
    raise AttributeError(name)


__all__ = ["METHODS", "Method", "VisionFeatures", "get_method"]
