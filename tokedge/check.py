"""`tokedge check`: a static check, no GPU needed, of every graph in an artifact against what a
TensorRT family's ONNX parser accepts (tokedge/data/trt_onnx_ops.toml): operators and domains,
opset, TopK k <= 3840, and tensor data types. Names each offending node."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from tokedge.errors import UsageError

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
    return node.op_type == "DequantizeLinear" and "block_size" in node.ints


def _check_dequantize(node, view, graph_name: str, name: str, rules: dict, report: CheckReport,
                      external: dict[str, bytes]) -> None:
    """TensorRT's dequantize layer takes symmetric quantization only: a zero point, when given,
    must be a constant of zeros."""
    zp = node.input(2)
    if zp is None:
        return
    const = view.const(zp)
    if const is None:
        report.findings.append(Finding(graph_name, name, "DequantizeLinear", f"zero point '{zp}' is not a constant; "
                                       f"{rules['name']} needs symmetric quantization (zero points all zero)"))
        return
    values = const.numpy(external).reshape(-1)
    nonzero = int((values != 0).sum())
    if nonzero:
        report.findings.append(Finding(
            graph_name, name, "DequantizeLinear",
            f"asymmetric zero point '{zp}' ({nonzero} of {values.size} values non-zero, e.g. "
            f"{values[values != 0][0]}); {rules['name']} accepts only zero (symmetric) zero points: "
            "re-quantize with `tokedge quantize --quant-form qdq` (symmetric)"))


def check_model(view, graph_name: str, rules: dict, report: CheckReport,
                external: dict[str, bytes] | None = None) -> None:
    """`view` is a `tokedge.onnx_graph.GraphView` (read without onnx or onnx-ir, so that the check
    runs on a device install); appends findings for every node and value that fails."""
    external = external or {}
    opset = view.opsets.get("", 0)
    block_dq = any(_is_block_dq(n) for n in view.nodes)
    if opset > rules["max_opset"] and not (block_dq and opset <= rules["block_dq_opset"]):
        report.findings.append(Finding(graph_name, "<model>", "opset", f"default-domain opset {opset} is above "
                                       f"{rules['max_opset']}, the newest {rules['name']} parses"))
    for node in view.nodes:
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
            _check_dequantize(node, view, graph_name, name, rules, report, external)
        if node.op_type not in rules["supported"]:
            report.findings.append(Finding(graph_name, name, node.op_type, f"not supported by {rules['name']}'s ONNX parser"))
            continue
        if node.op_type == "TopK" and node.input(1) is not None:
            const_k = view.const(node.input(1))
            k = int(const_k.numpy(external).reshape(-1)[0]) if const_k is not None else None
            if k is not None and k > rules["max_k"]:
                report.findings.append(Finding(graph_name, name, "TopK", f"k = {k} is above "
                                               f"TensorRT's limit of {rules['max_k']}"))
        weights = ({v for v in (node.input(0), node.input(2)) if v is not None and v in view.initializers}
                   if _is_block_dq(node) else set())
        for value in [*node.inputs, *node.outputs]:
            dtype = view.dtypes.get(value) if value else None
            if dtype is None:
                continue
            if value in weights and dtype in rules["weight_only_dtypes"]:
                continue  # a block-quantized constant weight: the weight-only form TensorRT takes
            if dtype in rules["dtypes"]:
                report.findings.append(Finding(graph_name, name, node.op_type,
                                               f"tensor '{value}' has dtype {dtype}, "
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
    """Check the graphs of an artifact as they were verified (`open_artifact`: hashes, links,
    limits), from those bytes: the files are not read again by path."""
    from tokedge.artifact import open_artifact
    from tokedge.onnx_graph import read_graph

    rules = _rules(target)
    verified = open_artifact(Path(artifact))
    manifest = verified.manifest
    report = CheckReport(target=target)
    for name, spec in manifest.graphs.items():
        model, external = verified.graph_bytes(name)
        check_model(read_graph(model, spec.file), name, rules, report, external)
    check_plans(manifest, target, report, profiles)
    return report
