"""Reading what an ONNX file refers to, without the `onnx` package (the device install has none).

A minimal protobuf walk over every place onnx.proto can hold a tensor or a graph:
ModelProto.graph (7), .functions (25) and .training_info (20); GraphProto.node (1),
.initializer (5) and .sparse_initializer (15); NodeProto.attribute (5); AttributeProto.t (5),
.g (6), .tensors (10), .graphs (11), .sparse_tensor (22), .sparse_tensors (23);
SparseTensorProto.values (1) and .indices (2); FunctionProto.node (7);
TrainingInfoProto.initialization (1) and .algorithm (2). A TensorProto's external_data (13)
entries (key 1, value 2) give the `location` of an externally stored tensor. The walk also
collects every node's op_type (NodeProto field 4), so control flow can be refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from tokedge.errors import IntegrityError

# field numbers in onnx.proto
_MODEL_GRAPH, _MODEL_TRAINING_INFO, _MODEL_FUNCTIONS = 7, 20, 25
_TRAINING_INIT, _TRAINING_ALGORITHM = 1, 2
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_FUNCTION_NODE = 7
_NODE_OP_TYPE, _NODE_ATTRIBUTE = 4, 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_MAX_DEPTH = 64  # nested subgraphs deeper than this are not something tokedge exports

# ops whose iteration count or branch comes from data; tokedge's exporter never emits them
CONTROL_FLOW = frozenset({"Loop", "Scan", "If", "SequenceMap"})


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """Yield (field_number, wire_type, value): an int for varints, else a memoryview of the bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated field")
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated field")
        yield number, wire, value


@dataclass
class OnnxScan:
    locations: list[str]  # every external-data location, in order, duplicates removed
    op_types: set[str]  # every node's op_type, in the main graph, subgraphs and functions


class _Walker:
    def __init__(self) -> None:
        self.locations: list[str] = []
        self.op_types: set[str] = set()

    def tensor(self, tensor: memoryview) -> None:
        for number, wire, value in _fields(tensor):
            if number == _TENSOR_EXTERNAL_DATA and wire == 2:
                entry = {n: bytes(v).decode("utf-8", "replace") for n, w, v in _fields(value) if w == 2}
                if entry.get(_ENTRY_KEY) == "location":
                    self.locations.append(entry.get(_ENTRY_VALUE, ""))

    def sparse(self, sparse: memoryview) -> None:
        for number, wire, value in _fields(sparse):
            if wire == 2 and number in (_SPARSE_VALUES, _SPARSE_INDICES):
                self.tensor(value)

    def node(self, node: memoryview, depth: int) -> None:
        for n, w, value in _fields(node):
            if w != 2:
                continue
            if n == _NODE_OP_TYPE:
                self.op_types.add(bytes(value).decode("utf-8", "replace"))
            elif n == _NODE_ATTRIBUTE:
                for an, aw, av in _fields(value):
                    if aw != 2:
                        continue
                    if an in (_ATTR_T, _ATTR_TENSORS):
                        self.tensor(av)
                    elif an in (_ATTR_SPARSE, _ATTR_SPARSES):
                        self.sparse(av)
                    elif an in (_ATTR_G, _ATTR_GRAPHS):
                        self.graph(av, depth + 1)

    def graph(self, graph: memoryview, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            raise ValueError("subgraphs nested too deeply")
        for number, wire, value in _fields(graph):
            if wire != 2:
                continue
            if number == _GRAPH_INITIALIZER:
                self.tensor(value)
            elif number == _GRAPH_SPARSE_INITIALIZER:
                self.sparse(value)
            elif number == _GRAPH_NODE:
                self.node(value, depth)

    def model(self, model: memoryview) -> None:
        for number, wire, value in _fields(model):
            if wire != 2:
                continue
            if number == _MODEL_GRAPH:
                self.graph(value)
            elif number == _MODEL_FUNCTIONS:
                for n, w, v in _fields(value):
                    if n == _FUNCTION_NODE and w == 2:
                        self.node(v, 1)
            elif number == _MODEL_TRAINING_INFO:
                for n, w, v in _fields(value):
                    if n in (_TRAINING_INIT, _TRAINING_ALGORITHM) and w == 2:
                        self.graph(v, 1)


def scan_onnx(data: bytes, name: str) -> OnnxScan:
    """Every external-data location and op type in the ONNX file `name` (its bytes)."""
    walker = _Walker()
    try:
        walker.model(memoryview(data))
    except ValueError as exc:
        raise IntegrityError(f"{name} is not a readable ONNX file ({exc}); re-export the artifact") from None
    return OnnxScan(locations=list(dict.fromkeys(walker.locations)), op_types=walker.op_types)


def external_data_locations(data: bytes, name: str) -> list[str]:
    """Every external-data `location` the ONNX file `name` (its bytes) names, duplicates removed."""
    return scan_onnx(data, name).locations
