"""Reading what an ONNX file refers to, without the `onnx` package (the device install has none).

A minimal protobuf walk: ModelProto.graph (7) -> GraphProto.initializer (5) and node (1) ->
attribute (5) tensors / subgraphs; TensorProto.external_data (13) entries (key 1, value 2) give the
`location` of each externally stored tensor. Enough to confine external data to the artifact.
"""

from __future__ import annotations


from tokedge.errors import IntegrityError

# field numbers in onnx.proto
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER = 1, 5
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_TENSOR_EXTERNAL_DATA = 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


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


def _fields(buf: memoryview):
    """Yield (field_number, wire_type, value) where value is a memoryview for length-delimited."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = None, pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise ValueError("truncated field")
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = None, pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def _tensor_locations(tensor: memoryview, out: list[str]) -> None:
    for number, wire, value in _fields(tensor):
        if number == _TENSOR_EXTERNAL_DATA and wire == 2:
            entry = {n: bytes(v).decode("utf-8", "replace") for n, w, v in _fields(value) if w == 2}
            if entry.get(_ENTRY_KEY) == "location":
                out.append(entry.get(_ENTRY_VALUE, ""))


def _graph_locations(graph: memoryview, out: list[str]) -> None:
    for number, wire, value in _fields(graph):
        if wire != 2:
            continue
        if number == _GRAPH_INITIALIZER:
            _tensor_locations(value, out)
        elif number == _GRAPH_NODE:
            for n, w, attr in _fields(value):
                if n != _NODE_ATTRIBUTE or w != 2:
                    continue
                for an, aw, av in _fields(attr):
                    if aw == 2 and an in (_ATTR_T, _ATTR_TENSORS):
                        _tensor_locations(av, out)
                    elif aw == 2 and an in (_ATTR_G, _ATTR_GRAPHS):
                        _graph_locations(av, out)


def external_data_locations(data: bytes, name: str) -> list[str]:
    """Every external-data `location` the ONNX file `name` (its bytes) names, duplicates removed."""
    try:
        buf = memoryview(data)
        found: list[str] = []
        for number, wire, value in _fields(buf):
            if number == _MODEL_GRAPH and wire == 2:
                _graph_locations(value, found)
    except ValueError as exc:
        raise IntegrityError(f"{name} is not a readable ONNX file ({exc}); re-export the artifact") from None
    return list(dict.fromkeys(found))
