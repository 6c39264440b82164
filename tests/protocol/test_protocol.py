from __future__ import annotations

import dataclasses
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load as st_load

from alignfed import protocol
from alignfed.errors import ProtocolError
from alignfed.lowrank import Factors
from alignfed.protocol import unpack
from alignfed.topics import Topics

GOLDEN = Path(__file__).resolve().parent.parent / "fixtures" / "golden_update.bin"
KEY = bytes(range(32))


def golden_update() -> protocol.AdapterUpdate:
    u = np.arange(12, dtype=np.float32).reshape(4, 3) / 8.0
    v = -np.arange(6, dtype=np.float32).reshape(3, 2) / 4.0
    return protocol.AdapterUpdate(
        device_id="dev-01",
        update_id="00000000000000000000000000000001",
        seq=7,
        base_version=3,
        bundle="ab" * 32,
        samples=16,
        local_steps=4,
        train_loss=2.5,
        wall_time=1.25,
        profile="rpi5-8gb",
        created_at=1700000000.5,
        deltas={"0.q": Factors(u=u, v=v)},
    )


def test_golden_bytes() -> None:
    """The wire format is frozen: the same message encodes to exactly these bytes."""
    payload = protocol.encode_update(golden_update(), KEY)
    assert payload == GOLDEN.read_bytes()
    (n,) = struct.unpack("<Q", payload[:8])
    assert n % 8 == 0


def test_the_stated_rank_is_signed_and_checked() -> None:
    """A device's LoRA rank travels in the header (absent when unstated, so the golden bytes hold)."""
    stated = dataclasses.replace(golden_update(), rank=2)
    decoded = protocol.decode_update(protocol.encode_update(stated, KEY), max_bytes=1 << 20)
    assert decoded.update.rank == 2 and decoded.verify(KEY)
    tensors, meta = protocol.unpack(protocol.encode_update(stated, KEY), 1 << 20)
    forged = protocol.decode_update(protocol.pack(tensors, {**meta, "rank": "1"}), max_bytes=1 << 20)
    assert forged.update.rank == 1 and not forged.verify(KEY)  # the signature covers the rank
    with pytest.raises(ProtocolError, match="header field 'rank'='two' is not a int"):
        protocol.decode_update(protocol.pack(tensors, {**meta, "rank": "two"}), max_bytes=1 << 20)


def test_interoperates_with_safetensors() -> None:
    tensors = st_load(protocol.encode_update(golden_update(), KEY))
    np.testing.assert_array_equal(tensors["delta.0.q.u"], golden_update().deltas["0.q"].u)


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_", min_size=1, max_size=20)


@st.composite
def updates(draw: st.DrawFn) -> protocol.AdapterUpdate:
    n_layers = draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    deltas = {}
    for i in range(n_layers):
        out_dim, in_dim, k = draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 4))
        deltas[f"{i}.{draw(st.sampled_from(['q', 'v', 'down']))}"] = Factors(
            u=rng.standard_normal((out_dim, k)).astype(np.float32),
            v=rng.standard_normal((k, in_dim)).astype(np.float32),
        )
    finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
    return protocol.AdapterUpdate(
        device_id=draw(names),
        update_id=draw(names),
        seq=draw(st.integers(0, 2**62)),
        base_version=draw(st.integers(0, 2**31)),
        bundle=draw(names),
        samples=draw(st.integers(1, 10**6)),
        local_steps=draw(st.integers(1, 10**4)),
        train_loss=draw(finite),
        wall_time=draw(finite),
        profile=draw(names),
        created_at=draw(finite),
        deltas=deltas,
        eval_loss=draw(st.one_of(st.just(float("nan")), st.just(float("inf")), finite)),
        rank=draw(st.integers(0, 64)),  # 0: not stated
    )


@settings(max_examples=60, deadline=None)
@given(updates(), st.sampled_from(["fp32", "int8", "int8c"]), st.sampled_from(protocol.CODECS))
def test_update_round_trip(update: protocol.AdapterUpdate, quant: str, codec: str) -> None:
    decoded = protocol.decode_update(protocol.encode_update(update, KEY, quant, codec), max_bytes=1 << 24)
    got = decoded.update
    assert decoded.verify(KEY) and not decoded.verify(b"other key")
    for name in (
        "device_id",
        "update_id",
        "seq",
        "base_version",
        "bundle",
        "samples",
        "local_steps",
        "profile",
        "rank",
    ):
        assert getattr(got, name) == getattr(update, name)
    for name in ("train_loss", "wall_time", "created_at"):
        assert getattr(got, name) == getattr(update, name)
    assert got.eval_loss == update.eval_loss or (math.isnan(got.eval_loss) and math.isnan(update.eval_loss))
    assert set(got.deltas) == set(update.deltas)
    for lid, f in update.deltas.items():
        if quant == "fp32":
            np.testing.assert_array_equal(got.deltas[lid].u, f.u)
            np.testing.assert_array_equal(got.deltas[lid].v, f.v)
        else:  # int8: error ≤ half a step of each row's (int8c: u's column's) scale
            u_axis = 0 if quant == "int8c" else 1
            for a, b, axis in ((got.deltas[lid].u, f.u, u_axis), (got.deltas[lid].v, f.v, 1)):
                step = np.abs(b).max(axis=axis, keepdims=True) / 127.0
                assert np.all(np.abs(a - b) <= step * 0.5 + 1e-7)
        assert protocol.wire_roundtrip(f, quant).u.tobytes() == got.deltas[lid].u.tobytes()


def test_int8c_sends_k_scales_for_u_and_is_smaller() -> None:
    rng = np.random.default_rng(1)
    u = rng.standard_normal((64, 4)).astype(np.float32) * np.array([8.0, 1.0, 0.1, 0.01], np.float32)  # SVD-like
    v = rng.standard_normal((4, 48)).astype(np.float32)
    update = dataclasses.replace(golden_update(), deltas={"0.q": Factors(u=u, v=v)})
    per_row, per_col = (protocol.encode_update(update, KEY, q) for q in ("int8", "int8c"))
    assert len(per_col) < len(per_row)
    assert unpack(per_col, 1 << 20)[0]["delta.0.q.u_scale"].shape == (4,)
    got = {
        q: protocol.decode_update(p, 1 << 20).update.deltas["0.q"].u for q, p in (("int8", per_row), ("int8c", per_col))
    }
    # the small columns keep their precision when they have their own scale
    assert np.abs(got["int8c"][:, 3] - u[:, 3]).max() < 0.1 * np.abs(got["int8"][:, 3] - u[:, 3]).max()


def svd_like_update() -> protocol.AdapterUpdate:
    """An update shaped like a real one: per layer u = U·sqrt(σ) (out, 8), v = sqrt(σ)·Vᵀ (8, in)."""
    rng = np.random.default_rng(3)
    deltas = {}
    for i in range(4):
        for module, out in (("q", 96), ("v", 32)):
            u_, _ = np.linalg.qr(rng.standard_normal((out, 8)))
            v_, _ = np.linalg.qr(rng.standard_normal((96, 8)))
            root = np.sqrt(np.sort(rng.gamma(1.0, 1.0, 8))[::-1])
            deltas[f"{i}.{module}"] = Factors(u=(u_ * root).astype(np.float32), v=(v_ * root).T.astype(np.float32))
    return dataclasses.replace(golden_update(), deltas=deltas)


def test_deflated_update_is_smaller_and_decodes_to_the_same_update() -> None:
    update = svd_like_update()
    plain, packed = (protocol.encode_update(update, KEY, "int8c", codec) for codec in ("none", "deflate"))
    assert packed[:4] == b"AFZ1" and len(packed) < 0.95 * len(plain)
    a, b = (protocol.decode_update(p, 1 << 20) for p in (plain, packed))
    assert a.digest == b.digest and a.update.signature == b.update.signature and b.verify(KEY)
    for lid in update.deltas:
        assert a.update.deltas[lid].u.tobytes() == b.update.deltas[lid].u.tobytes()
        assert a.update.deltas[lid].v.tobytes() == b.update.deltas[lid].v.tobytes()


def test_deflated_payload_is_bounded_and_checked() -> None:
    packed = protocol.encode_update(svd_like_update(), KEY, "int8c", "deflate")
    inflated = len(zlib.decompress(packed[4:]))
    with pytest.raises(ProtocolError, match=f"more than the {inflated - 1}-byte limit"):
        protocol.decode_update(packed, max_bytes=inflated - 1)  # the payload fits, what it inflates to not
    assert protocol.decode_update(packed, max_bytes=inflated).verify(KEY)
    with pytest.raises(ProtocolError, match="truncated"):
        protocol.decode_update(packed[:-7], max_bytes=1 << 20)
    with pytest.raises(ProtocolError, match="3 bytes after its zlib stream"):
        protocol.decode_update(packed + b"xyz", max_bytes=1 << 20)
    with pytest.raises(ProtocolError, match="corrupt"):
        protocol.decode_update(b"AFZ1" + b"\x00" * 64, max_bytes=1 << 20)
    bomb = b"AFZ1" + zlib.compress(b"\0" * (1 << 22), 9)  # 4 MiB of zeros in ~4 kB
    with pytest.raises(ProtocolError, match="more than the 1048576-byte limit"):
        protocol.decode_update(bomb, max_bytes=1 << 20)
    with pytest.raises(ProtocolError, match="unknown codec 'zstd'"):
        protocol.encode_update(svd_like_update(), KEY, "int8c", "zstd")


def test_global_round_trip() -> None:
    rng = np.random.default_rng(0)
    g = protocol.GlobalAdapter(
        version=5,
        parent_version=4,
        bundle="b",
        strategy="fedbuff",
        created_at=1.5,
        rank=4,
        alpha=8.0,
        tensors={
            "lora.0.q.A": rng.standard_normal((4, 8)).astype(np.float32),
            "lora.0.q.B": np.zeros((8, 4), np.float32),
        },
        metrics={"jain_index": 0.9, "accepted_share": {"a": 1.0}},
    )
    got = protocol.decode_global(protocol.encode_global(g), max_bytes=1 << 20)
    assert (got.version, got.parent_version, got.rank, got.alpha, got.strategy) == (5, 4, 4, 8.0, "fedbuff")
    assert got.metrics == g.metrics
    np.testing.assert_array_equal(got.tensors["lora.0.q.A"], g.tensors["lora.0.q.A"])


def test_eval_loss_is_optional_signed_and_checked() -> None:
    plain = protocol.encode_update(golden_update(), KEY)
    assert "eval_loss" not in unpack(plain, 1 << 20)[1]  # nan: not on the wire, old receivers unaffected
    assert math.isnan(protocol.decode_update(plain, 1 << 20).update.eval_loss)
    measured = protocol.encode_update(dataclasses.replace(golden_update(), eval_loss=2.75), KEY)
    decoded = protocol.decode_update(measured, 1 << 20)
    assert decoded.update.eval_loss == 2.75 and decoded.verify(KEY)
    tensors, meta = unpack(measured, 1 << 20)
    forged = protocol.decode_update(protocol.pack(tensors, {**meta, "eval_loss": "0.5"}), 1 << 20)
    assert forged.update.eval_loss == 0.5 and not forged.verify(KEY)  # the signature covers it
    with pytest.raises(ProtocolError, match="header field 'eval_loss'='low' is not a float"):
        protocol.decode_update(protocol.pack(tensors, {**meta, "eval_loss": "low"}), 1 << 20)


def test_tampered_payload_fails_signature() -> None:
    payload = bytearray(protocol.encode_update(golden_update(), KEY))
    payload[-1] ^= 0x01  # flip one bit of the last tensor value
    assert not protocol.decode_update(bytes(payload), max_bytes=1 << 20).verify(KEY)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "too short"),
        (struct.pack("<Q", 1 << 40) + b"{}", "does not fit"),
        (struct.pack("<Q", 2) + b"[]", "not a JSON object"),
        (struct.pack("<Q", 4) + b"nope", "not JSON"),
    ],
)
def test_garbage_is_a_protocol_error(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        protocol.decode_update(payload, max_bytes=1 << 20)


def test_truncated_payload_is_rejected() -> None:
    payload = protocol.encode_update(golden_update(), KEY)
    with pytest.raises(ProtocolError, match="do not fit the data"):
        protocol.decode_update(payload[:-5], max_bytes=1 << 20)


def test_size_limit_checked_before_decoding() -> None:
    with pytest.raises(ProtocolError, match="limit is 100"):
        protocol.decode_update(b"\0" * 101, max_bytes=100)


def test_ack_round_trip() -> None:
    ack = protocol.Ack("dev-1", "u1", False, "bad signature", 3)
    assert protocol.decode_ack(protocol.encode_ack(ack)) == ack
    with pytest.raises(ProtocolError):
        protocol.decode_ack(b"{")


# topic matching truth table
@pytest.mark.parametrize(
    ("topic", "device"),
    [
        ("alignfed/fed/devices/dev-1/update", "dev-1"),
        ("alignfed/fed/devices/dev-1/ack", "dev-1"),
        ("alignfed/fed/devices/dev-1/update/x", None),
        ("alignfed/other/devices/dev-1/update", None),
        ("alignfed/fed/global/adapter", None),
        ("alignfed/fed/devices/+/update", None),
    ],
)
def test_device_of(topic: str, device: str | None) -> None:
    assert Topics("fed").device_of(topic) == device


def _with_tensors(extra: dict[str, np.ndarray], drop: str | None = None) -> bytes:
    """The golden update re-framed with some tensors added or removed (signature not re-made)."""
    from alignfed.protocol import pack, unpack

    tensors, meta = unpack(protocol.encode_update(golden_update(), KEY, "int8"), 1 << 20)
    tensors = {**{k: v for k, v in tensors.items() if k != drop}, **extra}
    return pack(tensors, meta)


def test_unknown_tensor_name_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match=r"unexpected tensor 'delta\.foo'"):
        protocol.decode_update(_with_tensors({"delta.foo": np.zeros((2, 2), np.float32)}), 1 << 20)


def test_scale_of_wrong_length_is_a_protocol_error() -> None:
    payload = _with_tensors({"delta.0.q.u_scale": np.ones(3, np.float32)})
    with pytest.raises(ProtocolError, match=r"u_scale has shape \[3\], expected \[4\]"):
        protocol.decode_update(payload, 1 << 20)
