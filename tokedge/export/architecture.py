"""The manifest's `architecture` record, filled in export's writing stage (one call: the graphs are
final, quantized or not): exact parameter counts of every written graph, counted from its ONNX
initializers, and the vision/text numbers memory and FLOPs read (`tokedge.architecture`).

What counts as a parameter (docs/artifact.md, "architecture"): every floating-point initializer
with more than one element, except the scales of quantized weights; every quantized weight
(MatMulNBits, GatherBlockQuantized, or an integer initializer feeding DequantizeLinear) at its
logical size. Integer index constants, zero points and scalars are left out. `other_bytes` is the
size of each graph's files with those weights and scales taken out (the serialized graph with
their data cleared): nodes, names and small constants.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

from tokedge.artifact import GraphParameters, GraphSpec, Manifest

FLOAT_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16
PACKED_4BIT = 4  # MatMulNBits / GatherBlockQuantized default bits


def _numel(tensor) -> int:
    return math.prod(tensor.dims) if len(tensor.dims) else 1


def _attr(node, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def count_graph(root: Path, spec: GraphSpec) -> GraphParameters:
    """Parameters of one written graph (its weights are never loaded: counts come from the dims)."""
    import onnx

    model = onnx.load(str(Path(root) / spec.file), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    quantized = padded = groups = eight = 0
    counted: set[str] = set()
    scales: set[str] = set()
    for node in model.graph.node:
        ins = list(node.input)
        if node.op_type == "MatMulNBits" and len(ins) > 2 and ins[1] in inits:
            k, n, block = _attr(node, "K", 0), _attr(node, "N", 0), _attr(node, "block_size", 32)
            blocks = -(-k // block)
            quantized, padded, groups = quantized + k * n, padded + n * blocks * block, groups + n * blocks
            eight += k * n if _attr(node, "bits", PACKED_4BIT) == 8 else 0
            counted.add(ins[1])
            scales.add(ins[2])
        elif node.op_type == "GatherBlockQuantized" and len(ins) > 2 and ins[0] in inits:
            data = inits[ins[0]]
            bits = _attr(node, "bits", PACKED_4BIT)
            logical = _numel(data) * (8 // bits if data.data_type == 2 else 1)  # uint8 holds 8/bits weights
            quantized, padded, groups = quantized + logical, padded + logical, groups + _numel(inits[ins[2]])
            eight += logical if bits == 8 else 0
            counted.add(ins[0])
            scales.add(ins[2])
        elif node.op_type == "DequantizeLinear" and len(ins) > 1 and ins[0] in inits \
                and inits[ins[0]].data_type not in FLOAT_TYPES:
            logical = _numel(inits[ins[0]])
            quantized, padded = quantized + logical, padded + logical
            eight += logical if inits[ins[0]].data_type in (2, 3) else 0  # UINT8, INT8 (int4: 21, 22)
            groups += _numel(inits[ins[1]]) if ins[1] in inits else 0
            counted.add(ins[0])
            scales.add(ins[1])
    floats = 0
    for name, t in inits.items():
        if name in counted or name in scales or t.data_type not in FLOAT_TYPES or not len(t.dims) or _numel(t) < 2:
            continue
        floats += _numel(t)
        counted.add(name)
    for name in counted | scales:  # what stays is the graph's structure
        t = inits.get(name)
        if t is None:
            continue
        for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
            t.ClearField(field)
        if t.data_location == onnx.TensorProto.EXTERNAL:
            t.ClearField("external_data")
            t.data_location = onnx.TensorProto.DEFAULT
    return GraphParameters(parameters=floats + quantized, quantized=quantized, scale_groups=groups,
                           padded=padded, other_bytes=model.ByteSize(), int8=eight)


def record_architecture(root: Path, manifest: Manifest, config: dict) -> Manifest:
    """`manifest` with its architecture record: each written graph counted, the vision/text numbers
    read from the checkpoint's config (`config`: the transformers config as a dict) and the
    manifest's own layout (pixel range) and ToMe merge schedule."""
    from tokedge.architecture import from_config, vision_architecture
    from tokedge.layouts import image_layout_class

    layout = manifest.layout
    resizes = image_layout_class(layout.kind).takes_max_pixels  # images resized inside a pixel range
    processor = {"min_pixels": layout.min_pixels, "max_pixels": layout.max_pixels} if resizes else {}
    if layout.longest_edge:  # split tiles: the processor's longest edge and splitting, as recorded
        processor = {"longest_edge": layout.longest_edge, "do_image_splitting": layout.split_image}
    if layout.min_tiles:  # aspect tiles: the processor's tile range, as recorded
        processor = {"min_tiles": layout.min_tiles, "max_tiles": layout.max_tiles}
    geometry = from_config(config, processor, source=manifest.model.source)
    vision = geometry.architecture.vision
    tokens = vision.layer_tokens[0] if vision.layer_tokens else 0
    vc = config.get("vision_config") or {}
    vision = vision_architecture(vc, geometry.model.vision_model_type, vision.layers, vision.projector,
                                 vision.patches_per_token, tokens, manifest.reduction.merge_schedule)
    graphs = {name: count_graph(root, spec) for name, spec in manifest.graphs.items()}
    arch = replace(geometry.architecture, graphs=graphs, vision=vision, counted="onnx-initializers")
    return replace(manifest, architecture=arch)


def recount_graphs(root: Path, manifest: Manifest) -> Manifest:
    """`manifest` with its record's graph counts redone from the graphs now in `root`: for commands
    that rewrite an artifact's graphs (`tokedge quantize`, `tokedge optimize`), so the record
    describes what they wrote. Manifests without a record are returned unchanged."""
    if manifest.architecture is None:
        return manifest
    graphs = {name: count_graph(root, spec) for name, spec in manifest.graphs.items()}
    return replace(manifest, architecture=replace(manifest.architecture, graphs=graphs))
