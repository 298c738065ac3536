"""`tome`: Token Merging inside the vision tower (ToMe, arXiv 2210.09461).

In every ViT layer up to the feature layer, between attention and MLP: split the tokens
alternately into A (even positions) and B (odd), metric = that layer's keys averaged over heads,
cosine similarity; each A token's best B match; merge the r best edges by size-weighted average
(the receiving B token included: (b*s_b + sum a*s_a) / (s_b + sum s_a)); the CLS token is never
merged; token sizes are tracked and attention is proportional (log size added to the logits).
Output order per layer: [kept A tokens, all B tokens], A re-sorted by position (CLS stays first).
The per-layer r schedule (`--option schedule=even`: as even as the A-set caps allow; `early`: as
much as each layer allows, first layers first) lands exactly on `--budget` patch tokens leaving
the feature layer, so every count is static. Unlike pre-LLM
methods this also cuts vision-encoder time.
"""

from __future__ import annotations

import math

import torch

from tokedge.reduce.base import Method, OptionSpec, Signal, Stage, VisionGeometry
from tokedge.reduce.none import keep_all


def _max_removable(tokens: int, layers: int, protected: int) -> int:
    total = 0
    for _ in range(layers):
        r = (tokens - protected) // 2
        total, tokens = total + r, tokens - r
    return total


SCHEDULES = ("even", "early")


def merge_schedule(n_patches: int, budget: int, n_layers: int, protected: int = 1,
                   mode: str = "even") -> list[int] | None:
    """Per-layer merge counts r_l summing to n_patches - budget, each within the A-set cap
    ((tokens - protected) // 2). "even": as even as possible, front-loaded only where the later
    caps would not reach the budget (ToMe's constant r). "early": merge as much as each layer
    allows, starting with the first (ToMe's decreasing schedule taken to its limit, as in
    EarlyTom): later layers run on fewer tokens, so the tower costs less. None when the budget
    cannot be reached in n_layers layers."""
    if mode not in SCHEDULES:
        raise ValueError(f"unknown merge schedule {mode!r}")
    tokens = n_patches + protected
    left = n_patches - budget
    out = []
    for layer in range(n_layers):
        rest = n_layers - layer - 1
        cap = (tokens - protected) // 2
        r = min(math.ceil(left / (n_layers - layer)), cap) if mode == "even" else min(left, cap)
        while r < cap and left - r > _max_removable(tokens - r, rest, protected):
            r += 1
        out.append(r)
        tokens -= r
        left -= r
    return out if left == 0 else None


def fewest_tokens(geometry: VisionGeometry) -> int:
    """The smallest budget `merge_schedule` can reach in the tower's layers."""
    protected = 1 if geometry.has_cls else 0
    return geometry.patch_tokens - _max_removable(geometry.patch_tokens + protected, geometry.layers, protected)


def bipartite_matching(metric, r: int, class_token: bool):
    """metric [b, t, c] -> (unm_idx [b, |A|-r], src_idx [b, r], dst_idx [b, r]): A = even
    positions, B = odd; the r A tokens with the most similar B match are merged into it."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    scores = torch.matmul(a, b.transpose(1, 2))
    if class_token:
        protect = torch.zeros(scores.shape[1], 1, dtype=torch.bool, device=scores.device)
        protect[0] = True
        scores = scores.masked_fill(protect, -math.inf)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = torch.topk(node_max, node_max.shape[1], dim=-1).indices  # descending sort
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    dst_idx = torch.gather(node_idx, 1, src_idx)
    if class_token:
        unm_idx = torch.sort(unm_idx, dim=1).values
    return unm_idx, src_idx, dst_idx


def merge_sum(x, unm_idx, src_idx, dst_idx):
    """x [b, t, c] -> [b, t - r, c]: [kept A, B with the merged A rows added] (sums, not means).
    Written with a one-hot matmul instead of scatter so it exports to plain MatMul."""
    a, b = x[:, ::2], x[:, 1::2]
    c = x.shape[-1]
    unm = torch.gather(a, 1, unm_idx.unsqueeze(-1).expand(-1, -1, c))
    src = torch.gather(a, 1, src_idx.unsqueeze(-1).expand(-1, -1, c))
    onehot = torch.nn.functional.one_hot(dst_idx, b.shape[1]).to(x.dtype)  # [b, r, |B|]
    return torch.cat([unm, b + torch.matmul(onehot.transpose(1, 2), src)], dim=1)


def merge_weighted(x, size, metric, r: int, class_token: bool):
    """One ToMe step: x [b, t, c], size [b, t, 1] -> (x', size') with t - r tokens."""
    unm_idx, src_idx, dst_idx = bipartite_matching(metric, r, class_token)
    summed = merge_sum(x * size, unm_idx, src_idx, dst_idx)
    new_size = merge_sum(size, unm_idx, src_idx, dst_idx)
    return summed / new_size, new_size


METHOD = Method(
    name="tome",
    stage=Stage.IN_VIT,
    scores_with=(Signal.VIT_KEYS,),
    paper="2210.09461",
    reference="facebookresearch/ToMe",
    summary="bipartite token merging in every ViT layer (size-weighted, proportional attention)",
    reduce=keep_all,  # the tower already merged down to k patch tokens; project them
    fewest_tokens=fewest_tokens,
    budget_meaning="patch tokens leaving the vision feature layer (= visual tokens that enter the LLM)",
    option_specs={
        "schedule": OptionSpec(str, "even", "merges per layer: even (ToMe's constant r) or early (as many as each "
                               "layer allows, first layers first: cheaper tower)",
                               check=lambda v: v in SCHEDULES, requirement="schedule must be even or early"),
    },
)
