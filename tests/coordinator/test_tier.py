"""Site updates: the combined delta, its members on the wire, and the root's per-device view."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from alignfed import protocol
from alignfed.errors import ProtocolError
from alignfed.lowrank import Factors
from coordinator.tier import client_updates, combine, member_weights, members_of, stored_key, stored_keys
from tests.support.messages import adapter_update

KEY = b"k" * 32


def _update(uid: str, device: str, samples: int, rng: np.random.Generator, k: int = 2) -> protocol.AdapterUpdate:
    deltas = {
        "0.q": Factors(u=rng.normal(size=(6, k)).astype(np.float32), v=rng.normal(size=(k, 5)).astype(np.float32))
    }
    return adapter_update(update_id=uid, device_id=device, samples=samples, base_version=3, deltas=deltas)


def test_combine_is_the_weighted_sum_up_to_the_cut_which_it_keeps_as_residual() -> None:
    rng = np.random.default_rng(0)
    ups = [_update(f"u{i}", f"d{i}", 4 * (i + 1), rng) for i in range(3)]
    w = member_weights([u.samples for u in ups], "samples")
    assert np.allclose(w, [4 / 24, 8 / 24, 12 / 24])
    exact = sum(wi * u.deltas["0.q"].dense() for wi, u in zip(w, ups, strict=True))  # (6, 5)
    big, rest = combine(ups, list(w), max_rank=6, residual={})
    np.testing.assert_allclose(big["0.q"].dense(), exact, atol=1e-5)  # rank 6 holds all three rank-2 deltas
    assert rest == {}
    cut, rest = combine(ups, list(w), max_rank=2, residual={})
    assert cut["0.q"].rank == 2
    np.testing.assert_allclose(cut["0.q"].dense() + rest["0.q"].dense(), exact, atol=1e-5)  # nothing lost
    nxt, _ = combine(ups[:1], [1.0], max_rank=6, residual=rest)  # the cut rides with the next site update
    np.testing.assert_allclose(nxt["0.q"].dense(), ups[0].deltas["0.q"].dense() + rest["0.q"].dense(), atol=1e-5)
    with pytest.raises(ValueError, match="share their base version"):
        combine([ups[0], dataclasses.replace(ups[1], base_version=2)], [0.5, 0.5], 4, {})


def test_members_travel_signed_and_device_updates_stay_byte_identical() -> None:
    rng = np.random.default_rng(1)
    plain = _update("u1", "dev-1", 8, rng)
    assert b"members" not in protocol.encode_update(plain, KEY)
    site = dataclasses.replace(plain, device_id="site-a", members=members_of([plain, plain], [0.25, 0.75]))
    payload = protocol.encode_update(site, KEY)
    decoded = protocol.decode_update(payload, 1 << 20)
    assert decoded.verify(KEY) and decoded.update.members == site.members
    tampered = payload.replace(b"0.75", b"0.95")  # a site cannot reweigh its members after signing
    assert not protocol.decode_update(tampered, 1 << 20).verify(KEY)
    bad = protocol.pack({}, {"members": "[[1]]"})
    with pytest.raises(ProtocolError):
        protocol._members(protocol.unpack(bad, 1 << 20)[1]["members"])


def test_the_root_sees_a_site_update_as_its_member_devices() -> None:
    rng = np.random.default_rng(2)
    a1, a2, b1 = _update("a1", "dev-a", 4, rng), _update("a2", "dev-a", 6, rng), _update("b1", "dev-b", 8, rng)
    site = dataclasses.replace(
        a1, device_id="site-a", update_id="s1", members=members_of([a1, a2, b1], [0.2, 0.3, 0.5])
    )
    clients = client_updates(site, 5.0)
    assert [(c.device_id, c.samples) for c in clients] == [("dev-a", 4), ("dev-a", 6), ("dev-b", 8)]
    assert len({c.update_id for c in clients}) == 3  # one device twice in a site update: still distinct
    assert all(c.deltas is site.deltas and c.base_version == 3 for c in clients)
    assert {stored_key(c.device_id, c.update_id) for c in clients} == {("site-a", "s1")}
    used = {c.update_id: (c.device_id, 0.1) for c in clients} | {"own": ("dev-c", 0.4)}
    keys = stored_keys(used)
    assert set(keys) == {"s1", "own"} and keys["s1"][0] == "site-a" and keys["s1"][1] == pytest.approx(0.3)
    assert client_updates(a1, 5.0)[0].update_id == "a1"  # a device's own update is itself


@pytest.mark.parametrize("stale", [0, 2])
def test_under_fedbuff_a_site_tier_gives_the_flat_federations_version(stale: int) -> None:
    """Decision 19's claim, checked: the same device updates folded flat, or combined by a site
    (uniform split) and expanded at the root, give the same next adapter."""
    from alignfed import lora
    from coordinator.strategies.base import AdapterState
    from coordinator.strategies.fedbuff import FedBuff

    rng = np.random.default_rng(3)
    r, out, inp = 2, 6, 5
    tensors = {}
    for m in ("q", "v"):
        tensors[lora.key(0, m, "A")] = rng.normal(0, 0.1, (r, inp)).astype(np.float32)
        tensors[lora.key(0, m, "B")] = rng.normal(0, 0.1, (out, r)).astype(np.float32)
    state = AdapterState(version=3 + stale, tensors=tensors, scale=2.0, rank=r)

    def device(uid: str, dev: str, samples: int) -> protocol.AdapterUpdate:
        deltas = {
            lid: Factors(u=rng.normal(size=(out, 1)).astype(np.float32), v=rng.normal(size=(1, inp)).astype(np.float32))
            for lid in ("0.q", "0.v")
        }
        return adapter_update(update_id=uid, device_id=dev, base_version=3, samples=samples, deltas=deltas)

    ups = [device("u1", "d1", 4), device("u2", "d2", 8), device("u3", "d1", 20)]  # FedBuff ignores samples
    flat = FedBuff(k=3, error_feedback=False)
    for u in ups:
        flat.add(client_updates(u, 0.0)[0], state.version)
    w = member_weights([u.samples for u in ups], "uniform")
    deltas, rest = combine(ups, list(w), max_rank=4, residual={})  # 2r = 4 ≥ the members' rank 3: no cut
    assert rest == {}
    site = dataclasses.replace(
        ups[0], device_id="site-a", update_id="s1", deltas=deltas, members=members_of(ups, list(w))
    )
    tiered = FedBuff(k=3, error_feedback=False)
    for c in client_updates(site, 0.0):
        tiered.add(c, state.version)
    a, b = flat.aggregate(state, 1.0), tiered.aggregate(state, 1.0)
    for lid in ("0.q", "0.v"):
        np.testing.assert_allclose(
            lora.product(b.state.tensors, lid, state.scale), lora.product(a.state.tensors, lid, state.scale), atol=1e-5
        )
    assert stored_keys({uid: ("x", wt) for uid, wt in b.weights.items()})["s1"][1] == pytest.approx(
        sum(a.weights.values())
    )


def test_a_sites_fairness_split_is_the_roots_per_device_split_within_the_site() -> None:
    """AlignFed's per-device factors n^γ·(p̄/p)^β restricted to one site's members and renormalised do
    not depend on p̄ (within the clip), so a site's own window splits its share as the root would."""
    from coordinator import fairness

    params = fairness.FairnessParams(gamma=0.5, beta=1.0, h_min=0.1, h_max=10.0)
    site_history = ["a1", "a1", "a2", "a3", "a3", "a3"]
    root = fairness.ParticipationWindow(64, [*site_history, "b1", "b1", "b2", "b3", "b3", "b3", "b3"])
    devices, samples = ["a1", "a2", "a3", "b1"], [8, 4, 16, 8]
    flat = fairness.weights(samples, [1] * 4, devices, [0.9] * 4, root, params)  # one group: same τ and c
    expected = flat[:3] / flat[:3].sum()
    site = member_weights(samples[:3], "fairness", devices[:3], fairness.ParticipationWindow(64, site_history), params)
    np.testing.assert_allclose(site, expected, rtol=1e-12)
    assert not np.allclose(site, member_weights(samples[:3], "samples"))  # participation matters
