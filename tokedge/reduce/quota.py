"""Per-image token counts on dynamic-resolution families (torch-free: the runtime computes them).

An image of `n` merged tokens keeps
- `--budget K`: min(K, n) tokens (a count per image),
- `--keep f`:   clamp(ceil(f * n), 1, n) tokens (a ratio, since n varies with the image).
TensorRT Edge-LLM's DART keeps clamp(ceil(n * (1 - r)), 1, n) per image span for its
`--dartReductionRatio r`, so `--keep 1-r` gives the same count (exactly, for the ratios Edge-LLM
documents: 0.25 and 0.5), and skips pruning altogether when the request has fewer than 16 visual
tokens (`MIN_VISUAL_TOKENS`, its `minVisualTokens`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokedge.errors import UsageError

MIN_VISUAL_TOKENS = 16  # Edge-LLM DART: fewer visual tokens than this in a request -> no pruning


@dataclass(frozen=True)
class TokenBudget:
    """What the user asked for: a token count per image (`count`) or a keep ratio (`keep`)."""

    count: int | None = None  # --budget K: tokens per image
    keep: float | None = None  # --keep f: share of each image's tokens, 0 < f <= 1

    def __post_init__(self):
        if (self.count is None) == (self.keep is None):
            raise UsageError("give either --budget (tokens per image) or --keep (a ratio), not both")
        if self.keep is not None and not 0.0 < self.keep <= 1.0:
            raise UsageError(f"--keep {self.keep} is out of range: use a ratio in (0, 1], e.g. --keep 0.5")
        if self.count is not None and self.count < 1:
            raise UsageError(f"--budget {self.count} is out of range: use at least 1 token per image")

    def per_image(self, n: int) -> int:
        """Tokens kept from an image of `n` merged tokens."""
        if self.count is not None:
            return min(self.count, n)
        return max(1, min(n, math.ceil(n * self.keep)))

    def counts(self, full: list[int]) -> list[int]:
        return [self.per_image(n) for n in full]

    def describe(self) -> str:
        return f"--keep {self.keep:g}" if self.keep is not None else f"--budget {self.count}"

    def to_json(self) -> dict:
        return {"count": self.count, "keep": self.keep}


def vision_budget(reduction) -> TokenBudget | None:
    """The per-image budget of a vision graph that reduces each image itself (pre-LLM methods on
    dynamic-resolution layouts), from the manifest's `reduction`; None when it keeps every token."""
    if reduction.stage != "pre-llm":
        return None
    return TokenBudget(keep=reduction.keep) if reduction.keep is not None else TokenBudget(count=reduction.budget)


def dart_quotas(full: list[int], budget: TokenBudget) -> list[int]:
    """Edge-LLM DART's per-image-span quotas: `budget.per_image` for each span, or every token
    when the prompt has fewer than MIN_VISUAL_TOKENS visual tokens (Edge-LLM's skip guard)."""
    if sum(full) < MIN_VISUAL_TOKENS:
        return list(full)
    return budget.counts(full)


def image_spans(positions) -> list[int]:
    """Lengths of the runs of consecutive image positions of one prompt row (one run per image:
    chat templates put text between images)."""
    counts, run = [], 0
    for i, p in enumerate(positions):
        if i and int(p) != int(positions[i - 1]) + 1:
            counts.append(run)
            run = 0
        run += 1
    return counts + [run] if run else counts


def prefill_budget(stage_keeps: list[int], budget: TokenBudget | None, spans: list[int], images: int,
                   edge_dart: bool) -> tuple[list[int], list[int] | None]:
    """The prefill's `image_keep` [stages] for one prompt row, and its per-image quotas (DART with
    a quota per image span; None otherwise).

    stage_keeps: each stage's `keep` from the manifest; budget: the artifact's per-image budget on
    dynamic-resolution layouts (None: fixed layouts, where a stage keeps `keep` x images);
    spans: the row's image-token runs; edge_dart: the stage keeps Edge-LLM's per-image quotas.
    """
    if budget is None:
        return [k * images for k in stage_keeps], None
    if edge_dart:
        quotas = dart_quotas(spans, budget)
        return [sum(quotas)] * len(stage_keeps), quotas
    if budget.keep is not None:
        return [sum(budget.counts(spans))] * len(stage_keeps), None
    return [sum(min(k, n) for n in spans) for k in stage_keeps], None
