"""Memory plan: will a model fit a device? Weights + KV cache + activation peak, and the
TensorRT engine-build peak, against the device profile's memory with headroom. Pure arithmetic
on architecture numbers; torch- and TensorRT-free (docs/engines.md, "Memory plan").

What a plan is for (`Target`): an exported artifact (its manifest's `architecture` record: exact
parameter counts of every written graph; formulas only for artifacts written before the record
existed), or a model described by its config alone (`tokedge.architecture.Geometry`: a named
geometry, a checkpoint directory or a hub id) with a method, budget and weight scheme.

- weights: every graph the runtime loads, each at its stored width on the device: float weights
  in the profile's precision (fp16), quantized weights at bits/8 plus one fp16 scale per group. A
  graph that holds its own copy of the decoder (the prefill graph of an in-LLM method) counts it
  again: TensorRT engines do not share weights.
- KV cache: 2 x layers x kv_heads x head_dim x tokens x batch at the profile's sequence limit
  (`max_prompt_tokens + max_new_tokens`, capped by the model's positions): the shapes the engines
  are built for (`build/plan.py`).
- activation peak: the larger stage working set (they run one after another). Vision: per
  partition and block, heads x N x N float32 scores (`score_buffers` of them live, plus a mask's
  bytes when the graph masks windows over dense scores) and the block's per-token buffers, for the
  largest image the layout allows (dynamic resolution: the image's N patches, so `max_pixels`
  matters). Prefill at the prompt limit: float32 scores over the prompt, the MLP's per-token
  buffers and the last position's logits.
- engine-build peak, a lower bound (one graph at a time): the ONNX graph's weights as the parser
  holds them (the graph as written), the engine's weights on the device and the builder workspace
  (`workspace_mb`); Jetson memory is unified, so all of it counts against the same memory (the
  serialized engine, a host copy of its weights, comes on top at the end of the build).

`fits` means both the run (weights + KV + activations) and the build fit in memory x (1 -
headroom); headroom covers the OS, the CUDA context, TensorRT's libraries and fragmentation.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, replace
from itertools import pairwise

from tokedge.artifact import (
    Architecture,
    GraphParameters,
    Manifest,
    ModelInfo,
    QuantInfo,
    ReductionInfo,
    TextArchitecture,
    VisionArchitecture,
    VisualLayout,
)
from tokedge.reduce.base import Stage

GB = 1e9
DEFAULT_HEADROOM = 0.2
DEFAULT_TEXT_TOKENS = 64
DTYPE_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "fp8": 1.0}
SCORE_BYTES = 4  # attention scores and softmax run in float32 in tokedge's graphs (export/primitives.py)
EXIT_DOES_NOT_FIT = 3  # `tokedge memory`: the plan was printed and does not fit (docs/cli.md, docs/safety.md)


@dataclass(frozen=True)
class WeightScheme:
    """How weights are stored: float width for everything, and the quantized graphs' layers."""

    float_bytes: float = 2.0  # per weight kept in float
    bits: int | None = None  # quantized layers: 4 or 8 (None: nothing quantized)
    group_size: int = 128
    scale_bytes: float = 2.0  # one scale per group (fp16 on the device, fp32 in an artifact)
    zero_bytes: float = 0.0  # one zero point per group (asymmetric matmulnbits: bits / 8), 0 when symmetric
    decoder: bool = True  # decoder layers quantized
    vision: bool = False
    lm_head: bool = False
    embeddings: bool = False

    def per_weight(self, quantized: bool) -> float:
        if not quantized or self.bits is None:
            return self.float_bytes
        return self.bits / 8 + (self.scale_bytes + self.zero_bytes) / self.group_size

    @property
    def label(self) -> str:
        if self.bits is None:
            return {4.0: "fp32", 2.0: "fp16", 1.0: "int8"}.get(self.float_bytes, f"{self.float_bytes:g} B/weight")
        parts = ["decoder"] + (["vision"] if self.vision else []) + (["lm_head"] if self.lm_head else []) \
            + (["embeddings"] if self.embeddings else [])
        return f"int{self.bits} g{self.group_size} ({', '.join(parts)}), rest {self.float_bytes * 8:.0f}-bit float"

    @classmethod
    def from_quant(cls, quant: QuantInfo | None, float_bytes: float, scale_bytes: float) -> WeightScheme:
        if quant is None:
            return cls(float_bytes=float_bytes)
        return cls(float_bytes=float_bytes, bits=4 if quant.scheme == "int4" else 8, group_size=quant.group_size,
                   scale_bytes=scale_bytes, zero_bytes=0.0 if quant.symmetric else (4 if quant.scheme == "int4" else 8) / 8,
                   decoder=bool({"decoder", "prefill"} & set(quant.graphs)),
                   vision="vision" in quant.graphs, lm_head=quant.lm_head, embeddings=quant.embeddings)


# --- what a plan is for ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A model to plan: the manifest fields the plan reads (an artifact's own, or a geometry's with
    the requested method), so `image_bounds` and `prompt_tokens_for` read either the same way."""

    name: str
    model: ModelInfo
    layout: VisualLayout
    reduction: ReductionInfo
    architecture: Architecture  # graphs: every graph the runtime loads, counted or from formulas
    dtype: str = "fp32"  # weights as written (what a TensorRT build parses)
    quantization: QuantInfo | None = None
    artifact: bool = False  # an exported artifact (else a config-only geometry)
    notes: tuple[str, ...] = ()

    @property
    def graphs(self) -> dict[str, GraphParameters]:
        return self.architecture.graphs


def _legacy_architecture(manifest: Manifest) -> Architecture:
    """Formulas for artifacts written before the architecture record (LLaVA-style towers; the vision
    graph's counts follow `ModelInfo`)."""
    m, quant = manifest.model, manifest.quantization
    p = ParamCounts.of(m)
    decoder = p.decoder_layers + p.lm_head
    sizes = {"vision": p.vision, "embed": p.embed, "decoder": decoder, "prefill": decoder}
    if manifest.video is not None:  # a video graph of its own (OneVision): the tower again; temporal graphs ~0
        sizes.setdefault(manifest.video.graph, p.vision)
    graphs = {g: GraphParameters(parameters=sizes.get(g, 0)) for g in manifest.graphs}
    for g in ("decoder", "prefill"):  # quantized decoder layers (and lm_head when it was), as the record would say
        if quant is not None and g in quant.graphs and g in graphs:
            head = p.lm_head if quant.head_quantized else 0
            q = p.decoder_layers + head
            graphs[g] = GraphParameters(parameters=decoder, quantized=q, scale_groups=-(-q // quant.group_size),
                                        padded=q, int8=head if "lm_head" in quant.int8_matmuls else 0)
    d, ff = m.vision_hidden_size, m.vision_intermediate_size or 4 * m.vision_hidden_size
    from tokedge.layouts import image_layout_class

    fixed = not image_layout_class(manifest.layout.kind).takes_max_pixels  # (old manifests only)
    n = (m.image_size // m.patch_size) ** 2 + (1 if m.vision_model_type == "clip_vision_model" else 0)
    tokens: tuple[int, ...] = ()
    if fixed:
        schedule = list(manifest.reduction.merge_schedule) + [0] * m.vision_layers
        counts = []
        for i in range(max(1, m.vision_layers)):
            counts.append(n)
            n -= schedule[i]
        tokens = tuple(counts)
    merge = 1 if fixed else int(manifest.layout.merge_size or 1) ** 2
    vision = VisionArchitecture(layers=max(1, m.vision_layers), hidden=d, intermediate=ff, heads=max(1, d // 64),
                                layer_tokens=tokens, attention_span=(0,) * max(1, m.vision_layers),
                                patches_per_token=merge)
    text = TextArchitecture(layers=m.num_layers, hidden=m.hidden_size, heads=m.num_attention_heads,
                            kv_heads=m.num_key_value_heads, head_dim=m.head_dim,
                            intermediate=m.intermediate_size or 4 * m.hidden_size, vocab=m.vocab_size)
    return Architecture(graphs=graphs, vision=vision, text=text, counted="model-info-formulas")


def _quantized_later(manifest: Manifest, arch: Architecture) -> Architecture | None:
    """A record written before the graphs were quantized (`tokedge quantize` on a float artifact
    keeps the float export's record): the quantized graphs' MatMul weights from the record's layer
    numbers. None when the record already counts them."""
    quant = manifest.quantization
    stale = [g for g in (quant.graphs if quant else ()) if g in arch.graphs and not arch.graphs[g].quantized]
    if not stale:
        return None
    t, v = arch.text, arch.vision
    matrices = {
        "decoder": t.layers * (2 * t.hidden * t.heads * t.head_dim + 2 * t.hidden * t.kv_heads * t.head_dim
                               + 3 * t.hidden * t.intermediate) + (t.vocab * t.hidden if quant.head_quantized else 0),
        "vision": v.layers * (4 * v.hidden**2 + (3 if v.gated_mlp else 2) * v.hidden * v.intermediate)
        + sum(a * b for a, b in pairwise(v.projector)),
    }
    matrices["prefill"] = matrices["decoder"]
    graphs = dict(arch.graphs)
    head8 = t.vocab * t.hidden if "lm_head" in quant.int8_matmuls else 0  # int4 body, int8 lm_head
    for g in stale:
        q = min(matrices.get(g, 0), graphs[g].parameters)
        graphs[g] = replace(graphs[g], quantized=q, scale_groups=-(-q // quant.group_size), padded=q,
                            int8=head8 if g in ("decoder", "prefill") else 0)
    return replace(arch, graphs=graphs)


def target_of(manifest: Manifest) -> Target:
    arch = manifest.architecture
    notes: tuple[str, ...] = ()
    if arch is None:
        arch = _legacy_architecture(manifest)
        notes = ("this artifact predates the manifest's architecture record: parameter counts from formulas "
                 "(re-export for exact counts)"),
    elif (later := _quantized_later(manifest, arch)) is not None:
        arch = later
        notes = ("the architecture record predates this artifact's quantization (tokedge quantize): quantized "
                 "counts estimated from the layer sizes"),
    return Target(name=manifest.model.source, model=manifest.model, layout=manifest.layout,
                  reduction=manifest.reduction, architecture=arch, dtype=manifest.dtype,
                  quantization=manifest.quantization, artifact=True, notes=notes)


def target_for_geometry(geometry, method: str | None = None, budget: int | None = None, keep: float | None = None,
                        quantize: str | None = None, group_size: int = 128) -> Target:
    """A geometry exported with `method` (default: none; fp32 weights, or `quantize` int4/int8 as `tokedge export
    --quantize` writes them for TensorRT: qdq, decoder and prefill MatMuls, lm_head and embeddings float)."""
    from tokedge.errors import UsageError
    from tokedge.reduce.none import METHOD as keep_all

    if method is None or method == keep_all.name:  # torch-free (the registry imports every method, and torch)
        m = keep_all
    else:
        from tokedge.reduce import get_method

        m = get_method(method)
    if m.reduces_over_time:
        raise UsageError(f"--method {m.name} reduces videos; the memory plan is for images: use --method none")
    full = geometry.full_tokens
    dynamic = not geometry.architecture.vision.layer_tokens  # counts follow the image
    if keep is not None and not dynamic:
        raise UsageError("--keep applies to dynamic-resolution models (Qwen-VL); this model has a fixed count: "
                         "use --budget")
    if keep is not None and budget is not None:
        raise UsageError("give either --budget or --keep, not both")
    if keep is not None and not 0 < keep <= 1:
        raise UsageError(f"--keep {keep} is out of range: use a ratio in (0, 1]")
    if m.keeps_all and (budget is not None or keep is not None):
        raise UsageError("--method none keeps every token: drop --budget/--keep")
    if budget is not None and not 1 <= budget <= full:
        raise UsageError(f"--budget {budget} is out of range: 1..{full} visual tokens per image")
    kept = full if m.keeps_all else (budget if budget is not None else
                                     (max(1, math.ceil(full * keep)) if keep is not None else min(64, full)))
    schedule: tuple[int, ...] = ()
    vision = geometry.architecture.vision
    if m.stage is Stage.IN_VIT and not dynamic:
        from tokedge.reduce.tome import merge_schedule

        cls = vision.layer_tokens[0] - full  # CLS tokens kept out of merging
        schedule = tuple(merge_schedule(full, kept, vision.layers, protected=max(cls, 0) or 1))
        vision = replace(vision, layer_tokens=tuple(vision.layer_tokens[0] - sum(schedule[:i])
                                                    for i in range(vision.layers)))
    reduction = ReductionInfo(method=m.name, budget=kept, full_tokens=full, stage=m.stage.value, keep=keep,
                              merge_schedule=schedule)
    graphs = dict(geometry.architecture.graphs)
    if m.stage is Stage.IN_LLM:  # the prefill graph: the decoder's weights once more
        graphs["prefill"] = graphs["decoder"]
    quant = None
    if quantize is not None:
        if quantize not in ("int4", "int8"):
            raise UsageError(f"--quantize {quantize} is not supported; use int4 or int8")
        if group_size < 16 or group_size & (group_size - 1):
            raise UsageError(f"--group-size {group_size} must be a power of two >= 16")
        matrices = geometry.matrices["decoder"] - geometry.lm_head  # qdq's default: the lm_head float
        q = GraphParameters(parameters=graphs["decoder"].parameters, quantized=matrices,
                            scale_groups=-(-matrices // group_size), padded=matrices)
        for g in ("decoder", "prefill"):
            if g in graphs:
                graphs[g] = q
        quant = QuantInfo(scheme=quantize, form="qdq", group_size=group_size, symmetric=True, algorithm="rtn",
                          accuracy_level=0, graphs=tuple(g for g in ("decoder", "prefill") if g in graphs),
                          lm_head=False, embeddings=False)
    arch = replace(geometry.architecture, graphs=graphs, vision=vision)
    return Target(name=geometry.name, model=geometry.model, layout=geometry.layout, reduction=reduction,
                  architecture=arch, quantization=quant)


# --- the arithmetic ----------------------------------------------------------------------------


def _bits(target: Target) -> int:
    return 4 if target.quantization is not None and target.quantization.scheme == "int4" else 8


def device_weight_bytes(target: Target, float_bytes: float = 2.0, scale_bytes: float = 2.0) -> dict[str, int]:
    """Weights per graph on the device: float weights at `float_bytes`, quantized ones at bits/8
    plus one scale per group."""
    bits = _bits(target)
    return {g: int((r.parameters - r.quantized) * float_bytes + (r.quantized - r.int8) * bits / 8 + r.int8
                   + r.scale_groups * scale_bytes)
            for g, r in target.graphs.items()}


def written_bytes(target: Target) -> dict[str, int]:
    """What each graph's files weigh as written: float weights in the artifact's dtype, quantized
    weights as stored (MatMulNBits pads K to whole groups, qdq does not) with fp32 scales, plus the
    graph's structure (`other_bytes`; 0 for geometries)."""
    bits, width = _bits(target), DTYPE_BYTES[target.dtype]
    padded = target.quantization is not None and target.quantization.form == "matmulnbits"
    out = {}
    for g, r in target.graphs.items():
        # the 8-bit weights of int4 mixed precision (lm_head, down_proj...) at a byte each, counted unpadded
        stored = ((r.padded if padded and r.padded else r.quantized) - r.int8) * bits / 8 + r.int8
        out[g] = round((r.parameters - r.quantized) * width + stored + r.scale_groups * 4 + r.other_bytes)
    return out


def kv_cache_bytes(m: ModelInfo, tokens: int, batch: int, value_bytes: float) -> int:
    return int(2 * m.num_layers * m.num_key_value_heads * m.head_dim * tokens * batch * value_bytes)


def vision_working_set(v: VisionArchitecture, tokens: int, value_bytes: float, pixel_row: int = 0) -> int:
    """Peak bytes of one vision-graph run over `tokens` tokens (one partition, or one image's
    patches), per block: `score_buffers` float32 heads x N x span buffers, a mask's bytes per N x N
    position, the block's per-token buffers (q, k, v, MLP) and the input rows."""
    peak = 0
    spans = v.attention_span or (0,) * v.layers
    counts = v.layer_tokens or (tokens,) * v.layers
    ff = v.intermediate * (2 if v.gated_mlp else 1)
    for n, span in zip(counts, spans):
        n = min(n, tokens) if v.layer_tokens else n
        s = span or n
        attention = v.score_buffers * v.heads * n * s * SCORE_BYTES + v.mask_bytes * n * n
        peak = max(peak, attention + n * (3 * v.hidden + ff) * value_bytes)
    return int(peak + tokens * pixel_row * 4)


def activation_bytes(target: Target, partitions: int, vision_tokens: int, prompt_tokens: int, batch: int,
                     value_bytes: float) -> tuple[int, int]:
    """(vision, prefill) working sets; the plan takes the larger (stages run one after another).
    `vision_tokens`: tokens of one partition (fixed views) or of the image's patches (dynamic)."""
    v, t = target.architecture.vision, target.architecture.text
    vision = partitions * vision_working_set(v, vision_tokens, value_bytes)
    prefill = (t.heads * prompt_tokens * prompt_tokens * SCORE_BYTES
               + prompt_tokens * (3 * t.intermediate + 4 * t.hidden) * value_bytes + t.vocab * 4)
    return int(batch * vision), int(batch * prefill)


def size_text(n: float) -> str:
    """Bytes in the largest decimal unit that keeps them >= 1 (GB, MB, kB, B): "0.00 GB" never
    hides a 2 MB tiny model."""
    for unit, scale in (("GB", GB), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    memory_gb: float
    headroom: float
    weights: str  # the scheme, in words
    batch: int
    prompt_tokens: int  # tokens the engines are built for (the profile's prompt limit)
    new_tokens: int
    weight_bytes: dict[str, int]  # graph -> bytes on the device
    kv_cache_bytes: int
    activation_bytes: int
    total_bytes: int  # weights + KV cache + activations
    usable_bytes: int  # memory x (1 - headroom)
    fits: bool  # the run and the build both fit
    notes: tuple[str, ...] = ()
    visual_tokens: int = 0  # of the largest image, in the prompt
    vision_activation_bytes: int = 0
    prefill_activation_bytes: int = 0
    build_peak_bytes: int = 0
    build_graph: str = ""  # the graph whose build peaks
    run_fits: bool = True
    build_fits: bool = True
    source: str = ""  # artifact, geometry name, directory or hub id
    counted: str = ""  # where the parameter counts come from
    artifact_bytes: dict[str, int] = field(default_factory=dict)  # graph -> predicted bytes as written

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        w = sum(self.weight_bytes.values())
        verdict = "fits" if self.fits else "does NOT fit"
        graphs = ", ".join(f"{g} {size_text(b)}" for g, b in self.weight_bytes.items())
        why = "" if self.fits else (" (run)" if not self.run_fits and self.build_fits else
                                    " (engine build)" if self.run_fits else " (run and engine build)")
        seqs = "sequence" if self.batch == 1 else "sequences"
        return (f"memory plan on {self.device}: weights {size_text(w)} ({graphs}) + KV cache "
                f"{size_text(self.kv_cache_bytes)} ({self.batch} {seqs} of {self.prompt_tokens} prompt + "
                f"{self.new_tokens} new tokens) + activations {size_text(self.activation_bytes)} = "
                f"{size_text(self.total_bytes)}; engine build peak {size_text(self.build_peak_bytes)} "
                f"({self.build_graph}); {verdict}{why} in {size_text(self.usable_bytes)} usable "
                f"({self.memory_gb:g} GB, {self.headroom:.0%} headroom) [{self.weights}]")


def _scheme_label(target: Target, value: float) -> str:
    scheme = WeightScheme.from_quant(target.quantization, float_bytes=value, scale_bytes=2.0)
    return scheme.label


def plan(target: Target, profile, headroom: float = DEFAULT_HEADROOM,
         text_tokens: int = DEFAULT_TEXT_TOKENS) -> MemoryPlan:
    """The plan for running `target` on a device profile (engines in the profile's precision;
    quantized layers keep their bits with fp16 scales)."""
    value = max(DTYPE_BYTES.get(profile.precision, 2.0), 2.0)  # int8/fp8 profiles keep activations in 16 bits
    m, notes = target.model, list(target.notes)
    if target.quantization is not None and target.quantization.form == "matmulnbits":
        notes.append("MatMulNBits is an ONNX Runtime op: for TensorRT, quantize with --quant-form qdq")
    bounds = image_bounds(target)
    visual = bounds.prompt_tokens[2]
    total_seq = min(profile.max_sequence, m.max_position_embeddings)
    prompt_limit = min(profile.max_prompt_tokens, total_seq - 1)
    new_tokens = total_seq - prompt_limit
    if visual + text_tokens > prompt_limit:
        notes.append(f"the largest image gives {visual} visual tokens: with {text_tokens} text tokens that is over "
                     f"the profile's prompt limit ({prompt_limit}); such prompts are refused (a smaller budget or "
                     "--max-pixels lowers it)")
    if bounds.tiled:
        notes.append(f"per-image layout: planned for the largest image ({visual} visual tokens, "
                     f"{bounds.partitions[2]} partition{'s' if bounds.partitions[2] > 1 else ''}); a typical 4:3 "
                     f"photo gives {bounds.prompt_tokens[1]}")
    weights = device_weight_bytes(target, value)
    if "prefill" in weights:
        notes.append(f"in-LLM method: the prefill graph holds its own copy of the decoder weights "
                     f"({size_text(weights['prefill'])}; TensorRT engines do not share weights)")
    v = target.architecture.vision
    tokens = v.layer_tokens[0] if v.layer_tokens else bounds.vision_tokens[2] * v.patches_per_token
    vis, pre = activation_bytes(target, bounds.partitions[2], tokens, prompt_limit, profile.max_batch, value)
    if not v.layer_tokens:
        scores = v.score_buffers * v.heads * tokens * tokens * SCORE_BYTES + v.mask_bytes * tokens * tokens
        notes.append(f"vision attention is dense over an image's patches: {tokens} patches at the largest image "
                     f"({target.layout.max_pixels} pixels) hold {size_text(scores)} of scores")
    if pre >= vis and pre > 0.25 * profile.memory_gb * GB:
        notes.append(f"prefill attention at the profile's limits ({prompt_limit} tokens x batch {profile.max_batch}) "
                     f"holds {size_text(pre)} of float32 scores (tokedge's graphs scale after q k^T, which TensorRT "
                     "does not fuse): a profile with a smaller max_prompt_tokens or max_batch lowers it")
    kv = kv_cache_bytes(m, total_seq, profile.max_batch, value)
    total = sum(weights.values()) + kv + max(vis, pre)
    usable = int(profile.memory_gb * GB * (1 - headroom))
    written = written_bytes(target)
    # build (a lower bound): the parser's copy of the graph as written, the engine's weights on the
    # device and the builder workspace, one graph at a time (the serialized engine adds up to one more
    # copy of its weights at the end)
    builds = {g: written[g] + weights[g] + profile.workspace_mb * 2**20 for g in weights}
    build_graph = max(builds, key=builds.get)
    room = usable - sum(weights.values()) - kv  # what the vision graph may use
    if not v.layer_tokens and vis > room:
        notes.append(_vision_fit_note(target, room, usable, profile.max_batch, value))
    run_fits, build_fits = total <= usable, builds[build_graph] <= usable
    return MemoryPlan(
        device=profile.name, memory_gb=profile.memory_gb, headroom=headroom, weights=_scheme_label(target, value),
        batch=profile.max_batch, prompt_tokens=prompt_limit, new_tokens=new_tokens, weight_bytes=weights,
        kv_cache_bytes=kv, activation_bytes=max(vis, pre), total_bytes=total, usable_bytes=usable,
        fits=run_fits and build_fits, notes=tuple(notes), visual_tokens=visual, vision_activation_bytes=vis,
        prefill_activation_bytes=pre, build_peak_bytes=builds[build_graph], build_graph=build_graph,
        run_fits=run_fits, build_fits=build_fits, source=target.name, counted=target.architecture.counted,
        artifact_bytes=written,
    )


def _vision_fit_note(target: Target, room: int, usable: int, batch: int, value: float) -> str:
    """What to do when a dynamic-resolution vision graph cannot fit beside the weights and KV cache."""
    limit = vision_patch_limit(target, room / batch, value_bytes=value) if room > 0 else 0
    if limit:
        pixels = limit * int(target.layout.patch_size or 14) ** 2
        return (f"the vision graph's attention cannot fit at max_pixels: at most {limit} patches per image fit "
                f"beside the weights and KV cache (export with --max-pixels {pixels} or less)")
    return ("the vision graph's attention cannot fit for any image: the weights and KV cache leave "
            f"{size_text(max(room, 0))} of the {size_text(usable)} usable")


def plan_for_device(manifest: Manifest, profile, headroom: float = DEFAULT_HEADROOM,
                    text_tokens: int = DEFAULT_TEXT_TOKENS) -> MemoryPlan:
    """The plan for running an artifact on a device profile."""
    return plan(target_of(manifest), profile, headroom, text_tokens)


def profile_pixel_limit(target: Target, profile, headroom: float = DEFAULT_HEADROOM,
                        text_tokens: int = DEFAULT_TEXT_TOKENS) -> int | None:
    """The largest image (pixels, a multiple of one merged patch) of a dynamic-resolution target that a
    device profile holds: its visual tokens (unreduced) fit the profile's prompt limit beside
    `text_tokens` of text, and its vision graph's attention fits beside the weights and the KV cache
    (`plan`'s arithmetic). None for fixed views, or when not even one visual token fits."""
    v, lay = target.architecture.vision, target.layout
    if v.layer_tokens:
        return None
    p, m = int(lay.patch_size or 14), int(lay.merge_size or 1)
    whole = plan(target, profile, headroom, text_tokens)
    value = max(DTYPE_BYTES.get(profile.precision, 2.0), 2.0)
    room = whole.usable_bytes - sum(whole.weight_bytes.values()) - whole.kv_cache_bytes
    patches = (vision_patch_limit(target, room / whole.batch, value_bytes=value) or 0) if room > 0 else 0
    tokens = min(patches // (m * m), whole.prompt_tokens - text_tokens)
    return tokens * (p * m) ** 2 if tokens >= 1 else None


def vision_patch_limit(manifest, memory_bytes: float, value_bytes: float | None = None) -> int | None:
    """The most patches one image may have so that one vision-graph run fits `memory_bytes`
    (`vision_working_set`: dense heads x N x N float32 scores per block, a mask's bytes, the
    per-token buffers and the input rows); None for layouts whose vision graph runs fixed-size
    views (their working set does not depend on the image). `value_bytes`: activation width
    (default the artifact's dtype). The result is a multiple of the patches per visual token;
    0 when not even one visual token fits. `manifest`: a Manifest or a `Target`."""
    target = manifest if isinstance(manifest, Target) else target_of(manifest)
    v = target.architecture.vision
    if v.layer_tokens:
        return None
    value = DTYPE_BYTES[target.dtype] if value_bytes is None else value_bytes
    lay = target.layout
    pixel_row = 3 * int(lay.temporal_patch_size or 1) * int(lay.patch_size or 14) ** 2
    # vision_working_set(n) = a n^2 + b n (the block with the largest span is the binding one)
    a = v.score_buffers * v.heads * SCORE_BYTES + v.mask_bytes
    b = (3 * v.hidden + v.intermediate * (2 if v.gated_mlp else 1)) * value + pixel_row * 4
    n = int((-b + math.sqrt(b * b + 4 * a * max(0.0, float(memory_bytes)))) / (2 * a))
    while n > 0 and vision_working_set(v, n, value, pixel_row) > memory_bytes:
        n -= 1
    step = max(1, v.patches_per_token)
    return n - n % step


Range = tuple[int, int, int]  # (min, typical, max)


@dataclass(frozen=True)
class ImageBounds:
    """Per image, read from the manifest's layout and reduction (never from the family's name):
    the partitions its vision graph runs, the visual tokens the vision graph's packing gives
    before reduction, and the visual tokens that reach the LLM's prompt, each (min, typical, max).
    A "single" layout gives one partition and fixed counts; an "anyres" layout gives the bounds of
    `tokedge.runtime.layout.layout_bounds` (largest pinpoint's map + base view + newlines)."""

    partitions: Range
    vision_tokens: Range
    prompt_tokens: Range
    tiled: bool  # counts vary with the image size


def image_bounds(manifest: Manifest) -> ImageBounds:
    from tokedge.layouts import layout_of

    layout = layout_of(manifest)
    bounds = layout.bounds()
    full = bounds.tokens
    prompt = (prompt_tokens_for(manifest, full[0]), prompt_tokens_for(manifest, full[1]),
              prompt_tokens_for(manifest, full[2]))
    return ImageBounds(partitions=bounds.partitions, vision_tokens=full, prompt_tokens=prompt,
                       tiled=layout.counts_per_image)


def prompt_tokens_for(manifest: Manifest, image_tokens: int, budget: int | None = None) -> int:
    """Placeholders in the prompt for an image whose packing gives `image_tokens` visual tokens:
    pre-LLM and in-ViT methods hand the LLM their budget (`budget`, else the artifact's, per image
    as the layout counts it) whatever the image; `none` and in-LLM methods all of the image's tokens."""
    from tokedge.layouts import layout_of

    red = manifest.reduction
    if Stage(red.stage) in (Stage.NONE, Stage.IN_LLM, Stage.TEMPORAL):
        return image_tokens
    return layout_of(manifest).prompt_tokens(image_tokens, budget)


def visual_tokens_of(manifest: Manifest) -> int:
    """Visual tokens of the largest image in the LLM's prompt (in-LLM methods keep all of them for
    the first layers)."""
    return image_bounds(manifest).prompt_tokens[2]


# --- parameter formulas for artifacts without the record (and the roofline's weight share) ----------


@dataclass(frozen=True)
class ParamCounts:
    """LLaVA-1.5-style formulas from `ModelInfo` (CLIP/SigLIP tower, two-layer projector, Llama
    decoder): what artifacts written before the architecture record fall back to."""

    vision: int  # encoder layers up to the feature layer, patch + position embeddings, projector
    embed: int  # token table
    decoder_layers: int  # attention + MLP of every layer (norms included)
    lm_head: int

    @classmethod
    def of(cls, m: ModelInfo) -> ParamCounts:
        d, ff = m.vision_hidden_size, m.vision_intermediate_size or 4 * m.vision_hidden_size
        patches = (m.image_size // m.patch_size) ** 2
        n = patches + (1 if m.vision_model_type == "clip_vision_model" else 0)
        vision_layer = 4 * d * d + 4 * d + 2 * d * ff + ff + d + 4 * d  # q,k,v,o (+bias), fc1/fc2 (+bias), 2 LayerNorms
        # patch conv + (CLIP class embedding | SigLIP patch bias), position table, pre-norm
        vision = (m.vision_layers * vision_layer + 3 * m.patch_size**2 * d + d + n * d + 2 * d
                  + d * m.hidden_size + m.hidden_size + m.hidden_size**2 + m.hidden_size)  # two-layer projector
        h, hd = m.hidden_size, m.head_dim
        attn = h * m.num_attention_heads * hd * 2 + h * m.num_key_value_heads * hd * 2
        layer = attn + 3 * h * m.intermediate_size + 2 * h
        return cls(vision=vision, embed=m.vocab_size * h, decoder_layers=m.num_layers * layer + h,
                   lm_head=m.vocab_size * h)


def quantized_weight_share(manifest: Manifest) -> tuple[float, float]:
    """(vision, decoder) weight bytes of the manifest's scheme on the device (fp16 scales) as a
    share of fp16 weights: 1.0 for float artifacts. Scales the roofline's bytes moved."""
    if manifest.quantization is None:
        return 1.0, 1.0
    target = target_of(manifest)
    quant = device_weight_bytes(target, 2.0)
    fp16 = {g: r.parameters * 2 for g, r in target.graphs.items()}
    share = [quant[g] / fp16[g] if fp16.get(g) else 1.0 for g in ("vision", "decoder")]
    return share[0], share[1]


# --- artifact size: predicted vs measured ------------------------------------------------------------


def predicted_artifact_bytes(manifest: Manifest) -> dict[str, int]:
    """What the artifact's graphs should weigh on disk, per graph: from the architecture record
    (parameters at their stored width + the graph's structure), else from formulas (weights only)."""
    target = target_of(manifest)
    out = written_bytes(target)
    video = manifest.video
    # a video graph of its own (OneVision): the tower and projector again, never quantized (Qwen reuses "vision")
    if manifest.architecture is None and video is not None and video.graph in out:
        from tokedge.layouts import video_layout_of

        layout = video_layout_of(manifest)
        if layout is not None and layout.separate_graph():
            out[video.graph] = int(target.graphs["vision"].parameters * DTYPE_BYTES[manifest.dtype])
    return out


@dataclass
class SizeCheck:
    predicted: dict[str, int]
    measured: dict[str, int]
    ratio: float = field(init=False)  # predicted / measured, all graphs

    def __post_init__(self) -> None:
        self.ratio = sum(self.predicted.values()) / max(1, sum(self.measured.values()))


def measured_artifact_bytes(root, manifest: Manifest) -> dict[str, int]:
    """Bytes of each graph's files (ONNX plus external data) in an artifact directory."""
    from pathlib import Path

    root = Path(root)
    out = {}
    for name, spec in manifest.graphs.items():
        out[name] = sum((root / f).stat().st_size for f in (spec.file, spec.external_data) if f)
    return out


def check_artifact_size(root, manifest: Manifest) -> SizeCheck:
    return SizeCheck(predicted=predicted_artifact_bytes(manifest), measured=measured_artifact_bytes(root, manifest))


def profile_memory(root, manifest: Manifest, device=None, results=()) -> dict:
    """`tokedge profile`'s memory section: predicted vs measured artifact bytes; the CPU working
    set predicted for the largest profiled prompt vs the measured peak RSS; the device plan."""
    size = check_artifact_size(root, manifest)
    out: dict = {"artifact_bytes": {"predicted": sum(size.predicted.values()), "measured": sum(size.measured.values()),
                                    "ratio": round(size.ratio, 4), "per_graph": {"predicted": size.predicted,
                                                                                 "measured": size.measured}}}
    if results:
        largest = max(results, key=lambda r: r.visual_tokens)
        value = DTYPE_BYTES[manifest.dtype]
        target = target_of(manifest)
        partitions = max((entry["partitions"] for r in results for entry in r.per_image), default=1)
        v = target.architecture.vision
        tokens = v.layer_tokens[0] if v.layer_tokens else largest.visual_tokens * v.patches_per_token
        prompt = largest.visual_tokens + largest.prompt_tokens
        vis, pre = activation_bytes(target, partitions, tokens, prompt, 1, value)
        weights = sum(written_bytes(target).values())
        kv = kv_cache_bytes(manifest.model, prompt, 1, value)
        out["cpu"] = {"predicted_bytes": weights + kv + max(vis, pre),
                      "peak_rss_bytes": int(max(r.peak_rss_mb for r in results) * 2**20),
                      "note": "peak RSS also holds the Python interpreter, libraries, ONNX Runtime's arenas and "
                              "pre-packed weight copies"}
    if device is not None:
        p = plan_for_device(manifest, device)
        out["device"] = p.to_dict()
        out["device_summary"] = p.summary()
    return out


def resolve_target(target: str, *, method: str | None = None, budget: int | None = None, keep: float | None = None,
                   max_pixels: int | None = None, quantize: str | None = None,
                   group_size: int = 128) -> tuple[Target, dict[str, int] | None]:
    """`tokedge memory TARGET`: an artifact directory (its manifest; and its graphs' bytes on disk),
    a checkpoint directory (config.json, never weights), a named geometry or a hub id (config.json
    downloaded). Model flags apply to everything but artifacts, which carry their own."""
    from pathlib import Path

    from tokedge import architecture as arch
    from tokedge.artifact import MANIFEST_NAME, read_manifest
    from tokedge.errors import UsageError

    path = Path(target).expanduser()
    names = arch.named_geometries()
    if path.is_dir() and (path / MANIFEST_NAME).is_file():
        given = [flag for flag, value in (("--method", method is not None), ("--budget", budget is not None),
                                          ("--keep", keep is not None), ("--max-pixels", max_pixels is not None),
                                          ("--quantize", quantize is not None)) if value]
        if given:
            raise UsageError(f"{', '.join(given)} describe a model to export; an artifact carries its own "
                             "(drop them, or give the checkpoint or a named geometry)")
        manifest = read_manifest(path)
        return target_of(manifest), measured_artifact_bytes(path, manifest)
    if path.is_dir():
        geometry = arch.from_directory(path, max_pixels=max_pixels)
    elif target in names:
        geometry = arch.named(target, max_pixels=max_pixels)
    elif "/" in target and not target.startswith((".", "/", "~")) and not path.exists():
        geometry = arch.from_hub(target, max_pixels=max_pixels)
    else:
        raise UsageError(f"'{target}' is not an artifact, a checkpoint directory, a hub id or a named geometry "
                         f"({', '.join(names)})")
    if max_pixels is not None and max_pixels < 1:
        raise UsageError(f"--max-pixels {max_pixels} must be positive")
    return target_for_geometry(geometry, method, budget, keep, quantize, group_size), None
