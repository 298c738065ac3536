"""What a reduction method is: a small frozen description plus pure tensor functions.

Pre-LLM methods see `VisionFeatures` (the feature-layer tokens and whatever scores they asked for)
and return the tokens that go on to the projector. Nothing here holds state or hooks a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from tokedge.errors import UsageError

STAGES = ("none", "pre-llm", "in-vit", "in-llm")


@dataclass
class VisionFeatures:
    """Inputs a pre-LLM method may use (torch tensors; shapes with b = batch, n = patch tokens).

    features:      [b, n, d] feature-layer patch tokens (CLS already removed when the model drops it)
    cls_attention: [b, n] attention of the CLS query to each patch in the feature layer, mean over
                   heads, fp32; only present when the method declares it needs it.
    """

    features: Any
    cls_attention: Any = None


@dataclass(frozen=True)
class Method:
    name: str
    stage: str  # one of STAGES
    paper: str  # arXiv id(s) of the method's paper
    summary: str
    needs: frozenset[str] = frozenset()  # extra inputs: "cls_attention"
    static_counts: bool = True  # every token count is known at export time for a fixed budget
    supports_runtime_budget: bool = False  # can export a `budget` graph input (TopK with runtime k)
    budget_meaning: str = "visual tokens that enter the LLM"
    reduce: Callable[..., Any] | None = None  # (VisionFeatures, k) -> [b, k, d]
    options: dict[str, Any] = field(default_factory=dict)

    def check_budget(self, budget: int, full_tokens: int) -> None:
        if not 1 <= budget <= full_tokens:
            raise UsageError(f"--budget {budget} is out of range for this model: use 1..{full_tokens} visual tokens")
        if self.stage == "none" and budget != full_tokens:
            raise UsageError(
                f"--method none keeps all {full_tokens} visual tokens; pass --budget {full_tokens} "
                "or choose a reduction method (see `tokedge methods`)"
            )
