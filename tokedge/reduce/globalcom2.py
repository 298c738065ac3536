"""`globalcom2`: compression with global guidance for a thumbnail plus crops (GlobalCom2, arXiv
2501.05179, AAAI 2026; authors' code xuyang-liu16/GlobalCom2, `llava/model/llava_arch.py`).

One tiled image (LLaVA-NeXT anyres: the base view is the thumbnail, the tiles are the crops), a
budget of k tokens out of its C candidates (base view first, then the unpadded tile map in raster
order), R = k / C:
1. scores: the CLS query's logits before softmax, mean over heads, in the layer that reads the
   feature layer (the last layer for LLaVA's -2: the authors' `attn_maps[-1]`), per partition;
2. crop budgets: each tile's block of the thumbnail's p x p map (an even split by the tile grid,
   padding ignored) sums its thumbnail logits; softmax over tiles at temperature 10;
   r_j = min(R * (1 + p_j - mean p), 1); shares: thumbnail N * R, tile j n_j * r_j (n_j its
   candidates);
3. in-crop scores: the tile's own logits and the thumbnail's logits resized bilinearly onto the
   tile map, each L2-normalised over the tile's candidates, summed (1:1); thumbnail: its logits;
4. each partition keeps its best tokens (ties: the lower index). The authors keep floor(share)
   per partition, so their total drifts from k; tokedge keeps exactly k: the partition whose next
   token has the largest share left (share - rank) gets it, i.e. every share shifted by one
   constant, which is the authors' count whenever the floors sum to k and the largest remainder
   otherwise (ties: the lower partition, thumbnail first);
5. output: the thumbnail's kept tokens in descending score (the authors' order), then the tiles'
   in raster order of the whole map (the authors scatter them back onto the canvas); newlines are
   left out, as for every pre-LLM method on tiled images (the authors keep one per canvas row).
"""

from __future__ import annotations

from tokedge.reduce.base import Method, OptionSpec, Signal, Stage, VisionFeatures
from tokedge.reduce.select import gather_tokens, rank_in_group


def _normalise_per_partition(x, member):
    """x [C], member [C, P] one-hot -> x / ||x over its partition|| (torch's F.normalize, eps 1e-12)."""
    import torch

    norm = torch.sqrt((member * (x * x)[:, None]).sum(0)).clamp_min(1e-12)  # [P]
    return x / (member * norm[None, :]).sum(-1)


def select_globalcom2(logits, guide, partition, base_block, k: int, temperature: float):
    """One image's candidates: logits [C] (each partition's own CLS logits), guide [C] (the
    thumbnail's logits resized onto the tile map), partition [C] int64 (0 base, t + 1 tile t),
    base_block [N, T] one-hot -> [k] candidate indices in output order (see the module docstring)."""
    import torch

    n_base, tiles = base_block.shape[0], base_block.shape[1]
    logits, guide = logits.float(), guide.float()
    count = torch.ones_like(logits).sum()  # C as a float (a dynamic axis)
    block = (logits[:n_base, None] * base_block.float()).sum(0)  # [T] thumbnail logits per crop
    probs = torch.softmax((block - block.max()) / temperature, dim=0)
    ratio = k / count
    scales = torch.clamp(ratio * (1 + probs - probs.mean()), max=1.0)
    parts = torch.arange(tiles + 1, device=partition.device)
    member = (partition[:, None] == parts[None, :]).float()  # [C, T + 1]
    sizes = member.sum(0)
    share = torch.cat([(n_base * k) / count[None], sizes[1:] * scales])  # [T + 1]
    in_crop = _normalise_per_partition(logits, member) + _normalise_per_partition(guide, member)
    score = torch.where(partition == 0, logits, in_crop)
    c = logits.shape[0]
    order = torch.topk(score, c).indices  # best first; ties: the lower index
    part = partition[order]
    ordered = member[order]
    rank = rank_in_group(ordered)  # place of each candidate within its partition
    # (partition, rank) order, so that equal shares left go to the lower partition
    arrange = torch.topk(-(part.float() * c + rank), c).indices
    left = (share[part] - rank)[arrange]
    chosen = arrange[torch.topk(left, k).indices]  # positions in `order`
    # output: the thumbnail's by rank (descending score), then the tiles' by candidate index (>= N)
    kept = order[chosen]
    key = torch.where(part[chosen] == 0, rank[chosen], kept.float())
    return kept[torch.topk(-key, k).indices]


def reduce_globalcom2(vf: VisionFeatures, k: int, options: dict):
    """[1, C, d] candidates of one tiled image -> [1, k, hidden]."""
    idx = select_globalcom2(vf.cls_logits[0], vf.global_guide[0], vf.partition[0], vf.base_block[0], k,
                            options["temperature"])
    return vf.project(gather_tokens(vf.features, idx[None]))


METHOD = Method(
    name="globalcom2",
    stage=Stage.PRE_LLM,
    paper="2501.05179",
    reference="xuyang-liu16/GlobalCom2",
    summary="thumbnail CLS logits set each crop's share (softmax); in-crop: local + resized global logits",
    scores_with=(Signal.CLS_LOGITS, Signal.THUMBNAIL_GUIDE),
    reduce=reduce_globalcom2,
    budget_meaning="visual tokens per image that enter the LLM (thumbnail + crops; R = budget / candidates)",
    option_specs={
        "temperature": OptionSpec(float, 10.0, "softmax temperature of the crop shares (the authors' 10)",
                                  lambda v: v > 0, "must be > 0"),
    },
)
