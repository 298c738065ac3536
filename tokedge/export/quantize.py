"""Weight-only quantization of an artifact's linear layers (`--quantize int4|int8`).

Block-wise along the input dimension K (groups of 32 by default), round-to-nearest with a zero
point per group (`--symmetric`: none) or onnxruntime's HQQ, optionally int4 with some MatMuls kept
int8 (mixed precision). Schemes, the measure that judges them and its calibration on a real
language model: docs/quantization.md. Two graph forms, because the targets differ:

- `matmulnbits` (ONNX Runtime): onnxruntime's own `MatMulNBitsQuantizer` replaces each MatMul
  with a constant weight by the `com.microsoft::MatMulNBits` contrib op. `accuracy_level` 4 lets
  the CPU kernels quantize activations to int8 per block and use VNNI/AMX dot products.
- `qdq` (TensorRT): the weight is stored as INT4/INT8 with fp32 scales and dequantized with a
  standard `DequantizeLinear(axis=0, block_size=G)` (opset 21) feeding the unchanged MatMul; zero
  points are omitted, i.e. all zero, because TensorRT rejects asymmetric ones (always symmetric). int4 comes from
  onnxruntime's quantizer in QDQ mode, int8 is written here (same scheme, 8 bits).

What is quantized is data (`QuantConfig`): the decoder and prefill graphs by default, the vision
graph on request (its first and last blocks and the projector stay float); `lm_head` (the MatMul producing the logits) and the token embeddings stay float
unless asked. The result is recorded in the manifest as `QuantInfo`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokedge.artifact import QuantInfo
from tokedge.errors import InputError, UsageError

SCHEMES = ("int4", "int8")
FORMS = ("matmulnbits", "qdq")
QUANTIZABLE_GRAPHS = ("vision", "embed", "decoder", "prefill")
QDQ_OPSET = 21
ALGORITHMS = ("rtn", "hqq")
# mixed precision: which MatMuls of an int4 graph stay int8, by the traced module names
# (`/mlp/down_proj_7/MatMul`: module, then its repeat index = the layer)
INT8_MATMULS = ("down_proj", "first", "last", "lm_head")


@dataclass(frozen=True)
class QuantConfig:
    scheme: str = "int4"  # int4 | int8
    form: str = "matmulnbits"  # matmulnbits (ONNX Runtime contrib op) | qdq (DequantizeLinear, TensorRT)
    group_size: int = 32  # weights per scale along K; a power of two >= 16 (docs/quantization.md: 32 measured best)
    graphs: tuple[str, ...] = ("decoder", "prefill")  # graphs whose MatMul weights are quantized
    # the MatMul that produces the logits: True quantizes it at the scheme's bits, False keeps it float,
    # None is the default: int8 under int4 matmulnbits (measured: same KL, 36% faster decode), float
    # otherwise (int8; and qdq, where TensorRT's block-quantized weight-only form is int4's)
    lm_head: bool | None = None
    embeddings: bool = False  # also quantize the token-embedding table (matmulnbits: GatherBlockQuantized)
    accuracy_level: int = 4  # MatMulNBits compute: 4 = int8 activations (VNNI/AMX), 0 = float
    symmetric: bool | None = None  # zero points or not; None: asymmetric for matmulnbits, symmetric for qdq
    algorithm: str = "rtn"  # rtn (round to nearest, min/max scales) | hqq (onnxruntime's HQQ: matmulnbits int4)
    int8: tuple[str, ...] = ()  # int4 mixed precision: the MatMuls these name (INT8_MATMULS) stay int8

    @property
    def bits(self) -> int:
        return 4 if self.scheme == "int4" else 8

    def resolved(self) -> QuantConfig:
        """The scheme's default for the lm_head made explicit: `lm_head` a bool, and int4's int8 lm_head
        named in `int8` (mixed precision), as the manifest records it."""
        if self.lm_head is not None:
            return self
        if self.bits == 4 and self.form == "matmulnbits":
            return dataclasses.replace(self, lm_head=False, int8=tuple(dict.fromkeys((*self.int8, "lm_head"))))
        return dataclasses.replace(self, lm_head=False)

    @property
    def is_symmetric(self) -> bool:
        return self.form == "qdq" if self.symmetric is None else self.symmetric

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
        if self.form == "qdq" and self.symmetric is False:
            raise UsageError("--quant-form qdq is symmetric only (TensorRT rejects zero points); drop --asymmetric")
        if self.algorithm not in ALGORITHMS:
            raise UsageError(f"--quant-algorithm {self.algorithm} is unknown; use one of {', '.join(ALGORITHMS)}")
        if self.algorithm == "hqq" and (self.form == "qdq" or self.bits != 4 or self.symmetric):
            raise UsageError("--quant-algorithm hqq needs int4, --quant-form matmulnbits and zero points "
                             "(HQQ fits a float zero point per group)")
        bad = [name for name in self.int8 if name not in INT8_MATMULS]
        if bad:
            raise UsageError(f"--int8-matmuls: unknown '{bad[0]}'; choose from {', '.join(INT8_MATMULS)}")
        if "lm_head" in self.int8 and self.lm_head is not None:
            raise UsageError("--int8-matmuls lm_head keeps the lm_head at int8; drop "
                             f"{'--quantize-lm-head' if self.lm_head else '--float-lm-head'}")
        if self.int8 and self.bits != 4:
            raise UsageError("--int8-matmuls keeps some int4 MatMuls at int8; it needs --quantize int4")


@dataclass(frozen=True)
class QuantTolerance:
    """What a quantized artifact must reach, calibrated on a real language model (SmolLM2-135M in a
    LLaVA checkpoint; measurements and reasoning in docs/quantization.md): the image prompts' mean
    KL from the fp32 transformers reference, and the text measure against the fp32 artifact (mean
    and p99 KL per token, top-1 agreement). The int4 bounds catch a broken or crude quantization
    (symmetric g128 RTN fails them) while passing the int4 cost a 135M model pays with any fast
    scheme; int8 bounds are an order of magnitude tighter."""

    kl_mean: float  # image prompts: mean KL (nats) of their prefill and decode logits rows
    text_kl_mean: float
    text_kl_p99: float
    text_top1: float

    @classmethod
    def for_scheme(cls, scheme: str) -> QuantTolerance:
        if scheme == "int4":  # measured (default, int4 g32 zero points): 0.59, 0.273, 1.02, 68.8%
            return cls(kl_mean=1.0, text_kl_mean=0.35, text_kl_p99=1.5, text_top1=0.60)
        # int8 (measured, g32 zero points: 0.004, 0.003, 0.014, 96.4%)
        return cls(kl_mean=0.5, text_kl_mean=0.02, text_kl_p99=0.1, text_top1=0.90)


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

    cfg = cfg.resolved()

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
    if graph == "vision":  # the tower's first and last blocks (and the projector) stay float: measured
        exclude |= _int8_nodes(model.graph, ("first", "last"))  # on the real LM, the image tokens move less
    int8: set[str] = set()
    if cfg.bits == 4 and not gather:  # int4 mixed precision: these MatMuls at int8
        int8 = _int8_nodes(model.graph, cfg.int8) - exclude
        if head is not None and "lm_head" in cfg.int8:  # int4 body, int8 logits
            exclude.discard(head)
            int8.add(head)
    ops = ("Gather",) if gather else ("MatMul",)
    if cfg.form == "qdq" and cfg.bits == 8:
        count = _int8_qdq(model, cfg.group_size, exclude)
        model.ir_version = max(model.ir_version, 10)
        return model, count
    model = _nbits(model, cfg, cfg.bits, ops, exclude=exclude | int8, algorithm=cfg.algorithm)
    if int8 and cfg.form == "qdq":
        _int8_qdq(model, cfg.group_size, {n.name for n in model.graph.node if n.name not in int8})
        model.ir_version = max(model.ir_version, 10)
    elif int8:
        model = _nbits(model, cfg, 8, ops, exclude=exclude, include=int8, algorithm="rtn")
    marker = ("MatMulNBits", "GatherBlockQuantized") if cfg.form == "matmulnbits" else ("DequantizeLinear",)
    count = sum(1 for n in model.graph.node if n.op_type in marker)
    return model, count


def _nbits(model, cfg: QuantConfig, bits: int, ops: tuple[str, ...], exclude: set[str], algorithm: str,
           include: set[str] | None = None):
    """One pass of onnxruntime's quantizer over `ops` (`include`: only those nodes)."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    axes = (("MatMul", 0), ("Gather", 1))
    level = cfg.accuracy_level if cfg.form == "matmulnbits" and cfg.accuracy_level else None
    algo = HQQWeightOnlyQuantConfig(block_size=cfg.group_size, bits=bits, op_types_to_quantize=ops,
                                    quant_axes=axes) if algorithm == "hqq" else None
    quantizer = MatMulNBitsQuantizer(
        model, bits=bits, block_size=cfg.group_size, is_symmetric=cfg.is_symmetric, accuracy_level=level,
        nodes_to_exclude=sorted(exclude), nodes_to_include=sorted(include) if include is not None else None,
        quant_format=QuantFormat.QDQ if cfg.form == "qdq" else QuantFormat.QOperator,
        op_types_to_quantize=ops, quant_axes=axes, algo_config=algo,
    )
    quantizer.process()
    out = quantizer.model.model
    if level is not None:  # HQQ writes its MatMulNBits without the compute level
        from onnx import helper

        for node in out.graph.node:
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                node.attribute.append(helper.make_attribute("accuracy_level", level))
    return out


def _layer(name: str, names: set[str]) -> int:
    """The repeat index the exporter gives a module's nodes (`/mlp/down_proj_7/MatMul` -> 7 when
    `/mlp/down_proj/MatMul` exists too; the first repeat, and modules that do not repeat, e.g. a
    projector's `linear_2`, -> 0): the layer, for graphs whose layers repeat the same modules."""
    match = re.search(r"^(.*)_(\d+)/MatMul$", name)
    return int(match.group(2)) if match and f"{match.group(1)}/MatMul" in names else 0


def _int8_nodes(graph, names: tuple[str, ...]) -> set[str]:
    """The MatMuls (with constant weights) that mixed precision keeps at int8."""
    if not names:
        return set()
    consts = {t.name for t in graph.initializer}
    matmuls = [n.name for n in graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in consts]
    every = set(matmuls)
    layer = {n: _layer(n, every) for n in matmuls}
    last = max(layer.values(), default=0)
    return {n for n in matmuls if ("down_proj" in names and "/down_proj" in n)
            or ("first" in names and layer[n] == 0) or ("last" in names and layer[n] == last)}


def quantize_graphs(root: Path, manifest, cfg: QuantConfig, external_threshold: int = 1 << 30):
    """Quantize the graphs of the artifact staged at `root` in place (files rewritten, graph specs
    recomputed). Returns (manifest with new graph specs and `quantization`, QuantInfo)."""
    import onnx
    import onnx_ir as ir

    from tokedge.export.onnx_export import graph_spec, save_graph

    cfg.check()
    cfg = cfg.resolved()
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
        scheme=cfg.scheme, form=cfg.form, group_size=cfg.group_size, symmetric=cfg.is_symmetric,
        algorithm=cfg.algorithm, accuracy_level=cfg.accuracy_level if cfg.form == "matmulnbits" else 0,
        graphs=tuple(wanted), lm_head=cfg.lm_head, embeddings=cfg.embeddings, quantized=quantized,
        weight_bytes=sizes, tolerance=dataclasses.asdict(tol), int8_matmuls=cfg.int8,
    )
    return dataclasses.replace(manifest, graphs=graphs, quantization=info), info


def record_text_reference(root: Path, manifest):
    """The fp32 side of the text measure (`tokedge.fidelity`), from the float graphs staged at
    `root`, saved there as `fidelity.npz`. -> (TextReference, the manifest's `reference.text`). The
    text is a prompt without images, so in-LLM pruning artifacts read it through their decoder graph
    (their prefill graph prunes image tokens only; the image prompts measure it)."""
    from tokedge import fidelity
    from tokedge.runtime.graphs import ArtifactGraphs

    plan = fidelity.TextPlan()
    ids = fidelity.text_ids((root / "tokenizer.json").read_text(encoding="utf-8"), plan)
    with ArtifactGraphs(root, manifest) as graphs:
        ref = fidelity.record_reference(graphs, ids, plan.context)
    ref.save(root / fidelity.FIDELITY_FILE)
    return ref, {"file": fidelity.FIDELITY_FILE, "text": fidelity.EVAL_TEXT, "rows": plan.rows,
                 "context": plan.context, "steps": plan.steps, "top_k": fidelity.TOP_K}


def fidelity_record(report) -> dict[str, float]:
    """The manifest's `quantization.fidelity`: the text measure and the image prompts' KL of a
    validation report (`ParityReport`)."""
    out: dict[str, float] = {}
    if report.text is not None:
        t = report.text
        out.update(text_tokens=t["tokens"], text_kl_mean=t["kl_mean"], text_kl_p99=t["kl_p99"],
                   text_kl_max=t["kl_max"], text_top1=t["top1"], ppl_fp32=t["ppl_reference"], ppl=t["ppl"],
                   ppl_change=t["ppl_change"])
    if report.cases:
        out.update(image_kl_mean=round(float(np.mean([c.kl_mean for c in report.cases])), 6),
                   image_kl_max=max(c.kl_max for c in report.cases),
                   image_top1=round(float(np.mean([c.top1_agreement for c in report.cases])), 4))
    return out


@dataclass
class QuantizeResult:
    out: Path
    info: QuantInfo
    parity: dict


def quantize_artifact(artifact: Path, out: Path, cfg: QuantConfig, force: bool = False,
                      validate: bool = True) -> QuantizeResult:
    """`tokedge quantize`: copy a float artifact, quantize its graphs, measure it against the fp32
    artifact (the text measure) and the fp32 transformers reference recorded at export (the image
    prompts), judge it with the scheme's tolerance (not on random weights), write it."""
    from tokedge.artifact import hash_tree, open_artifact, staged_directory, write_manifest
    from tokedge.export.validate import load_reference, run_cases, tolerance_dict, tolerance_for
    from tokedge.fidelity import measure
    from tokedge.runtime.graphs import ArtifactGraphs

    artifact, out = Path(artifact), Path(out)
    if artifact.resolve() == out.resolve():
        raise UsageError("--out must differ from the artifact: quantize writes a new artifact")
    cfg.check()
    verified = open_artifact(artifact)  # every file read once, no links followed, hashed: these bytes are copied
    manifest = verified.manifest
    with staged_directory(out, force=force, protect=(artifact,)) as stage:
        verified.write_to(stage)
        text_ref, text_record = record_text_reference(stage, manifest) if validate else (None, None)
        staged, info = quantize_graphs(stage, dataclasses.replace(manifest, files={}), cfg)
        pixel_values, cases = load_reference(verified.read(manifest.reference["file"]))
        tol = tolerance_for(staged.dtype, info, gated=manifest.weights is None)
        parity: dict = {"skipped": True}
        if validate:
            with ArtifactGraphs(stage, staged) as graphs:
                report = run_cases(graphs, pixel_values, cases, tol)
                if text_ref is not None:
                    report = dataclasses.replace(report, text=measure(graphs, text_ref).to_dict())
            report.raise_if_failed(f"quantize ({cfg.scheme}, {cfg.form})")
            parity = report.to_dict()
            info = dataclasses.replace(info, fidelity=fidelity_record(report))
        reference = {**manifest.reference, "tolerance": tolerance_dict(tol), "parity_at_export": parity}
        if text_record is not None:
            reference["text"] = text_record
        staged = dataclasses.replace(staged, quantization=info, reference=reference)
        write_manifest(stage, dataclasses.replace(staged, files=hash_tree(stage)))
    return QuantizeResult(out=out, info=info, parity=parity)
