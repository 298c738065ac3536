"""The artifact contract in code: manifest dataclasses, hashing and integrity checks.

Torch-free: the export side writes these, the device runtime reads them. The contract itself is
documented in docs/artifact.md; keep the two in step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from tokedge.errors import ArtifactError, IntegrityError, UsageError

FORMAT_VERSION = 1
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
class QuantInfo:
    """The manifest's record of how the weights were quantized (absent = float weights)."""

    scheme: str  # int4 | int8
    form: str  # matmulnbits | qdq
    group_size: int
    symmetric: bool
    algorithm: str  # "rtn" (round to nearest)
    accuracy_level: int  # MatMulNBits only; 0 for qdq
    graphs: tuple[str, ...]
    lm_head: bool
    embeddings: bool
    quantized: dict[str, int] = field(default_factory=dict)  # graph -> weights quantized
    weight_bytes: dict[str, dict[str, int]] = field(default_factory=dict)  # graph -> {"before", "after"}
    tolerance: dict[str, float] = field(default_factory=dict)  # QuantTolerance as data


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        try:
            return _from_dict(cls, data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"manifest {MANIFEST_NAME} is malformed ({exc}); re-export the artifact") from exc


def _from_dict(cls: type, data: Any) -> Any:
    """Rebuild nested frozen dataclasses from plain JSON data (tuples where the type says so)."""
    import typing

    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise KeyError(f"missing field '{f.name}' in {cls.__name__}")
        kwargs[f.name] = _convert(hints[f.name], data[f.name])
    return cls(**kwargs)


def _convert(tp: Any, value: Any) -> Any:
    import types
    import typing

    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is type(None):
                continue
            if dataclasses.is_dataclass(arg) or typing.get_origin(arg) in (tuple, dict):
                return _convert(arg, value)
        return value
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v) for v in value)
        return tuple(_convert(a, v) for a, v in zip(args, value))
    if origin is dict:
        return {k: _convert(args[1], v) for k, v in value.items()}
    return value


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


def verify_files(root: Path, manifest: Manifest) -> None:
    """Check every file in the manifest exists inside root with the recorded sha256, and that each
    graph's external-data locations stay inside the artifact (graph bytes are read once for both)."""
    from tokedge.onnx_files import external_data_locations

    graph_files = {g.file for g in manifest.graphs.values()}
    graph_bytes: dict[str, bytes] = {}
    for rel, digest in manifest.files.items():
        path = confined_path(root, rel)
        if not path.is_file():
            raise IntegrityError(f"artifact file '{rel}' is missing from {root}; re-export the artifact")
        if rel in graph_files:
            graph_bytes[rel] = path.read_bytes()
            actual = hashlib.sha256(graph_bytes[rel]).hexdigest()
        else:
            actual = sha256_file(path)
        if actual != digest:
            raise IntegrityError(
                f"artifact file '{rel}' does not match its sha256 in {MANIFEST_NAME} (modified or corrupt); "
                "re-export the artifact"
            )
    for name, graph in manifest.graphs.items():
        for rel in filter(None, (graph.file, graph.external_data)):
            if rel not in manifest.files:
                raise IntegrityError(f"{name} graph file '{rel}' is not covered by the manifest's hashes")
        graph_dir = Path(graph.file).parent
        for location in external_data_locations(graph_bytes[graph.file], graph.file):
            rel = (graph_dir / location).as_posix() if not os.path.isabs(location) else location
            confined_path(root, rel)
            if os.path.normpath(rel) not in manifest.files or os.path.normpath(rel) != graph.external_data:
                raise IntegrityError(
                    f"{graph.file} stores weights in '{location}', which is not its manifest-listed external data file"
                )


# --- reading and writing ----------------------------------------------------------------------


def read_manifest(root: Path | str) -> Manifest:
    root = Path(root)
    if not root.exists():
        raise ArtifactError(f"artifact directory '{root}' does not exist")
    if not root.is_dir():
        raise ArtifactError(f"'{root}' is a file, not an artifact directory; pass the directory `tokedge export` wrote")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"'{root}' is not a tokedge artifact (no {MANIFEST_NAME}); create one with `tokedge export`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-export the artifact") from exc
    if not isinstance(data, dict) or not isinstance(data.get("format_version"), int):
        raise ArtifactError(f"{path} has no integer format_version; it is not a tokedge manifest")
    if data["format_version"] > FORMAT_VERSION:
        raise ArtifactError(
            f"artifact format {data['format_version']} is newer than this tokedge reads ({FORMAT_VERSION}); "
            "upgrade tokedge on this device"
        )
    return Manifest.from_dict(data)


def load_artifact(root: Path | str, check_hashes: bool = True) -> Manifest:
    """Read the manifest and (by default) check every file's hash and location before use."""
    manifest = read_manifest(root)
    if check_hashes:
        verify_files(Path(root), manifest)
    return manifest


def write_manifest(root: Path, manifest: Manifest) -> None:
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n"
    tmp = root / (MANIFEST_NAME + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, root / MANIFEST_NAME)


def lock_path_for(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def staged_directory(target: Path, force: bool = False, lock_timeout: float | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; on success rename it into place.

    The target is never half-written: on any error (or a kill) the staging directory is the only
    thing touched. An existing target is refused unless `force`, and then replaced whole. Writers
    of the same target are serialised by a lock file; staging directories that a killed writer
    left behind are removed by the next writer (it holds the lock, so they are nobody's).
    """
    from tokedge.locking import exclusive

    target = Path(target)
    if target.exists() and not force:
        raise UsageError(f"'{target}' already exists; choose another --out or pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(lock_path_for(target), timeout=lock_timeout):
        for stale in target.parent.glob(f".{target.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(stage, 0o777 & ~umask)  # mkdtemp makes it private; the artifact should not be
        try:
            yield stage
            if target.exists():
                if not force:
                    raise UsageError(f"'{target}' appeared while exporting; pass --force to replace it")
                old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
                os.replace(target, old / "previous")
                os.replace(stage, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(stage, target)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
