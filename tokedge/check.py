"""`tokedge check`: a static check, no GPU needed, of every graph in an artifact against what a
TensorRT family's ONNX parser accepts (tokedge/data/trt_onnx_ops.toml): operators and domains,
opset, TopK k <= 3840, and tensor data types. Names each offending node."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from tokedge.artifact import load_artifact
from tokedge.errors import MissingDependencyError, UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib  # pyright: ignore[reportMissingImports]

TARGETS = {"trt-10.3": "trt-10_3", "trt-11": "trt-11"}
DATA = Path(__file__).parent / "data" / "trt_onnx_ops.toml"


@dataclass(frozen=True)
class Finding:
    graph: str
    node: str
    op: str
    problem: str

    def line(self) -> str:
        if self.op == "profile":  # an engine plan, not a node
            return f"engine plan for profile {self.node}: {self.problem}"
        return f"{self.graph}: node '{self.node}' ({self.op}): {self.problem}"


@dataclass
class CheckReport:
    target: str
    findings: list[Finding] = field(default_factory=list)
    nodes_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.findings


def _rules(target: str) -> dict:
    if target not in TARGETS:
        raise UsageError(f"--target {target} is unknown; use one of {', '.join(TARGETS)}")
    with open(DATA, "rb") as fh:
        data = tomllib.load(fh)
    family = data[TARGETS[target]]
    common = data["common"]
    return {
        "name": family["name"],
        "max_opset": family["max_opset"],
        "supported": set(common["supported"]) | set(family["extra_supported"]),
        "dtypes": set(common["unsupported_dtypes"]) | set(family["unsupported_dtypes"]),
        "max_k": common["max_topk_k"],
        "block_dq_opset": family.get("block_dq_opset", family["max_opset"]),
        "weight_only_dtypes": set(family.get("weight_only_dtypes", [])),
    }


def _is_block_dq(node) -> bool:
    return node.op_type == "DequantizeLinear" and node.attributes.get("block_size") is not None


def _check_dequantize(node, graph_name: str, name: str, rules: dict, report: CheckReport) -> None:
    """TensorRT's dequantize layer takes symmetric quantization only: a zero point, when given,
    must be a constant of zeros."""
    import onnx_ir as ir

    if len(node.inputs) < 3 or node.inputs[2] is None:
        return
    zp = node.inputs[2]
    const = ir.convenience.get_const_tensor(zp)
    if const is None:
        report.findings.append(Finding(graph_name, name, "DequantizeLinear", f"zero point '{zp.name}' is not a constant; "
                                       f"{rules['name']} needs symmetric quantization (zero points all zero)"))
        return
    values = const.numpy().reshape(-1)
    nonzero = int((values != 0).sum())
    if nonzero:
        report.findings.append(Finding(
            graph_name, name, "DequantizeLinear",
            f"asymmetric zero point '{zp.name}' ({nonzero} of {values.size} values non-zero, e.g. "
            f"{values[values != 0][0]}); {rules['name']} accepts only zero (symmetric) zero points: "
            "re-quantize with `tokedge quantize --quant-form qdq` (symmetric)"))


def check_model(model, graph_name: str, rules: dict, report: CheckReport) -> None:
    """`model` is an onnx_ir Model; appends findings for every node and value that fails."""
    import onnx_ir as ir

    opset = model.opset_imports.get("", 0)
    block_dq = any(_is_block_dq(n) for n in model.graph.all_nodes())
    if opset > rules["max_opset"] and not (block_dq and opset <= rules["block_dq_opset"]):
        report.findings.append(Finding(graph_name, "<model>", "opset", f"default-domain opset {opset} is above "
                                       f"{rules['max_opset']}, the newest {rules['name']} parses"))
    for node in model.graph.all_nodes():
        report.nodes_checked += 1
        name = node.name or "<unnamed>"
        if node.domain == "com.microsoft":
            report.findings.append(Finding(graph_name, name, f"{node.domain}::{node.op_type}",
                                           f"ONNX Runtime contrib op, not for {rules['name']}"
                                           + ("; quantize with --quant-form qdq for TensorRT"
                                              if node.op_type in ("MatMulNBits", "GatherBlockQuantized") else
                                              "; export without the ort-fusions pass for TensorRT")))
            continue
        if node.domain not in ("", "ai.onnx"):
            report.findings.append(Finding(graph_name, name, f"{node.domain}::{node.op_type}",
                                           f"custom-domain op; {rules['name']} needs a plugin for it"))
            continue
        if node.op_type == "DequantizeLinear":
            _check_dequantize(node, graph_name, name, rules, report)
        if node.op_type not in rules["supported"]:
            report.findings.append(Finding(graph_name, name, node.op_type, f"not supported by {rules['name']}'s ONNX parser"))
            continue
        if node.op_type == "TopK" and len(node.inputs) > 1 and node.inputs[1] is not None:
            k = ir.convenience.get_const_tensor(node.inputs[1])
            if k is not None and int(k.numpy().reshape(-1)[0]) > rules["max_k"]:
                report.findings.append(Finding(graph_name, name, "TopK", f"k = {int(k.numpy().reshape(-1)[0])} is above "
                                               f"TensorRT's limit of {rules['max_k']}"))
        weights = ({id(v) for v in (node.inputs[0], node.inputs[2] if len(node.inputs) > 2 else None)
                    if v is not None and v.const_value is not None} if _is_block_dq(node) else set())
        for value in [*node.inputs, *node.outputs]:
            if value is not None and id(value) in weights and value.dtype is not None \
                    and value.dtype.name in rules["weight_only_dtypes"]:
                continue  # a block-quantized constant weight: the weight-only form TensorRT takes
            if value is not None and value.dtype is not None and value.dtype.name in rules["dtypes"]:
                report.findings.append(Finding(graph_name, name, node.op_type,
                                               f"tensor '{value.name}' has dtype {value.dtype.name}, "
                                               f"which {rules['name']} does not take"))
                break


def target_profiles(target: str) -> list:
    """The shipped device profiles of a TensorRT family (`--target trt-10.3`: the JetPack 6 devices)."""
    from tokedge.profiles import list_profiles

    version = target.removeprefix("trt-")
    return [p for p in list_profiles().values() if p.trt_version == version]


def check_plans(manifest, target: str, report: CheckReport, profiles=None) -> None:
    """Engine planning, as `tokedge build` does it (`build.plan.plan_shapes`: one decision), for
    every device profile of the target family: a finding per profile that cannot be planned."""
    from tokedge.build.plan import plan_shapes
    from tokedge.errors import TokedgeError

    for profile in profiles if profiles is not None else target_profiles(target):
        try:
            plan_shapes(manifest, profile)
        except TokedgeError as exc:
            report.findings.append(Finding("plan", profile.name, "profile", str(exc)))


def check_artifact(artifact: Path, target: str, profiles=None) -> CheckReport:
    try:
        import onnx_ir as ir
    except ImportError:
        raise MissingDependencyError("tokedge check needs onnx-ir: pip install 'tokedge[export]'") from None
    rules = _rules(target)
    root = Path(artifact)
    manifest = load_artifact(root)
    report = CheckReport(target=target)
    for name, spec in manifest.graphs.items():
        check_model(ir.load(root / spec.file), name, rules, report)
    check_plans(manifest, target, report, profiles)
    return report
