"""The artifact contract in code: manifest dataclasses, hashing and integrity checks.

Torch-free: the export side writes these, the device runtime reads them. The contract itself is
documented in docs/artifact.md; keep the two in step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from tokedge.errors import ArtifactError, ArtifactPathError, IntegrityError, UsageError

if TYPE_CHECKING:
    from tokedge.safeio import Limits

FORMAT_VERSION = 5  # the newest format this tokedge writes and reads (it reads 1 to 5)
MANIFEST_NAME = "tokedge.json"

Dim = int | str  # a fixed size or a symbolic axis name


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy-style dtype name: "float32", "float16", "int64"
    shape: tuple[Dim, ...]


@dataclass(frozen=True)
class GraphSpec:
    file: str  # path relative to the artifact directory
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    external_data: str | None = None  # the one external-data file of this graph, if any

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)


@dataclass(frozen=True)
class ModelInfo:
    source: str  # hub id or local path the user gave
    family: str  # "llava"
    vision_model_type: str  # "clip_vision_model" | "siglip_vision_model"
    text_model_type: str  # "llama" | "qwen2" | "mistral"
    vision_hidden_size: int
    hidden_size: int  # language model hidden size (width of image_embeds / inputs_embeds)
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    image_size: int
    patch_size: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    image_token_id: int
    sliding_window: int | None = None
    # sizes for analytical FLOPs (`tokedge profile`); 0 when unknown
    vision_layers: int = 0  # encoder layers run up to the feature layer
    vision_intermediate_size: int = 0
    intermediate_size: int = 0


@dataclass(frozen=True)
class ReductionInfo:
    method: str
    budget: int  # tokens that reach the LLM (pre-LLM / in-ViT methods): the default when a range exists
    full_tokens: int  # visual tokens without reduction (576 for LLaVA-1.5)
    stage: str  # "none" | "pre-llm" | "in-vit" | "in-llm"
    budget_range: tuple[int, int] | None = None  # inclusive [min, max] of the vision graph's `budget` input
    options: dict[str, Any] = field(default_factory=dict)
    # in-LLM methods: pruning stages inside the prefill, each {score_layer, prune_layer, keep, rule}
    stages: tuple[dict[str, Any], ...] = ()
    # in-ViT methods (ToMe): tokens merged away in each vision layer up to the feature layer
    merge_schedule: tuple[int, ...] = ()
    scores_with: tuple[str, ...] = ()  # the method's signals (tokedge.reduce.base.Signal values)
    supports_runtime_budget: bool = False  # the method can be re-exported with a `budget` input
    # dynamic-resolution layouts: `--keep f` keeps clamp(ceil(f * n), 1, n) of an image's n tokens (then
    # `budget` is that count at the largest image); None: `budget` tokens per image (`--budget`)
    keep: float | None = None


@dataclass(frozen=True)
class PreprocessInfo:
    """What the image processor does, as numbers a torch-free client can replay."""

    do_convert_rgb: bool
    do_resize: bool
    resize_shortest_edge: int | None  # CLIP: shortest edge; None when resizing to a fixed size
    resize_size: tuple[int, int] | None  # (height, width) for fixed-size processors (SigLIP)
    resample: int  # PIL resample enum value (3 = bicubic)
    do_center_crop: bool
    crop_size: tuple[int, int]  # (height, width) of pixel_values
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]


@dataclass(frozen=True)
class PromptInfo:
    tokenizer_file: str  # tokenizer.json (HF tokenizers format) in the artifact
    chat_template: str | None  # Jinja template as transformers renders it
    image_token: str  # placeholder in prompts, e.g. "<image>"
    image_token_id: int
    visual_tokens: int  # placeholders per image after expansion (= reduction budget by default)
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token... for the template


@dataclass(frozen=True)
class VisualLayout:
    """How one image becomes visual tokens, declared by the model family (docs/artifact.md).

    "single": one view of `preprocess.crop_size`, `reduction.full_tokens` tokens (LLaVA-1.5).
    "anyres": a base view plus tiles on a canvas chosen from `pinpoints` (LLaVA-NeXT/OneVision);
    the fields below are those of `tokedge.runtime.layout.AnyresLayout`, unused for "single".
    A manifest with a layout other than "single" needs format_version >= 2.
    """

    kind: str = "single"
    tile: int | None = None  # side of a tile and of the base view in pixels (vision image_size)
    patch_grid: int | None = None  # features per tile side (image_size // patch_size)
    pinpoints: tuple[tuple[int, int], ...] = ()  # candidate canvases (height, width), in the config's order
    max_tiles: int | None = None  # OneVision "anyres_max_M": feature maps over ~M tiles are interpolated down;
    # "aspect_tiles": the most tiles of an image's grid
    interpolate_threshold: float = 1.1  # ... when sqrt(h*w / (M*p*p)) exceeds this
    multi_image_square: bool = False  # OneVision: images of multi-image prompts are padded square, untiled
    pad_fill: tuple[int, int, int] = (0, 0, 0)  # uint8 colour of the canvas padding (before normalising)
    image_newline: bool = False  # a learned newline embedding ends each row of tile features
    # "dynamic_patches" (Qwen2-VL / Qwen2.5-VL / Qwen3-VL; older manifests: "qwen_dynamic"; docs/artifact.md,
    # "dynamic resolution"); unused otherwise
    patch_size: int | None = None  # P: pixels per patch side
    merge_size: int | None = None  # m: m x m patches form one visual token
    temporal_patch_size: int | None = None  # T: a still image is repeated T times in each patch row
    min_pixels: int | None = None  # the resize keeps height * width inside [min_pixels, max_pixels]
    max_pixels: int | None = None  # ... (export's --max-pixels; default the checkpoint's processor value)
    window_size: int | None = None  # window attention side in pixels (Qwen2.5-VL: 112); None: full attention
    fullatt_blocks: tuple[int, ...] = ()  # vision blocks with full attention (the others use windows)
    mrope_section: tuple[int, ...] = ()  # M-RoPE: rotary frequencies per (temporal, height, width) axis
    mrope_interleaved: bool = False  # Qwen3-VL's t h w t h w ... frequency order (chunked otherwise)
    position_table: int | None = None  # Qwen3-VL: side of the learned position table resampled to each grid
    deepstack_levels: int = 0  # Qwen3-VL: DeepStack planes packed after each embedding row (docs/artifact.md)
    vision_start_token_id: int | None = None  # text tokens the chat template puts around each image
    vision_end_token_id: int | None = None
    # "split_tiles" (SmolVLM, Idefics3 lineage; docs/artifact.md): `tile` is the view side; unused otherwise
    longest_edge: int | None = None  # step 1 resizes the image's longest edge to this (pixels)
    view_tokens: int | None = None  # visual tokens per view (tile or global view)
    split_image: bool = True  # tiles + a global view; False: one squashed view per image
    # "aspect_tiles" (InternVL3; docs/artifact.md): `tile`, `patch_size`, `merge_size`, `view_tokens` as above,
    # `max_tiles` the most tiles of an image's grid (the processor's max_patches); unused otherwise
    min_tiles: int | None = None  # the fewest tiles of an image's grid (min_patches)
    # "framed_view" (Gemma 3; docs/artifact.md): one view per image (`tile` square, `view_tokens` tokens, or
    # the reduction's budget), its run of `run_token` framed by two texts; unused otherwise
    frame_before: str = ""  # text before an image's run (Gemma 3: "\n\n<start_of_image>")
    frame_after: str = ""  # text after it (Gemma 3: "<end_of_image>\n\n")
    run_token: str = ""  # the token string of each visual token in the run (Gemma 3: "<image_soft_token>")

    @property
    def format_version(self) -> int:
        """The oldest manifest format that reads this layout (`tokedge.layouts`)."""
        from tokedge.layouts import IMAGE_LAYOUTS, canonical_kind

        cls = IMAGE_LAYOUTS.get(canonical_kind(self.kind))
        return cls.format_version if cls is not None else FORMAT_VERSION

    @property
    def per_image(self) -> bool:
        """Each image gives its own visual-token count (the runtime builds per-image vision inputs)."""
        from tokedge.layouts import image_layout_class

        return image_layout_class(self.kind).counts_per_image

    @property
    def position_rows(self) -> int:
        """Rows of the decoder's `position_ids`: 3 with M-RoPE ([3, b, s]), else 1 ([b, s])."""
        return 3 if self.mrope_section else 1

    def anyres(self):
        """This layout as the runtime's `AnyresLayout` (tiled layouts: tile and patch grid set)."""
        from tokedge.runtime.layout import AnyresLayout

        if self.tile is None or self.patch_grid is None:
            raise ArtifactError(f"the manifest's layout is '{self.kind}', not a complete tiled layout")
        return AnyresLayout(tile=self.tile, patch_grid=self.patch_grid, pinpoints=self.pinpoints,
                            max_tiles=self.max_tiles, interpolate_threshold=self.interpolate_threshold,
                            multi_image_square=self.multi_image_square, pad_fill=self.pad_fill)


@dataclass(frozen=True)
class VideoInfo:
    """How a video becomes visual tokens (LLaVA-OneVision; docs/artifact.md, "video").

    Frames sampled from the clip are each resized to `frame_size` squared, rescaled and normalised
    with `mean`/`std` and run through `graph` ([F, 3, S, S] -> `video_embeds` [F, q*q, hidden]:
    tower, projector, then a bilinear 27->14 style pooling of the p x p map to q x q, in-graph);
    the video's tokens are the frames' pooled tokens in frame-major raster order followed by ONE
    `image_newline` (the graph's `newline` output) when `newline` is "one_per_video"."""

    graph: str  # name in `graphs` of the per-frame video graph ("video_vision")
    video_token: str  # placeholder in prompts, e.g. "<video>"
    video_token_id: int
    frame_size: int  # S: every frame is resized to S x S (no aspect kept, no crop)
    patch_grid: int  # p: tower features per frame side before pooling
    pooled_grid: int  # q: tokens per frame side after pooling (ceil(p / 2))
    tokens_per_frame: int  # q * q
    newline: str  # "one_per_video" (one image_newline after the last frame) or "absent"
    resample: int  # PIL resample enum value of the frame resize (3 = bicubic)
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    default_frames: int  # frames sampled when neither --frames nor --fps is given (never "all frames")
    max_frames: int  # most frames a prompt may take (context and memory bound)
    sampling: str = "uniform"  # transformers' default_sample_indices_fn: frame i*total//N
    keep_ratio: float = 1.0  # reducing artifacts: share of a video's F*n tokens kept when no budget is given
    # "frames" (above: OneVision) or "dynamic_patches" (Qwen2.5-VL; older manifests: "qwen_dynamic": frames
    # resized and patchified with the image layout, T frames per temporal group, `graph` = the image vision graph run once per group;
    # frame_size, patch_grid, pooled_grid and tokens_per_frame are 0, the grid follows each clip's size)
    kind: str = "frames"
    tokens_per_second: float = 0.0  # "dynamic_patches": M-RoPE temporal positions per second of video

    def tokens(self, frames: int, kept: int | None = None) -> int:
        """`<video>` placeholders for `frames` frames: every pooled token (or `kept` of them) + newline."""
        body = frames * self.tokens_per_frame if kept is None else kept
        return body + (1 if self.newline == "one_per_video" else 0)


@dataclass(frozen=True)
class QuantInfo:
    """The manifest's record of how the weights were quantized (absent = float weights)."""

    scheme: str  # int4 | int8
    form: str  # matmulnbits | qdq
    group_size: int
    symmetric: bool  # False: a zero point per group (matmulnbits only)
    algorithm: str  # "rtn" (round to nearest) | "hqq" (onnxruntime's HQQ)
    accuracy_level: int  # MatMulNBits only; 0 for qdq
    graphs: tuple[str, ...]
    lm_head: bool
    embeddings: bool
    quantized: dict[str, int] = field(default_factory=dict)  # graph -> weights quantized
    weight_bytes: dict[str, dict[str, int]] = field(default_factory=dict)  # graph -> {"before", "after"}
    tolerance: dict[str, float] = field(default_factory=dict)  # QuantTolerance as data
    int8_matmuls: tuple[str, ...] = ()  # int4 mixed precision: the MatMuls kept at int8 (down_proj, first, last, lm_head)
    # the measure at quantization (docs/quantization.md): text KL mean / p99 / max, top-1, perplexity
    # (fp32 and this), image prompts' KL; empty in artifacts quantized before it existed or with --no-validate
    fidelity: dict[str, float] = field(default_factory=dict)

    @property
    def head_quantized(self) -> bool:
        """Whether the lm_head's weights were quantized: at the scheme's bits (`lm_head`), or at 8 bits
        under int4 mixed precision (`int8_matmuls` names it: int4 matmulnbits' default)."""
        return self.lm_head or "lm_head" in self.int8_matmuls


@dataclass(frozen=True)
class GraphParameters:
    """One graph's weights as written: counted at export from the graph's initializers (not from
    the torch module): every floating-point initializer of one element or more that is not a
    quantization scale, plus every quantized weight at its logical size (K x N); integer index
    constants, zero points and 0-d scalars are left out."""

    parameters: int  # weight elements, float and quantized together
    quantized: int = 0  # of which stored as int4/int8 (logical elements)
    scale_groups: int = 0  # quantization scales stored (one per group of `group_size` weights along K)
    padded: int = 0  # quantized elements as stored, padded to whole groups (MatMulNBits pads K; qdq does not)
    int8: int = 0  # of `quantized`, those stored at 8 bits (an int8 scheme's, or int4 mixed precision's int8 MatMuls)
    other_bytes: int = 0  # bytes of the written files that are not these weights or scales: nodes, names, constants


@dataclass(frozen=True)
class VisionArchitecture:
    """The vision graph's tower as it runs (docs/artifact.md, "architecture")."""

    layers: int  # blocks run up to the feature layer
    hidden: int
    intermediate: int
    heads: int
    gated_mlp: bool = False  # SwiGLU MLP (three matrices) instead of fc1/fc2
    # tokens of one partition entering each block, in-ViT merging applied (ToMe's schedule); empty when
    # the count follows the image (dynamic resolution: the image's patches)
    layer_tokens: tuple[int, ...] = ()
    # per block, the keys one query is scored against: 0 = every token of the partition (dense N x N
    # scores), k > 0 = windows of k tokens. Qwen2.5-VL's window blocks are 0 here: tokedge's graph masks
    # a dense N x N score matrix, so the memory is that of full attention
    attention_span: tuple[int, ...] = ()
    patches_per_token: int = 1  # patches merged into one visual token after the tower (Qwen: merge_size^2)
    # float32 heads x N x N buffers live at a block's attention peak: 1 for softmax(q k^T) (the softmax
    # reuses the scores), 2 when a mask is added first (masked scores beside the scores)
    score_buffers: int = 1
    mask_bytes: int = 0  # bytes per N x N position of a mask the graph holds (Qwen2.5-VL windows: float32 bias + bool)
    projector: tuple[int, ...] = ()  # widths of the projector's matrices, in order: (in, hidden, ..., out)


@dataclass(frozen=True)
class TextArchitecture:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int


@dataclass(frozen=True)
class Architecture:
    """Architecture numbers recorded at export (absent in older manifests): what memory, FLOPs and
    planning read instead of formulas."""

    graphs: dict[str, GraphParameters]
    vision: VisionArchitecture
    text: TextArchitecture
    counted: str = "onnx-initializers"  # how `graphs` was counted


@dataclass(frozen=True)
class Manifest:
    format_version: int
    tokedge_version: str
    dtype: str  # "fp32" | "fp16": weights and activations inside the graphs
    model: ModelInfo
    reduction: ReductionInfo
    graphs: dict[str, GraphSpec]  # "vision", "embed", "decoder"
    preprocess: PreprocessInfo
    prompt: PromptInfo
    versions: dict[str, str]
    opset: int
    reference: dict[str, Any]  # file + tolerances of the parity reference recorded at export
    files: dict[str, str]  # relative path -> sha256 of every other file in the artifact
    optimizations: tuple[dict[str, Any], ...] = ()  # graph passes applied: {graph, pass, fired}
    quantization: QuantInfo | None = None  # weight-only quantization; absent in float artifacts
    layout: VisualLayout = VisualLayout()  # absent in manifests written before it existed: "single"
    video: VideoInfo | None = None  # video input (OneVision); absent: the artifact takes images only
    architecture: Architecture | None = None  # architecture numbers; absent in manifests written before it existed
    # where the weights came from when they are not a trained checkpoint's: "random (preset tiny-llava)";
    # None: the checkpoint's own weights (and in manifests written before the field existed)
    weights: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        """Validate `data` against the schema (types, then ranges) and build the manifest."""
        from tokedge.manifest_schema import check_ranges, convert

        from tokedge.layouts import canonical_kind, canonical_video_kind

        manifest = convert(cls, data, "")
        # older kind names (e.g. "qwen_dynamic") read as their layout's name today
        manifest = dataclasses.replace(manifest, layout=dataclasses.replace(
            manifest.layout, kind=canonical_kind(manifest.layout.kind)))
        if manifest.video is not None:
            manifest = dataclasses.replace(manifest, video=dataclasses.replace(
                manifest.video, kind=canonical_video_kind(manifest.video.kind)))
        check_ranges(manifest, manifest.format_version)
        return manifest


# --- files and hashes ------------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def confined_path(root: Path, rel: str) -> Path:
    """Resolve `rel` inside `root`, refusing absolute paths, `..`, and links that lead out."""
    if not rel or os.path.isabs(rel) or Path(rel).is_absolute():
        raise IntegrityError(f"artifact path '{rel}' is absolute; artifact files must be relative to it")
    if any(part == ".." for part in Path(rel).parts):
        raise IntegrityError(f"artifact path '{rel}' leaves the artifact directory ('..')")
    root_real = root.resolve()
    candidate = root / rel
    real = candidate.resolve()
    if real != root_real and root_real not in real.parents:
        raise IntegrityError(f"artifact file '{rel}' resolves outside the artifact directory (symlink?)")
    if candidate.exists() and candidate.is_file() and os.stat(candidate).st_nlink > 1:
        raise IntegrityError(f"artifact file '{rel}' is a hard link; copy the artifact instead of linking it")
    return candidate


def hash_tree(root: Path, exclude: tuple[str, ...] = (MANIFEST_NAME,)) -> dict[str, str]:
    """sha256 of every regular file below root (relative POSIX paths), sorted."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and rel not in exclude:
            out[rel] = sha256_file(path)
    return out


@dataclass(frozen=True)
class VerifiedArtifact:
    """An artifact whose manifest validated and whose listed files matched their sha256, with
    the very bytes that were hashed: runners, the tokenizer and verify use these, never the paths
    again, so a file swapped on disk after the check is never what runs."""

    root: Path
    manifest: Manifest
    manifest_sha256: str
    blobs: dict[str, bytes]  # relative path -> verified bytes of every listed file

    def read(self, rel: str) -> bytes:
        if rel not in self.blobs:
            raise IntegrityError(f"'{rel}' is not a file listed in the artifact's manifest")
        return self.blobs[rel]

    def write_to(self, stage: Path) -> None:
        """Write every verified file into `stage` (a fresh directory this process owns), from the
        bytes that were hashed: commands that derive a new artifact from this one (quantize,
        optimize) never read the source's paths again, so a file swapped or replaced by a symlink
        after the check cannot reach their output. Files are created exclusively, without
        following links."""
        from tokedge.safeio import write_new

        for rel, data in self.blobs.items():
            target = Path(stage) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            write_new(target, data)

    def graph_bytes(self, name: str) -> tuple[bytes, dict[str, bytes]]:
        """(model bytes, {external-data location as named in the model: its bytes}) of a graph."""
        graph = self.manifest.graphs[name]
        external: dict[str, bytes] = {}
        if graph.external_data is not None:
            location = Path(graph.external_data).relative_to(Path(graph.file).parent).as_posix()
            external[location] = self.read(graph.external_data)
        return self.read(graph.file), external


def _limit_for(rel: str, manifest: Manifest, limits: "Limits") -> int:
    if rel == manifest.prompt.tokenizer_file:
        return limits.tokenizer_bytes
    if rel == manifest.reference.get("file") or rel == (manifest.reference.get("text") or {}).get("file"):
        return limits.reference_bytes
    return limits.graph_bytes


def _in_parallel(fn, items: list) -> list:
    """`[fn(x) for x in items]` on up to 4 threads (files are read and hashed side by side); the
    results in order, and the first item's exception, in order, if any raised."""
    workers = min(4, os.cpu_count() or 1, len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="tokedge-verify") as pool:
        futures = [pool.submit(fn, x) for x in items]
        return [f.result() for f in futures]


def verify_files(root: Path, manifest: Manifest, root_fd: int | None = None,
                 limits: "Limits | None" = None) -> dict[str, bytes]:
    """Check every file in the manifest: inside root (no symlink in any component, no hard link,
    a regular file), within its size limit, with the recorded sha256; that the tokenizer, the
    reference and every graph and its data are among them; and that each graph's external data
    (anywhere in the file: initializers, sparse tensors, attributes, subgraphs, functions) is its
    listed data file and that it has no control flow. Returns the verified bytes by path."""
    from tokedge.onnx_files import CONTROL_FLOW, scan_onnx
    from tokedge.safeio import DEFAULT_LIMITS, open_dir, printable, read_regular

    limits = limits or DEFAULT_LIMITS
    own_fd = root_fd is None
    fd = open_dir(root) if root_fd is None else root_fd
    try:
        scoped = [("prompt.tokenizer_file", manifest.prompt.tokenizer_file),
                  ("reference.file", manifest.reference["file"])]
        if manifest.reference.get("text"):
            scoped += [("reference.text.file", manifest.reference["text"]["file"])]
        for name, graph in manifest.graphs.items():
            scoped += [(f"graphs.{name}.file", graph.file)]
            if graph.external_data is not None:
                scoped += [(f"graphs.{name}.external_data", graph.external_data)]
        for key, rel in scoped:
            if rel not in manifest.files:
                raise IntegrityError(f"{key} '{printable(rel)}' is not covered by the manifest's hashes "
                                     f"(missing from 'files'); re-export the artifact")
        for rel in manifest.files:
            confined_path(root, rel)  # clear messages for '..', absolute paths and links leading out

        def read_and_hash(rel: str) -> tuple[bytes, str]:  # both release the GIL: files overlap on cores
            data = read_regular(fd, rel, _limit_for(rel, manifest, limits), f"artifact file '{printable(rel)}'")
            return data, hashlib.sha256(data).hexdigest()

        blobs: dict[str, bytes] = {}
        for rel, (data, digest) in zip(manifest.files, _in_parallel(read_and_hash, list(manifest.files))):
            if digest != manifest.files[rel]:
                raise IntegrityError(
                    f"artifact file '{printable(rel)}' does not match its sha256 in {MANIFEST_NAME} "
                    "(modified or corrupt); re-export the artifact"
                )
            blobs[rel] = data
    finally:
        if own_fd:
            os.close(fd)
    for name, graph in manifest.graphs.items():
        scan = scan_onnx(blobs[graph.file], graph.file)
        graph_dir = Path(graph.file).parent
        for location in scan.locations:
            rel = (graph_dir / location).as_posix() if not os.path.isabs(location) else location
            confined_path(root, rel)
            if os.path.normpath(rel) not in manifest.files or os.path.normpath(rel) != graph.external_data:
                raise IntegrityError(
                    f"{graph.file} stores weights in '{printable(location)}', which is not its manifest-listed "
                    "external data file"
                )
        flow = sorted(scan.op_types & CONTROL_FLOW)
        if flow:
            raise IntegrityError(f"{graph.file} contains control flow ({', '.join(flow)}), which tokedge never "
                                 "exports (it could loop without bound); re-export the artifact")
    return blobs


# --- reading and writing ----------------------------------------------------------------------


def _parse_manifest(raw: bytes, where: Path) -> Manifest:
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        from tokedge.safeio import printable

        raise ArtifactError(f"{where} is not valid JSON ({printable(exc, 120)}); re-export the artifact") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{where} is not a JSON object; it is not a tokedge manifest")
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ArtifactError(f"{where} has no integer format_version; it is not a tokedge manifest")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"artifact format {version} is newer than this tokedge reads ({FORMAT_VERSION}); "
            "upgrade tokedge on this device"
        )
    return Manifest.from_dict(data)


def _read_manifest_bytes(root: Path, fd: int, limits: "Limits") -> bytes:
    from tokedge.safeio import read_regular

    try:
        os.stat(MANIFEST_NAME, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        raise ArtifactPathError(f"'{root}' is not a tokedge artifact (no {MANIFEST_NAME}); create one with "
                                "`tokedge export`") from None
    return read_regular(fd, MANIFEST_NAME, limits.manifest_bytes, f"{root / MANIFEST_NAME}")


def manifest_sha256(root: Path | str, limits: Limits | None = None) -> str:
    """sha256 of an artifact's manifest bytes, its id (what `open_artifact` reports and `tokedge
    build` records), without checking its files."""
    from tokedge.safeio import DEFAULT_LIMITS, open_dir

    root = Path(root)
    fd = open_dir(root)
    try:
        return hashlib.sha256(_read_manifest_bytes(root, fd, limits or DEFAULT_LIMITS)).hexdigest()
    finally:
        os.close(fd)


def read_manifest(root: Path | str, limits: "Limits | None" = None) -> Manifest:
    """The manifest alone, schema-validated (no file hashes checked)."""
    from tokedge.safeio import DEFAULT_LIMITS, open_dir

    root = Path(root)
    fd = open_dir(root)
    try:
        return _parse_manifest(_read_manifest_bytes(root, fd, limits or DEFAULT_LIMITS), root / MANIFEST_NAME)
    finally:
        os.close(fd)


def open_artifact(root: Path | str, limits: "Limits | None" = None) -> VerifiedArtifact:
    """Read and validate the manifest, then read, bound and hash every listed file once."""
    from tokedge.safeio import DEFAULT_LIMITS, open_dir

    root = Path(root)
    limits = limits or DEFAULT_LIMITS
    fd = open_dir(root)
    try:
        raw = _read_manifest_bytes(root, fd, limits)
        manifest = _parse_manifest(raw, root / MANIFEST_NAME)
        blobs = verify_files(root, manifest, root_fd=fd, limits=limits)
    finally:
        os.close(fd)
    return VerifiedArtifact(root=root, manifest=manifest, manifest_sha256=hashlib.sha256(raw).hexdigest(), blobs=blobs)


def load_artifact(root: Path | str, check_hashes: bool = True) -> Manifest:
    """Read the manifest and (by default) check every file's hash and location before use.
    Callers that go on to use the files should take `open_artifact`'s verified bytes instead."""
    if check_hashes:
        return open_artifact(root).manifest
    return read_manifest(root)


def write_manifest(root: Path, manifest: Manifest) -> None:
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n"
    tmp = root / (MANIFEST_NAME + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, root / MANIFEST_NAME)


def lock_path_for(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


_KINDS = {MANIFEST_NAME: "tokedge artifact", "engines.json": "tokedge engines directory",
          "config.json": "checkpoint directory"}


def check_target(target: Path, force: bool, marker: str = MANIFEST_NAME, protect: tuple[Path | None, ...] = ()) -> None:
    """Refuse an output directory that must not be written or replaced: the current directory or
    one of its parents, a protected path (the source checkpoint) or one of its parents, and,
    unless `force`, anything that exists. With `force`, only an empty directory or one holding
    `marker` (a directory of the kind being written) is replaced; never a file or a symlink."""
    target = Path(target)
    kind = _KINDS.get(marker, "tokedge output")
    real = Path(os.path.abspath(target)).resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise UsageError(f"--out '{target}' is the current directory or one of its parents; choose a new directory")
    for source in protect:
        if source is None:
            continue
        src = Path(source).resolve()
        if real == src or real in src.parents:
            raise UsageError(f"--out '{target}' would replace the source '{source}' being read; choose another --out")
    if not os.path.lexists(target):
        return
    if not force:
        raise UsageError(f"'{target}' already exists; choose another --out or pass --force to replace it")
    if target.is_symlink():
        raise UsageError(f"'{target}' is a symbolic link; --force replaces only a real {kind} directory")
    if not target.is_dir():
        raise UsageError(f"'{target}' is a file, not a {kind}; --force replaces only a {kind} or an empty directory")
    with os.scandir(target) as entries:
        empty = next(entries, None) is None
    if not empty and not _holds_kind(target, marker):
        raise UsageError(f"'{target}' is not a {kind} (no {marker} of one, with the files it lists); --force "
                         f"replaces only a {kind} or an empty directory: remove it yourself or choose another --out")


def _holds_kind(target: Path, marker: str) -> bool:
    """Whether `target` is a directory tokedge wrote, not one that merely holds a file named `marker`:
    the marker is a regular file (no link) whose JSON has the shape tokedge writes, and for an
    artifact every file its manifest lists is there."""
    from tokedge.errors import TokedgeError
    from tokedge.safeio import MiB, open_dir, open_regular, read_regular

    try:
        fd = open_dir(target)
        try:
            data = json.loads(read_regular(fd, marker, 16 * MiB).decode("utf-8"))
            if not isinstance(data, dict):
                return False
            if marker == MANIFEST_NAME:
                files, version = data.get("files"), data.get("format_version")
                if (not isinstance(files, dict) or not files or not isinstance(data.get("graphs"), dict)
                        or isinstance(version, bool) or not isinstance(version, int)):
                    return False
                for rel in files:  # each listed file present: a regular file below target, no links
                    os.close(open_regular(fd, str(rel)))
                return True
            if marker == "engines.json":
                return isinstance(data.get("engines"), dict) and isinstance(data.get("artifact_manifest_sha256"), str)
            if marker == "config.json":
                return isinstance(data.get("model_type"), str)
            return True
        finally:
            os.close(fd)
    except (TokedgeError, OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False


@contextlib.contextmanager
def staged_directory(target: Path, force: bool = False, lock_timeout: float | None = None,
                     marker: str = MANIFEST_NAME, protect: tuple[Path | None, ...] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; on success rename it into place.

    The target is never half-written: on any error (or a kill) the staging directory is the only
    thing touched. An existing target is refused unless `force`, and then replaced whole. Writers
    of the same target are serialised by a lock file; staging directories that a killed writer
    left behind are removed by the next writer (it holds the lock, so they are nobody's).
    """
    from tokedge.locking import exclusive

    target = Path(target)
    check_target(target, force, marker, protect)
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(lock_path_for(target), timeout=lock_timeout):
        # the name is escaped: `art[1]` must not match (and delete) `.art1.partial-*` of another export
        for stale in target.parent.glob(f".{glob.escape(target.name)}.partial-*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes it private; the artifact should not be
        try:
            yield stage
            if os.path.lexists(target):
                if not force:
                    raise UsageError(f"'{target}' appeared while exporting; pass --force to replace it")
                check_target(target, force, marker, protect)
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, old / "previous")
                os.replace(stage, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(stage, target)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise


def random_weights_notice(weights: str | None) -> str | None:
    """One line for every command that shows output or numbers from an artifact whose weights are
    random (a preset's): None for a trained checkpoint's."""
    if not weights:
        return None
    return (f"this artifact's weights are {weights}: its text and its fidelity numbers show that the "
            "pipeline works, not what a trained model would answer")
