"""Token-selection primitives shared by the score-based methods (torch, export-traceable)."""

from __future__ import annotations


def topk_sorted(scores, k: int):
    """Indices of the k largest scores per row, returned in ascending (raster) order.

    scores: [b, n] float; returns [b, k] int64. Ties follow torch.topk. In ONNX this is
    TopK(scores, k) followed by a second TopK(largest=0) over the indices, which TensorRT accepts
    for k <= 3840.
    """
    import torch

    if k >= scores.shape[-1]:
        return torch.arange(scores.shape[-1], device=scores.device).expand(scores.shape[0], -1)
    idx = torch.topk(scores, k, dim=-1, largest=True, sorted=True).indices
    return torch.sort(idx, dim=-1).values


def rank_in_group(member):
    """member [n, G] one-hot group of each of n items, in ranked order -> [n]: each item's place
    among the items of its own group (0 = first)."""
    return (member.cumsum(0) * member).sum(-1) - 1


def gather_tokens(x, idx):
    """x: [b, n, d], idx: [b, k] -> [b, k, d] (the rows named by idx, in idx order)."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


MOST_STEPS = 4096  # greedy steps a graph unrolls at most (one per kept token)


def unroll_limit(name: str):
    """The budget check of a method whose graph unrolls one greedy step per kept token."""

    def check(budget: int, full: int) -> str | None:
        if budget > MOST_STEPS:
            return (f"{name} unrolls one greedy step per kept token, at most {MOST_STEPS}: use --budget <= "
                    f"{MOST_STEPS} (or a smaller --keep or --max-pixels)")
        return None

    return check
