"""Weight-only quantization of an artifact's linear layers (`--quantize int4|int8`).

Round-to-nearest, block-wise along the input dimension K, symmetric (no zero point). Two graph
forms, because the targets differ:

- `matmulnbits` (ONNX Runtime): onnxruntime's own `MatMulNBitsQuantizer` replaces each MatMul
  with a constant weight by the `com.microsoft::MatMulNBits` contrib op. `accuracy_level` 4 lets
  the CPU kernels quantize activations to int8 per block and use VNNI/AMX dot products.
- `qdq` (TensorRT): the weight is stored as INT4/INT8 with fp32 scales and dequantized with a
  standard `DequantizeLinear(axis=0, block_size=G)` (opset 21) feeding the unchanged MatMul; zero
  points are omitted, i.e. all zero, because TensorRT rejects asymmetric ones. int4 comes from
  onnxruntime's quantizer in QDQ mode, int8 is written here (same scheme, 8 bits).

What is quantized is data (`QuantConfig`): the decoder and prefill graphs by default, the vision
graph on request; `lm_head` (the MatMul producing the logits) and the token embeddings stay float
unless asked. The result is recorded in the manifest as `QuantInfo`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokedge.artifact import QuantInfo
from tokedge.errors import InputError, UsageError

SCHEMES = ("int4", "int8")
FORMS = ("matmulnbits", "qdq")
QUANTIZABLE_GRAPHS = ("vision", "embed", "decoder", "prefill")
QDQ_OPSET = 21


@dataclass(frozen=True)
class QuantConfig:
    scheme: str = "int4"  # int4 | int8
    form: str = "matmulnbits"  # matmulnbits (ONNX Runtime contrib op) | qdq (DequantizeLinear, TensorRT)
    group_size: int = 128  # weights per scale along K; a power of two >= 16
    graphs: tuple[str, ...] = ("decoder", "prefill")  # graphs whose MatMul weights are quantized
    lm_head: bool = False  # also quantize the MatMul that produces the logits
    embeddings: bool = False  # also quantize the token-embedding table (matmulnbits: GatherBlockQuantized)
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations (VNNI/AMX), 0 = float

    @property
    def bits(self) -> int:
        return 4 if self.scheme == "int4" else 8

    def check(self) -> None:
        if self.scheme not in SCHEMES:
            raise UsageError(f"--quantize {self.scheme} is not supported; use one of {', '.join(SCHEMES)}")
        if self.form not in FORMS:
            raise UsageError(f"--quant-form {self.form} is unknown; use matmulnbits (ONNX Runtime) or qdq (TensorRT)")
        if self.group_size < 16 or self.group_size & (self.group_size - 1):
            raise UsageError(f"--group-size {self.group_size} must be a power of two >= 16 (e.g. 32, 64, 128)")
        unknown = [g for g in self.graphs if g not in QUANTIZABLE_GRAPHS]
        if unknown:
            raise UsageError(f"--quant-graphs: unknown graph '{unknown[0]}'; choose from {', '.join(QUANTIZABLE_GRAPHS)}")
        if self.embeddings and (self.form == "qdq" or self.bits != 4):
            raise UsageError("--quantize-embeddings needs int4 and --quant-form matmulnbits "
                             "(onnxruntime's GatherBlockQuantized; TensorRT has no int4 Gather)")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise UsageError(f"--accuracy-level {self.accuracy_level} must be 0..4 (4 = int8 compute)")


@dataclass(frozen=True)
class QuantTolerance:
    """What a quantized artifact must reach against the fp32 transformers reference: the worst
    cosine similarity of a logits row and the share of logits rows whose argmax agrees."""

    logit_cosine: float
    top1_agreement: float

    @classmethod
    def for_scheme(cls, scheme: str) -> QuantTolerance:
        # int4 RTN moves logits visibly; a flip of the top token where two logits are close is normal
        return cls(logit_cosine=0.95, top1_agreement=0.75) if scheme == "int4" else cls(0.995, 0.9)


def _logits_matmul(graph, vocab_size: int) -> str | None:
    """Name of the MatMul whose output is the logits (the lm_head), found by its weight's width."""
    consts = {t.name: t for t in graph.initializer}
    for node in reversed(graph.node):
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in consts:
            dims = list(consts[node.input[1]].dims)
            if dims and dims[-1] == vocab_size:
                return node.name
    return None


def _name_nodes(graph) -> None:
    """The quantizers key exclusions by node name; give unnamed nodes one."""
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


def _weight_bytes(model) -> int:
    from onnx import numpy_helper

    total = 0
    for t in model.graph.initializer:
        if t.data_type in (16, 22, 23):  # bfloat16, int4, uint4: raw bytes
            total += len(t.raw_data)
        else:
            total += numpy_helper.to_array(t).nbytes
    return total


def _int8_qdq(model, group: int, exclude: set[str]) -> int:
    """Block-wise symmetric int8: MatMul(x, W) -> MatMul(x, DequantizeLinear(Wq, scale, axis=0,
    block_size=group)). Returns how many weights were quantized."""
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    new_nodes, drop, count = [], set(), 0
    for node in graph.node:
        w = consts.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if w is None or node.name in exclude or len(w.dims) != 2 or w.data_type != onnx.TensorProto.FLOAT:
            new_nodes.append(node)
            continue
        k, n = w.dims
        weights = numpy_helper.to_array(w).astype(np.float32)
        blocks = -(-k // group)
        padded = np.zeros((blocks * group, n), dtype=np.float32)
        padded[:k] = weights
        amax = np.abs(padded.reshape(blocks, group, n)).max(axis=1)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.rint(weights / np.repeat(scale, group, axis=0)[:k]), -127, 127).astype(np.int8)
        base = w.name if uses.get(w.name, 0) == 1 else f"{w.name}_{node.name}"
        graph.initializer.extend([numpy_helper.from_array(q, base + "_Q8"), numpy_helper.from_array(scale, base + "_scale")])
        if uses.get(w.name, 0) == 1:
            drop.add(w.name)
        deq = base + "_dequantized"
        new_nodes.append(helper.make_node("DequantizeLinear", [base + "_Q8", base + "_scale"], [deq],
                                          name=node.name + "_DQ_Q8", axis=0, block_size=group))
        node.input[1] = deq
        new_nodes.append(node)
        count += 1
    del graph.node[:]
    graph.node.extend(new_nodes)
    kept = [t for t in graph.initializer if t.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return count


def check_initializers(model, where: str) -> None:
    """Every initializer's data holds exactly what its dims and type declare: a graph whose dims lie
    is refused in one line (ArtifactError) before numpy or onnxruntime's quantizer reshape it."""
    import math

    from onnx import TensorProto, helper

    from tokedge.errors import ArtifactError
    from tokedge.safeio import printable

    packed = {getattr(TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(TensorProto, n)}
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            continue  # not loaded: the artifact's data file is checked where it is read
        count = math.prod(t.dims) if all(d >= 0 for d in t.dims) else -1
        try:
            if t.HasField("raw_data") or t.raw_data:
                itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
                actual, expected = len(t.raw_data), (count + 1) // 2 if t.data_type in packed else count * itemsize
            else:
                actual = len(getattr(t, helper.tensor_dtype_to_field(t.data_type)))
                expected = (count + 1) // 2 if t.data_type in packed else count
                if t.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
                    expected = 2 * count
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{where}: initializer '{printable(t.name, 80)}' has an unknown data type "
                                f"{t.data_type}; re-export the artifact") from None
        if count < 0 or actual != expected:
            raise ArtifactError(f"{where}: initializer '{printable(t.name, 80)}' declares dims {list(t.dims)} but "
                                f"holds {actual} {'bytes' if t.raw_data else 'values'}; the graph is corrupt, "
                                "re-export the artifact")


def quantize_model(model, cfg: QuantConfig, vocab_size: int, graph: str = "decoder"):
    """Quantize one onnx ModelProto (the artifact's graph `graph`); returns (new ModelProto,
    weights quantized). Only the embed graph's Gather (the token table) is ever quantized."""
    import logging

    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # onnxruntime's quantizer logs its own lines (and calls logging.basicConfig on import): errors only,
    # unless the caller chose a level (the CLI shows everything with --debug)
    log = logging.getLogger("onnxruntime.quantization")
    if log.level == logging.NOTSET:
        log.setLevel(logging.ERROR)
    gather = cfg.embeddings and graph == "embed"
    if cfg.form == "qdq" or gather:  # int4 tensors and block-wise DequantizeLinear need opset 21
        from onnx import version_converter

        current = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
        if current < QDQ_OPSET:
            model = version_converter.convert_version(model, QDQ_OPSET)
    _name_nodes(model.graph)
    exclude = set()
    head = _logits_matmul(model.graph, vocab_size)
    if head is not None and not cfg.lm_head:
        exclude.add(head)
    if cfg.form == "qdq" and cfg.bits == 8:
        count = _int8_qdq(model, cfg.group_size, exclude)
        model.ir_version = max(model.ir_version, 10)
        return model, count
    ops = ("Gather",) if gather else ("MatMul",)
    quantizer = MatMulNBitsQuantizer(
        model, bits=cfg.bits, block_size=cfg.group_size, is_symmetric=True,
        accuracy_level=cfg.accuracy_level if cfg.form == "matmulnbits" and cfg.accuracy_level else None,
        nodes_to_exclude=sorted(exclude),
        quant_format=QuantFormat.QDQ if cfg.form == "qdq" else QuantFormat.QOperator,
        op_types_to_quantize=ops,
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    quantizer.process()
    out = quantizer.model.model
    marker = ("MatMulNBits", "GatherBlockQuantized") if cfg.form == "matmulnbits" else ("DequantizeLinear",)
    count = sum(1 for n in out.graph.node if n.op_type in marker)
    return out, count


def quantize_graphs(root: Path, manifest, cfg: QuantConfig, external_threshold: int = 1 << 30):
    """Quantize the graphs of the artifact staged at `root` in place (files rewritten, graph specs
    recomputed). Returns (manifest with new graph specs and `quantization`, QuantInfo)."""
    import onnx
    import onnx_ir as ir

    from tokedge.export.onnx_export import graph_spec, save_graph

    cfg.check()
    if manifest.dtype != "fp32":
        raise UsageError(f"--quantize needs an fp32 artifact (this one is {manifest.dtype}); export with --dtype fp32")
    if getattr(manifest, "quantization", None):
        raise InputError("this artifact is already quantized; quantize the float artifact it came from")
    wanted = [g for g in cfg.graphs if g in manifest.graphs]
    if cfg.embeddings and "embed" not in wanted:
        wanted.append("embed")
    if not wanted:
        raise UsageError(f"none of the graphs {', '.join(cfg.graphs)} is in this artifact ({', '.join(manifest.graphs)})")
    graphs = dict(manifest.graphs)
    quantized: dict[str, int] = {}
    sizes: dict[str, dict[str, int]] = {}
    for name in wanted:
        spec = graphs[name]
        model = onnx.load(str(root / spec.file), load_external_data=True)
        check_initializers(model, spec.file)
        before = _weight_bytes(model)
        model, count = quantize_model(model, cfg, manifest.model.vocab_size, name)
        after = _weight_bytes(model)
        quantized[name], sizes[name] = count, {"before": before, "after": after}
        if spec.external_data:
            (root / spec.external_data).unlink()
        (root / spec.file).unlink()
        graph = ir.from_proto(model)
        file, data = save_graph(graph, root, Path(spec.file).stem, external_threshold)
        graphs[name] = graph_spec(graph, file, data)
    tol = QuantTolerance.for_scheme(cfg.scheme)
    info = QuantInfo(
        scheme=cfg.scheme, form=cfg.form, group_size=cfg.group_size, symmetric=True, algorithm="rtn",
        accuracy_level=cfg.accuracy_level if cfg.form == "matmulnbits" else 0, graphs=tuple(wanted),
        lm_head=cfg.lm_head, embeddings=cfg.embeddings, quantized=quantized, weight_bytes=sizes,
        tolerance=dataclasses.asdict(tol),
    )
    return dataclasses.replace(manifest, graphs=graphs, quantization=info), info


@dataclass
class QuantizeResult:
    out: Path
    info: QuantInfo
    parity: dict


def quantize_artifact(artifact: Path, out: Path, cfg: QuantConfig, force: bool = False,
                      validate: bool = True) -> QuantizeResult:
    """`tokedge quantize`: copy a float artifact, quantize its graphs, re-check it against the
    fp32 transformers reference recorded at export (with the scheme's tolerance), write it."""
    from tokedge.artifact import hash_tree, open_artifact, staged_directory, write_manifest
    from tokedge.export.validate import load_reference, run_cases, tolerance_dict, tolerance_for
    from tokedge.runtime.graphs import ArtifactGraphs

    artifact, out = Path(artifact), Path(out)
    if artifact.resolve() == out.resolve():
        raise UsageError("--out must differ from the artifact: quantize writes a new artifact")
    cfg.check()
    verified = open_artifact(artifact)  # every file read once, no links followed, hashed: these bytes are copied
    manifest = verified.manifest
    with staged_directory(out, force=force, protect=(artifact,)) as stage:
        verified.write_to(stage)
        staged, info = quantize_graphs(stage, dataclasses.replace(manifest, files={}), cfg)
        pixel_values, cases = load_reference(verified.read(manifest.reference["file"]))
        tol = tolerance_for(staged.dtype, info)
        parity: dict = {"skipped": True}
        if validate:
            with ArtifactGraphs(stage, staged) as graphs:
                report = run_cases(graphs, pixel_values, cases, tol)
            report.raise_if_failed(f"quantize ({cfg.scheme}, {cfg.form})")
            parity = report.to_dict()
        reference = {**manifest.reference, "tolerance": tolerance_dict(tol), "parity_at_export": parity}
        write_manifest(stage, dataclasses.replace(staged, reference=reference, files=hash_tree(stage)))
    return QuantizeResult(out=out, info=info, parity=parity)
