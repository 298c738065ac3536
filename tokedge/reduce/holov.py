"""`holov`: holistic visual token pruning (HoloV, arXiv 2510.02912, NeurIPS 2025; authors' code
obananas/HoloV `llava/model/utils.py` `HoloV`, called from `llava/model/llava_arch.py`).

What the authors' code does, on one view's n projected patch tokens (LLaVA-1.5: n = 576) and the
feature layer's CLS attention (CLS query row, mean over heads):
1. "Crops" are C contiguous runs of the raster sequence (1-D bands, not 2-D tiles): n // C tokens
   each, the first n % C one more. C = 16 at 64 tokens (their LLaVA call); other budgets take their
   Qwen formula max(1, int(1024 / 576 * n / K)), which gives 16 at 64 of 576.
2. Per crop (m tokens): F = x / (|x| + 1e-6); S = F F^T with the diagonal zeroed; mean_i = sum_j S_ij
   / (m - 1); var_i = sum_j (S_ij - mean_i)^2 / (m - 1) (the zeroed diagonal entry included);
   a_i = 1000 * attention_i; token score = a_i + 0.09 * var_i * mean|a| / (mean|var| + 1e-6); the
   crop's score is the mean token score.
3. Budgets: w = score / (sum + 1e-6); alloc = floor(w * K); the K - sum(alloc) left over go one each
   to the crops with the largest w.
4. Each crop keeps its alloc tokens with the highest CLS attention, in descending attention order
   (not raster); a crop whose alloc >= m keeps all its tokens in raster order and the surplus is lost.
5. Fewer than K kept (a crop's surplus lost): zero vectors fill up to K, as the authors' code does.
Deployment choices: scores in fp32 (theirs in fp16); ties go to the lower index (crops and tokens).
Static counts for a fixed K and n: constant crop maps, pairwise ranks, one TopK over an order key.
"""

from __future__ import annotations

from tokedge.errors import UsageError
from tokedge.reduce.base import Method, OptionSpec, Signal, Stage, VisionFeatures

EPS = 1e-6  # the authors' `esp`
VAR_WEIGHT = 0.09  # the authors' alpha
ATTN_SCALE = 1e3


def crop_count(tokens: int, budget: int, options: dict | None = None) -> int:
    chosen = (options or {}).get("crops")
    return int(chosen) if chosen is not None else max(1, int(1024 / 576 * tokens / budget))


def crop_sizes(tokens: int, crops: int) -> list[int]:
    """The authors' split: n // C each, the first n % C one more."""
    return [tokens // crops + (1 if c < tokens % crops else 0) for c in range(crops)]


def select_holov(x, attention, budget: int, crops: int):
    """x [b, n, D] projected tokens, attention [b, n] -> (index [b, K] into n in the authors' order,
    real [b, K] bool: False where the authors pad with a zero vector)."""
    import torch

    n = attention.shape[-1]
    sizes = crop_sizes(n, crops)
    cid = torch.tensor([c for c, m in enumerate(sizes) for _ in range(m)], dtype=torch.int64)  # [n] constant
    onehot = (cid[:, None] == torch.arange(crops)[None, :]).to(torch.float32)  # [n, C]
    size_c = torch.tensor(sizes, dtype=torch.float32)
    same = cid[:, None] == cid[None, :]  # [n, n]
    t_idx = torch.arange(n)
    off = same & (t_idx[:, None] != t_idx[None, :])
    m_tok = size_c[cid]  # crop size of each token

    x = x.float()
    f = x / (x.norm(dim=-1, keepdim=True) + EPS)
    s = torch.matmul(f, f.transpose(-1, -2)) * off.to(torch.float32)  # [b, n, n]: in-crop, diagonal 0
    mean = s.sum(dim=-1) / (m_tok - 1)
    var = (((s - mean[..., None]) ** 2) * same.to(torch.float32)).sum(dim=-1) / (m_tok - 1)
    a = attention.float() * ATTN_SCALE

    def crop_mean(v):  # [b, n] -> [b, C]
        return torch.matmul(v, onehot) / size_c

    scaling = crop_mean(a.abs()) / (crop_mean(var.abs()) + EPS)
    score = crop_mean(a + VAR_WEIGHT * var * scaling[:, cid])  # [b, C]
    w = score / (score.sum(dim=-1, keepdim=True) + EPS)
    alloc = torch.floor(w * budget).to(torch.int64)
    left = budget - alloc.sum(dim=-1, keepdim=True)
    c_idx = torch.arange(crops)
    w_i, w_j = w[..., :, None], w[..., None, :]
    first = (w_j > w_i) | ((w_j == w_i) & (c_idx[None, :] < c_idx[:, None]))  # [b, C, C]
    alloc = alloc + (first.sum(dim=-1) < left).to(torch.int64)

    a_i, a_j = a[..., :, None], a[..., None, :]
    ahead = same & ((a_j > a_i) | ((a_j == a_i) & (t_idx[None, :] < t_idx[:, None])))
    rank = ahead.sum(dim=-1)  # place within its crop by descending attention
    whole = alloc[:, cid] >= m_tok.to(torch.int64)  # the crop is kept whole, in raster order (the authors')
    start = torch.tensor([sum(sizes[:c]) for c in range(crops)], dtype=torch.int64)[cid]
    rank = torch.where(whole, t_idx - start, rank)
    kept = rank < alloc[:, cid]
    order = torch.where(kept, cid * n + rank, torch.full_like(rank, crops * n + n))
    index = torch.topk(order, budget, dim=-1, largest=False, sorted=True).indices
    return index, kept.gather(1, index)


def reduce_holov(vf: VisionFeatures, k: int, options: dict):
    """[b, n, d] patches of one view -> [b, k, hidden] (zero rows where the authors pad)."""
    embeds = vf.project(vf.features)  # similarities on the projected tokens (as the authors')
    n = int(embeds.shape[1])
    crops = crop_count(n, k, options)
    if n // crops < 2:
        raise UsageError(f"--method holov: {crops} crops of {n} tokens would hold one token each; use fewer crops")
    index, real = select_holov(embeds, vf.cls_attention, k, crops)
    rows = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
    return rows * real[..., None].to(rows.dtype)


def _budget_check(budget: int, full: int) -> str | None:
    crops = crop_count(full, budget)
    if full // crops < 2:
        return f"its {crops} crops of {full} tokens would hold one token each: use --budget >= 4"
    return None


METHOD = Method(
    name="holov",
    stage=Stage.PRE_LLM,
    single_view=True,
    paper="2510.02912",
    reference="obananas/HoloV",
    summary="budget split over raster bands by CLS attention (+ in-band similarity variance), top CLS attention "
            "per band",
    scores_with=(Signal.CLS_ATTENTION, Signal.EMBEDDINGS),
    reduce=reduce_holov,
    budget_check=_budget_check,
    option_specs={
        "crops": OptionSpec(int, None, "raster bands the budget is split over (default: the authors' "
                            "int(1024/576 * tokens / budget), 16 at 64 of 576)", lambda v: v >= 1, "must be >= 1"),
    },
)
