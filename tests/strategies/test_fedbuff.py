from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignfed.errors import RejectedUpdate
from alignfed.lowrank import Method
from coordinator.strategies import build
from coordinator.strategies.fedbuff import FedBuff
from coordinator.strategies.staleness import Constant


def test_k1_constant_weight_is_plain_async_step(syn: Any) -> None:
    """FedBuff with K=1 and s ≡ 1 is x_{t+1} = x_t + η Δ (rank big enough that nothing is truncated)."""
    shapes = {"0.q": (8, 6), "1.v": (5, 6)}
    current = syn.state(version=3, rank=4, shapes=shapes)
    for name, t in current.tensors.items():
        if name.endswith(".A"):
            t[2:] = 0.0  # product of rank 2 in a rank-4 adapter
    upd = syn.update("u1", base_version=1, shapes=shapes)  # rank-2 delta: rank(x + ηΔ) ≤ 4
    fb = FedBuff(k=1, server_lr=0.7, staleness=Constant())
    fb.add(upd, current_version=3)
    assert fb.ready(0.0)
    agg = fb.aggregate(current, 0.0)
    assert agg.state.version == 4
    before, after, delta = syn.products(current), syn.products(agg.state), syn.dense(upd)
    for lid in before:
        np.testing.assert_allclose(after[lid], before[lid] + 0.7 * delta[lid], atol=1e-4)
        assert np.abs(agg.state.residual[lid].dense()).max() < 1e-4
    assert agg.metrics["staleness"] == [2]
    assert agg.weights == {"u1": 1.0}
    assert fb.pending() == []


def test_weights_are_sqrt_staleness_over_k(syn: Any) -> None:
    current = syn.state(version=5)
    fb = FedBuff(k=3)
    for i, base in enumerate([5, 4, 2]):
        fb.add(syn.update(f"u{i}", base_version=base, seed=i), current_version=5)
        assert fb.ready(0.0) == (i == 2)
    agg = fb.aggregate(current, 0.0)
    assert agg.used == ("u2", "u1", "u0")  # canonical order: base version, device, update id
    assert agg.metrics["staleness"] == [3, 1, 0]
    np.testing.assert_allclose(agg.metrics["weights"], [1 / 6, 1 / (3 * np.sqrt(2)), 1 / 3])
    assert agg.weights["u0"] == pytest.approx(1 / 3)


def test_sum_with_error_feedback_is_conserved(syn: Any) -> None:
    """Rank 2 cannot hold x + ηΔ: what PCA drops lives on in the residual."""
    current = syn.state(version=0)
    fb = FedBuff(k=2, server_lr=1.0)
    updates = [syn.update(f"u{i}", 0, seed=10 + i) for i in range(2)]
    for u in updates:
        fb.add(u, 0)
    agg = fb.aggregate(current, 0.0)
    expected = syn.weighted_sum(updates, agg.metrics["weights"])
    before, after = syn.totals(current), syn.totals(agg.state)
    for lid in before:
        np.testing.assert_allclose(after[lid], before[lid] + expected[lid], atol=1e-5)
    assert agg.metrics["residual_norm"] > 1e-3


def test_rejects_future_and_duplicate(syn: Any) -> None:
    fb = FedBuff(k=2)
    with pytest.raises(RejectedUpdate, match="future: base version 4 is ahead of current 3"):
        fb.add(syn.update("u1", 4), current_version=3)
    fb.add(syn.update("u1", 3), current_version=3)
    with pytest.raises(RejectedUpdate, match="duplicate"):
        fb.add(syn.update("u1", 3), current_version=3)
    assert len(fb.pending()) == 1


def test_empty_aggregate_refused(syn: Any) -> None:
    with pytest.raises(RuntimeError, match="empty buffer"):
        FedBuff(k=1).aggregate(syn.state(), 0.0)


def test_registry_builds_fedbuff() -> None:
    fb = build("fedbuff", k=4, server_lr=0.5, staleness="hinge")
    assert isinstance(fb, FedBuff) and fb.k == 4
    with pytest.raises(ValueError, match="expected one of fedavg, fedasync, fedbuff, fedstaleweight, alignfed"):
        build("fedprox")


@settings(max_examples=25, deadline=None)
@given(order=st.permutations(range(4)), method=st.sampled_from(["pca", "qrcp", "cur"]))
def test_permutation_invariant(order: list[int], method: Method, syn: Any) -> None:
    current = syn.state(version=6)
    updates = [syn.update(f"u{i}", base_version=b, seed=i) for i, b in enumerate([6, 5, 5, 2])]
    results = []
    for perm in (range(4), order):
        fb = FedBuff(k=4, server_lr=0.9, method=method)
        for i in perm:
            fb.add(updates[i], 6)
        agg = fb.aggregate(current, 0.0)
        results.append(syn.totals(agg.state))
        assert dict(agg.weights) == pytest.approx(dict(sorted(agg.weights.items())))
    for lid in results[0]:
        np.testing.assert_allclose(results[0][lid], results[1][lid], atol=1e-5)
