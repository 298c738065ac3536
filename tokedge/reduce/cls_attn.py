"""`cls-attn`: keep the patches the CLS token attends to most (FasterVLM arXiv 2412.01818,
HiRED arXiv 2408.10945).

Score = attention of the CLS query to each patch in the feature layer (the vision layer whose
output LLaVA takes, `vision_feature_layer`), softmax over all keys including CLS, mean over heads.
Keep the top `budget` patches, restore raster order, then project. `--budget` = visual tokens that
enter the LLM. Counts are static for a fixed budget; with `--dynamic-budget` the TopK k is the
`budget` graph input.
"""

from __future__ import annotations

from tokedge.reduce.base import Method, Signal, Stage, VisionFeatures
from tokedge.reduce.select import gather_tokens, topk_sorted


def select_cls_attn(scores, k: int):
    """scores: [b, n] CLS attention per patch -> [b, k] kept patch indices in raster order."""
    return topk_sorted(scores, k)


def reduce_cls_attn(vf: VisionFeatures, k: int, options: dict):
    """[b, n, d] features -> [b, k, hidden]: the k most-attended patches, projected."""
    if k >= vf.features.shape[1]:
        return vf.project(vf.features)
    return vf.project(gather_tokens(vf.features, select_cls_attn(vf.cls_attention, k)))


def reduce_cls_attn_indexed(vf: VisionFeatures, k, options: dict, most: int = 0):
    """Towers without CLS (Qwen-VL), one image, a run-time count k (0-d int64): the k merged tokens
    that receive the most attention (`vf.cls_attention` holds that score) -> (tokens [1, k, d],
    their raster indices [1, k] ascending)."""
    import torch

    idx = torch.sort(torch.topk(vf.cls_attention[0], k).indices).values
    return vf.features[0][idx][None], idx[None]


METHOD = Method(
    name="cls-attn",
    stage=Stage.PRE_LLM,
    paper="2412.01818, 2408.10945",
    reference="Theia-4869/FasterVLM",
    summary="top-k patches by CLS attention in the feature layer",
    scores_with=(Signal.CLS_ATTENTION,),
    supports_runtime_budget=True,
    reduce=reduce_cls_attn,
    reduce_indexed=reduce_cls_attn_indexed,
)
