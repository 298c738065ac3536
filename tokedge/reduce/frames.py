"""Primitives shared by the temporal (video) methods: evs, dycoke, fastvid (torch, export-traceable).

A video reaches these as its pooled projected tokens x [F, n, D] (OneVision: n = 196 per frame),
what enters the LLM. Selections are boolean keep masks over the flat (frame, token) grid with a
count known at export time; `mask_indices` turns one into ascending flat indices with one TopK
(static k) and a sort, so graphs have no data-dependent shapes. Ranks are computed by pairwise
comparison, so ties always go to the lower index (in eager torch and in ONNX Runtime alike).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

COS_EPS = 1e-8  # torch.nn.functional.cosine_similarity's eps on each norm


@dataclass
class VideoTokens:
    """What a temporal method sees (torch tensors).

    tokens:             [F, n, D] pooled projected tokens, frame-major raster (the newline is not here)
    received_attention: [F, n] mean attention each token receives in the tower's last layer (mean over
                        heads and queries), pooled like the tokens -- only for methods scoring with
                        Signal.RECEIVED_ATTENTION
    """

    tokens: Any
    received_attention: Any = None


def position_cosine(a, b):
    """a, b [..., n, D] -> [..., n]: cosine of each token with the token at the same position (fp32)."""
    a, b = a.float(), b.float()
    den = a.norm(dim=-1).clamp_min(COS_EPS) * b.norm(dim=-1).clamp_min(COS_EPS)
    return (a * b).sum(dim=-1) / den


def rank_ascending(score):
    """score [..., n] -> [..., n] int64: each entry's place in a stable ascending sort (0 = smallest;
    equal scores: the lower index first)."""
    import torch

    n = score.shape[-1]
    s_i = score.unsqueeze(-1)  # [..., n, 1] the ranked entry
    s_j = score.unsqueeze(-2)  # [..., 1, n] the others
    idx = torch.arange(n, device=score.device)
    before = (s_j < s_i) | ((s_j == s_i) & (idx[None, :] < idx[:, None]))
    return before.sum(dim=-1)


def rank_descending(score):
    """score [..., n] -> [..., n] int64: place in a stable descending sort (0 = largest; ties: lower index)."""
    import torch

    n = score.shape[-1]
    s_i = score.unsqueeze(-1)
    s_j = score.unsqueeze(-2)
    idx = torch.arange(n, device=score.device)
    before = (s_j > s_i) | ((s_j == s_i) & (idx[None, :] < idx[:, None]))
    return before.sum(dim=-1)


def mask_indices(mask, k: int):
    """mask [F, n] bool with exactly k True -> [k] int64 flat indices (f * n + j), ascending."""
    import torch

    flat = mask.reshape(-1).float()
    if k >= flat.shape[0]:
        return torch.arange(flat.shape[0], device=mask.device)
    return torch.sort(torch.topk(flat, k, largest=True, sorted=False).indices).values


def temporal_module(method, frames: int, n: int, budget: int | None, options: dict):
    """The graph a temporal method exports for `frames` frames of n tokens (static counts):
    video_embeds [F, n, D] (+ received_attention [F, n] when it scores with it) ->
    (video_tokens [K, D], video_kept [K] int64 flat indices)."""
    import torch

    class TemporalGraph(torch.nn.Module):
        def forward(self, video_embeds, received_attention=None):
            return method.temporal(VideoTokens(video_embeds, received_attention), budget, options)

    return TemporalGraph().eval()
