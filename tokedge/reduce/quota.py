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


def dart_quotas(full: list[int], budget: TokenBudget) -> list[int]:
    """Edge-LLM DART's per-image-span quotas: `budget.per_image` for each span, or every token
    when the prompt has fewer than MIN_VISUAL_TOKENS visual tokens (Edge-LLM's skip guard)."""
    if sum(full) < MIN_VISUAL_TOKENS:
        return list(full)
    return budget.counts(full)
