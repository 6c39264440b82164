"""Hand-made hostile payloads: each one crashed a decoder once (issue 10) or is a classic of its kind.

Every payload here is small; `HOSTILE_TENSOR_MESSAGES` are safetensors-framed (updates, globals),
`HOSTILE_JSON_MESSAGES` are acks and status documents.
"""

from __future__ import annotations

import json
import struct
import zlib


def framed(header: bytes | str | object, data: bytes = b"") -> bytes:
    """A safetensors blob with this header (bytes/str as is, anything else as JSON) and data."""
    if isinstance(header, str):
        raw = header.encode()
    elif isinstance(header, bytes):
        raw = header
    else:
        raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


DEEP = 100_000


def _global_meta(**changes: str) -> dict[str, str]:
    meta = dict(type="global_adapter", wire="1", version="1", parent_version="0", bundle="b", strategy="s")
    return {**meta, "created_at": "0", "rank": "4", "alpha": "8", "metrics": "{}", **changes}


def _update_meta(**changes: str) -> dict[str, str]:
    meta = dict(type="adapter_update", wire="1", device_id="dev-1", update_id="u", seq="1", base_version="0")
    more = dict(bundle="b", samples="1", local_steps="1", train_loss="1.0", wall_time="1.0", profile="p")
    return {**meta, **more, "created_at": "0.0", **changes}


HOSTILE_TENSOR_MESSAGES: dict[str, bytes] = {
    "shape 1e400": framed('{"x":{"dtype":"F32","shape":[1e400],"data_offsets":[0,0]}}'),
    "shape 1e300 x 0": framed('{"x":{"dtype":"F32","shape":[1e300,0],"data_offsets":[0,0]}}'),
    "shape 10**30 x 0": framed('{"x":{"dtype":"F32","shape":[' + "9" * 30 + ',0],"data_offsets":[0,0]}}'),
    "shape NaN": framed('{"x":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}', b"\0" * 4),
    "negative shape": framed({"x": {"dtype": "F32", "shape": [2, -2], "data_offsets": [0, 0]}}),
    "empty, but huge other dims": framed({"x": {"dtype": "F32", "shape": [2**32] * 4 + [0], "data_offsets": [0, 0]}}),
    "huge shape product": framed({"x": {"dtype": "F32", "shape": [2**32] * 3, "data_offsets": [0, 0]}}),
    "1000 dims": framed({"x": {"dtype": "F32", "shape": [1] * 1000, "data_offsets": [0, 4]}}, b"\0" * 4),
    "bool shape": framed({"x": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4),
    "float offsets": framed({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}, b"\0" * 4),
    "offsets 1e400": framed('{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,1e400]}}'),
    "offsets past the end": framed({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
    "offsets reversed": framed({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4),
    "three offsets": framed({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, b"\0" * 8),
    "unknown dtype": framed({"x": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16),
    "dtype list": framed({"x": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "entry is a number": framed({"x": 5}),
    "entry is a list": framed({"x": [1, 2]}),
    "header is a list": framed([1, 2, 3]),
    "header is a string": framed('"hello"'),
    "header is null": framed("null"),
    "metadata is a list": framed({"__metadata__": ["a"]}),
    "metadata holds a number": framed({"__metadata__": {"type": 1}}),
    "metadata nested": framed({"__metadata__": {"type": {"a": "b"}}}),
    "nested 100000 deep (list)": framed("[" * DEEP + "]" * DEEP),
    "nested 100000 deep (object)": framed('{"a":' * DEEP + "1" + "}" * DEEP),
    "nested in an entry": framed('{"x":' + "[" * DEEP + "]" * DEEP + "}"),
    "header not UTF-8": framed(b'{"\xff\xfe":1}'),
    "header length 2**64-1": struct.pack("<Q", 2**64 - 1) + b"{}",
    "header length past the end": struct.pack("<Q", 100) + b"{}",
    "empty": b"",
    "seven bytes": b"\0" * 7,
    "header not JSON": framed("nope"),
    "deflate magic only": b"AFZ1",
    "deflate garbage": b"AFZ1" + b"\x78\x9c" + b"\xff" * 32,
    "deflate truncated": b"AFZ1" + zlib.compress(framed({}), 6)[:-4],
    "deflate bomb": b"AFZ1" + zlib.compress(b"\0" * (8 << 20), 9),
    "deflated 1e400": b"AFZ1" + zlib.compress(framed('{"x":{"dtype":"F32","shape":[1e400],"data_offsets":[0,0]}}')),
    "deflated deep nest": b"AFZ1" + zlib.compress(framed("[" * DEEP + "]" * DEEP)),
    "global with version 1e400": framed({"__metadata__": _global_meta(version="1e400")}),
    "global with deep metrics": framed({"__metadata__": _global_meta(metrics="[" * DEEP + "]" * DEEP)}),
    "global with list metrics": framed({"__metadata__": _global_meta(metrics="[1]")}),
    "update with seq 10**30": framed({"__metadata__": _update_meta(seq="9" * 30)}),
    "update with base_version 5000 digits": framed({"__metadata__": _update_meta(base_version="9" * 5000)}),
}

_ACK = {"type": "ack", "device_id": "dev-1", "update_id": "u", "accepted": True, "reason": "ok", "global_version": 1}

HOSTILE_JSON_MESSAGES: dict[str, bytes] = {
    "nested 100000 deep": b"[" * DEEP + b"]" * DEEP,
    "nested object 100000 deep": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    "global_version 1e400": json.dumps(_ACK).replace('"global_version": 1', '"global_version": 1e400').encode(),
    "global_version NaN": json.dumps(_ACK).replace('"global_version": 1', '"global_version": NaN').encode(),
    "global_version 5000 digits": json.dumps(_ACK).replace(": 1}", ": " + "9" * 5000 + "}").encode(),
    "global_version a string of 5000 digits": json.dumps({**_ACK, "global_version": "9" * 5000}).encode(),
    "global_version a list": json.dumps({**_ACK, "global_version": [1]}).encode(),
    "update_id an object": json.dumps({**_ACK, "update_id": {"a": 1}}).encode(),
    "accepted a string": json.dumps({**_ACK, "accepted": "false"}).encode(),
    "a list": b"[]",
    "a number": b"1e400",
    "null": b"null",
    "missing fields": b'{"type":"ack"}',
    "not UTF-8": b'{"\xff":1}',
    "empty": b"",
    "NUL bytes": b"\0" * 64,
}
