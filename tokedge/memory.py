"""Memory plan: will a model fit a device? Weights + KV cache + activation peak against the
device profile's memory, with headroom. Pure arithmetic on the manifest's geometry (`ModelInfo`),
the weight scheme and a `DeviceProfile`; torch- and TensorRT-free.

- weights: parameter counts from the geometry (vision tower up to the feature layer, projector,
  token embeddings, decoder layers, lm_head), each at its stored width: the device precision
  (fp16 engines) or, for quantized layers, bits/8 plus one scale per group. A graph that holds its
  own copy of the decoder weights (the prefill graph of an in-LLM method) counts them again:
  TensorRT engines do not share weights.
- KV cache: 2 x layers x kv_heads x head_dim x (prompt + new tokens) x batch, where the prompt is
  the visual tokens the budget lets through plus `text_tokens`, and new tokens are the profile's.
  Tiled ("anyres") layouts give a token count per image: the plan takes the largest image the
  layout allows (`image_bounds`, from the manifest's layout alone).
- activation peak: the largest stage working set (ViT attention scores + MLP for every partition
  the vision graph runs at once, or prefill MLP + fp32 attention scores + last-position logits)
  for the batch.

`fits` means total <= memory x (1 - headroom); headroom covers the OS (Jetson memory is unified),
CUDA context, TensorRT workspace and fragmentation.

`artifact_size` predicts the bytes the artifact's graphs take on disk from the same counts (the
check that the parameter arithmetic is right: measured vs predicted).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tokedge.artifact import Manifest, ModelInfo, QuantInfo
from tokedge.reduce.base import Stage

GB = 1e9
DEFAULT_HEADROOM = 0.2
DEFAULT_TEXT_TOKENS = 64
DTYPE_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "fp8": 1.0}


@dataclass(frozen=True)
class WeightScheme:
    """How weights are stored: float width for everything, and the quantized graphs' layers."""

    float_bytes: float = 2.0  # per weight kept in float
    bits: int | None = None  # quantized layers: 4 or 8 (None: nothing quantized)
    group_size: int = 128
    scale_bytes: float = 2.0  # one scale per group (fp16 on the device, fp32 in an artifact)
    decoder: bool = True  # decoder layers quantized
    vision: bool = False
    lm_head: bool = False
    embeddings: bool = False

    def per_weight(self, quantized: bool) -> float:
        if not quantized or self.bits is None:
            return self.float_bytes
        return self.bits / 8 + self.scale_bytes / self.group_size

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
                   scale_bytes=scale_bytes, decoder=bool({"decoder", "prefill"} & set(quant.graphs)),
                   vision="vision" in quant.graphs, lm_head=quant.lm_head, embeddings=quant.embeddings)


@dataclass(frozen=True)
class ParamCounts:
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


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    memory_gb: float
    headroom: float
    weights: str  # the scheme, in words
    batch: int
    prompt_tokens: int  # visual + text tokens
    new_tokens: int
    weight_bytes: dict[str, int]  # graph -> bytes
    kv_cache_bytes: int
    activation_bytes: int
    total_bytes: int
    usable_bytes: int  # memory x (1 - headroom)
    fits: bool
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        w = sum(self.weight_bytes.values())
        verdict = "fits" if self.fits else "does NOT fit"
        return (f"memory plan on {self.device}: weights {w / GB:.2f} GB + KV cache {self.kv_cache_bytes / GB:.2f} GB "
                f"({self.prompt_tokens}+{self.new_tokens} tokens x{self.batch}) + activations "
                f"{self.activation_bytes / GB:.2f} GB = {self.total_bytes / GB:.2f} GB; {verdict} in "
                f"{self.usable_bytes / GB:.2f} GB usable ({self.memory_gb:g} GB, {self.headroom:.0%} headroom) "
                f"[{self.weights}]")


def weight_bytes(m: ModelInfo, graphs: tuple[str, ...], scheme: WeightScheme) -> dict[str, int]:
    """Bytes of weights per graph ("vision", "embed", "decoder", "prefill")."""
    p = ParamCounts.of(m)
    decoder = p.decoder_layers * scheme.per_weight(scheme.decoder) + p.lm_head * scheme.per_weight(scheme.lm_head)
    out = {
        "vision": p.vision * scheme.per_weight(scheme.vision),
        "embed": p.embed * scheme.per_weight(scheme.embeddings),
        "decoder": decoder,
        "prefill": decoder,
    }
    return {g: int(out[g]) for g in graphs if g in out}


def quantized_weight_share(manifest: Manifest) -> tuple[float, float]:
    """(vision, decoder) weight bytes of the manifest's scheme on the device (fp16 scales) as a
    share of fp16 weights: 1.0 for float artifacts. Scales the roofline's bytes moved."""
    if manifest.quantization is None:
        return 1.0, 1.0
    fp16 = weight_bytes(manifest.model, ("vision", "decoder"), WeightScheme(2.0))
    quant = weight_bytes(manifest.model, ("vision", "decoder"),
                         WeightScheme.from_quant(manifest.quantization, float_bytes=2.0, scale_bytes=2.0))
    return quant["vision"] / fp16["vision"], quant["decoder"] / fp16["decoder"]


def kv_cache_bytes(m: ModelInfo, tokens: int, batch: int, value_bytes: float) -> int:
    return int(2 * m.num_layers * m.num_key_value_heads * m.head_dim * tokens * batch * value_bytes)


def activation_bytes(m: ModelInfo, visual_tokens: int, prompt_tokens: int, batch: int, value_bytes: float,
                     partitions: int = 1) -> int:
    """Peak working set of one stage (not summed: stages run one after another). `partitions`:
    views of one image the vision graph runs as one batch (base view + tiles)."""
    d = m.vision_hidden_size
    ff = m.vision_intermediate_size or 4 * d
    n = (m.image_size // m.patch_size) ** 2 + 1
    heads = max(1, d // 64)
    vision = partitions * (heads * n * n * 4 + n * (3 * d + ff) * value_bytes) + visual_tokens * m.hidden_size * value_bytes
    t = prompt_tokens
    prefill = (m.num_attention_heads * t * t * 4  # fp32 scores
               + t * (3 * m.intermediate_size + 4 * m.hidden_size) * value_bytes
               + m.vocab_size * 4)
    return int(batch * max(vision, prefill))


def plan_memory(model: ModelInfo, graphs: tuple[str, ...], scheme: WeightScheme, *, device: str, memory_gb: float,
                visual_tokens: int, new_tokens: int, batch: int = 1, text_tokens: int = DEFAULT_TEXT_TOKENS,
                value_bytes: float = 2.0, headroom: float = DEFAULT_HEADROOM,
                notes: tuple[str, ...] = (), partitions: int = 1) -> MemoryPlan:
    prompt = visual_tokens + text_tokens
    weights = weight_bytes(model, graphs, scheme)
    kv = kv_cache_bytes(model, prompt + new_tokens, batch, value_bytes)
    act = activation_bytes(model, visual_tokens, prompt, batch, value_bytes, partitions)
    total = sum(weights.values()) + kv + act
    usable = int(memory_gb * GB * (1 - headroom))
    return MemoryPlan(device=device, memory_gb=memory_gb, headroom=headroom, weights=scheme.label, batch=batch,
                      prompt_tokens=prompt, new_tokens=new_tokens, weight_bytes=weights, kv_cache_bytes=kv,
                      activation_bytes=act, total_bytes=total, usable_bytes=usable, fits=total <= usable, notes=notes)


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


def plan_for_device(manifest: Manifest, profile, headroom: float = DEFAULT_HEADROOM,
                    text_tokens: int = DEFAULT_TEXT_TOKENS) -> MemoryPlan:
    """The plan for running `manifest` on a device profile (engines in the profile's precision;
    quantized layers keep their bits with fp16 scales)."""
    value = DTYPE_BYTES.get(profile.precision, 2.0)
    value = max(value, 2.0)  # int8/fp8 profiles still keep activations and the KV cache in 16 bits
    scheme = WeightScheme.from_quant(manifest.quantization, float_bytes=value, scale_bytes=2.0)
    notes = ()
    if manifest.quantization is not None and manifest.quantization.form == "matmulnbits":
        notes = ("MatMulNBits is an ONNX Runtime op: for TensorRT, quantize with --quant-form qdq",)
    bounds = image_bounds(manifest)
    if bounds.tiled:
        note = (f"tiled layout: planned for the largest image ({bounds.prompt_tokens[2]} visual tokens, "
                f"{bounds.partitions[2]} partitions); a typical 4:3 photo gives {bounds.prompt_tokens[1]}")
        notes += (note,)
    return plan_memory(manifest.model, tuple(manifest.graphs), scheme, device=profile.name,
                       memory_gb=profile.memory_gb, visual_tokens=bounds.prompt_tokens[2],
                       new_tokens=profile.max_new_tokens, batch=profile.max_batch, text_tokens=text_tokens,
                       value_bytes=value, headroom=headroom, notes=notes, partitions=bounds.partitions[2])


def predicted_artifact_bytes(manifest: Manifest) -> dict[str, int]:
    """What the artifact's graphs should weigh on disk (weights in the artifact's own dtype,
    fp32 scales), per graph."""
    scheme = WeightScheme.from_quant(manifest.quantization, float_bytes=DTYPE_BYTES[manifest.dtype], scale_bytes=4.0)
    out = weight_bytes(manifest.model, tuple(manifest.graphs), scheme)
    video = manifest.video
    # a video graph of its own (OneVision): the tower and projector again, never quantized (Qwen reuses "vision")
    from tokedge.layouts import video_layout_of

    if video is not None and video_layout_of(manifest).separate_graph():
        out[video.graph] = weight_bytes(manifest.model, ("vision",), WeightScheme(DTYPE_BYTES[manifest.dtype]))["vision"]
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
        scheme = WeightScheme.from_quant(manifest.quantization, float_bytes=value, scale_bytes=4.0)
        partitions = max((entry["partitions"] for r in results for entry in r.per_image), default=1)
        cpu = plan_memory(manifest.model, tuple(manifest.graphs), scheme, device="cpu", memory_gb=0.0,
                          visual_tokens=largest.visual_tokens, new_tokens=0, batch=1,
                          text_tokens=largest.prompt_tokens, value_bytes=value, headroom=0.0, partitions=partitions)
        out["cpu"] = {"predicted_bytes": cpu.total_bytes, "peak_rss_bytes": int(max(r.peak_rss_mb for r in results) * 2**20),
                      "note": "peak RSS also holds the Python interpreter, libraries, ONNX Runtime's arenas and "
                              "pre-packed weight copies"}
    if device is not None:
        plan = plan_for_device(manifest, device)
        out["device"] = plan.to_dict()
        out["device_summary"] = plan.summary()
    return out


# LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf): CLIP ViT-L/14 at 336 px (feature layer -2: 23 of 24
# layers run), two-layer MLP projector, Vicuna-7B (Llama, 32 layers, 4096 wide, MHA, 32000 vocab).
LLAVA_15_7B = ModelInfo(
    source="llava-hf/llava-1.5-7b-hf", family="llava", vision_model_type="clip_vision_model", text_model_type="llama",
    vision_hidden_size=1024, hidden_size=4096, num_layers=32, num_attention_heads=32, num_key_value_heads=32,
    head_dim=128, vocab_size=32064, max_position_embeddings=4096, image_size=336, patch_size=14, bos_token_id=1,
    eos_token_ids=(2,), pad_token_id=32001, image_token_id=32000, vision_layers=23, vision_intermediate_size=4096,
    intermediate_size=11008,
)
GEOMETRIES = {"llava-1.5-7b": LLAVA_15_7B}
