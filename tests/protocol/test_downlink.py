"""4-bit factors on the uplink and the global adapter as a chain of quantized deltas (alignfed.downlink)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignfed import downlink, lowrank, protocol
from alignfed.downlink import Broadcaster, Outcome, follow
from alignfed.errors import ProtocolError
from alignfed.lowrank import Factors

RANK, IN, OUT = 4, 33, 21  # odd sizes: the 4-bit packing pads


def _adapter(rng: np.random.Generator, layers: int = 2) -> dict[str, np.ndarray]:
    t: dict[str, np.ndarray] = {}
    for i in range(layers):
        for m in ("q", "v"):
            t[f"lora.{i}.{m}.A"] = rng.standard_normal((RANK, IN)).astype(np.float32)
            t[f"lora.{i}.{m}.B"] = (0.1 * rng.standard_normal((OUT, RANK))).astype(np.float32)
    return t


def _moved(rng: np.random.Generator, t: dict[str, np.ndarray], step: float = 0.01) -> dict[str, np.ndarray]:
    return {n: (a + step * rng.standard_normal(a.shape)).astype(np.float32) for n, a in t.items()}


def _delta(step: downlink.Step, version: int, quant: str = "int4c") -> protocol.GlobalDelta:
    return protocol.GlobalDelta(
        version=version,
        parent_version=version - 1,
        bundle="b" * 64,
        strategy="fedbuff",
        created_at=1.5,
        rank=RANK,
        alpha=8.0,
        quantization=quant,
        digest=step.digest,
        wire=step.wire,
    )


# -- 4-bit codes ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 5),
    st.integers(1, 9),
    st.floats(1e-6, 1e3),
    st.integers(0, 2**31 - 1),
)
def test_int4_rows_round_trip_within_half_a_step(rows: int, cols: int, size: float, seed: int) -> None:
    x = (size * np.random.default_rng(seed).standard_normal((rows, cols))).astype(np.float32)
    packed, scale = lowrank.quantize_rows4(x)
    assert packed.dtype == np.int8 and packed.shape == (rows, (cols + 1) // 2)
    codes = lowrank.unpack_rows4(packed)
    assert codes.shape == (rows, cols if rows else 2 * packed.shape[1])  # no rows: nothing to tell the length by
    if rows:
        assert codes.min() >= -7 and codes.max() <= 7
        err = np.abs(lowrank.dequantize_rows4(packed, scale) - x)
        assert np.all(err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-12)


def test_int4_padding_anywhere_but_every_rows_end_is_refused() -> None:
    packed, _ = lowrank.quantize_rows4(np.ones((2, 3), np.float32))
    bad = packed.copy().view(np.uint8)
    bad[0, 0] = 0x88  # −8 in both nibbles of the first byte
    with pytest.raises(ValueError, match="padding code"):
        lowrank.unpack_rows4(bad.view(np.int8))
    one_row = packed.copy().view(np.uint8)
    one_row[1, -1] &= 0x0F  # row 1 no longer padded: the rows disagree on their length
    with pytest.raises(ValueError, match="padding code"):
        lowrank.unpack_rows4(one_row.view(np.int8))


def _update(u: np.ndarray, v: np.ndarray) -> protocol.AdapterUpdate:
    return protocol.AdapterUpdate(
        device_id="d",
        update_id="u",
        seq=1,
        base_version=0,
        bundle="b",
        samples=1,
        local_steps=1,
        train_loss=1.0,
        wall_time=1.0,
        profile="p",
        created_at=0.0,
        deltas={"0.q": Factors(u=u, v=v)},
    )


def test_int4c_update_round_trips_within_half_a_step_per_component_and_is_half_of_int8c() -> None:
    rng = np.random.default_rng(3)
    # SVD-like: columns of u and rows of v of very different size
    u = (rng.standard_normal((OUT, 3)) * [10.0, 1.0, 0.01]).astype(np.float32)
    v = (rng.standard_normal((3, IN)) * [[5.0], [1.0], [0.1]]).astype(np.float32)
    payload = protocol.encode_update(_update(u, v), b"k", "int4c")
    got = protocol.decode_update(payload, 1 << 20).update
    assert got.quantization == "int4c"
    f = got.deltas["0.q"]
    assert f.u.shape == (OUT, 3) and f.v.shape == (3, IN)
    u_step = np.abs(u).max(axis=0) / 7
    v_step = np.abs(v).max(axis=1) / 7
    assert np.all(np.abs(f.u - u) <= u_step[None, :] / 2 * (1 + 1e-5))
    assert np.all(np.abs(f.v - v) <= v_step[:, None] / 2 * (1 + 1e-5))
    tensors = protocol.unpack(payload, 1 << 20)[0]
    int8c = protocol.unpack(protocol.encode_update(_update(u, v), b"k", "int8c"), 1 << 20)[0]
    data = {name: t.nbytes for name, t in tensors.items()}
    assert data["delta.0.q.u"] == 3 * ((OUT + 1) // 2) and data["delta.0.q.v"] == 3 * ((IN + 1) // 2)
    assert data["delta.0.q.u"] + data["delta.0.q.v"] < 0.55 * (
        int8c["delta.0.q.u"].nbytes + int8c["delta.0.q.v"].nbytes
    )
    assert protocol.wire_roundtrip(Factors(u=u, v=v), "int4c").dense() == pytest.approx(f.dense())


def test_int4c_update_with_a_misplaced_padding_code_is_a_protocol_error() -> None:
    rng = np.random.default_rng(4)
    meta, tensors = protocol._update_wire(
        _update(rng.standard_normal((OUT, 2)).astype(np.float32), rng.standard_normal((2, IN)).astype(np.float32)),
        "int4c",
    )
    u = tensors["delta.0.q.u"].copy().view(np.uint8)
    u[0, 0] = 0x88
    tensors["delta.0.q.u"] = u.view(np.int8)
    with pytest.raises(ProtocolError, match="padding code"):
        protocol.decode_update(protocol.pack(tensors, meta), 1 << 20)


# -- the downlink's wire ---------------------------------------------------------------------------


@pytest.mark.parametrize("quant", protocol.DOWNLINK_QUANTIZATIONS)
def test_changes_round_trip_within_half_a_step_per_rank_component(quant: str) -> None:
    rng = np.random.default_rng(5)
    changes = _moved(rng, {n: np.zeros_like(a) for n, a in _adapter(rng).items()}, step=1.0)
    back = protocol.dequantize_changes(protocol.quantize_changes(changes, quant), quant)
    levels = {"fp32": None, "int8c": 127, "int4c": 7}[quant]
    for name, c in changes.items():
        if levels is None:
            np.testing.assert_array_equal(back[name], c)
            continue
        axis = 1 if name.endswith(".A") else 0  # A: a scale per row (r, in), B: per column (out, r)
        step = np.abs(c).max(axis=axis, keepdims=True) / levels
        assert np.all(np.abs(back[name] - c) <= step / 2 * (1 + 1e-5)), name


def test_global_delta_round_trips_and_is_an_eighth_of_a_snapshot() -> None:
    rng = np.random.default_rng(6)
    prev = _adapter(rng, layers=4)
    step = Broadcaster("int4c").step(prev, _moved(rng, prev))
    d = _delta(step, 3)
    payload = protocol.encode_global_delta(d)
    got = protocol.decode_global_delta(payload, 1 << 20)
    assert (got.version, got.parent_version, got.digest, got.quantization) == (3, 2, step.digest, "int4c")
    for name in prev:
        np.testing.assert_array_equal(got.changes()[name], d.changes()[name])
    snapshot = protocol.encode_global(protocol.GlobalAdapter(3, 2, "b" * 64, "fedbuff", 1.5, RANK, 8.0, step.published))
    raw = sum(a.nbytes for a in prev.values())
    assert len(payload) < 0.5 * len(snapshot)  # at this toy size the header is a large part of both
    data = sum(t.nbytes for t in got.wire.values())
    assert data == raw / 8 + 4 * RANK * len(prev) + RANK / 2 * len(prev)  # codes, a scale per component, padding


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m, t: m.update(type="global_adapter"), "expected 'global_delta'"),
        (lambda m, t: m.update(parent_version="3"), "not below version"),
        (lambda m, t: m.update(digest="xyz"), "64 lower-case hex"),
        (lambda m, t: m.update(quantization="int2"), "unknown downlink quantization"),
        (lambda m, t: t.update({"lora.0.q.A.q": np.zeros((RANK, 2), np.float32)}), "expected int8"),
        (lambda m, t: t.update({"lora.0.q.A.scale": np.ones(RANK + 1, np.float32)}), "scale has shape"),
        (lambda m, t: t.update({"junk": np.ones(2, np.float32)}), "unexpected tensor"),
        (lambda m, t: t.pop("lora.0.q.B.scale"), "expected lora.0.q.B.q and .scale"),
    ],
)
def test_malformed_global_delta_is_a_protocol_error(edit, message: str) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(7)
    prev = _adapter(rng)
    d = _delta(Broadcaster("int4c").step(prev, _moved(rng, prev)), 3)
    tensors, meta = protocol.unpack(protocol.encode_global_delta(d, "none"), 1 << 20)
    tensors = dict(tensors)
    edit(meta, tensors)
    with pytest.raises(ProtocolError, match=message):
        protocol.decode_global_delta(protocol.pack(tensors, meta), 1 << 20)


# -- the chain -----------------------------------------------------------------------------------


def test_gauge_keeps_every_product_and_undoes_sign_flips_and_swaps() -> None:
    rng = np.random.default_rng(8)
    prev = _adapter(rng)
    flip = np.diag([1.0, -1.0, 1.0, -1.0])[[1, 0, 2, 3]]  # signs flipped and two components swapped
    new = {}
    for n, a in prev.items():
        new[n] = (flip @ a if n.endswith(".A") else a @ flip.T).astype(np.float32)
    fixed = downlink.gauge(prev, new)
    for n in prev:
        if n.endswith(".A"):
            b = n[:-1] + "B"
            np.testing.assert_allclose(fixed[b] @ fixed[n], new[b] @ new[n], atol=1e-5)
        np.testing.assert_allclose(fixed[n], prev[n], atol=1e-5)


def test_a_follower_of_the_chain_holds_bit_for_bit_what_the_coordinator_published() -> None:
    rng = np.random.default_rng(9)
    target = _adapter(rng)
    cast = Broadcaster("int4c")
    published = {n: a.copy() for n, a in target.items()}
    held, version = {n: a.copy() for n, a in published.items()}, 0
    for v in range(1, 13):
        target = _moved(rng, target)
        step = cast.step(published, target)
        cast.accept(step)
        published = step.published
        payload = protocol.encode_global_delta(_delta(step, v))
        outcome, tensors = follow(version, held, protocol.decode_global_delta(payload, 1 << 20))
        assert outcome is Outcome.APPLIED and tensors is not None
        held, version = tensors, v
        assert protocol.adapter_digest(held) == step.digest
        for n in held:
            np.testing.assert_array_equal(held[n], published[n])


def test_error_feedback_keeps_the_federation_where_exact_publishing_would_have_taken_it() -> None:
    """As the coordinator runs it: each version is the last published one plus the same small step.
    With the carry, the published adapter stays within one quantization's error of the exact
    trajectory; dropping each version's error lets them add up."""
    errors = {}
    for feedback in (True, False):
        rng = np.random.default_rng(10)
        start = _adapter(rng, layers=1)
        drift = {n: 0.02 * rng.standard_normal(a.shape).astype(np.float32) for n, a in start.items()}
        published = {n: a.copy() for n, a in start.items()}
        exact = {n: a.copy() for n, a in start.items()}
        cast = Broadcaster("int4c", feedback=feedback)
        for _ in range(40):
            exact = {n: a + drift[n] for n, a in exact.items()}
            # the strategy's new adapter is built on what was published, in its factors' gauge
            built = {n: a + drift[n] for n, a in downlink.gauge(exact, published).items()}
            step = cast.step(published, built)
            cast.accept(step)
            published = step.published
        # products: the gauge may rotate factors, never what they multiply to
        got, want = _products(published), _products(exact)
        errors[feedback] = float(np.sqrt(sum(np.sum((got[n] - want[n]) ** 2) for n in want)))
        assert (cast.carried_norm() > 0) == feedback
    size = float(np.sqrt(sum(np.sum(d**2) for d in drift.values())))
    assert errors[True] < 0.5 * errors[False]
    assert errors[True] < size  # within one version's step of the exact trajectory, after 40


def _products(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: t[n[:-1] + "B"].astype(np.float64) @ t[n] for n in t if n.endswith(".A")}


def test_gap_and_tampering_ask_for_a_snapshot_and_the_chain_goes_on_from_it() -> None:
    rng = np.random.default_rng(11)
    target = _adapter(rng)
    cast = Broadcaster("int8c")
    chain: list[tuple[protocol.GlobalDelta, dict[str, np.ndarray]]] = []
    published = {n: a.copy() for n, a in target.items()}
    v0 = {n: a.copy() for n, a in published.items()}
    for v in range(1, 5):
        target = _moved(rng, target)
        step = cast.step(published, target)
        cast.accept(step)
        published = step.published
        chain.append(
            (protocol.decode_global_delta(protocol.encode_global_delta(_delta(step, v, "int8c")), 1 << 20), published)
        )
    # v1 applies; v3 after v1 is a gap: nothing is applied
    outcome, held = follow(0, v0, chain[0][0])
    assert outcome is Outcome.APPLIED and held is not None
    assert follow(1, held, chain[2][0]) == (Outcome.GAP, None)
    assert follow(None, None, chain[0][0]) == (Outcome.GAP, None)  # no base at all
    assert follow(1, held, chain[0][0]) == (Outcome.OLD, None)
    # a wrong base (one bit off) applies but does not match the digest
    wrong = {n: a.copy() for n, a in held.items()}
    wrong["lora.0.q.A"].view(np.uint32)[0, 0] ^= 1
    assert follow(1, wrong, chain[1][0]) == (Outcome.MISMATCH, None)
    # a delta whose result is not finite is refused even when its digest is that result's
    inf = {n: np.full_like(a, np.inf) for n, a in held.items()}
    bad = replace(chain[1][0], quantization="fp32", wire=protocol.quantize_changes(inf, "fp32"))
    bad = replace(bad, digest=protocol.adapter_digest(downlink.apply(held, bad.changes())))
    with np.errstate(invalid="ignore"):
        assert follow(1, held, bad) == (Outcome.MISMATCH, None)
    # the snapshot of v3 (what `global/adapter` retains), then v4 chains on it
    snapshot = protocol.decode_global(
        protocol.encode_global(protocol.GlobalAdapter(3, 2, "b" * 64, "fedbuff", 0.0, RANK, 8.0, chain[2][1])), 1 << 20
    )
    outcome, held = follow(snapshot.version, snapshot.tensors, chain[3][0])
    assert outcome is Outcome.APPLIED and held is not None
    assert protocol.adapter_digest(held) == protocol.adapter_digest(chain[3][1])


def test_mutated_global_deltas_are_refused_or_never_applied_unless_their_digest_holds() -> None:
    """Hostile deltas (truncated, bit-flipped, spliced, inflated, header-poked real payloads): the
    decoder answers a ProtocolError with a one-line reason that one of its checks gave, and what
    decodes is applied only when the digest of the result holds."""
    from tests.fuzz.payloads import CASES, GUARD, corpus

    rng = np.random.default_rng(12)
    prev = _adapter(rng)
    pool = []
    for quant in ("int4c", "int8c"):
        step = Broadcaster(quant).step(prev, _moved(rng, prev))
        for codec in ("deflate", "none"):
            pool.append(protocol.encode_global_delta(_delta(step, 1, quant), codec))
    applied = refused = 0
    for _how, payload in corpus(pool, CASES, seed=3):
        try:
            d = protocol.decode_global_delta(payload, 1 << 20)
        except ProtocolError as exc:
            reason = str(exc)
            assert reason and "\n" not in reason and len(reason) < 1000 and not GUARD.match(reason), reason
            refused += 1
            continue
        outcome, tensors = follow(0, prev, d)
        assert outcome in (Outcome.APPLIED, Outcome.MISMATCH, Outcome.GAP, Outcome.OLD)
        if outcome is Outcome.APPLIED:
            assert tensors is not None and protocol.adapter_digest(tensors) == d.digest
            applied += 1
    assert refused > 0


def test_the_carry_moves_on_only_with_a_stored_version() -> None:
    """A version whose store fails is made again: its carry must not have been taken yet."""
    rng = np.random.default_rng(13)
    prev = _adapter(rng)
    cast = Broadcaster("int4c")
    step = cast.step(prev, _moved(rng, prev))
    assert cast.carried_norm() == 0.0
    again = cast.step(prev, _moved(np.random.default_rng(13), prev))
    assert sum(float(np.sum(c**2)) for c in step.carry.values()) > 0
    cast.accept(again)
    assert cast.carried_norm() == pytest.approx(
        np.sqrt(sum(float(np.sum(c.astype(np.float64) ** 2)) for c in again.carry.values()))
    )
