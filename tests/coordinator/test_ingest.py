"""Every validation rule of ingest rejects with a reason that says what was wrong."""

from __future__ import annotations

import math
import zlib
from typing import TypedDict, Unpack

import numpy as np
import pytest

from alignfed import protocol
from alignfed.errors import RejectedUpdate
from alignfed.lowrank import Factors
from alignfed.manifest import Architecture, LoraLayout, Manifest
from coordinator.ingest import IngestLimits, frobenius, payload_limit, validate
from tests.support.messages import adapter_update

KEY = b"k" * 32
ARCH = Architecture("llama", 2, 16, 32, 4, 2, 50, 64, 10000.0, 1e-5, False)
MANIFEST = Manifest("tiny", "0" * 64, ARCH, LoraLayout(("q", "v"), 2, 4.0), "fp32")


def make_update(**changes: object) -> protocol.AdapterUpdate:
    rng = np.random.default_rng(0)
    deltas = {}
    for lid, (out_dim, in_dim) in MANIFEST.delta_shapes().items():
        deltas[lid] = Factors(
            u=0.01 * rng.standard_normal((out_dim, 4)).astype(np.float32),
            v=0.01 * rng.standard_normal((4, in_dim)).astype(np.float32),
        )
    return adapter_update(**{"deltas": deltas, **changes})


DEFAULT_LIMITS = IngestLimits()


def check(
    payload: bytes, device: str = "dev-1", current: int = 3, limits: IngestLimits = DEFAULT_LIMITS
) -> protocol.AdapterUpdate:
    return validate(
        device,
        payload,
        manifest=MANIFEST,
        bundle="B",
        key_of=lambda d: KEY if d in ("dev-1", "dev-2") else None,
        has_version=lambda v: 0 <= v <= current,
        current_version=current,
        limits=limits,
    )


def test_valid_update_passes() -> None:
    got = check(protocol.encode_update(make_update(), KEY))
    assert got.update_id == "u1" and set(got.deltas) == {"0.q", "0.v", "1.q", "1.v"}


class CheckOptions(TypedDict, total=False):
    """check's keyword arguments, for helpers that pass them on."""

    device: str
    current: int
    limits: IngestLimits


def reason(payload: bytes, **kw: Unpack[CheckOptions]) -> str:
    with pytest.raises(RejectedUpdate) as exc:
        check(payload, **kw)
    return exc.value.reason


def test_bad_signature() -> None:
    assert "bad signature" in reason(protocol.encode_update(make_update(), b"wrong key"))


def test_unknown_device() -> None:
    payload = protocol.encode_update(make_update(device_id="dev-9"), KEY)
    assert "unknown device 'dev-9'" in reason(payload, device="dev-9")


def test_topic_and_header_device_must_match() -> None:
    assert "does not match topic device 'dev-2'" in reason(protocol.encode_update(make_update(), KEY), device="dev-2")


def test_wrong_shapes() -> None:
    d = dict(make_update().deltas)
    d["0.q"] = Factors(u=np.zeros((15, 4), np.float32), v=np.zeros((4, 16), np.float32))
    r = reason(protocol.encode_update(make_update(deltas=d), KEY))
    assert "wrong shape for layer 0.q" in r and "expected u [16, k]" in r


def test_rank_above_2r() -> None:
    d = dict(make_update().deltas)
    d["0.q"] = Factors(u=np.zeros((16, 5), np.float32), v=np.zeros((5, 16), np.float32))
    assert "1 ≤ k ≤ 4" in reason(protocol.encode_update(make_update(deltas=d), KEY))


def test_missing_and_extra_layers() -> None:
    d = dict(make_update().deltas)
    d["7.q"] = d.pop("1.v")
    r = reason(protocol.encode_update(make_update(deltas=d), KEY))
    assert "missing ['1.v']" in r and "unexpected ['7.q']" in r


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite(bad: float) -> None:
    d = dict(make_update().deltas)
    u = d["1.v"].u.copy()
    u[0, 0] = bad
    d["1.v"] = Factors(u=u, v=d["1.v"].v)
    assert "non-finite values (NaN/Inf) in layer 1.v" in reason(protocol.encode_update(make_update(deltas=d), KEY))


def test_norm_bound() -> None:
    d = {k: Factors(u=f.u * 1e4, v=f.v) for k, f in make_update().deltas.items()}
    assert "bound is 1" in reason(
        protocol.encode_update(make_update(deltas=d), KEY), limits=IngestLimits(max_delta_norm=1.0)
    )


def test_future_and_stale_versions() -> None:
    assert "future version" in reason(protocol.encode_update(make_update(base_version=9), KEY))
    r = reason(protocol.encode_update(make_update(base_version=0), KEY), current=3, limits=IngestLimits(tau_max=2))
    assert "stale: base version 0 is 3 behind current 3 (tau_max 2)" in r


def test_other_bundle() -> None:
    assert "does not match the federation's bundle" in reason(protocol.encode_update(make_update(bundle="C"), KEY))


def test_malformed_and_oversized() -> None:
    assert reason(b"garbage").startswith("malformed")
    payload = protocol.encode_update(make_update(), KEY)
    assert "limit is 100" in reason(payload, limits=IngestLimits(max_payload_bytes=100))


def test_frobenius_matches_dense() -> None:
    rng = np.random.default_rng(1)
    f = Factors(u=rng.standard_normal((7, 3)).astype(np.float32), v=rng.standard_normal((3, 5)).astype(np.float32))
    assert frobenius(f) == pytest.approx(np.linalg.norm(f.dense()), rel=1e-9)


@pytest.mark.parametrize("field", ["train_loss", "wall_time", "created_at"])
def test_non_finite_header_numbers(field: str) -> None:
    payload = protocol.encode_update(make_update(**{field: float("nan")}), KEY)
    assert f"header field {field} is nan" in reason(payload)


def test_deflated_payloads_inflate_at_most_to_the_bundles_largest_update() -> None:
    limit = payload_limit(DEFAULT_LIMITS, MANIFEST)
    assert limit < DEFAULT_LIMITS.max_payload_bytes
    exact = protocol.encode_update(make_update(), KEY, "fp32", "deflate")  # the largest kind there is
    assert check(exact).update_id == "u1"
    bomb = b"AFZ1" + zlib.compress(b"\0" * (limit + 1), 9)  # small on the wire, too big inflated
    assert len(bomb) < limit
    assert f"more than the {limit}-byte limit" in reason(bomb)


def test_eval_loss_must_be_a_loss() -> None:
    assert "eval_loss is -1.0; expected a loss ≥ 0" in reason(protocol.encode_update(make_update(eval_loss=-1.0), KEY))
    assert check(protocol.encode_update(make_update(eval_loss=math.inf), KEY)).eval_loss == math.inf  # diverged


def _narrow(width: int) -> dict[str, Factors]:
    """Deltas of factor width `width` (a rank-k device sends at most 2k)."""
    return {lid: Factors(u=f.u[:, :width].copy(), v=f.v[:width].copy()) for lid, f in make_update().deltas.items()}


def test_ranks_up_to_the_federations_are_accepted() -> None:
    """The federation's rank is 2: a device capped at 1 (factors ≤ 2 wide) and one at 2 both pass."""
    capped = check(protocol.encode_update(make_update(rank=1, deltas=_narrow(2)), KEY))
    assert capped.rank == 1 and {f.rank for f in capped.deltas.values()} == {2}
    assert check(protocol.encode_update(make_update(rank=2), KEY)).rank == 2
    assert check(protocol.encode_update(make_update(), KEY)).rank == 0  # unstated: the bundle's rank


def test_a_rank_above_the_federations_is_refused() -> None:
    r = reason(protocol.encode_update(make_update(rank=3), KEY))
    assert r == (
        "LoRA rank 3 in the header; the federation's adapter has rank 2, so expected 1 ≤ rank ≤ 2: "
        "cap the device's rank with max_rank = 2 (or less) in its profile"
    )
    assert "expected 1 ≤ rank ≤ 2" in reason(protocol.encode_update(make_update(rank=-1), KEY))


def test_a_capped_update_may_not_send_wider_factors_than_its_rank_allows() -> None:
    """Rank 1 means a delta of rank ≤ 2: four columns cannot come from it."""
    r = reason(protocol.encode_update(make_update(rank=1), KEY))
    assert "wrong shape for layer 0.q" in r and "1 ≤ k ≤ 2 (2 × LoRA rank 1)" in r
