"""In-LLM pruning: FastV (arXiv 2403.06764), PyramidDrop (arXiv 2410.17247), DART (arXiv 2502.11494).

These act inside the decoder's prefill: at a pruning layer, image tokens are scored, the top ones
kept, and every later layer sees the shorter sequence. Survivors keep their original position ids;
the KV cache of layers before the first pruning layer holds the full prompt, later layers the
shortened one (per-layer-group past lengths; see docs/artifact.md). `--budget` = image tokens kept
after the last pruning layer.

This module holds the plans and the pure tensor functions; `tokedge.export.decoder` runs them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tokedge.errors import UsageError
from tokedge.reduce.base import Method, OptionSpec, Signal
from tokedge.reduce.base import Stage as Acts
from tokedge.reduce.none import keep_all  # the vision graph keeps every token; the decoder prunes


@dataclass(frozen=True)
class Stage:
    score_layer: int  # layer whose projections score the tokens (its input hidden states)
    prune_layer: int  # first layer that sees the shortened sequence
    keep: int  # image tokens kept from here on
    rule: Signal  # LLM_ATTENTION (last-token attention row, mean over heads) or LLM_KEY_NORM (DART)


@dataclass(frozen=True)
class Plan:
    stages: tuple[Stage, ...]
    pivots: int = 8  # dart only

    def group_of(self, layer: int) -> int:
        """0 for layers before the first pruning layer, g after the g-th."""
        return sum(1 for s in self.stages if layer >= s.prune_layer)


# --- pure functions ------------------------------------------------------------------------------
# The number of image positions `n` (all images of a prompt) and the count kept `k` are both
# run-time values: `k` may be a Python int or a 0-d int64 tensor (a graph input; traced, it stays
# TopK's dynamic K), and every other size follows from shapes, so no count is a trace constant
# and no data-dependent op (NonZero) is needed.


def _capped(k, image_pos):
    """min(k, n): TopK over n image positions cannot take more than n."""
    if isinstance(k, int):
        return min(k, image_pos.shape[1])
    return torch.minimum(k, torch.ones_like(image_pos[0]).sum())


def _flags(seq_len_like, positions):
    """[b, t] bool: True at `positions` [b, m] (a scatter, not an [m, t] comparison)."""
    zeros = torch.zeros_like(seq_len_like, dtype=torch.int64)
    return zeros.scatter(1, positions, torch.ones_like(positions)) > 0


def rank(values, descending: bool = True):
    """values [b, n] -> each entry's place [b, n] int64 in the order (0 = first); ties keep the
    lower index first (ONNX TopK's rule)."""
    order = torch.topk(values, values.shape[1], dim=-1, largest=descending, sorted=True).indices
    places = torch.arange(values.shape[1], device=values.device).expand_as(order)
    return torch.zeros_like(order).scatter(1, order, places)


def top_indices(x, k):
    """Indices of the k largest values along the last axis, equal values in position order (the lower
    index first): ONNX TopK's documented rule, which the traced graph runs; eager torch.topk leaves
    ties unspecified, so eager runs (export's reference modules) take a stable sort instead. Ties
    happen where scores are exactly equal, e.g. image tokens outside a sliding-window layer's window
    (all 0 in the last token's attention row)."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return torch.topk(x, k, dim=-1).indices
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., : int(k)]


def select_top_image_tokens(scores, image_pos, k):
    """scores [b, t] per sequence position, image_pos [b, n] -> kept image positions [b, min(k, n)]
    (sorted): the ones with the highest scores, ties to the earlier position (`top_indices`)."""
    img_scores = torch.gather(scores, 1, image_pos)
    top = top_indices(img_scores, _capped(k, image_pos))
    return torch.sort(torch.gather(image_pos, 1, top), dim=-1).values


def keep_positions(seq_len_like, image_pos, kept_img):
    """All non-image positions plus the kept image positions, in sequence order: [b, t - n + k].

    seq_len_like: any [b, t] tensor (gives t, which may be a dynamic axis).
    """
    t = seq_len_like.shape[1]
    ar = torch.arange(t, device=image_pos.device)
    is_img = _flags(seq_len_like, image_pos)
    is_kept = _flags(seq_len_like, kept_img)
    keep = (~is_img) | is_kept  # [b, t], count t - n + k in every row
    count = t - image_pos.shape[1] + kept_img.shape[1]
    key = keep.to(torch.float32) * (2.0 * t) - ar.to(torch.float32)  # kept first, then by position
    idx = torch.topk(key, count, dim=-1).indices
    return torch.sort(idx, dim=-1).values


def remap_positions(keep_idx, kept_img):
    """Where the kept image tokens sit in the shortened sequence: [b, k]."""
    return (keep_idx[:, None, :] < kept_img[:, :, None]).sum(dim=-1)


def _quota(k, p: int, pivots: int):
    """DART's share of pivot `p`: floor(k / pivots), one more for the first k % pivots pivots."""
    if isinstance(k, int):
        return k // pivots + (1 if p < k % pivots else 0)
    return torch.div(k, pivots, rounding_mode="floor") + (torch.remainder(k, pivots) > p).to(k.dtype)


def dart_select(key_norm, hidden, image_pos, mask, k, pivots: int = 8):
    """DART: pivots = the image and text tokens with the largest key L1 norm (half each); for each
    pivot in turn take the image tokens least similar to it (cosine of hidden states) from the
    pool, removing them; floor(k / pivots) each, the first k % pivots pivots one more.

    key_norm [b, t] L1 norm of the scoring layer's keys; hidden [b, t, h] input of the pruning
    layer; image_pos [b, n]; mask [b, t] (padding is never a pivot) -> kept image positions
    [b, min(k, n)] (sorted).
    """
    n = image_pos.shape[1]
    is_img = _flags(mask, image_pos)
    neg = torch.finfo(torch.float32).min
    n_img_piv = pivots // 2
    img_piv = torch.topk(key_norm.masked_fill(~is_img, neg), n_img_piv, dim=-1).indices
    txt_ok = (~is_img) & (mask > 0)
    txt_piv = torch.topk(key_norm.masked_fill(~txt_ok, neg), pivots - n_img_piv, dim=-1).indices
    piv = torch.cat([img_piv, txt_piv], dim=1)  # [b, pivots]
    hn = torch.nn.functional.normalize(hidden.float(), dim=-1)
    img_h = torch.gather(hn, 1, image_pos.unsqueeze(-1).expand(-1, -1, hn.shape[-1]))  # [b, n, h]
    piv_h = torch.gather(hn, 1, piv.unsqueeze(-1).expand(-1, -1, hn.shape[-1]))  # [b, p, h]
    sim = torch.matmul(piv_h, img_h.transpose(1, 2))  # [b, p, n]
    taken = torch.zeros_like(image_pos) > 0
    for p in range(pivots):  # a pivot's share may be 0 (k < pivots): a mask, never a TopK of 0
        score = sim[:, p].masked_fill(taken, math.inf)  # taken tokens rank last
        taken = taken | (rank(score, descending=False) < _quota(k, p, pivots))  # least similar first
    # the taken positions, ascending: taken ones first by position, then cut at min(k, n)
    key = taken.to(torch.float32) * (2.0 * n) - torch.arange(n, device=sim.device).to(torch.float32)
    first = torch.topk(key, _capped(k, image_pos), dim=-1).indices
    return torch.sort(torch.gather(image_pos, 1, first), dim=-1).values


def _rank_in_span(score, same_span, eligible):
    """score [b, n], same_span [b, n, n] bool, eligible [b, n] bool -> [b, n] int64: each token's
    place among the eligible tokens of its span by descending score, ties to the lower index."""
    n = score.shape[1]
    ar = torch.arange(n, device=score.device)
    earlier = ar[None, :] < ar[:, None]  # [i, j]: j comes before i
    s_i, s_j = score[:, :, None], score[:, None, :]
    ahead = (s_j > s_i) | ((s_j == s_i) & earlier[None])
    return (ahead & same_span & eligible[:, None, :]).sum(dim=-1)


def dart_span_select(pivot_score, hidden, image_pos, image_span, image_quota, mask, k,
                     image_pivots: int = 4, text_pivots: int = 4):
    """DART with a quota per image span, as TensorRT Edge-LLM 0.11 selects (docs/research/qwen-vl.md
    8.2; no image of a multi-image prompt is starved).

    Per span (one image): its `image_pivots` image tokens with the largest `pivot_score` (at most its
    quota) are kept at once; the pivot list is those (descending score) then the prompt's
    `text_pivots` text tokens with the largest score (shared by every span); pivot p in turn takes
    ceil(remaining / pivots left) of the span's not-yet-kept tokens least similar to it (highest
    -(e_p . e_c) / max(|e_p| |e_c|, 1e-8), ties to the lower index), so each span ends with exactly
    its quota.

    pivot_score [b, t] (L1 norm of the embeddings, or of the scoring layer's keys); hidden [b, t, h]
    the vectors compared; image_pos [b, n] ascending; image_span [b, n] int64 span id of each image
    token; image_quota [b, n] int64 its span's quota; mask [b, t] (padding is never a pivot);
    k = the sum of the quotas (int or 0-d int64 tensor) -> kept image positions [b, k] ascending.
    Memory is O(n^2) in the image tokens of a prompt (pairwise ranks inside spans). The prompt
    needs at least `text_pivots` text tokens (every chat template has them).
    """
    n = image_pos.shape[1]
    e = hidden.float()
    img_e = torch.gather(e, 1, image_pos.unsqueeze(-1).expand(-1, -1, e.shape[-1]))  # [b, n, h]
    img_l1 = torch.gather(pivot_score.float(), 1, image_pos)
    same = image_span[:, :, None] == image_span[:, None, :]  # [b, n, n]
    everyone = torch.ones_like(image_pos) > 0
    own_pivots = torch.clamp(image_quota, max=image_pivots)  # image pivots of each token's span
    l1_place = _rank_in_span(img_l1, same, everyone)
    taken = l1_place < own_pivots  # image pivots are kept at once
    is_img = _flags(mask, image_pos)
    text_ok = (~is_img) & (mask > 0)
    neg = torch.finfo(torch.float32).min
    text_piv = torch.topk(pivot_score.float().masked_fill(~text_ok, neg), text_pivots, dim=-1).indices  # [b, 4]
    txt_e = torch.gather(e, 1, text_piv.unsqueeze(-1).expand(-1, -1, e.shape[-1]))
    l2 = torch.sqrt((img_e * img_e).sum(-1))  # [b, n]
    l2_txt = torch.sqrt((txt_e * txt_e).sum(-1))  # [b, 4]
    eps = 1e-8
    # score of candidate i against an image pivot j (of i's span) and against each text pivot
    vs_img = -torch.matmul(img_e, img_e.transpose(1, 2)) / torch.clamp(l2[:, :, None] * l2[:, None, :], min=eps)
    vs_txt = -torch.matmul(img_e, txt_e.transpose(1, 2)) / torch.clamp(l2[:, :, None] * l2_txt[:, None, :], min=eps)
    n_piv = own_pivots + text_pivots  # [b, n]: pivots of each token's span
    for p in range(image_pivots + text_pivots):
        pivot_is_img = own_pivots > p
        is_pivot = same & (l1_place[:, None, :] == p)  # [b, n, n]: j is i's span's image pivot p
        s_img = torch.where(is_pivot, vs_img, torch.zeros_like(vs_img)).sum(-1)
        t_slot = torch.clamp(p - own_pivots, min=0, max=text_pivots - 1)
        s_txt = torch.gather(vs_txt, 2, t_slot.unsqueeze(-1))[..., 0]
        score = torch.where(pivot_is_img, s_img, s_txt)
        held = (same & taken[:, None, :]).sum(-1)  # [b, n]: kept so far in each token's span
        left = torch.clamp(n_piv - p, min=1)
        share = torch.div(image_quota - held + left - 1, left, rounding_mode="floor")  # ceil(remaining / left)
        share = torch.where(n_piv > p, torch.clamp(share, min=0), torch.zeros_like(share))
        cand = ~taken
        taken = taken | (cand & (_rank_in_span(score, same, cand) < share))
    key = taken.to(torch.float32) * (2.0 * n) - torch.arange(n, device=e.device).to(torch.float32)
    first = torch.topk(key, _capped(k, image_pos), dim=-1).indices
    return torch.sort(torch.gather(image_pos, 1, first), dim=-1).values


# --- plans from options ----------------------------------------------------------------------------


def _fastv_plan(budget: int, full: int, n_layers: int, options: dict) -> Plan:
    k = options["layer"]
    if not 1 <= k < n_layers:
        raise UsageError(f"--option layer={k}: must be within 1..{n_layers - 1} for this {n_layers}-layer model")
    return Plan((Stage(score_layer=k - 1, prune_layer=k, keep=budget, rule=Signal.LLM_ATTENTION),))


def _parse_layers(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--option layers={text}: expected comma-separated layer numbers like 8,16,24") from None


def _pdrop_plan(budget: int, full: int, n_layers: int, options: dict) -> Plan:
    layers = _parse_layers(options["layers"]) if options["layers"] else sorted(
        {max(1, round(n_layers * f)) for f in (0.25, 0.5, 0.75)} - {n_layers})
    if not layers or layers != sorted(set(layers)) or layers[0] < 1 or layers[-1] >= n_layers:
        raise UsageError(f"--option layers: need increasing layers within 1..{n_layers - 1} (got {layers})")
    stages = []
    for i, layer in enumerate(layers):
        keep = min(full, budget * 2 ** (len(layers) - 1 - i))  # each stage halves; the last keeps --budget
        stages.append(Stage(score_layer=layer, prune_layer=layer, keep=keep, rule=Signal.LLM_ATTENTION))
    return Plan(tuple(stages))


def _dart_plan(budget: int, full: int, n_layers: int, options: dict) -> Plan:
    """layer K >= 1: pivots by layer K-1's key L1 norm, cosine on layer K's input (the paper);
    layer 0: both on the input embeddings, before any layer (TensorRT Edge-LLM's embedding level)."""
    k = options["layer"]
    if not 0 <= k < n_layers:
        raise UsageError(f"--option layer={k}: must be within 0..{n_layers - 1} for this {n_layers}-layer model")
    return Plan((Stage(score_layer=k - 1, prune_layer=k, keep=budget, rule=Signal.LLM_KEY_NORM),), pivots=options["pivots"])


def plan_for(method: Method, budget: int, full: int, n_layers: int, options: dict) -> Plan:
    """The method's pruning plan for a decoder of `n_layers` layers."""
    if method.plan is None:
        raise UsageError(f"--method {method.name} does not prune inside the LLM")
    return method.plan(budget, full, n_layers, options)


_LAYER = OptionSpec(int, 2, "pruning layer K (layers >= K see the kept tokens)", lambda v: v >= 1, "must be >= 1")

FASTV = Method(
    name="fastv", stage=Acts.IN_LLM, paper="2403.06764", reference="pkunlp-icler/FastV",
    summary="prune image tokens at LLM layer K by the last token's attention in layer K-1",
    scores_with=(Signal.LLM_ATTENTION,), reduce=keep_all, plan=_fastv_plan,
    budget_meaning="image tokens kept after layer K", option_specs={"layer": _LAYER},
)
PDROP = Method(
    name="pdrop", stage=Acts.IN_LLM, paper="2410.17247", reference="Cooperx521/PyramidDrop",
    summary="FastV's rule in stages (default layers L/4, L/2, 3L/4), halving image tokens each stage",
    scores_with=(Signal.LLM_ATTENTION,), reduce=keep_all, plan=_pdrop_plan,
    budget_meaning="image tokens kept after the last stage (earlier stages keep 2x, 4x)",
    option_specs={"layers": OptionSpec(str, "", "comma-separated stage layers (default L/4,L/2,3L/4)")},
)
DART = Method(
    name="dart", stage=Acts.IN_LLM, paper="2502.11494", reference="ZichenWen1/DART",
    summary="keep image tokens least similar to 8 pivot tokens (duplicate removal) at layer K",
    scores_with=(Signal.LLM_KEY_NORM,), reduce=keep_all, plan=_dart_plan,
    budget_meaning="image tokens kept after layer K",
    option_specs={"layer": OptionSpec(int, 2, "pruning layer K (0: on the input embeddings, as TensorRT Edge-LLM)",
                                      lambda v: v >= 0, "must be >= 0"),
                  "pivots": OptionSpec(int, 8, "pivot tokens, half image half text", lambda v: v >= 2 and v % 2 == 0,
                                       "must be an even number >= 2")},
)
