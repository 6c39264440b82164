"""What the fuzz tests throw: structurally valid and invalid messages, and mutations of real ones.

Generators (Hypothesis strategies) build updates, globals, acks and status documents field by
field, valid or with one field made hostile; mutators take real captured payloads (what a device
and the coordinator actually send) and truncate, flip, splice, inflate or nest them. The same
mutators drive the live tests through `random.Random`, so a run over MQTT is reproducible by seed.
"""

from __future__ import annotations

import json
import os
import random
import re
import struct
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from alignfed import protocol
from alignfed.lowrank import Factors

CASES = int(os.environ.get("ALIGNFED_FUZZ_CASES", "1000"))  # 1,000 in CI; 10,000 for the soak run
# CI replays the same Hypothesis cases every run; ALIGNFED_FUZZ_RANDOM=1 draws new ones.
DERANDOMIZE = not os.environ.get("ALIGNFED_FUZZ_RANDOM")
# The message of the last-resort guard at each decoder: a check is missing if a reason reads like this.
GUARD = re.compile(r"^malformed [a-z ]+: [A-Za-z]*(Error|Exception|Overflow)\b")

HOSTILE_NUMBERS: list[object] = [
    -1, 0, 2**31, 2**63, 2**64 + 1, 10**30, 1e400, -1e400, 1.5, True, None, "1", "", [], {}, [1e400], "x" * 300,
]  # fmt: skip
HOSTILE_TEXT = ["", "1e400", "nan", "inf", "-inf", "9" * 5000, "-1", "0x10", "\u00e9", "1_0", " 7 ", "[" * 50]


# -- real payloads ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Seeds:
    """Real payloads of one federation, captured from the encoders the programs use."""

    updates: list[bytes]
    globals: list[bytes]
    acks: list[bytes]
    statuses: list[bytes]


def real_update(
    device_id: str, key: bytes, bundle: str, shapes: Mapping[str, tuple[int, int]], base_version: int = 0,
    *, seed: int = 0, quantization: str = "int8c", codec: str = "deflate", samples: int = 4, uid: str = "",
) -> bytes:  # fmt: skip
    rng = np.random.default_rng(seed)
    deltas = {
        lid: Factors(u=0.01 * rng.standard_normal((o, 2)).astype(np.float32),
                     v=0.01 * rng.standard_normal((2, i)).astype(np.float32))
        for lid, (o, i) in shapes.items()
    }  # fmt: skip
    update = protocol.AdapterUpdate(
        device_id, uid or f"{seed:032x}", seed + 1, base_version, bundle, samples, 2, 1.5, 0.25, "x86-laptop", 1.7e9,
        deltas, eval_loss=2.0,
    )  # fmt: skip
    return protocol.encode_update(update, key, quantization, codec)


def real_global(bundle: str, tensors: Mapping[str, np.ndarray], version: int = 1) -> bytes:
    g = protocol.GlobalAdapter(
        version, version - 1, bundle, "fedbuff", 1.7e9, 4, 8.0, tensors, metrics={"jain_index": 1.0, "weights": [0.5]}
    )
    return protocol.encode_global(g)


def seeds(
    device_id: str, key: bytes, bundle: str, shapes: Mapping[str, tuple[int, int]], tensors: Mapping[str, np.ndarray]
) -> Seeds:
    ups = [
        real_update(device_id, key, bundle, shapes, seed=i, quantization=q, codec=c)
        for i, (q, c) in enumerate([("int8c", "deflate"), ("fp32", "none"), ("int8", "none"), ("fp32", "deflate")])
    ]
    acks = [protocol.encode_ack(protocol.Ack(device_id, f"{i:032x}", i % 2 == 0, "accepted", 3)) for i in range(2)]
    statuses = [
        protocol.encode_status({"state": "online", "version": 3, "accepted_share": {device_id: 1.0}}),
        protocol.encode_status({"state": "offline"}),
    ]
    return Seeds(ups, [real_global(bundle, tensors, v) for v in (1, 7)], acks, statuses)


def small_seeds() -> Seeds:
    """Seeds of a made-up two-layer bundle, for the in-process decoder tests (no export needed)."""
    shapes = {"0.q": (8, 6), "1.v": (4, 6)}
    tensors = {
        f"lora.{lid.split('.')[0]}.{lid.split('.')[1]}.{ab}": np.full(shape, 0.01, np.float32)
        for lid, (o, i) in shapes.items()
        for ab, shape in (("A", (4, i)), ("B", (o, 4)))
    }
    return seeds("dev-1", bytes(range(32)), "ab" * 32, shapes, tensors)


# -- mutators ------------------------------------------------------------------------------------------


def _header(payload: bytes) -> tuple[dict[str, object], bytes] | None:
    """(header, data) of a plain or deflated tensor message, None for anything else."""
    try:
        blob = zlib.decompress(payload[4:]) if payload[:4] == b"AFZ1" else payload
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8 : 8 + n])
    except (zlib.error, struct.error, ValueError, RecursionError):
        return None
    return (header, blob[8 + n :]) if isinstance(header, dict) else None


def _frame(header: object, data: bytes) -> bytes:
    raw = json.dumps(header, allow_nan=True).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def truncate(p: bytes, r: random.Random) -> bytes:
    return p[: r.randrange(len(p) + 1)]


def flip(p: bytes, r: random.Random) -> bytes:
    b = bytearray(p)
    for _ in range(r.randint(1, 8)):
        if b:
            b[r.randrange(len(b))] ^= 1 << r.randrange(8)
    return bytes(b)


def splice(p: bytes, r: random.Random, other: bytes = b"") -> bytes:
    """The head of one payload on the tail of another (or of itself)."""
    q = other or p
    return p[: r.randrange(len(p) + 1)] + q[r.randrange(len(q) + 1) :]


def inflate(p: bytes, r: random.Random) -> bytes:
    """Deflate a plain message, inflate a deflated one, or pad a message (with zeros or more data)."""
    choice = r.randrange(4)
    try:
        if choice == 0:
            return b"AFZ1" + zlib.compress(p if p[:4] != b"AFZ1" else zlib.decompress(p[4:]), r.randint(0, 9))
        if choice == 1 and p[:4] == b"AFZ1":
            return zlib.decompress(p[4:])
    except zlib.error:
        return b"AFZ1" + zlib.compress(p)
    if choice == 2:
        return p + bytes(r.randrange(1, 4096))
    return p + p[8:]


def nest(p: bytes, r: random.Random) -> bytes:
    """Bury a JSON document (a header, an ack, a status) under deep nesting, or nest a field of it."""
    depth = r.choice([10, 1000, 100_000])
    found = _header(p)
    if found is None:  # a JSON message (ack, status)
        return b"[" * depth + p + b"]" * depth
    header, data = found
    name = r.choice(sorted(header))
    header[name] = json.loads("[" * min(depth, 500) + "]" * min(depth, 500))
    blob = _frame(header, data)
    return (
        blob if depth <= 500 else struct.pack("<Q", len(blob) - 8 + 2 * depth) + b"[" * depth + blob[8:] + b"]" * depth
    )


def poke_header(p: bytes, r: random.Random) -> bytes:
    """Replace one header value (a shape, an offset, a dtype, a metadata field) with something hostile."""
    found = _header(p)
    if found is None:
        try:
            doc = json.loads(p)
        except (ValueError, RecursionError):
            return flip(p, r)
        if isinstance(doc, dict) and doc:
            doc[r.choice(sorted(doc))] = r.choice(HOSTILE_NUMBERS)
        return json.dumps(doc, allow_nan=True).encode()
    header, data = found
    name = r.choice(sorted(header))
    entry = header[name]
    if name == "__metadata__" and isinstance(entry, dict) and entry:
        entry[r.choice(sorted(entry))] = r.choice(HOSTILE_TEXT)
    elif isinstance(entry, dict):
        key = r.choice(["dtype", "shape", "data_offsets"])
        entry[key] = r.choice(
            [r.choice(HOSTILE_NUMBERS), [r.choice(HOSTILE_NUMBERS)], [r.choice(HOSTILE_NUMBERS), 0], "F64", [2**40] * 3]
        )
    return _frame(header, data)


MUTATORS: dict[str, Callable[[bytes, random.Random], bytes]] = {
    "truncate": truncate, "flip": flip, "splice": splice, "inflate": inflate, "nest": nest, "poke": poke_header,
}  # fmt: skip


def mutate(p: bytes, r: random.Random, pool: list[bytes]) -> tuple[str, bytes]:
    name = r.choice(sorted(MUTATORS))
    if name == "splice":
        return name, splice(p, r, r.choice(pool))
    return name, MUTATORS[name](p, r)


def corpus(seeds_: list[bytes], n: int, seed: int) -> list[tuple[str, bytes]]:
    """n (how it was made, payload) cases: mostly mutations (1-3 in a row), some seeds untouched."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        p = r.choice(seeds_)
        how = []
        for _ in range(r.choice([0, 1, 1, 1, 2, 3])):
            name, p = mutate(p, r, seeds_)
            how.append(name)
        out.append(("+".join(how) or "real", p))
    return out


# -- Hypothesis strategies ---------------------------------------------------------------------------


def mutated(pool: list[bytes]) -> st.SearchStrategy[tuple[str, bytes]]:
    """A real payload through 0-3 mutations, drawn by Hypothesis (shrinks towards fewer mutations)."""

    @st.composite
    def draw(d: st.DrawFn) -> tuple[str, bytes]:
        r = random.Random(d(st.integers(0, 2**32 - 1)))
        p = d(st.sampled_from(pool))
        how = []
        for _ in range(d(st.integers(0, 3))):
            name, p = mutate(p, r, pool)
            how.append(name)
        return "+".join(how) or "real", p

    return draw()


def _json_value(depth: int = 2) -> st.SearchStrategy[object]:
    leaves = st.one_of(
        st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=12),
        st.sampled_from(HOSTILE_NUMBERS),
    )  # fmt: skip
    return st.recursive(leaves, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                        max_leaves=8)  # fmt: skip


@st.composite
def tensor_messages(draw: st.DrawFn, kind: str) -> tuple[str, bytes]:
    """A safetensors message built field by field: header entries and metadata valid or hostile."""
    header: dict[str, object] = {}
    data = b""
    for i in range(draw(st.integers(0, 3))):
        dtype = draw(st.sampled_from(["F32", "F16", "I8", "I64", "F64", "BOOL"]))
        shape = draw(st.lists(st.integers(0, 5), max_size=3) | st.lists(st.sampled_from(HOSTILE_NUMBERS), max_size=3))
        size = draw(st.integers(0, 64))
        start = len(data)
        end = draw(st.sampled_from([start + size, start, start + size + 1, 2**64, -1]))
        entry: object = {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}
        if draw(st.integers(0, 9)) == 0:
            entry = draw(_json_value())
        header[draw(st.sampled_from([f"delta.{i}.q.u", f"delta.{i}.q.v", f"lora.{i}.q.A", f"x{i}"]))] = entry
        data += bytes(size)
    meta = (
        {"type": "adapter_update", "wire": "1", "device_id": "dev-1", "update_id": "u", "seq": "1", "base_version": "0",
         "bundle": "ab", "samples": "1", "local_steps": "1", "train_loss": "1.0", "wall_time": "1.0", "profile": "p",
         "created_at": "0.0", "quantization": "fp32"}
        if kind == "update"
        else {"type": "global_adapter", "wire": "1", "version": "1", "parent_version": "0", "bundle": "ab",
              "strategy": "s", "created_at": "0", "rank": "4", "alpha": "8", "metrics": "{}"}
    )  # fmt: skip
    for name in draw(st.lists(st.sampled_from(sorted(meta)), max_size=2)):
        meta[name] = draw(st.sampled_from(HOSTILE_TEXT) | st.text(max_size=8))
    if draw(st.booleans()):
        header["__metadata__"] = meta
    elif draw(st.booleans()):
        header["__metadata__"] = draw(_json_value())
    payload = _frame(header, data)
    return "generated", b"AFZ1" + zlib.compress(payload) if draw(st.booleans()) else payload


@st.composite
def json_messages(draw: st.DrawFn, kind: str) -> tuple[str, bytes]:
    """An ack or a status document with each field valid or hostile, or any JSON at all."""
    if draw(st.integers(0, 4)) == 0:
        return "generated", json.dumps(draw(_json_value(3)), allow_nan=True).encode()
    doc: dict[str, object] = (
        {"type": "ack", "device_id": "dev-1", "update_id": "u", "accepted": True, "reason": "accepted",
         "global_version": 3}
        if kind == "ack"
        else {"state": "online", "version": 3}
    )  # fmt: skip
    for name in draw(st.lists(st.sampled_from(sorted(doc)), max_size=2)):
        doc[name] = draw(_json_value())
    return "generated", json.dumps(doc, allow_nan=True).encode()


@st.composite
def signed_updates(
    draw: st.DrawFn, device_id: str, key: bytes, bundle: str, shapes: Mapping[str, tuple[int, int]], rank: int
) -> tuple[str, bytes]:
    """Structurally valid, correctly signed updates whose values range over what ingest must judge:
    ranks up to 2r + 1, huge or non-finite entries, missing or extra layers, versions from the past
    and the future, odd sample counts, another device's id, another bundle."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    # Most are valid (ingest must accept them); one in two has one field ingest must refuse.
    bad = draw(st.sampled_from(["none"] * 9 + [
        "rank", "scale", "nan", "inf", "missing layer", "extra layer", "shape", "device", "bundle", "future",
        "negative version", "samples", "steps", "loss", "eval loss",
    ]))  # fmt: skip
    k = 2 * rank + 1 if bad == "rank" else draw(st.integers(1, 2 * rank))
    scale = {"scale": 1e30, "nan": float("nan"), "inf": float("inf")}.get(bad, 0.01)
    layers = dict(shapes)
    if bad == "missing layer":
        layers.pop(draw(st.sampled_from(sorted(layers))))
    if bad == "extra layer":
        layers["99.q"] = (4, 4)
    if bad == "shape":
        lid = draw(st.sampled_from(sorted(layers)))
        layers[lid] = (layers[lid][0] + 1, layers[lid][1])
    deltas = {
        lid: Factors(u=(scale * rng.standard_normal((o, k))).astype(np.float32),
                     v=(0.01 * rng.standard_normal((k, i))).astype(np.float32))
        for lid, (o, i) in layers.items()
    }  # fmt: skip
    update = protocol.AdapterUpdate(
        device_id="dev-other" if bad == "device" else device_id,
        update_id=draw(st.uuids()).hex,
        seq=draw(st.integers(0, 2**62)),
        base_version={"future": 10**6, "negative version": -1}.get(bad, 0),
        bundle="cd" * 32 if bad == "bundle" else bundle,
        samples=0 if bad == "samples" else draw(st.integers(1, 64)),
        local_steps=-1 if bad == "steps" else draw(st.integers(1, 8)),
        train_loss=float("nan") if bad == "loss" else draw(st.floats(0, 20)),
        wall_time=draw(st.floats(0, 1e4)),
        profile="x86-laptop",
        created_at=draw(st.floats(0, 2e9)),
        deltas=deltas,
        eval_loss=-1.0 if bad == "eval loss" else draw(st.sampled_from([float("nan"), float("inf"), 0.0, 2.5])),
    )
    quant = draw(st.sampled_from(protocol.QUANTIZATIONS))
    with np.errstate(all="ignore"):  # quantizing inf/nan on purpose
        return "signed", protocol.encode_update(update, key, quant, draw(st.sampled_from(protocol.CODECS)))


# -- tallies -------------------------------------------------------------------------------------------

_VALUES = re.compile(r"'[^']*'|\"[^\"]*\"|\[.*\]|\{.*\}|(?<![\w-])-?\d[\d.e+_-]*|[0-9a-f]{8,}…?")
_NAME = re.compile(r"'[A-Za-z_][\w.]{0,30}'")


def reason_key(reason: str) -> str:
    """A reject reason with its values blanked (field names kept), so the tally counts kinds of problem."""
    reason = re.sub(r"tensor '[^']*'", "tensor …", reason)
    names = _NAME.findall(reason)
    text = _VALUES.sub("…", _NAME.sub("\0", reason))
    for name in names:
        text = text.replace("\0", name, 1)
    if "expected" in text and "…" in text[: text.rfind("expected")]:  # "field x is <value>; expected y"
        text = text[: text.find("…") + 1] + " " + text[text.rfind("expected") :]
    return text[:100]
