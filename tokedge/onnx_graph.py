"""The structure of an ONNX graph, read without the `onnx` package or onnx-ir (the device install
has neither): what `tokedge check`, and through it `tokedge build`, need to know.

Read from the protobuf wire format (onnx.proto field numbers below): the default-domain opset;
every node of the main graph and its subgraphs (name, op_type, domain, input and output names,
integer attributes); the element type of every value the file types (graph inputs, outputs,
value_info, initializers, Constant outputs); and constant tensors (initializers and Constant
nodes' `value`) decoded on demand, including external data handed over as bytes. What is typed
and what is constant follows onnx-ir's reading of the same file, which a test checks value by
value on every family's exported graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tokedge.errors import IntegrityError
from tokedge.onnx_files import _fields, _varint

# onnx.proto field numbers
_MODEL_OPSET, _MODEL_GRAPH = 8, 7
_OPSET_DOMAIN, _OPSET_VERSION = 1, 2
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_VALUE_INFO = 1, 5, 11, 12, 13
_NODE_INPUT, _NODE_OUTPUT, _NODE_NAME, _NODE_OP_TYPE, _NODE_ATTRIBUTE, _NODE_DOMAIN = 1, 2, 3, 4, 5, 7
_ATTR_NAME, _ATTR_F, _ATTR_I, _ATTR_T, _ATTR_G, _ATTR_FLOATS, _ATTR_INTS, _ATTR_GRAPHS, _ATTR_TYPE = \
    1, 2, 3, 5, 6, 7, 8, 11, 20
_VALUE_NAME, _VALUE_TYPE = 1, 2
_TYPE_TENSOR, _TYPE_SPARSE = 1, 8
_TENSOR_TYPE_ELEM = 1
_T_DIMS, _T_DTYPE, _T_FLOAT, _T_INT32, _T_INT64, _T_NAME, _T_RAW, _T_DOUBLE, _T_UINT64 = 1, 2, 4, 5, 7, 8, 9, 10, 11
_T_EXTERNAL, _T_LOCATION = 13, 14
_ATTR_TYPE_INT = 2
_MAX_DEPTH = 64

# TensorProto.DataType, by number: the names onnx-ir's DataType uses
DTYPES = {
    1: "FLOAT", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64", 8: "STRING", 9: "BOOL",
    10: "FLOAT16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64", 15: "COMPLEX128", 16: "BFLOAT16",
    17: "FLOAT8E4M3FN", 18: "FLOAT8E4M3FNUZ", 19: "FLOAT8E5M2", 20: "FLOAT8E5M2FNUZ", 21: "UINT4", 22: "INT4",
    23: "FLOAT4E2M1", 24: "FLOAT8E8M0", 25: "UINT2", 26: "INT2",
}
# numpy types of the tensors whose values a check reads (zero points, TopK's k, shapes)
_NUMPY = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64, 9: np.bool_,
          10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64}
_NIBBLES = {21: False, 22: True}  # 4-bit types, two per byte, low nibble first; True: signed


@dataclass
class TensorRef:
    """A constant tensor in the file, decoded only when its values are asked for."""

    name: str
    dtype: int
    dims: tuple[int, ...]
    raw: memoryview | None = None
    ints: list[int] | None = None  # int32_data / int64_data / uint64_data
    floats: list[float] | None = None
    external: dict[str, str] | None = None

    @property
    def dtype_name(self) -> str:
        return DTYPES.get(self.dtype, f"UNKNOWN({self.dtype})")

    def numpy(self, external_bytes: dict[str, bytes] | None = None) -> np.ndarray:
        count = int(np.prod(self.dims, dtype=np.int64)) if self.dims else 1
        raw = self.raw
        if self.external is not None:
            location = self.external.get("location", "")
            blob = (external_bytes or {}).get(location)
            if blob is None:
                raise IntegrityError(f"tensor '{self.name}' is stored in '{location}', which was not provided")
            offset = int(self.external.get("offset", 0))
            length = int(self.external.get("length", len(blob) - offset))
            raw = memoryview(blob)[offset:offset + length]
        if self.dtype in _NIBBLES:
            packed = np.frombuffer(raw, dtype=np.uint8) if raw is not None else \
                np.asarray(self.ints or [], dtype=np.int64).astype(np.uint8)
            values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(-1)[:count].astype(np.int8)
            if _NIBBLES[self.dtype]:
                values = np.where(values > 7, values - 16, values).astype(np.int8)
            return values.reshape(self.dims)
        if self.dtype not in _NUMPY:
            raise IntegrityError(f"tensor '{self.name}' has type {self.dtype_name}, which tokedge does not decode")
        kind = _NUMPY[self.dtype]
        if raw is not None:
            return np.frombuffer(raw, dtype=np.dtype(kind).newbyteorder("<")).reshape(self.dims).astype(kind)
        if self.floats is not None:
            return np.asarray(self.floats, dtype=kind).reshape(self.dims)
        values = np.asarray(self.ints or [], dtype=np.int64)
        if self.dtype == 10:  # float16 values travel as their bit patterns in int32_data
            return values.astype(np.uint16).view(np.float16).reshape(self.dims)
        return values.astype(kind).reshape(self.dims)


@dataclass
class Node:
    name: str
    op_type: str
    domain: str
    inputs: list[str]  # "" for an omitted optional input
    outputs: list[str]
    ints: dict[str, int] = field(default_factory=dict)  # integer attributes
    value: TensorRef | None = None  # a Constant node's `value` attribute

    def input(self, index: int) -> str | None:
        """The index-th input's name, None when absent or omitted."""
        return self.inputs[index] if index < len(self.inputs) and self.inputs[index] else None


@dataclass
class GraphView:
    opsets: dict[str, int]
    nodes: list[Node]  # main graph, then each subgraph's, in file order
    dtypes: dict[str, str]  # value name -> element type name, where the file states it
    initializers: dict[str, TensorRef]
    constants: dict[str, TensorRef]  # Constant outputs -> their value

    def const(self, name: str | None) -> TensorRef | None:
        """The constant behind a value: an initializer or a Constant node's output."""
        if not name:
            return None
        return self.initializers.get(name) or self.constants.get(name)


def _text(value) -> str:
    return bytes(value).decode("utf-8", "replace")


def _packed_ints(wire: int, value) -> list[int]:
    if wire == 0:
        return [value]
    out, pos = [], 0
    while pos < len(value):
        number, pos = _varint(value, pos)
        out.append(number)
    return out


def _signed64(values: list[int]) -> list[int]:
    return [v - (1 << 64) if v >= 1 << 63 else v for v in values]


def _tensor(buf) -> TensorRef:
    name, dtype, dims, raw, ints, floats, external, location = "", 0, [], None, None, None, {}, 0
    for number, wire, value in _fields(buf):
        if number == _T_DIMS:
            dims.extend(_signed64(_packed_ints(wire, value)))
        elif number == _T_DTYPE and wire == 0:
            dtype = value
        elif number == _T_NAME and wire == 2:
            name = _text(value)
        elif number == _T_RAW and wire == 2:
            raw = value
        elif number in (_T_INT32, _T_INT64, _T_UINT64) and wire in (0, 2):
            ints = (ints or []) + (_packed_ints(wire, value) if number == _T_UINT64 else
                                   _signed64(_packed_ints(wire, value)))
        elif number in (_T_FLOAT, _T_DOUBLE) and wire in (1, 2, 5):
            kind = "<f4" if number == _T_FLOAT else "<f8"
            floats = (floats or []) + np.frombuffer(value, dtype=kind).tolist()
        elif number == _T_EXTERNAL and wire == 2:
            entry = {n: _text(v) for n, w, v in _fields(value) if w == 2}
            external[entry.get(1, "")] = entry.get(2, "")
        elif number == _T_LOCATION and wire == 0:
            location = value
    if dtype in (10, 21, 22) and ints is not None:  # float16 / 4-bit: bit patterns, not signed values
        ints = [v & 0xFFFFFFFF for v in ints]
    return TensorRef(name=name, dtype=dtype, dims=tuple(dims), raw=raw, ints=ints, floats=floats,
                     external=external if location == 1 else None)


def _value_info(buf) -> tuple[str, int | None]:
    name, elem = "", None
    for number, wire, value in _fields(buf):
        if number == _VALUE_NAME and wire == 2:
            name = _text(value)
        elif number == _VALUE_TYPE and wire == 2:
            for tn, tw, tv in _fields(value):
                if tn in (_TYPE_TENSOR, _TYPE_SPARSE) and tw == 2:
                    for en, ew, ev in _fields(tv):
                        if en == _TENSOR_TYPE_ELEM and ew == 0 and ev:
                            elem = ev
    return name, elem


class _Reader:
    def __init__(self) -> None:
        self.view = GraphView(opsets={}, nodes=[], dtypes={}, initializers={}, constants={})

    def node(self, buf, depth: int) -> None:
        node = Node(name="", op_type="", domain="", inputs=[], outputs=[])
        subgraphs = []
        for number, wire, value in _fields(buf):
            if wire != 2:
                continue
            if number == _NODE_INPUT:
                node.inputs.append(_text(value))
            elif number == _NODE_OUTPUT:
                node.outputs.append(_text(value))
            elif number == _NODE_NAME:
                node.name = _text(value)
            elif number == _NODE_OP_TYPE:
                node.op_type = _text(value)
            elif number == _NODE_DOMAIN:
                node.domain = _text(value)
            elif number == _NODE_ATTRIBUTE:
                name, integer, kind, tensor, ints, floats, single = "", None, None, None, [], [], None
                for an, aw, av in _fields(value):
                    if an == _ATTR_NAME and aw == 2:
                        name = _text(av)
                    elif an == _ATTR_I and aw == 0:
                        integer = _signed64([av])[0]
                    elif an == _ATTR_INTS and aw in (0, 2):
                        ints.extend(_signed64(_packed_ints(aw, av)))
                    elif an == _ATTR_F and aw == 5:
                        single = float(np.frombuffer(av, "<f4")[0])
                    elif an == _ATTR_FLOATS and aw in (2, 5):
                        floats.extend(np.frombuffer(av, "<f4").tolist())
                    elif an == _ATTR_TYPE and aw == 0:
                        kind = av
                    elif an == _ATTR_T and aw == 2:
                        tensor = _tensor(av)
                    elif an in (_ATTR_G, _ATTR_GRAPHS) and aw == 2:
                        subgraphs.append(av)
                if integer is not None and kind in (None, _ATTR_TYPE_INT):
                    node.ints[name] = integer
                if tensor is not None and name == "value":
                    node.value = tensor
                elif name == "value_int" and integer is not None:  # Constant's other value forms
                    node.value = TensorRef(name=name, dtype=7, dims=(), ints=[integer])
                elif name == "value_ints":
                    node.value = TensorRef(name=name, dtype=7, dims=(len(ints),), ints=ints)
                elif name == "value_float" and single is not None:
                    node.value = TensorRef(name=name, dtype=1, dims=(), floats=[single])
                elif name == "value_floats":
                    node.value = TensorRef(name=name, dtype=1, dims=(len(floats),), floats=floats)
        self.view.nodes.append(node)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.value is not None and node.outputs:
            self.view.constants[node.outputs[0]] = node.value
            self.view.dtypes.setdefault(node.outputs[0], node.value.dtype_name)
        for graph in subgraphs:
            self.graph(graph, depth + 1)

    def graph(self, buf, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            raise ValueError("subgraphs nested too deeply")
        nodes = []
        for number, wire, value in _fields(buf):
            if wire != 2:
                continue
            if number == _GRAPH_NODE:
                nodes.append(value)
            elif number == _GRAPH_INITIALIZER:
                tensor = _tensor(value)
                self.view.initializers[tensor.name] = tensor
                self.view.dtypes[tensor.name] = tensor.dtype_name
            elif number in (_GRAPH_INPUT, _GRAPH_OUTPUT, _GRAPH_VALUE_INFO):
                name, elem = _value_info(value)
                if elem is not None:
                    self.view.dtypes[name] = DTYPES.get(elem, f"UNKNOWN({elem})")
        for node in nodes:
            self.node(node, depth)

    def model(self, buf) -> None:
        for number, wire, value in _fields(buf):
            if number == _MODEL_OPSET and wire == 2:
                domain, version = "", 0
                for n, w, v in _fields(value):
                    if n == _OPSET_DOMAIN and w == 2:
                        domain = _text(v)
                    elif n == _OPSET_VERSION and w == 0:
                        version = v
                self.view.opsets["" if domain == "ai.onnx" else domain] = version
            elif number == _MODEL_GRAPH and wire == 2:
                self.graph(value)


def read_graph(data: bytes, name: str) -> GraphView:
    """The structure of the ONNX file `name` from its bytes; a one-line IntegrityError if unreadable."""
    reader = _Reader()
    try:
        reader.model(memoryview(data))
    except ValueError as exc:
        raise IntegrityError(f"{name} is not a readable ONNX file ({exc}); re-export the artifact") from None
    return reader.view
