"""The wire format: every message of DESIGN.md section 4, encoded in one place.

Tensor messages (AdapterUpdate, GlobalAdapter) are safetensors blobs whose `__metadata__` holds
the header fields as strings; the framing is written here byte for byte (8-byte little-endian
header length, JSON header with sorted keys, raw little-endian data), so the same message always
encodes to the same bytes and any safetensors reader can open it. Nothing is ever pickled. Acks
and status messages are small JSON documents.

A tensor message may travel deflated (codec "deflate"): the 4-byte magic `AFZ1` followed by a
zlib stream of the safetensors blob. The magic cannot start a safetensors blob (read as a header
length it is far above MAX_HEADER_BYTES), so receivers tell the two apart by their first bytes and
bound the inflated size by the same limit as the payload. int8 factors of an SVD spend most of
their 256 levels on rare large entries; deflate's Huffman stage takes back the unused bits.

Updates are signed with HMAC-SHA256 over a digest of the header fields (minus the signature) and
of every wire tensor's name, dtype, shape and bytes, so a signature covers exactly what travelled.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import math
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from alignfed.errors import ProtocolError
from alignfed.lowrank import Factors, dequantize_rows, dequantize_rows4, quantize_rows, quantize_rows4

WIRE_VERSION = "1"
MAX_HEADER_BYTES = 1 << 20
MAX_DIMS = 8  # a wire tensor has at most this many dimensions (factors: 2, scales: 1)
MAX_DIM = 1 << 32  # ... each at most this long; bounds the arithmetic on shapes before any allocation
MAX_ELEMENTS = 1 << 40  # ... and their non-zero dimensions multiply to at most this
_INT64 = 1 << 63  # header integers land in SQLite INTEGER columns
CODECS = ("none", "deflate")
_DEFLATE_MAGIC = b"AFZ1"

# How each topic (under alignfed/{federation}/) travels: (QoS, retained). docs/protocol.md's table
# is checked against this one. Both status topics carry their sender's last will, which the
# transport sets at QoS 1, so their own messages go at QoS 1 too.
DELIVERY: dict[str, tuple[int, bool]] = {
    "global/adapter": (1, True),
    "global/delta": (1, True),
    "global/status": (1, True),
    "devices/{id}/update": (1, False),
    "devices/{id}/ack": (1, False),
    "devices/{id}/status": (1, True),
}

_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I8": np.dtype("i1"),
    "I64": np.dtype("<i8"),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


# ---------------------------------------------------------------------------------------------
# decoding hostile input

F = TypeVar("F", bound=Callable[..., Any])

# What a decoder may raise on input nobody checked for; turned into ProtocolError at the boundary
# so a receiver rejects the message instead of dying of it (issue 10).
_UNEXPECTED = (
    ArithmeticError,
    LookupError,
    TypeError,
    ValueError,
    RecursionError,
    MemoryError,
    struct.error,
    zlib.error,
)


def _decoder(what: str) -> Callable[[F], F]:
    """Every decoder's last line of defence: anything but ProtocolError becomes one, naming `what`.

    The checks in the decoders name the field at fault; this only catches what they missed."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except _UNEXPECTED as exc:
                raise ProtocolError(f"malformed {what}: {type(exc).__name__}: {_short(str(exc), 160)}") from None

        return guarded  # type: ignore[return-value]

    return wrap


def _field(meta: Mapping[str, str], name: str, typ: type) -> Any:
    """Header field `name` of a tensor message as `typ`; integers must fit 64 bits (SQLite, numpy)."""
    if name not in meta:
        raise ProtocolError(f"header field {name!r} is missing")
    text = meta[name]
    if typ is str:
        return text
    try:
        value = typ(text)
    except ValueError:
        raise ProtocolError(f"header field {name!r}={_short(text)} is not a {typ.__name__}") from None
    if typ is int and not -_INT64 <= value < _INT64:
        raise ProtocolError(f"header field {name!r}={_short(text)}; expected an integer of at most 64 bits")
    return value


# ---------------------------------------------------------------------------------------------
# safetensors framing


def pack(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str], codec: str = "none") -> bytes:
    """Serialize tensors + string metadata as a safetensors blob, deterministically; deflated if asked."""
    if codec not in CODECS:
        raise ProtocolError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        if np.dtype(dtype) not in _NAMES:
            raise ProtocolError(f"tensor {name!r}: dtype {arr.dtype} cannot go on the wire")
        data = arr.astype(dtype, copy=False).tobytes()
        header[name] = {
            "dtype": _NAMES[np.dtype(dtype)],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data section to 8 bytes
    blob = struct.pack("<Q", len(head)) + head + b"".join(chunks)
    return _DEFLATE_MAGIC + zlib.compress(blob, 6) if codec == "deflate" else blob


def _inflate(payload: bytes, max_bytes: int) -> bytes:
    """The safetensors blob inside a deflated payload, refusing one that inflates past max_bytes."""
    inflater = zlib.decompressobj()
    try:
        blob = inflater.decompress(payload[len(_DEFLATE_MAGIC) :], max_bytes + 1)
    except zlib.error as exc:
        raise ProtocolError(f"deflated payload is corrupt: {exc}") from exc
    if len(blob) > max_bytes or inflater.unconsumed_tail:
        raise ProtocolError(f"deflated payload inflates to more than the {max_bytes}-byte limit")
    if not inflater.eof:
        raise ProtocolError("deflated payload is truncated: the zlib stream does not end")
    if inflater.unused_data:
        raise ProtocolError(f"deflated payload has {len(inflater.unused_data)} bytes after its zlib stream")
    return blob


@_decoder("tensor message")
def unpack(payload: bytes, max_bytes: int) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a safetensors blob (plain or deflated), checking every size and offset before touching the data.

    max_bytes bounds the payload as received and, for a deflated one, what it inflates to.
    """
    if len(payload) > max_bytes:
        raise ProtocolError(f"payload is {len(payload)} bytes, limit is {max_bytes}")
    if payload[: len(_DEFLATE_MAGIC)] == _DEFLATE_MAGIC:
        payload = _inflate(payload, max_bytes)
    if len(payload) < 8:
        raise ProtocolError(f"payload is {len(payload)} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", payload[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(payload):
        raise ProtocolError(f"safetensors header length {n} does not fit a {len(payload)}-byte payload")
    header = strict_json(payload[8 : 8 + n], "safetensors header")
    if not isinstance(header, dict):
        raise ProtocolError(f"safetensors header is not a JSON object but a JSON {_kind(header)}")
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ProtocolError("__metadata__ must map strings to strings")
    data = memoryview(payload)[8 + n :]
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        dtype, shape, (start, end) = _tensor_entry(name, info)
        count = math.prod(shape)  # ≤ MAX_DIM ** MAX_DIMS: exact Python integers, no overflow
        if not 0 <= start <= end <= len(data) or end - start != count * dtype.itemsize:
            raise ProtocolError(
                f"tensor {_short(name)}: shape {list(shape)} and offsets [{start}, {end}] do not fit the data "
                f"({len(data)} bytes)"
            )
        tensors[name] = np.frombuffer(data[start:end], dtype=dtype).reshape(shape)
    return tensors, dict(meta)


def _kind(value: object) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_entry(name: str, info: object) -> tuple[np.dtype[Any], tuple[int, ...], tuple[int, int]]:
    """(dtype, shape, offsets) of one header entry, every field type- and range-checked."""
    if not isinstance(info, dict):
        raise ProtocolError(f"tensor {_short(name)}: header entry is a JSON {_kind(info)}, expected an object")
    dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
        raise ProtocolError(f"tensor {_short(name)}: dtype {_short(dtype_name)}; expected one of {', '.join(_DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in shape):
        raise ProtocolError(
            f"tensor {_short(name)}: shape {_short(shape)}; expected a list of integers in [0, {MAX_DIM}], "
            f"at most {MAX_DIMS} of them"
        )
    if math.prod(d for d in shape if d) > MAX_ELEMENTS:  # numpy refuses such shapes even when empty
        raise ProtocolError(f"tensor {_short(name)}: shape {_short(shape)} has more than {MAX_ELEMENTS} elements")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(x) and 0 <= x < _INT64 for x in offsets):
        raise ProtocolError(
            f"tensor {_short(name)}: data_offsets {_short(offsets)}; expected two integers [start, end]"
        )
    return _DTYPES[dtype_name], tuple(shape), (offsets[0], offsets[1])


def _short(value: object, limit: int = 80) -> str:
    """repr of a hostile value, cut short so a log line stays a line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def strict_json(raw: bytes | memoryview, what: str) -> Any:
    """Parse JSON from the wire: NaN/Infinity refused, nesting that exhausts the parser reported as such.

    Python's json parser recurses per nesting level; 100,000 brackets raise RecursionError, which
    must not escape as if it were a bug.
    """
    try:
        return json.loads(bytes(raw), parse_constant=_no_constant)
    except RecursionError:
        raise ProtocolError(f"{what} is nested too deeply to be a message") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise ProtocolError(f"{what} is not JSON: {_short(str(exc), 160)}") from None


def _digest(meta: Mapping[str, str], tensors: Mapping[str, np.ndarray]) -> bytes:
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in meta.items() if k != "signature"}, sort_keys=True).encode())
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        h.update(f"\n{name}|{_NAMES[np.dtype(arr.dtype)]}|{list(arr.shape)}\n".encode())
        h.update(arr.tobytes())
    return h.digest()


def sign(key: bytes, digest: bytes) -> str:
    return hmac.new(key, digest, hashlib.sha256).hexdigest()


# ---------------------------------------------------------------------------------------------
# messages


@dataclass(frozen=True, slots=True)
class Member:
    """One device update a site coordinator folded into its site update (hierarchical coordinators).

    `weight` is its share of the site delta (the members' weights sum to 1); `samples` its n_i.
    """

    device_id: str
    update_id: str
    samples: int
    weight: float


@dataclass(frozen=True, slots=True)
class AdapterUpdate:
    """One device's contribution: the change of its adapter product since global `base_version`.

    `deltas[layer_id]` holds factors with delta = u @ v = s·(B_i A_i − B_v A_v), shape (out, in);
    u: (out, k), v: (k, in), k ≤ 2r. `quantization` says how the factors travel ("fp32" | "int8" | "int8c" | "int4c").
    `eval_loss`, measured before training, is what the federation's worst-device loss is made of.
    `rank` is the LoRA rank the device trained at (k ≤ r, its profile's cap; 0: not stated, i.e.
    the bundle's r): a capped device's delta is s·(B_i A_i − T_k(B_v A_v)), T_k the best rank-k
    approximation it started from, so k ≤ 2·rank.
    """

    device_id: str
    update_id: str
    seq: int
    base_version: int
    bundle: str
    samples: int
    local_steps: int
    train_loss: float
    wall_time: float
    profile: str
    created_at: float
    deltas: Mapping[str, Factors]
    # base_version's loss on the device's held-out examples (nan: not measured, inf: diverged)
    eval_loss: float = math.nan
    quantization: str = "fp32"
    signature: str = ""
    # a site update: the device updates it combines (empty for a device's own update); signed with the rest
    members: tuple[Member, ...] = ()
    rank: int = 0


@dataclass(frozen=True, slots=True)
class GlobalAdapter:
    """The federation's current adapter: canonical `lora.{i}.{m}.A|B` tensors of rank `rank`."""

    version: int
    parent_version: int
    bundle: str
    strategy: str
    created_at: float
    rank: int
    alpha: float
    tensors: Mapping[str, np.ndarray]
    metrics: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Ack:
    device_id: str
    update_id: str
    accepted: bool
    reason: str
    global_version: int


@dataclass(frozen=True, slots=True)
class Decoded:
    """A decoded update plus the digest its signature must match."""

    update: AdapterUpdate
    digest: bytes

    def verify(self, key: bytes) -> bool:
        return bool(self.update.signature) and hmac.compare_digest(sign(key, self.digest), self.update.signature)


_PARTS = {"u": 2, "v": 2, "u_scale": 1, "v_scale": 1}  # wire tensor suffix -> its number of dims

_UPDATE_FIELDS: dict[str, type] = {
    "device_id": str,
    "update_id": str,
    "seq": int,
    "base_version": int,
    "bundle": str,
    "samples": int,
    "local_steps": int,
    "train_loss": float,
    "wall_time": float,
    "profile": str,
    "created_at": float,
}


def _update_wire(update: AdapterUpdate, quantization: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    meta = {
        name: repr(getattr(update, name)) if typ is float else str(getattr(update, name))
        for name, typ in _UPDATE_FIELDS.items()
    }
    meta.update({"type": "adapter_update", "wire": WIRE_VERSION, "quantization": quantization})
    if not math.isnan(update.eval_loss):  # optional: absent when the device holds nothing out; inf = diverged
        meta["eval_loss"] = repr(float(update.eval_loss))
    if update.members:  # absent for device updates, so their bytes and signatures do not change
        meta["members"] = json.dumps([[m.device_id, m.update_id, m.samples, m.weight] for m in update.members])
    if update.rank:  # absent when not stated, so older updates keep their bytes and signatures
        meta["rank"] = str(update.rank)
    tensors: dict[str, np.ndarray] = {}
    for lid, f in update.deltas.items():
        for part, arr in _quantize(f, quantization).items():
            tensors[f"delta.{lid}.{part}"] = arr
    return meta, tensors


QUANTIZATIONS = ("fp32", "int8", "int8c", "int4c")


def _quantize(f: Factors, quantization: str) -> dict[str, np.ndarray]:
    """The wire tensors of one layer's factors: u, v and, for int8 kinds, their scales.

    "int8": one scale per row of u (out,) and of v (k,). "int8c": one scale per rank component,
    i.e. per column of u (k,) and per row of v (k,): u = U·sqrt(σ) has columns of very different
    size, and k scales cost 4k bytes where out scales cost 4·out (the same size as u's int8 data
    at k = 4). "int4c": as int8c with 4-bit codes packed two a byte (`lowrank.quantize_rows4`); u
    travels transposed, as (k, ⌈out/2⌉) bytes.
    """
    if quantization == "fp32":
        return {"u": np.asarray(f.u, dtype=np.float32), "v": np.asarray(f.v, dtype=np.float32)}
    if quantization == "int4c":
        # 4 bits, one scale per rank component; u travels transposed, (k, ⌈out/2⌉) packed bytes, so
        # both factors pack along their long side and every scale belongs to one packed row
        qu, su = quantize_rows4(np.asarray(f.u).T)
        qv, sv = quantize_rows4(f.v)
        return {"u": qu, "u_scale": su, "v": qv, "v_scale": sv}
    if quantization == "int8":
        qu, su = quantize_rows(f.u)
    elif quantization == "int8c":
        qu_t, su = quantize_rows(np.asarray(f.u).T)
        qu = np.ascontiguousarray(qu_t.T)
    else:
        raise ProtocolError(f"unknown quantization {_short(quantization)}; expected one of {', '.join(QUANTIZATIONS)}")
    qv, sv = quantize_rows(f.v)
    return {"u": qu, "u_scale": su, "v": qv, "v_scale": sv}


def _dequantize(lid: str, p: Mapping[str, np.ndarray], quantization: str) -> Factors:
    if quantization == "fp32":
        return Factors(u=p["u"].astype(np.float32), v=p["v"].astype(np.float32))
    if quantization not in QUANTIZATIONS:
        raise ProtocolError(f"unknown quantization {_short(quantization)}; expected one of {', '.join(QUANTIZATIONS)}")
    per_column = quantization == "int8c"
    u_scales = p["u"].shape[1] if per_column else p["u"].shape[0]  # int4c: u travels transposed
    for part, n, what in (("u", u_scales, "column" if per_column else "row"), ("v", p["v"].shape[0], "row")):
        if p[f"{part}_scale"].shape != (n,):
            raise ProtocolError(
                f"layer {_short(lid)}: {part}_scale has shape {list(p[f'{part}_scale'].shape)}, "
                f"expected [{n}] (one per {what} of {part})"
            )
    if quantization == "int4c":
        u = _dequantize4(f"layer {_short(lid)}: u", p["u"], p["u_scale"]).T
        return Factors(u=np.ascontiguousarray(u), v=_dequantize4(f"layer {_short(lid)}: v", p["v"], p["v_scale"]))
    u = dequantize_rows(p["u"].T, p["u_scale"]).T if per_column else dequantize_rows(p["u"], p["u_scale"])
    return Factors(u=np.ascontiguousarray(u), v=dequantize_rows(p["v"], p["v_scale"]))


def _dequantize4(what: str, packed: np.ndarray, scale: np.ndarray) -> np.ndarray:
    try:
        return dequantize_rows4(packed, scale)
    except ValueError as exc:
        raise ProtocolError(f"{what}: {exc}") from None


def wire_roundtrip(f: Factors, quantization: str) -> Factors:
    """The factors a receiver decodes when `f` is sent with `quantization` (for error feedback)."""
    return _dequantize("", _quantize(f, quantization), quantization)


def encode_update(update: AdapterUpdate, key: bytes, quantization: str = "fp32", codec: str = "none") -> bytes:
    """Encode and sign an update with the device's key.

    The signature covers the metadata and tensors, not the envelope: the same update signs the
    same whether or not it travels deflated.
    """
    meta, tensors = _update_wire(update, quantization)
    meta["signature"] = sign(key, _digest(meta, tensors))
    return pack(tensors, meta, codec)


@_decoder("adapter update")
def decode_update(payload: bytes, max_bytes: int) -> Decoded:
    """Decode an update; raises ProtocolError naming the first problem found. Does not verify."""
    tensors, meta = unpack(payload, max_bytes)
    if meta.get("type") != "adapter_update":
        raise ProtocolError(f"message type is {_short(meta.get('type'))}, expected 'adapter_update'")
    if meta.get("wire") != WIRE_VERSION:
        raise ProtocolError(f"wire version {_short(meta.get('wire'))}, expected {WIRE_VERSION!r}")
    fields: dict[str, Any] = {name: _field(meta, name, typ) for name, typ in _UPDATE_FIELDS.items()}
    fields["eval_loss"] = _field({"eval_loss": "nan", **meta}, "eval_loss", float)
    members = _members(meta.get("members"))
    rank = _field(meta, "rank", int) if "rank" in meta else 0
    quant = meta.get("quantization", "fp32")
    parts: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in tensors.items():
        lid, _, part = name[len("delta.") :].rpartition(".")
        if not name.startswith("delta.") or not lid or part not in _PARTS or arr.ndim != _PARTS[part]:
            raise ProtocolError(
                f"unexpected tensor {_short(name)} with shape {list(arr.shape)}; expected delta.<layer>.u|v (2-D) "
                "or delta.<layer>.u_scale|v_scale (1-D)"
            )
        parts.setdefault(lid, {})[part] = arr
    deltas: dict[str, Factors] = {}
    for lid, p in sorted(parts.items()):
        try:
            f = _dequantize(lid, p, quant)
        except KeyError as exc:
            raise ProtocolError(f"layer {_short(lid)}: tensor {_short(exc.args[0])} is missing") from exc
        u, v = f.u, f.v
        if u.ndim != 2 or v.ndim != 2 or u.shape[1] != v.shape[0]:
            raise ProtocolError(f"layer {_short(lid)}: factors {list(u.shape)} @ {list(v.shape)} do not chain")
        deltas[lid] = Factors(u=u, v=v)
    update = AdapterUpdate(
        **fields,
        deltas=deltas,
        quantization=quant,
        signature=meta.get("signature", ""),
        members=members,
        rank=rank,
    )
    return Decoded(update=update, digest=_digest(meta, tensors))


def _members(raw: str | None) -> tuple[Member, ...]:
    """Parse the `members` header: a JSON list of [device_id, update_id, samples, weight]."""
    if raw is None:
        return ()
    rows = strict_json(raw.encode(), "header field 'members'")
    try:
        members = tuple(Member(str(d), str(u), int(n), float(w)) for d, u, n, w in rows)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ProtocolError(
            f"header field 'members' is not a list of [device_id, update_id, samples, weight]: {exc}"
        ) from exc
    if not members or any(m.samples < 0 or not (math.isfinite(m.weight) and m.weight >= 0) for m in members):
        raise ProtocolError("header field 'members': expected a non-empty list with samples ≥ 0 and finite weights ≥ 0")
    return members


def encode_global(g: GlobalAdapter) -> bytes:
    meta = {
        "type": "global_adapter",
        "wire": WIRE_VERSION,
        "version": str(g.version),
        "parent_version": str(g.parent_version),
        "bundle": g.bundle,
        "strategy": g.strategy,
        "created_at": repr(g.created_at),
        "rank": str(g.rank),
        "alpha": repr(float(g.alpha)),
        "metrics": json.dumps(g.metrics, sort_keys=True, default=float),
    }
    return pack({k: np.asarray(v, dtype=np.float32) for k, v in g.tensors.items()}, meta)


@_decoder("global adapter")
def decode_global(payload: bytes, max_bytes: int) -> GlobalAdapter:
    tensors, meta = unpack(payload, max_bytes)
    if meta.get("type") != "global_adapter":
        raise ProtocolError(f"message type is {_short(meta.get('type'))}, expected 'global_adapter'")
    metrics = strict_json(meta.get("metrics", "{}").encode(), "global adapter metrics")
    if not isinstance(metrics, dict):
        raise ProtocolError(f"global adapter metrics are a JSON {_kind(metrics)}, expected an object")
    return GlobalAdapter(
        version=_field(meta, "version", int),
        parent_version=_field(meta, "parent_version", int),
        bundle=_field(meta, "bundle", str),
        strategy=_field(meta, "strategy", str),
        created_at=_field(meta, "created_at", float),
        rank=_field(meta, "rank", int),
        alpha=_field(meta, "alpha", float),
        tensors={k: np.array(v, dtype=np.float32) for k, v in tensors.items()},
        metrics=metrics,
    )


def encode_ack(ack: Ack) -> bytes:
    return json.dumps({"type": "ack", **_asdict(ack)}, sort_keys=True).encode()


_ACK_FIELDS: dict[str, type] = {
    "device_id": str,
    "update_id": str,
    "accepted": bool,
    "reason": str,
    "global_version": int,
}


@_decoder("ack")
def decode_ack(payload: bytes) -> Ack:
    raw = strict_json(payload, "ack")
    if not isinstance(raw, dict):
        raise ProtocolError(f"malformed ack: a JSON {_kind(raw)}, expected an object")
    for name, typ in _ACK_FIELDS.items():
        value = raw.get(name)
        ok = isinstance(value, typ) and (typ is bool or not isinstance(value, bool))
        if not ok or (isinstance(value, int) and not -_INT64 <= value < _INT64):
            expected = {str: "a string", int: "an integer", bool: "true or false"}[typ]
            raise ProtocolError(f"malformed ack: field {name!r} is {_short(value)}; expected {expected}")
    return Ack(
        device_id=raw["device_id"],
        update_id=raw["update_id"],
        accepted=raw["accepted"],
        reason=raw["reason"],
        global_version=raw["global_version"],
    )


def encode_status(status: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(status), sort_keys=True, default=float).encode()


@_decoder("status")
def decode_status(payload: bytes) -> dict[str, Any]:
    raw = strict_json(payload, "status")
    if not isinstance(raw, dict):
        raise ProtocolError(f"status is a JSON {_kind(raw)}, expected an object")
    return raw


def _asdict(ack: Ack) -> dict[str, Any]:
    return {name: getattr(ack, name) for name in Ack.__slots__}  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# downlink: version-to-version deltas of the global adapter

DOWNLINK_QUANTIZATIONS = ("fp32", "int8c", "int4c")
_DELTA_PARTS = ("q", "scale")


def adapter_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """SHA-256 (hex) of an adapter's float32 tensors: every name, shape and the raw bytes, in name order.

    What a device must hold after applying a GlobalDelta; equal digests mean bit-equal adapters."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name], dtype="<f4")
        h.update(f"\n{name}|{list(arr.shape)}\n".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class GlobalDelta:
    """global_{version} − global_{parent_version}, quantized, plus the digest of the result.

    `wire[f"{name}.q"]` (and `.scale` unless fp32) per canonical tensor `lora.{layer}.{module}.A|B`,
    each held rank-major: A (r, in) as it is, B (out, r) transposed to (r, out), so every rank
    component has its own scale, as in int8c/int4c updates. `digest` is `adapter_digest` of
    global_{parent_version} + `changes()` in float32: a receiver that gets another digest holds
    something else than the coordinator and must fetch a snapshot.
    """

    version: int
    parent_version: int
    bundle: str
    strategy: str
    created_at: float
    rank: int
    alpha: float
    quantization: str
    digest: str
    wire: Mapping[str, np.ndarray]

    def changes(self) -> dict[str, np.ndarray]:
        """The float32 change of every tensor, in its own shape (A: (r, in), B: (out, r))."""
        return dequantize_changes(self.wire, self.quantization)


def quantize_changes(changes: Mapping[str, np.ndarray], quantization: str) -> dict[str, np.ndarray]:
    """The wire tensors of a version-to-version change (see GlobalDelta)."""
    if quantization not in DOWNLINK_QUANTIZATIONS:
        raise ProtocolError(
            f"unknown downlink quantization {_short(quantization)}; expected one of {', '.join(DOWNLINK_QUANTIZATIONS)}"
        )
    wire: dict[str, np.ndarray] = {}
    for name, arr in changes.items():
        major = np.asarray(arr, dtype=np.float32)
        major = major.T if name.endswith(".B") else major  # (r, out) / (r, in)
        if quantization == "fp32":
            wire[f"{name}.q"] = np.ascontiguousarray(major)
            continue
        q, s = quantize_rows4(major) if quantization == "int4c" else quantize_rows(major)
        wire[f"{name}.q"], wire[f"{name}.scale"] = q, s
    return wire


def dequantize_changes(wire: Mapping[str, np.ndarray], quantization: str) -> dict[str, np.ndarray]:
    """Inverse of `quantize_changes` up to the quantization error; checks names, dtypes and shapes."""
    if quantization not in DOWNLINK_QUANTIZATIONS:
        raise ProtocolError(
            f"unknown downlink quantization {_short(quantization)}; expected one of {', '.join(DOWNLINK_QUANTIZATIONS)}"
        )
    names: dict[str, dict[str, np.ndarray]] = {}
    for key, arr in wire.items():
        name, _, part = key.rpartition(".")
        if not name.endswith((".A", ".B")) or part not in _DELTA_PARTS or arr.ndim != (2 if part == "q" else 1):
            raise ProtocolError(
                f"unexpected tensor {_short(key)} with shape {list(arr.shape)}; expected <name>.A|B.q (2-D) "
                "or <name>.A|B.scale (1-D)"
            )
        names.setdefault(name, {})[part] = arr
    out: dict[str, np.ndarray] = {}
    want = np.dtype("<f4") if quantization == "fp32" else np.dtype("i1")
    for name, p in sorted(names.items()):
        if "q" not in p or (quantization == "fp32") != ("scale" not in p):
            raise ProtocolError(
                f"tensor {_short(name)}: expected {name}.q" + ("" if quantization == "fp32" else " and .scale")
            )
        if p["q"].dtype != want:
            raise ProtocolError(f"tensor {_short(name)}.q is {p['q'].dtype}, expected {want} for {quantization}")
        if quantization == "fp32":
            major = p["q"].astype(np.float32)
        else:
            if p["scale"].shape != (p["q"].shape[0],) or p["scale"].dtype != np.dtype("<f4"):
                raise ProtocolError(
                    f"tensor {_short(name)}.scale has shape {list(p['scale'].shape)}, "
                    f"expected [{p['q'].shape[0]}] float32"
                )
            if quantization == "int4c":
                major = _dequantize4(f"tensor {_short(name)}.q", p["q"], p["scale"])
            else:
                major = dequantize_rows(p["q"], p["scale"])
        out[name] = np.ascontiguousarray(major.T if name.endswith(".B") else major)
    return out


def encode_global_delta(d: GlobalDelta, codec: str = "deflate") -> bytes:
    meta = {
        "type": "global_delta",
        "wire": WIRE_VERSION,
        "version": str(d.version),
        "parent_version": str(d.parent_version),
        "bundle": d.bundle,
        "strategy": d.strategy,
        "created_at": repr(float(d.created_at)),
        "rank": str(d.rank),
        "alpha": repr(float(d.alpha)),
        "quantization": d.quantization,
        "digest": d.digest,
    }
    return pack(d.wire, meta, codec)


@_decoder("global delta")
def decode_global_delta(payload: bytes, max_bytes: int) -> GlobalDelta:
    tensors, meta = unpack(payload, max_bytes)
    if meta.get("type") != "global_delta":
        raise ProtocolError(f"message type is {_short(meta.get('type'))}, expected 'global_delta'")
    if meta.get("wire") != WIRE_VERSION:
        raise ProtocolError(f"wire version {_short(meta.get('wire'))}, expected {WIRE_VERSION!r}")
    version, parent = _field(meta, "version", int), _field(meta, "parent_version", int)
    if parent >= version:
        raise ProtocolError(f"global delta: parent_version {parent} is not below version {version}")
    digest = _field(meta, "digest", str)
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ProtocolError(f"global delta: digest {_short(digest)} is not 64 lower-case hex digits")
    quant = _field(meta, "quantization", str)
    dequantize_changes(tensors, quant)  # names, dtypes and shapes are checked before anyone applies it
    return GlobalDelta(
        version=version,
        parent_version=parent,
        bundle=_field(meta, "bundle", str),
        strategy=_field(meta, "strategy", str),
        created_at=_field(meta, "created_at", float),
        rank=_field(meta, "rank", int),
        alpha=_field(meta, "alpha", float),
        quantization=quant,
        digest=digest,
        wire=tensors,
    )
