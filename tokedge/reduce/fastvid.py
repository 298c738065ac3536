"""`fastvid`: FastVID's density spatio-temporal pruning (arXiv 2503.11187; authors' code
LunarShen/FastVID, the whole method in the patched `Qwen2Model.forward` of
`fastvid_llavaonevision/.../language_model/modeling_qwen2.py`).

On the pooled projected tokens of a video x [F, n, D] and the attention each token receives in the
tower's last layer a [F, n]:
1. DySeg: frame features g_t (L2-normalised), s_t = <g_t, g_t+1>; a cut after frame t for the c-1
   least similar transitions and wherever s_t < tau; segments are the runs between cuts.
2. STPrune: each frame keeps R tokens: S = R - int(R * d) salient ones (top attention, kept as
   they are) and C = R - S context tokens. In a segment of L frames, the anchor frames are its last
   frame and every p-th frame before it; the segment's L * C context tokens are shared among them.
3. Density score on each frame's non-salient tokens (DPC-kNN): dist = euclidean / sqrt(D),
   rho = exp(-mean of the 4 smallest dist^2) (itself included), delta = distance to the nearest
   denser token (the frame's largest distance if none), score = rho * delta; an anchor frame's
   anchors are its top-score tokens.
4. DTM: every non-salient token of the segment joins, for each anchor frame, that frame's anchor
   of highest cosine similarity; an anchor becomes w * a + (1 - w) * mean(its tokens) with
   w = max(1 / (count + 1), beta). Output in frame-major raster order (merged tokens at their
   anchor's position).

tokedge's variant (docs/methods.md): the budget B is exact. R_f = B // F, one more for the first
B % F frames; an anchor frame gets its segment's context total // A, one more for the last
(total % A) anchors (the authors floor it, losing tokens). Signals as the authors' Qwen2.5-VL port
(LLaVA-OneVision checkpoints lack SigLIP's MAP head the OneVision code loads separately): g_t =
mean of the frame's tokens, salience = received attention. No random tie noise: ties go to the
lower index. Positions are contiguous (the authors keep the original position ids).
All counts are static for a fixed (F, B): masks, pairwise ranks, one TopK, and one unrolled
assignment per frame, so it traces to ONNX without data-dependent shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokedge.errors import UsageError
from tokedge.reduce.base import Method, OptionSpec, Signal, Stage
from tokedge.reduce.frames import COS_EPS, VideoTokens, mask_indices, rank_ascending, rank_descending

NEIGHBOURS = 4  # the density's nearest neighbours, itself included (authors' k=4)


@dataclass(frozen=True)
class Plan:
    """Per-frame salient and context counts for an exact budget, plus the method's parameters."""

    salient: tuple[int, ...]
    context: tuple[int, ...]
    cuts: int = 8  # DySeg c: at least c - 1 cuts (the least similar transitions)
    tau: float = 0.9  # DySeg: also cut wherever consecutive frames' cosine < tau
    period: int = 4  # DTM p: an anchor frame every p frames, counted back from a segment's end
    beta: float = 0.6  # DTM: an anchor's weight is at least beta

    @property
    def total(self) -> int:
        return sum(self.salient) + sum(self.context)


def plan(frames: int, n: int, budget: int, d: float = 0.4, cuts: int = 8, tau: float = 0.9, period: int = 4,
         beta: float = 0.6) -> Plan:
    """Split the budget over frames (the first B % F get one more) and check every frame can hold
    its anchors: the most an anchor frame gets is min(F, p) frames' context."""
    if not 1 <= budget <= frames * n:
        raise UsageError(f"fastvid: use --budget 1..{frames * n} for {frames} frames of {n} tokens")
    per, extra = divmod(budget, frames)
    retain = [per + (f < extra) for f in range(frames)]
    salient = [r - int(r * d) for r in retain]
    context = [r - s for r, s in zip(retain, salient)]
    most = max(salient) + min(frames, period) * max(context)
    if most > n or (max(context) and n - max(salient) < NEIGHBOURS):
        raise UsageError(f"fastvid cannot place {budget} tokens in {frames} frames of {n}: an anchor frame may "
                         f"need {most}; use a smaller --budget or --option period=1")
    return Plan(tuple(salient), tuple(context), cuts, tau, period, beta)


def segments(x, plan: Plan):
    """x [F, n, D] -> [F] int64 segment id of each frame (DySeg)."""
    import torch

    g = x.float().mean(dim=1)
    g = g / g.norm(dim=-1, keepdim=True).clamp_min(COS_EPS)
    s = (g[:-1] * g[1:]).sum(dim=-1)  # [F-1]
    k = min(plan.cuts - 1, s.shape[0])  # the authors' topk fails for c - 1 > F - 1
    cut = (s < plan.tau) | (rank_ascending(s) < k)
    return torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(cut.long(), dim=0)])


def anchor_counts(seg, plan: Plan):
    """seg [F] -> [F] int64 context tokens per frame (0 for frames that are not anchors)."""
    import torch

    frames = seg.shape[0]
    order = torch.arange(frames)
    same = seg[:, None] == seg[None, :]  # [F, F]
    after = (same & (order[None, :] > order[:, None])).sum(dim=1)  # frames after f in its segment
    is_anchor = (after % plan.period) == 0
    anchors = (same & is_anchor[None, :]).sum(dim=1)  # A of f's segment
    total = (same.long() * torch.tensor(plan.context, dtype=torch.int64)[None, :]).sum(dim=1)
    share = torch.div(total, anchors, rounding_mode="floor")
    last = torch.div(after, plan.period, rounding_mode="floor") < (total - share * anchors)
    return torch.where(is_anchor, share + last.long(), torch.zeros_like(share))


def density_score(x, salient):
    """x [F, n, D], salient [F, n] bool -> [F, n] DPC-kNN score among each frame's non-salient
    tokens (-1 on salient tokens)."""
    import torch

    xf = x.float()
    n, width = xf.shape[1], xf.shape[2]
    sq = (xf * xf).sum(dim=-1)
    d2 = (sq[:, :, None] + sq[:, None, :] - 2.0 * torch.matmul(xf, xf.transpose(1, 2))).clamp_min(0.0)
    pos = torch.arange(n)
    eye = (pos[:, None] == pos[None, :])[None]
    d2 = torch.where(eye, torch.zeros_like(d2), d2) / width
    dist = d2.sqrt()
    other = ~salient
    pair = other[:, :, None] & other[:, None, :]
    big = d2.amax() + 1.0
    nearest = torch.topk(torch.where(pair, d2, big), NEIGHBOURS, dim=-1, largest=False).values
    rho = torch.exp(-nearest.mean(dim=-1))  # [F, n]
    far = torch.where(pair, dist, torch.zeros_like(dist)).amax(dim=(1, 2))[:, None, None]
    denser = pair & (rho[:, None, :] > rho[:, :, None])
    delta = torch.where(denser, dist, far).amin(dim=-1)
    return torch.where(other, rho * delta, torch.full_like(rho, -1.0))


def fastvid(x, attn, plan: Plan):
    """x [F, n, D] tokens, attn [F, n] received attention -> ([K, D] tokens, [K] int64 flat source
    indices), K = plan.total, frame-major raster order."""
    import torch

    frames, n, width = (int(v) for v in x.shape)
    seg = segments(x, plan)
    context = anchor_counts(seg, plan)
    salient = rank_descending(attn.float()) < torch.tensor(plan.salient, dtype=torch.int64)[:, None]
    score = density_score(x, salient)
    anchor = (rank_descending(score) < context[:, None]) & ~salient
    flat = x.reshape(frames * n, width)
    frame_of = torch.arange(frames * n) // n
    order = torch.arange(frames)
    same = seg[:, None] == seg[None, :]
    ordinal = torch.div((same & (order[None, :] > order[:, None])).sum(dim=1), plan.period, rounding_mode="floor")

    # DTM: the pool (every non-salient token) against the anchors; a token joins, for each anchor
    # frame of its segment (told apart by their ordinal from the segment's end), the most similar anchor
    anchors = mask_indices(anchor, sum(plan.context))  # [A]
    pool = mask_indices(~salient, frames * n - sum(plan.salient))  # [P]
    unit = flat.float() / flat.float().norm(dim=-1, keepdim=True).clamp_min(COS_EPS)
    sim = torch.matmul(unit[pool], unit[anchors].transpose(0, 1))  # [P, A]
    a_frame = frame_of[anchors]
    joins = seg[frame_of[pool]][:, None] == seg[a_frame][None, :]  # same segment
    count = torch.zeros(anchors.shape[0], dtype=torch.float32)
    total = torch.zeros(anchors.shape[0], width, dtype=torch.float32)
    members = flat.float()[pool]
    for o in range(-(-frames // plan.period)):
        cols = joins & (ordinal[a_frame] == o)[None, :]
        best = torch.where(cols, sim, torch.full_like(sim, -2.0)).max(dim=1).indices  # ties: the first anchor
        hit = cols.any(dim=1).to(torch.float32)
        count = count.scatter_add(0, best, hit)
        total = total.scatter_add(0, best[:, None].expand(-1, width), members * hit[:, None])
    weight = (1.0 / (count + 1.0)).clamp_min(plan.beta)[:, None]
    merged = weight * flat.float()[anchors] + (1.0 - weight) * total / count.clamp_min(1.0)[:, None]

    idx = mask_indices(salient | anchor, plan.total)  # [K]
    slot_anchor = anchor.reshape(-1)[idx]
    which = (torch.cumsum(slot_anchor.long(), dim=0) - 1).clamp_min(0)  # the slot's place among the anchors
    kept = flat[idx]
    if anchors.shape[0] == 0:
        return kept, idx
    out = torch.where(slot_anchor[:, None], merged[which].to(kept.dtype), kept)
    return out, idx


def plan_for(frames: int, n: int, budget: int | None, options: dict) -> Plan:
    o = {k: v for k, v in options.items() if v is not None}
    return plan(frames, n, frames * n if budget is None else budget, **o)


def reduce_fastvid(video: VideoTokens, budget: int | None, options: dict):
    """[F, n, D] (+ received attention [F, n]) -> ([K, D], [K] flat indices of the kept/anchor tokens)."""
    x = video.tokens
    if video.received_attention is None:
        raise UsageError("fastvid scores with the tower's received attention; this video graph has none")
    return fastvid(x, video.received_attention, plan_for(int(x.shape[0]), int(x.shape[1]), budget, options))


def count(frames: int, n: int, budget: int | None, options: dict) -> int:
    return plan_for(frames, n, budget, options).total


METHOD = Method(
    name="fastvid",
    stage=Stage.TEMPORAL,
    scores_with=(Signal.EMBEDDINGS, Signal.RECEIVED_ATTENTION),
    paper="2503.11187",
    reference="LunarShen/FastVID",
    summary="video: segment by frame similarity, keep salient tokens, merge the rest into density anchors",
    budget_meaning="visual tokens per video that enter the LLM",
    option_specs={
        "d": OptionSpec(float, 0.4, "share of each frame's tokens that are context (merged) tokens",
                        lambda v: 0 <= v < 1, "use 0 <= d < 1"),
        "cuts": OptionSpec(int, 8, "DySeg c: at least c - 1 segment cuts", lambda v: v >= 1, "use cuts >= 1"),
        "tau": OptionSpec(float, 0.9, "DySeg: cut where consecutive frames' cosine < tau"),
        "period": OptionSpec(int, 4, "DTM p: an anchor frame every p frames of a segment",
                             lambda v: v >= 1, "use period >= 1"),
        "beta": OptionSpec(float, 0.6, "DTM: smallest weight of an anchor in its merge",
                           lambda v: 0 <= v <= 1, "use 0 <= beta <= 1"),
    },
    temporal=reduce_fastvid,
    temporal_count=count,
)
