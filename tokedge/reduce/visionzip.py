"""`visionzip`: dominant tokens by CLS attention plus contextual tokens merged from the rest
(VisionZip, arXiv 2412.04467).

`--budget` = visual tokens that enter the LLM = 1 CLS + dominant patches + contextual tokens.
As the authors' code: the CLS token is output token 0 and goes through the projector; the default
split keeps their ratio (64 = CLS + 53 + 10, 128 = 108 + 20, 192 = 162 + 30): contextual =
round(budget * 10 / 64), at least 1; `--option contextual=N` overrides it. Dominant patches are the
top by CLS attention (mean over heads; the ranking is the same as their sum), in raster order.
Contextual: the remaining patches in raster order, keys of the feature layer averaged over heads
and L2-normalised; `contextual` targets at a uniform stride (step = max(1, R // contextual)); every
other remaining patch goes to its most similar target (argmax cosine); each contextual token =
the target + the mean of the patches assigned to it (zero when none). Counts are static.
"""

from __future__ import annotations

import torch

from tokedge.reduce.base import Method, OptionSpec, Signal, Stage, VisionFeatures
from tokedge.reduce.select import gather_tokens


def split(budget: int, contextual: int | None) -> tuple[int, int]:
    """budget -> (dominant patches, contextual tokens); the CLS token is the remaining 1."""
    c = contextual if contextual is not None else max(1, round(budget * 10 / 64))
    return budget - 1 - c, c


def contextual_tokens(features, keys, remaining_idx, k_c: int):
    """features [b, n, d], keys [b, n, e] (normalised), remaining_idx [b, R] raster order ->
    [b, k_c, d] contextual tokens (target + mean of assigned).

    Written without Python arithmetic on R, so a graph traced for one token count runs on
    another (tiled images): targets are the positions 0, step, 2*step... (k_c of them, step =
    max(1, R // k_c)); every other remaining token goes to its most similar target."""
    rem_x = gather_tokens(features, remaining_idx)
    rem_k = gather_tokens(keys, remaining_idx)
    ones = torch.ones_like(remaining_idx[0])
    step = torch.clamp(torch.div(ones.sum(), k_c, rounding_mode="floor"), min=1)
    pos = ones.cumsum(0) - 1  # [R] 0..R-1
    target_pos = torch.arange(k_c, device=features.device) * step
    not_target = ~((pos % step == 0) & (torch.div(pos, step, rounding_mode="floor") < k_c))
    tgt_x, tgt_k = rem_x[:, target_pos], rem_k[:, target_pos]
    sim = torch.matmul(rem_k, tgt_k.transpose(1, 2))  # [b, R, k_c]
    assign = torch.nn.functional.one_hot(sim.argmax(-1), k_c).to(features.dtype)  # [b, R, k_c]
    assign = assign * not_target[None, :, None].to(features.dtype)  # targets are not assigned
    counts = assign.sum(1).clamp(min=1).unsqueeze(-1)  # [b, k_c, 1]
    merged = torch.matmul(assign.transpose(1, 2), rem_x) / counts
    return tgt_x + merged


def select_visionzip(cls_attention, keys, dominant: int):
    """-> (dominant indices [b, dominant] raster order, remaining indices [b, n - dominant] raster order)."""
    n = cls_attention.shape[1]
    order = torch.topk(cls_attention, n, dim=-1).indices  # all patches by score
    dom = torch.sort(order[:, :dominant], dim=-1).values
    rest = torch.sort(order[:, dominant:], dim=-1).values
    return dom, rest


def reduce_visionzip(vf: VisionFeatures, k: int, options: dict):
    dominant, k_c = split(k, options.get("contextual"))
    keys = torch.nn.functional.normalize(vf.keys.float(), dim=-1)
    dom_idx, rest_idx = select_visionzip(vf.cls_attention, keys, dominant)
    dom = gather_tokens(vf.features, dom_idx)
    ctx = contextual_tokens(vf.features.float(), keys, rest_idx, k_c).to(vf.features.dtype)
    return vf.project(torch.cat([vf.cls_token, dom, ctx], dim=1))


def _check(budget: int, full: int) -> str | None:
    if budget < 3:
        return "needs room for the CLS token, one dominant and one contextual token (>= 3)"
    return None


def received_split(k):
    """Towers without CLS: k (0-d int64) -> (dominant, contextual) with contextual =
    max(1, round(k * 10 / 64)) (the authors' 54:10 ratio, no CLS slot)."""
    ctx = torch.clamp(torch.round(k.to(torch.float32) * 10.0 / 64.0), min=1.0).to(torch.int64)
    return k - ctx, ctx


def reduce_visionzip_indexed(vf: VisionFeatures, k, options: dict, most: int = 0):
    """VisionZip on one image of a tower without CLS (Qwen-VL), b = 1, a run-time count k.

    vf.features [1, n, d] merged tokens (raster order of the merged grid); vf.cls_attention [1, n]
    the mean attention each merged token receives in the scoring block (its 4 patches averaged);
    vf.keys [1, n, e] that block's keys before rotary, mean over heads and over each merge unit.
    Dominant = top (k - c) by attention; contextual: c targets at a uniform stride over the rest
    (raster order), every other remaining token joins its most similar target (cosine of keys),
    each contextual token = target + mean of its members, at the target's position. Output in
    raster order of those positions -> (tokens [1, k, d], kept_index [1, k])."""
    dominant, k_c = received_split(k)
    if options.get("contextual") is not None:
        k_c = torch.minimum(torch.ones_like(k) * int(options["contextual"]), k - 1)
        dominant = k - k_c
    score, x = vf.cls_attention[0].float(), vf.features[0]
    keys = torch.nn.functional.normalize(vf.keys[0].float(), dim=-1)
    n = score.shape[0]
    order = torch.topk(score, n).indices  # every token by score, ties to the lower index
    dom = torch.sort(order[:dominant]).values
    rest = torch.sort(order[dominant:]).values  # [R] raster order
    ones = torch.ones_like(rest)
    step = torch.clamp(torch.div(ones.sum(), k_c, rounding_mode="floor"), min=1)
    slot = ones.cumsum(0) - 1
    targets = torch.arange(k_c) * step  # places in `rest`
    is_target = (slot % step == 0) & (torch.div(slot, step, rounding_mode="floor") < k_c)
    rest_k, tgt_k = keys[rest], keys[rest[targets]]
    best = torch.matmul(rest_k, tgt_k.T).argmax(-1)  # [R]
    member = (best[:, None] == torch.arange(k_c)[None, :]) & ~is_target[:, None]  # [R, c]
    weight = member.to(x.dtype)
    count = weight.sum(0).clamp(min=1.0)[:, None]
    ctx = x[rest[targets]] + torch.matmul(weight.T, x[rest]) / count
    index = torch.cat([dom, rest[targets]])
    tokens = torch.cat([x[dom], ctx])
    place = torch.sort(index).indices
    return tokens[place][None], index[place][None]


METHOD = Method(
    name="visionzip",
    stage=Stage.PRE_LLM,
    paper="2412.04467",
    reference="dvlab-research/VisionZip",
    summary="CLS + dominant patches by CLS attention + contextual tokens merged by key similarity",
    scores_with=(Signal.CLS_ATTENTION, Signal.CLS_TOKEN, Signal.KEYS),
    reduce=reduce_visionzip,
    reduce_indexed=reduce_visionzip_indexed,
    budget_meaning="visual tokens that enter the LLM (CLS + dominant + contextual)",
    option_specs={
        "contextual": OptionSpec(int, None, "contextual tokens (default round(budget*10/64))",
                                 lambda v: v >= 1, "must be >= 1 and leave at least one dominant patch"),
    },
    min_budget=3,
    budget_check=_check,
)
