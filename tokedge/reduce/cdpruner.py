"""`cdpruner`: conditional diversity (CDPruner, arXiv 2506.10967, NeurIPS 2025; authors' code
Theia-4869/CDPruner `llava/model/llava_arch.py` `encode_images`; OpenVINO GenAI's port for Qwen-VL,
`src/cpp/src/visual_language/cdpruner/`).

The kept set is the greedy MAP of a determinantal point process whose kernel weighs the visual
tokens' similarity by their relevance to the instruction, as the authors' code does it:
1. S = cosine similarities of the projected visual tokens (the LLM's input space).
2. Relevance r_i = cos(v_i, q) to the instruction q, min-max normalised over the view:
   (r - min + 1e-6) / (max - min); `negate=1` takes -cos first (the authors' sign, which they need
   in CLIP's joint space; OpenVINO's default for LLM-space relevance is the plain cosine).
3. Kernel K = diag(r) S diag(r).
4. Fast greedy MAP (Chen et al. 2018): d2 = diag(K), c = 0; K times: j = argmax d2 (first index on
   ties), e = (K[j] - sum_t c_t[j] c_t) / sqrt(d2[j]), c_next = e, d2 -= e^2, d2[j] = -inf.
5. The picks return to raster order and are gathered from the projected tokens.
Where tokedge departs (docs/methods.md): the authors' relevance compares CLIP's joint-space patch
embeddings with the raw question through CLIP's text tower, which LLaVA checkpoints do not carry;
tokedge, as OpenVINO GenAI, compares the projected visual tokens with the instruction in the LLM's
embedding space: q = the mean of the embed graph's output over the prompt's text tokens (every token
of the rendered prompt but image placeholders and padding), the vision graph's `instruction` input.
A constant relevance (max = min, where the authors' code divides by zero) counts as all equal. Marginal
gains d2 at or below 1e-4 count as 0, and such candidates are picked last, in raster order: the picks
beyond what the kernel spans (K above the embedding width, duplicates), and tokens whose relevance is
at most 0.01 (d2 starts at r^2), which the kernel weighs near zero anyway: below that, fp32 sums in
two runtimes order them differently (the authors' sqrt of a non-positive d2 gives NaN; OpenVINO
GenAI guards it with an epsilon too).
Static counts: K unrolled steps (argmax, a gather, a row update), no data-dependent shapes.
"""

from __future__ import annotations

from tokedge.reduce.base import Method, OptionSpec, Signal, Stage, VisionFeatures
from tokedge.reduce.select import unroll_limit

EXHAUSTED = 1e-4  # marginal gain d2 at or below this (of at most 1): spent, below fp32 reproducibility


def relevance(embeds, instruction, negate: bool):
    """embeds [b, n, d], instruction [b, d] -> [b, n] min-max normalised relevance (fp32)."""
    v = embeds.float()
    q = instruction.float()
    v = v / v.norm(dim=-1, keepdim=True)
    q = q / q.norm(dim=-1, keepdim=True)
    cos = (v * q[:, None, :]).sum(dim=-1)
    r = -cos if negate else cos
    lo = r.min(dim=-1, keepdim=True).values
    hi = r.max(dim=-1, keepdim=True).values
    return (r - lo + 1e-6) / (hi - lo).clamp_min(1e-12)


def greedy_map(kernel, k: int):
    """kernel [b, n, n] -> [b, k] picks in the order chosen (fast greedy DPP MAP, fp32)."""
    import torch

    b, n = kernel.shape[0], kernel.shape[-1]
    rows = torch.arange(b)
    cols = torch.arange(n)
    # the diagonal, written as a masked row sum (torch.diagonal exports an If for a dynamic n)
    d2 = (kernel * (cols[:, None] == cols[None, :]).to(kernel.dtype)).sum(dim=-1)
    c = None  # [t, b, n]: the Cholesky rows so far, grown by one per pick
    picks = []
    picked = torch.zeros_like(d2, dtype=torch.bool)
    for _ in range(k):
        j = torch.argmax(d2, dim=-1)  # [b]
        picks.append(j)
        kj = kernel[rows, j]  # [b, n]
        if c is not None:
            kj = kj - (c[:, rows, j][..., None] * c).sum(dim=0)
        dj = d2[rows, j][:, None]
        live = dj > EXHAUSTED  # the kernel's rank is spent: no update (the authors' sqrt would give NaN)
        e = torch.where(live, kj / torch.sqrt(dj.clamp_min(EXHAUSTED)), torch.zeros_like(kj))
        c = e[None] if c is None else torch.cat([c, e[None]])
        picked = picked | (cols[None, :] == j[:, None])
        d2 = d2 - e * e
        d2 = torch.where(d2 > EXHAUSTED, d2, torch.zeros_like(d2))  # spent candidates tie at 0: raster order
        d2 = torch.where(picked, torch.full_like(d2, float("-inf")), d2)
    return torch.stack(picks, dim=-1)


def dpp_kernel(embeds, instruction, negate: bool):
    """embeds [b, n, d], instruction [b, d] -> [b, n, n] kernel diag(r) S diag(r) (fp32)."""
    import torch

    v = embeds.float()
    v = v / v.norm(dim=-1, keepdim=True)
    sim = torch.matmul(v, v.transpose(-1, -2))
    r = relevance(embeds, instruction, negate)
    return r[:, :, None] * sim * r[:, None, :]


def select_cdpruner(embeds, instruction, k: int, negate: bool):
    """embeds [b, n, d] projected tokens, instruction [b, d] -> [b, k] kept indices, ascending."""
    import torch

    return torch.sort(greedy_map(dpp_kernel(embeds, instruction, negate), k), dim=-1).values


def reduce_cdpruner(vf: VisionFeatures, k: int, options: dict):
    """[b, n, d] patches + the instruction [b, hidden] -> [b, k, hidden]."""
    embeds = vf.project(vf.features)
    if k >= embeds.shape[1]:
        return embeds
    idx = select_cdpruner(embeds, vf.instruction, k, bool(options["negate"]))
    return embeds.gather(1, idx[..., None].expand(-1, -1, embeds.shape[-1]))


def reduce_cdpruner_indexed(vf: VisionFeatures, k, options: dict, most: int = 0):
    """Dynamic resolution (Qwen-VL), one image, a run-time count k (0-d int64) of its merged tokens
    `vf.features` [1, n, d] and the instruction [1, d] or [d]: `most` greedy steps unrolled (the
    largest count the graph is fed), the first k picks kept (greedy picks are a prefix of any longer
    run) -> (tokens [1, k, d], raster indices [1, k] ascending)."""
    import torch

    embeds = vf.features
    kernel = dpp_kernel(embeds, vf.instruction.reshape(1, -1), bool(options["negate"]))
    picks = greedy_map(kernel, max(int(most), 1))[0]
    kept = torch.sort(picks[:k]).values
    return embeds[0][kept][None], kept[None]


METHOD = Method(
    name="cdpruner",
    stage=Stage.PRE_LLM,
    paper="2506.10967",
    reference="Theia-4869/CDPruner; openvinotoolkit/openvino.genai (cdpruner)",
    summary="greedy DPP MAP: projected tokens' similarity weighted by relevance to the instruction",
    scores_with=(Signal.EMBEDDINGS, Signal.INSTRUCTION),
    reduce=reduce_cdpruner,
    reduce_indexed=reduce_cdpruner_indexed,
    budget_check=unroll_limit("cdpruner"),
    option_specs={
        "negate": OptionSpec(int, 0, "1: relevance = -cos (the authors' sign, for CLIP's joint space); 0: cos "
                             "(OpenVINO GenAI's default in the LLM's space)", lambda v: v in (0, 1), "use 0 or 1"),
    },
)
