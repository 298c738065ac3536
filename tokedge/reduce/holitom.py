"""`holitom`: HoliTom's holistic pre-LLM token merging (arXiv 2505.21334; authors' code
cokeshao/HoliTom, `holitom/llava_arch.py`: `select_static_windows`, `get_static_dynamic_features`,
`merge_tokens_by_attention_density`, `merge_tokens_by_density`, `cluster_dpc_knn`,
`merge_tokens_by_clustering`).

On the pooled projected tokens of a video x [F, n, D] and the attention each token receives in the
tower's last layer a [F, n]:
1. Temporal windows: sim[t, j] = cos(x[t, j], x[t+1, j]); a position is static over frames s..e
   when every sim on the way is > tau. A dynamic programme over frames picks the windows that
   save the most tokens (gain = static positions x (L - 1); ties: the frame alone, then the
   smallest window).
2. In a window of L >= 2 frames, static positions become one token each (their mean over the L
   frames); every other token is dynamic.
3. Dynamic tokens, per frame: the top ones by attention, in raster order.
4. Static tokens of a window: DPC-kNN centres (density from the min(K, count) nearest, score =
   density x distance to the nearest denser token), centres in position order; every other static
   token joins its nearest centre, which becomes beta * centre + (1 - beta) * mean(joined).
5. Output per window: [static centres, frame s dynamic, ..., frame e dynamic], windows in order.

tokedge's variant (docs/methods.md): the budget B is exact. Units (each window's static set, each
frame's dynamic set) get B * size / (total size) tokens, floored, the remainder to the largest
fractional parts (ties: earlier unit, static before dynamic), in integer arithmetic; the authors
use ceil / round of a rescaled ratio, so their count varies with the video. If the windows would
leave fewer than B tokens (a nearly still video at a high keep ratio), every frame is its own
window. Ties go to the lower index (no `rand * 1e-6`); D = 0 (no contextual merging of dynamic
tokens, the authors' default). The optional in-LLM stage is not implemented. Static shapes for a
fixed (F, B): the programme is unrolled over frames; masks, pairwise ranks and one TopK.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokedge.errors import UsageError
from tokedge.reduce.base import Method, OptionSpec, Signal, Stage
from tokedge.reduce.frames import COS_EPS, VideoTokens, mask_indices, rank_descending

NEIGHBOURS = 7  # HoliTom's K: density from the min(K, centres) nearest, itself included


@dataclass(frozen=True)
class Plan:
    budget: int
    tau: float = 0.8  # static when consecutive cosine > tau
    beta: float = 0.6  # a centre's weight in its merge

    @property
    def total(self) -> int:
        return self.budget


def windows(sim, tau: float):
    """sim [F-1, n] -> (start [F] int64, end [F] int64: each frame's window, reduced: tokens saved).

    The authors' dynamic programme, unrolled over frames."""
    import torch

    frames = sim.shape[0] + 1
    moved = (sim <= tau).long()  # [F-1, n]
    prefix = torch.cat([torch.zeros_like(moved[:1]), torch.cumsum(moved, dim=0)])  # [F, n]: moves before t
    order = torch.arange(frames)
    # static[s, e]: positions static over s..e (no move in s..e-1); gain = count x (e - s), e > s
    still = (prefix[None, :, :] - prefix[:, None, :]) == 0  # [s, e, n]
    span = (order[None, :] - order[:, None]).clamp_min(0)
    # [F, F] (0 for e <= s): integer token counts held in float32 for Max/ArgMax (TensorRT takes no
    # float64 and no int64 ArgMax); exact, as every sum here is at most F * n < 2**24 (`plan` checks)
    gain = (still.sum(dim=-1) * span).float()
    zero = torch.zeros((), dtype=torch.float32)
    dp, start = [], []
    for i in range(frames):
        options = [dp[i - 1] if i > 0 else zero]  # frame i alone
        for size in range(2, i + 2):  # window [i - size + 1, i]
            j = i - size
            options.append((dp[j] if j >= 0 else zero) + gain[j + 1, i])
        best = torch.stack(options).max(dim=0)  # first maximum: alone, then the smallest window
        dp.append(best.values)
        start.append(i - best.indices)
    start_of = torch.stack(start)  # [F] window start if frame i ends a window
    first = torch.zeros(frames, dtype=torch.int64)
    last = torch.zeros(frames, dtype=torch.int64)
    end = torch.full((), frames - 1, dtype=torch.int64)
    for _ in range(frames):  # backtrack from the last frame, at most F windows
        live = end >= 0
        s = start_of[end.clamp_min(0)]
        inside = live & (order >= s) & (order <= end)
        first = torch.where(inside, s, first)
        last = torch.where(inside, end, last)
        end = torch.where(live, s - 1, end)
    return first, last, dp[-1]


def plan(frames: int, n: int, budget: int, tau: float = 0.8, beta: float = 0.6) -> Plan:
    if not 1 <= budget <= frames * n:
        raise UsageError(f"holitom: use --budget 1..{frames * n} for {frames} frames of {n} tokens")
    if frames * n >= 1 << 24:  # token counts are compared in float32 (TensorRT has no float64): exact below 2**24
        raise UsageError(f"holitom: {frames} frames of {n} tokens is more than 2**24 tokens; sample fewer frames")
    return Plan(budget, tau, beta)


def holitom(x, attn, plan: Plan):
    """x [F, n, D], attn [F, n] -> ([B, D] tokens, [B] int64 flat index frame * n + position of each
    token's source: a static centre's window start frame)."""
    import torch

    frames, n, width = (int(v) for v in x.shape)
    budget = plan.budget
    xf = x.float()
    unit = xf / xf.norm(dim=-1, keepdim=True).clamp_min(COS_EPS)
    sim = (unit[:-1] * unit[1:]).sum(dim=-1)
    first, last, reduced = windows(sim, plan.tau)
    order = torch.arange(frames)
    # too few tokens left for the budget: every frame alone
    alone = (frames * n - reduced.long()) < budget
    first = torch.where(alone, order, first)
    last = torch.where(alone, order, last)
    moved = (sim <= plan.tau).long()
    prefix = torch.cat([torch.zeros_like(moved[:1]), torch.cumsum(moved, dim=0)])
    multi = last > first
    static = multi[:, None] & ((prefix[last] - prefix[first]) == 0)  # [F, n], same row for a window's frames
    lead = first == order  # the frame that carries its window's static tokens

    # budget over units: static set of each window (at its lead frame), dynamic set of each frame
    n_static = torch.where(lead & multi, static.sum(dim=1), torch.zeros_like(first))  # [F]
    n_dynamic = n - static.sum(dim=1)  # [F]
    sizes = torch.stack([n_static, n_dynamic], dim=1).reshape(-1)  # units in order: static t, dynamic t
    total = sizes.sum()
    share = torch.div(budget * sizes, total, rounding_mode="floor")
    rest = budget * sizes - share * total
    extra = budget - share.sum()
    counts = (share + (rank_descending(rest.float()) < extra).long()).reshape(frames, 2)  # rest < F*n: exact
    c_static, c_dynamic = counts[:, 0], counts[:, 1]

    # dynamic tokens: the top by attention among each frame's dynamic positions
    score = torch.where(static, torch.full_like(attn.float(), -1.0), attn.float())
    keep_dynamic = (rank_descending(score) < c_dynamic[:, None]) & ~static

    # static tokens: the window mean, DPC-kNN centres, nearest-centre merge (rows of lead frames)
    member = (first[:, None] == first[None, :]).float()  # [F, F] same window
    mean = torch.matmul(member / member.sum(dim=1, keepdim=True), xf.reshape(frames, -1)).reshape(frames, n, width)
    sq = (mean * mean).sum(dim=-1)
    d2 = (sq[:, :, None] + sq[:, None, :] - 2.0 * torch.matmul(mean, mean.transpose(1, 2))).clamp_min(0.0)
    pos = torch.arange(n)
    d2 = torch.where((pos[:, None] == pos[None, :])[None], torch.zeros_like(d2), d2) / width
    dist = d2.sqrt()
    pair = static[:, :, None] & static[:, None, :]
    big = d2.amax() + 1.0
    nearest = torch.topk(torch.where(pair, d2, big), min(NEIGHBOURS, n), dim=-1, largest=False).values
    k = c_static.clamp(min=1, max=NEIGHBOURS).to(d2.dtype)[:, None]  # min(K, centres)
    taken = (torch.arange(nearest.shape[-1])[None, None, :] < k[:, :, None]).to(d2.dtype)
    rho = torch.exp(-(nearest * taken).sum(dim=-1) / k)
    far = torch.where(pair, dist, torch.zeros_like(dist)).amax(dim=(1, 2))[:, None, None]
    denser = pair & (rho[:, None, :] > rho[:, :, None])
    delta = torch.where(denser, dist, far).amin(dim=-1)
    dpc = torch.where(static, rho * delta, torch.full_like(rho, -1.0))
    centre = (rank_descending(dpc) < c_static[:, None]) & static & lead[:, None]
    joins = static[:, :, None] & ~centre[:, :, None] & centre[:, None, :]  # [F, token, centre]
    pick = torch.where(joins, dist, torch.full_like(dist, float("inf"))).min(dim=-1).indices  # first nearest
    assign = torch.nn.functional.one_hot(pick, n).to(xf.dtype) * joins.any(dim=-1, keepdim=True).to(xf.dtype)
    count = assign.sum(dim=1)[..., None]  # [F, n, 1] tokens joining each centre
    joined = torch.matmul(assign.transpose(1, 2), mean) / count.clamp_min(1.0)
    merged = torch.where(count > 0, plan.beta * mean + (1.0 - plan.beta) * joined, mean)

    keep = torch.cat([centre, keep_dynamic], dim=1)  # [F, 2n]: static slots before each frame's dynamic ones
    idx = mask_indices(keep, budget)
    values = torch.cat([merged.to(x.dtype), x], dim=1).reshape(frames * 2 * n, width)[idx]
    source = torch.div(idx, 2 * n, rounding_mode="floor") * n + idx % n
    return values, source


def plan_for(frames: int, n: int, budget: int | None, options: dict) -> Plan:
    o = {k: v for k, v in options.items() if v is not None}
    return plan(frames, n, frames * n if budget is None else budget, **o)


def reduce_holitom(video: VideoTokens, budget: int | None, options: dict):
    """[F, n, D] (+ received attention [F, n]) -> ([B, D], [B] source flat indices)."""
    x = video.tokens
    if video.received_attention is None:
        raise UsageError("holitom scores with the tower's received attention; this video graph has none")
    return holitom(x, video.received_attention, plan_for(int(x.shape[0]), int(x.shape[1]), budget, options))


def count(frames: int, n: int, budget: int | None, options: dict) -> int:
    return plan_for(frames, n, budget, options).total


METHOD = Method(
    name="holitom",
    stage=Stage.TEMPORAL,
    scores_with=(Signal.EMBEDDINGS, Signal.RECEIVED_ATTENTION),
    paper="2505.21334",
    reference="cokeshao/HoliTom",
    summary="video: static windows by a dynamic programme, static tokens clustered, dynamic ones by attention",
    budget_meaning="visual tokens per video that enter the LLM",
    option_specs={
        "tau": OptionSpec(float, 0.8, "a position is static while consecutive frames' cosine > tau"),
        "beta": OptionSpec(float, 0.6, "a cluster centre's weight in its merge", lambda v: 0 <= v <= 1,
                           "use 0 <= beta <= 1"),
    },
    temporal=reduce_holitom,
    temporal_count=count,
)
