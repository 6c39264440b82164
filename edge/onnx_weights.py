"""Read the initializers of an ONNX file one tensor at a time, without parsing the whole model.

`onnx.load` materialises the entire ModelProto (a 1 B model's calibration graph is ~2 GB) and the
caller then copies every tensor out of it: the load peak is twice the weights, far above what a
lean training step needs. This reader walks the protobuf wire format instead (ModelProto.graph = 7,
GraphProto.initializer = 5, TensorProto: dims = 1, data_type = 2, name = 8, raw_data = 9,
external_data = 13, data_location = 14; onnx.proto3) and reads each tensor's bytes straight into
its own numpy array, so the peak is the weights kept plus one small header at a time. Tensors
without `raw_data` (rare: small constants) fall back to onnx's own parser for that tensor only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from io import BufferedReader
from pathlib import Path
from typing import BinaryIO

import numpy as np

from alignfed.errors import BundleError

# TensorProto.DataType -> numpy dtype (the types an exported bundle holds)
_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 6: np.int32, 7: np.int64, 10: np.float16, 11: np.float64}
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_T_DIMS, _T_TYPE, _T_NAME, _T_RAW, _T_EXTERNAL, _T_LOCATION = 1, 2, 8, 9, 13, 14


def _varint(f: BinaryIO) -> int:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            raise EOFError
        result |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return result
        shift += 7


def _skip(f: BinaryIO, wire: int) -> None:
    if wire == 0:
        _varint(f)
    elif wire == 1:
        f.seek(8, 1)
    elif wire == 2:
        f.seek(_varint(f), 1)
    elif wire == 5:
        f.seek(4, 1)
    else:
        raise ValueError(f"unsupported protobuf wire type {wire}")


def _fields(f: BinaryIO, end: int) -> Iterator[tuple[int, int]]:
    """(field number, wire type) of each field until byte `end`; the caller reads or skips the value."""
    while f.tell() < end:
        try:
            key = _varint(f)
        except EOFError:
            return
        yield key >> 3, key & 7


def _read_into(f: BinaryIO | BufferedReader, arr: np.ndarray) -> int:
    """Fill `arr` (C-contiguous) from the file's current position; returns the bytes read."""
    return int(f.readinto(arr.reshape(-1).view(np.uint8).data))  # type: ignore[union-attr]


def _string_pairs(f: BinaryIO, end: int) -> tuple[str, str]:
    key = value = ""
    for field, wire in _fields(f, end):
        if wire == 2 and field in (1, 2):
            text = f.read(_varint(f)).decode()
            key, value = (text, value) if field == 1 else (key, text)
        else:
            _skip(f, wire)
    return key, value


def _tensor(f: BinaryIO, end: int, path: Path, want: Callable[[str], bool]) -> tuple[str, np.ndarray] | None:
    start = f.tell()
    dims: list[int] = []
    dtype = 0
    name = ""
    raw: tuple[int, int] | None = None
    external: dict[str, str] = {}
    location = 0
    for field, wire in _fields(f, end):
        if field == _T_DIMS and wire == 0:
            dims.append(_varint(f))
        elif field == _T_DIMS and wire == 2:  # packed
            n = _varint(f)
            stop = f.tell() + n
            while f.tell() < stop:
                dims.append(_varint(f))
        elif field == _T_TYPE and wire == 0:
            dtype = _varint(f)
        elif field == _T_NAME and wire == 2:
            name = f.read(_varint(f)).decode()
        elif field == _T_RAW and wire == 2:
            n = _varint(f)
            raw = (f.tell(), n)
            f.seek(n, 1)
        elif field == _T_EXTERNAL and wire == 2:
            n = _varint(f)
            k, v = _string_pairs(f, f.tell() + n)
            external[k] = v
        elif field == _T_LOCATION and wire == 0:
            location = _varint(f)
        else:
            _skip(f, wire)
    f.seek(end)
    if not want(name):
        return None
    if dtype not in _DTYPES or (raw is None and location != 1):  # no raw bytes: let onnx decode it
        from onnx import TensorProto, numpy_helper

        f.seek(start)
        arr = numpy_helper.to_array(TensorProto.FromString(f.read(end - start)))
        f.seek(end)
        return name, arr
    arr = np.empty(dims, dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<"))
    if location == 1:  # EXTERNAL: location / offset / length in a file beside the model
        src, offset = path.parent / external["location"], int(external.get("offset", "0"))
        with open(src, "rb") as ext:
            ext.seek(offset)
            got = _read_into(ext, arr)
    else:
        assert raw is not None
        f.seek(raw[0])
        got = _read_into(f, arr)
        f.seek(end)
    if got != arr.nbytes:
        raise BundleError(f"{path}: initializer {name!r} expected {arr.nbytes} bytes, read {got}")
    return name, arr


def read_initializers(path: Path, want: Callable[[str], bool] = lambda _: True) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) of each initializer of the ONNX model at `path` that `want(name)` accepts."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: ONNX model not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        for field, wire in _fields(f, size):
            if field != _MODEL_GRAPH or wire != 2:
                _skip(f, wire)
                continue
            n = _varint(f)
            graph_end = f.tell() + n
            for gfield, gwire in _fields(f, graph_end):
                if gfield != _GRAPH_INITIALIZER or gwire != 2:
                    _skip(f, gwire)
                    continue
                n = _varint(f)
                tensor_end = f.tell() + n
                got = _tensor(f, tensor_end, path, want)
                if got is not None:
                    yield got
            f.seek(graph_end)
