"""`hiprune`: hierarchical attention in the vision encoder (HiPrune, arXiv 2508.00553, ACL 2026
Findings; authors' code Danielement321/HiPrune `LLaVA/llava/model/llava_arch.py`, `encode_images`).

Scores are the attention each patch RECEIVES in a layer: the layer's softmax probabilities, mean over
heads and over every query row (CLS included), the CLS key dropped (no CLS needed). For a budget K on
one square patch grid W wide (n = W * W patches):
1. anchors: the a = round(K * alpha / 5) patches (Python round, half to even) with the highest score
   in the middle "object" layer (the authors' layer 9 of CLIP-L's 24; `object_layer`);
2. buffer: each anchor's flat neighbours idx - 1, idx + 1, idx - W, idx + W, clamped to 0..n-1, as
   the authors' code does (a column edge wraps to the next row; row 0 / the last row add patch 0 /
   n - 1); duplicates count once, so anchors + buffer are m <= 5a patches;
3. registers: the K - m other patches with the highest score in the feature layer (the authors'
   `attentions[-2]` for LLaVA's `hidden_states[-2]`).
Kept patches return to raster order and are projected; the CLS token is not kept, nothing merges.
Ties in a top-k go to the lower index. Static counts for a fixed K: two TopKs, a scatter and a sort.
"""

from __future__ import annotations

import math

from tokedge.reduce.base import Method, OptionSpec, Signal, Stage, VisionFeatures
from tokedge.reduce.select import gather_tokens

CLIP_OBJECT_FRACTION = 9 / 24  # the authors' object layer 9 of CLIP ViT-L/336's 24 layers (HIPRUNE_OBJECT_LAYER)
QWEN_OBJECT_FRACTION = 16 / 32  # their block 16 of Qwen2.5-VL's 32 (a full-attention block), towers without CLS


def anchor_count(budget: int, alpha: float) -> int:
    """The authors' `round(visual_token_num * alpha / 5)` (Python round: half to even)."""
    return round(budget * alpha / 5)


def object_layer(options: dict, layers: int, has_cls: bool = True) -> int:
    """0-based index of the object layer in a tower `layers` deep. `object_layer=L` is 1-based (the
    authors' HIPRUNE_OBJECT_LAYER); by default the authors' share of the depth: 9/24 for CLS towers
    (their CLIP-L), 16/32 for towers without CLS (their Qwen2.5-VL)."""
    chosen = options.get("object_layer")
    if chosen is None:
        chosen = max(1, round(layers * (CLIP_OBJECT_FRACTION if has_cls else QWEN_OBJECT_FRACTION)))
    return min(int(chosen), layers) - 1


def keep_hiprune(object_score, deep_score, width, budget, anchors):
    """object_score, deep_score [b, n] received attention (object and feature layer) on a grid `width`
    wide; `budget` and `anchors` python ints or 0-d int64 tensors (a run-time count) -> [b, budget]
    kept indices, ascending."""
    import torch

    n = object_score.shape[-1]
    chosen = torch.zeros_like(deep_score, dtype=torch.bool)
    if not isinstance(anchors, int) or anchors > 0:  # a constant 0 leaves no anchors (and no TopK k = 0)
        idx = torch.topk(object_score, anchors, dim=-1).indices  # [b, a]
        near = torch.cat([idx, idx - 1, idx + 1, idx - width, idx + width], dim=-1).clamp(0, n - 1)
        chosen = (near[..., None] == torch.arange(n, device=near.device)).any(dim=-2)  # [b, n]
    # the chosen ones first (received attention is at most 1), then the best other patches
    key = deep_score.float() + 2.0 * chosen.to(torch.float32)
    return torch.sort(torch.topk(key, budget, dim=-1).indices, dim=-1).values


def select_hiprune(object_score, deep_score, width: int, budget: int, alpha: float):
    """A fixed budget: [b, n] scores, n = width^2 -> [b, budget] kept patch indices, ascending."""
    return keep_hiprune(object_score, deep_score, width, budget, anchor_count(budget, alpha))


def reduce_hiprune(vf: VisionFeatures, k: int, options: dict):
    """[b, n, d] patches of one square grid -> [b, k, hidden]."""
    n = vf.features.shape[1]
    if k >= n:
        return vf.project(vf.features)
    width = math.isqrt(int(n))
    idx = select_hiprune(vf.object_attention, vf.received_attention, width, k, options["alpha"])
    return vf.project(gather_tokens(vf.features, idx))


def reduce_hiprune_indexed(vf: VisionFeatures, k, options: dict, most: int = 0):
    """Towers without CLS (Qwen-VL), one image, a run-time count k (0-d int64) on its merged grid
    (`vf.grid_width` columns, raster order): the same steps with a = round(k * alpha / 5) computed in
    the graph (ONNX Round is half to even, as Python's) -> (tokens [1, k, d], raster indices [1, k])."""
    import torch

    a = torch.round(k.to(torch.float32) * options["alpha"] / 5).to(torch.int64)
    kept = keep_hiprune(vf.object_attention, vf.received_attention, vf.grid_width, k, a)
    return vf.features[0][kept[0]][None], kept


METHOD = Method(
    name="hiprune",
    stage=Stage.PRE_LLM,
    single_view=True,
    paper="2508.00553",
    reference="Danielement321/HiPrune",
    summary="anchors by received attention in a middle ViT layer + their 4 neighbours, the rest by the feature "
            "layer's received attention",
    scores_with=(Signal.OBJECT_ATTENTION, Signal.RECEIVED_ATTENTION),
    reduce=reduce_hiprune,
    reduce_indexed=reduce_hiprune_indexed,
    object_layer=object_layer,
    option_specs={
        "alpha": OptionSpec(float, 0.1, "anchor share: round(budget*alpha/5) anchors, each with its 4 neighbours",
                            lambda v: 0.0 <= v <= 1.0, "must be between 0 and 1"),
        "object_layer": OptionSpec(int, None, "1-based ViT layer whose received attention picks the anchors "
                                   "(default: 9/24 of the tower's depth, the authors' 9 for CLIP-L)",
                                   lambda v: v >= 1, "must be >= 1"),
    },
)
