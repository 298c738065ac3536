"""Analytical FLOPs and bytes per stage, from the manifest's sizes (multiply-add = 2 FLOPs).

Rough by design: dense projections, attention score/value products and MLPs; norms, softmax and
the reduction's own selection are left out (they are small next to the GEMMs). Used for the
achieved GFLOP/s column of `tokedge profile` and for roofline predictions on a device profile.

Artifacts with the manifest's `architecture` record are costed from it: the tokens each vision
block runs (ToMe's schedule included), each block's attention span, the MLP's matrices (SwiGLU:
three), the projector's widths and the exact parameter counts of the graphs (bytes moved). The
LLaVA formulas below remain for artifacts written before the record.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from tokedge.artifact import Manifest
from tokedge.reduce.base import Signal, Stage


@dataclass(frozen=True)
class StageCost:
    flops: float
    bytes: float  # weights + KV cache read at least once (activations ignored)


def _vit_layer(n: int, d: int, ff: int) -> float:
    return 2 * n * 4 * d * d + 2 * 2 * n * n * d + 2 * n * 2 * d * ff


def _llm_layer(t: int, ctx: int, m) -> float:
    d, hd = m.hidden_size, m.head_dim
    proj = d * (m.num_attention_heads * hd) * 2 + d * (m.num_key_value_heads * hd) * 2
    attn = 2 * 2 * t * ctx * m.num_attention_heads * hd
    return 2 * t * proj + attn + 2 * t * 3 * d * m.intermediate_size


def _llm_layer_params(m) -> float:
    d, hd = m.hidden_size, m.head_dim
    return d * (m.num_attention_heads * hd) * 2 + d * (m.num_key_value_heads * hd) * 2 + 3 * d * m.intermediate_size


def bytes_per_value(manifest: Manifest) -> int:
    return 2 if manifest.dtype == "fp16" else 4


def vision_cost(manifest: Manifest, budget: int, batch: int = 1, partitions: int = 1,
                patches: int | None = None) -> StageCost:
    """In-ViT merging follows the merge schedule the export recorded (tokens merged per layer),
    so the count per layer is the traced graph's, whatever the tower (CLS or not).

    `partitions`: views of one image the tower runs (1 for a single view; base view + tiles for
    a tiled layout, `runtime.layout.plan_image(...).partitions` for a given image size). Each runs
    the whole tower; unreduced, the projector runs on every partition's patch features (the
    packing after it is a gather). `patches`: patches of one partition when images vary in size
    (dynamic resolution; attention counted dense, window blocks included: an upper bound)."""
    if getattr(manifest, "architecture", None) is not None:
        return _recorded_vision_cost(manifest, budget, batch, partitions, patches)
    m, red = manifest.model, manifest.reduction
    patches = (m.image_size // m.patch_size) ** 2 if patches is None else patches
    n = patches + (1 if m.vision_model_type == "clip_vision_model" else 0)
    d, ff = m.vision_hidden_size, m.vision_intermediate_size or 4 * m.vision_hidden_size
    schedule = list(red.merge_schedule) + [0] * (m.vision_layers - len(red.merge_schedule))
    flops = 0.0
    for r in schedule[: m.vision_layers]:
        flops += _vit_layer(n, d, ff)
        n -= r
    stage = Stage(red.stage)
    # pre-LLM methods that select among projected tokens (divprune) project all of them
    # and on dynamic-resolution layouts every method acts on merged tokens (the merger runs on all)
    from tokedge.layouts import layout_of

    projects_all = (stage in (Stage.NONE, Stage.IN_LLM, Stage.TEMPORAL) or Signal.EMBEDDINGS.value in red.scores_with
                    or layout_of(manifest).takes_max_pixels)
    flops *= partitions
    projected = partitions * patches if projects_all else budget
    flops += 2 * projected * (d * m.hidden_size + m.hidden_size * m.hidden_size)
    params = m.vision_layers * (4 * d * d + 2 * d * ff) + d * m.hidden_size + m.hidden_size**2
    return StageCost(flops=batch * flops, bytes=params * bytes_per_value(manifest))


def _recorded_vision_cost(manifest: Manifest, budget: int, batch: int, partitions: int,
                          patches: int | None) -> StageCost:
    """`vision_cost` from the architecture record. `patches`: one image's patches when the tower's
    count follows the image (default: the largest image the layout allows)."""
    arch, red = manifest.architecture, manifest.reduction
    v = arch.vision
    if v.layer_tokens:
        counts = list(v.layer_tokens)
    else:
        if patches is None:
            from tokedge.memory import image_bounds

            patches = image_bounds(manifest).vision_tokens[2] * v.patches_per_token
        counts = [patches] * v.layers
    spans = v.attention_span or (0,) * v.layers
    d, ff, mats = v.hidden, v.intermediate, 3 if v.gated_mlp else 2
    flops = sum(2 * n * 4 * d * d + 2 * 2 * n * (s or n) * d + 2 * n * mats * d * ff for n, s in zip(counts, spans))
    flops *= partitions
    stage = Stage(red.stage)
    merged = (counts[0] if v.layer_tokens else patches) // max(1, v.patches_per_token)
    projects_all = (stage in (Stage.NONE, Stage.IN_LLM, Stage.TEMPORAL) or Signal.EMBEDDINGS.value in red.scores_with
                    or not v.layer_tokens)  # merged-patch towers project every merged token, then select
    projected = partitions * merged if projects_all else budget
    widths = v.projector
    mergers = 1 + int(manifest.layout.deepstack_levels or 0)  # DeepStack: one merger per level beside the main one
    flops += mergers * 2 * projected * sum(a * b for a, b in pairwise(widths))
    params = arch.graphs["vision"].parameters if "vision" in arch.graphs else 0
    return StageCost(flops=batch * flops, bytes=params * bytes_per_value(manifest))


def prefill_cost(manifest: Manifest, prompt_tokens: int, visual_tokens: int, batch: int = 1) -> StageCost:
    """prompt_tokens: text tokens; visual_tokens: image tokens entering the LLM."""
    m, red = manifest.model, manifest.reduction
    t = prompt_tokens + visual_tokens
    flops = 0.0
    if red.stages:  # in-LLM pruning: later layers see shorter sequences
        lengths = []
        current = t
        # image tokens each stage removes: down to its keep (a share of this image's tokens with --keep)
        if red.keep is not None:
            from tokedge.reduce.quota import TokenBudget

            kept = {s["prune_layer"]: TokenBudget(keep=red.keep).per_image(visual_tokens) for s in red.stages}
        else:
            kept = {s["prune_layer"]: min(int(s["keep"]), visual_tokens) for s in red.stages}
        cuts = {layer: visual_tokens - k for layer, k in kept.items()}
        for layer in range(m.num_layers):
            if layer in cuts:
                current = t - cuts[layer]
            lengths.append(current)
        flops = sum(_llm_layer(length, length, m) for length in lengths)
    else:
        flops = m.num_layers * _llm_layer(t, t, m)
    flops += 2 * m.hidden_size * m.vocab_size  # last-position logits
    params = m.num_layers * _llm_layer_params(m) + m.hidden_size * m.vocab_size
    return StageCost(flops=batch * flops, bytes=params * bytes_per_value(manifest))


def decode_cost(manifest: Manifest, context: int, batch: int = 1) -> StageCost:
    """One new token with `context` tokens in the cache (after pruning, for in-LLM methods)."""
    m = manifest.model
    flops = m.num_layers * _llm_layer(1, context + 1, m) + 2 * m.hidden_size * m.vocab_size
    params = m.num_layers * _llm_layer_params(m) + m.hidden_size * m.vocab_size
    kv = 2 * m.num_layers * m.num_key_value_heads * m.head_dim * context
    return StageCost(flops=batch * flops, bytes=(params + batch * kv) * bytes_per_value(manifest))
