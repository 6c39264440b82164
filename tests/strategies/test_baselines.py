"""FedAsync, FedAvg, FedStaleWeight, staleness weights, the server step and the registry."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from alignfed.errors import RejectedUpdate
from alignfed.lowrank import Factors
from coordinator.strategies import NAMES, build, server_update
from coordinator.strategies.fedasync import FedAsync
from coordinator.strategies.fedavg import FedAvg
from coordinator.strategies.fedstaleweight import FedStaleWeight
from coordinator.strategies.staleness import FEDBUFF, Constant, Hinge, Polynomial, make, polynomial


def test_staleness_weights() -> None:
    assert Constant(0.7)(5) == 0.7
    assert Polynomial(0.5)(3) == pytest.approx(0.5)
    assert FEDBUFF(8) == pytest.approx(1 / 3) and make("sqrt") == Polynomial(0.5) == FEDBUFF
    np.testing.assert_allclose(polynomial([0, 3, 8], 0.5), [1.0, 0.5, 1 / 3])
    h = Hinge(a=10, b=4)
    assert [h(t) for t in (0, 4)] == [1.0, 1.0]
    assert h(6) == pytest.approx(1 / 21)
    for w in (Constant(), Polynomial(1.3), Hinge(), FEDBUFF):
        values = [w(t) for t in range(20)]
        assert values[0] == 1.0 and values == sorted(values, reverse=True)
    assert make("hinge", a=2, b=1) == Hinge(2, 1)
    with pytest.raises(ValueError, match="expected one of constant, polynomial, hinge, sqrt"):
        make("linear")
    with pytest.raises(ValueError, match="≥ 0"):
        FEDBUFF(-1)


def test_fedasync_applies_one_at_a_time_oldest_first(syn: Any) -> None:
    fa = FedAsync(alpha=0.5, staleness=Polynomial(1.0))
    assert not fa.ready(0.0)
    fa.add(syn.update("late", 2, seed=1), 3)
    fa.add(syn.update("early", 3, seed=2), 3)
    assert fa.ready(0.0)
    current = syn.state(version=3, rank=8)  # rank 8 ≥ rank(x + Δ): nothing truncated
    agg = fa.aggregate(current, 0.0)
    assert agg.used == ("late",)
    assert agg.weights == {"late": pytest.approx(0.5 * 0.5)}  # α · (1 + τ)^−1 with τ = 1
    assert [u.update_id for u in fa.pending()] == ["early"]
    before, after = syn.products(current), syn.products(agg.state)
    delta = syn.dense(syn.update("late", 2, seed=1))
    for lid in before:
        np.testing.assert_allclose(after[lid], before[lid] + 0.25 * delta[lid], atol=1e-5)
    agg2 = fa.aggregate(agg.state, 0.0)
    assert agg2.used == ("early",) and agg2.metrics["staleness"] == [1] and agg2.state.version == 5


def test_fedavg_rejects_stale_and_waits_for_all_n(syn: Any) -> None:
    fa = FedAvg(n=3)
    with pytest.raises(RejectedUpdate, match="stale: base version 4 but the synchronous round aggregates on version 5"):
        fa.add(syn.update("old", 4, device="a"), 5)
    fa.add(syn.update("u1", 5, device="a", samples=10, seed=1), 5)
    with pytest.raises(RejectedUpdate, match="duplicate: device a"):
        fa.add(syn.update("u1b", 5, device="a"), 5)
    fa.add(syn.update("u2", 5, device="b", samples=30, seed=2), 5)
    assert not fa.ready(1e9)  # no timeout: the round waits for the slowest device
    fa.add(syn.update("u3", 5, device="c", samples=60, seed=3), 5)
    assert fa.ready(0.0)
    current = syn.state(version=5, rank=8)
    agg = fa.aggregate(current, 0.0)
    assert agg.weights == pytest.approx({"u1": 0.1, "u2": 0.3, "u3": 0.6})
    ups = [syn.update(f"u{i}", 5, seed=i) for i in (1, 2, 3)]
    expected = syn.weighted_sum(ups, [0.1, 0.3, 0.6])
    before, after = syn.products(current), syn.products(agg.state)
    for lid in before:
        np.testing.assert_allclose(after[lid], before[lid] + expected[lid], atol=1e-5)
    assert fa.pending() == []


def test_fedstaleweight_upweights_slow_devices(syn: Any) -> None:
    fsw = FedStaleWeight(k=3)
    # history: the slow device has been 4 versions behind, the fast one fresh
    fsw.restore({"slow": (2, 8), "fast": (6, 0)})
    fsw.add(syn.update("f1", 9, device="fast", seed=1), 9)
    fsw.add(syn.update("f2", 9, device="fast", seed=2), 9)
    fsw.add(syn.update("s1", 5, device="slow", seed=3), 9)
    agg = fsw.aggregate(syn.state(version=9), 0.0)
    # τ̄_slow = (8 + 4) / 3 = 4, τ̄_fast = 0: raw weights 1, 1, 5
    assert agg.weights == pytest.approx({"f1": 1 / 7, "f2": 1 / 7, "s1": 5 / 7})
    assert agg.metrics["device_staleness"] == {"fast": 0.0, "slow": 4.0}
    assert fsw.history() == {"fast": (8, 0), "slow": (3, 12)}


def test_error_feedback_residual_is_carried(syn: Any) -> None:
    """Rank 2 truncates; the residual comes back next time, so s·BA + R is conserved exactly."""
    state = syn.state(version=0)
    total = syn.totals(state)
    for step in range(4):
        upd = syn.update(f"u{step}", step, seed=step, k=3)
        delta = syn.dense(upd)
        state = server_update.apply(state, upd.deltas, server_lr=0.5, method="pca", error_feedback=True)
        for lid in total:
            total[lid] = total[lid] + 0.5 * delta[lid]
        now = syn.totals(state)
        for lid in total:
            np.testing.assert_allclose(now[lid], total[lid], atol=1e-5)
    assert server_update.residual_norm(state) > 1e-3


def test_without_error_feedback_the_residual_is_dropped(syn: Any) -> None:
    state = syn.state(version=0)
    upd = syn.update("u", 0, k=3)
    delta = syn.dense(upd)
    new = server_update.apply(state, upd.deltas, server_lr=1.0, error_feedback=False)
    assert new.residual == {} and server_update.residual_norm(new) == 0.0
    before, after = syn.products(state), syn.products(new)
    lid = "0.q"
    exact = before[lid] + delta[lid]
    sv = np.linalg.svd(exact, compute_uv=False)
    assert np.linalg.norm(after[lid] - exact) == pytest.approx(math.sqrt(float(np.sum(sv[2:] ** 2))), rel=1e-4)


def test_server_step_checks_layers(syn: Any) -> None:
    state = syn.state()
    with pytest.raises(ValueError, match="does not have"):
        server_update.apply(state, {"7.q": Factors(u=np.zeros((8, 1)), v=np.zeros((1, 6)))}, server_lr=1.0)
    with pytest.raises(ValueError, match="has shape"):
        server_update.apply(state, {"0.q": Factors(u=np.zeros((6, 1)), v=np.zeros((1, 8)))}, server_lr=1.0)


def test_registry_builds_every_name(syn: Any) -> None:
    options: dict[str, dict[str, Any]] = {
        "fedavg": {"n": 2},
        "fedasync": {"alpha": 0.5},
        "fedbuff": {"k": 2},
        "fedstaleweight": {"k": 2},
        "alignfed": {"k": 2, "alignment": False},
    }
    assert set(options) == set(NAMES)
    for name, opts in options.items():
        s = build(name, **opts)
        assert s.name == name
    with pytest.raises(ValueError, match="bad options for strategy 'fedbuff'"):
        build("fedbuff", buffer=3)


def test_failed_aggregation_keeps_the_buffer(syn: Any) -> None:
    """A delta the adapter cannot take fails the aggregation but loses no buffered update."""
    from coordinator.strategies.alignfed import AlignFed, AlignFedConfig

    wrong = syn.update("bad", 0, shapes={"0.q": (3, 3)})
    for strategy in (
        build("fedbuff", k=2),
        build("fedstaleweight", k=2),
        build("fedasync"),
        AlignFed(AlignFedConfig(k=2, alignment=False)),
    ):
        strategy.add(wrong, 0)
        strategy.add(syn.update("good", 0, device="b"), 0)
        with pytest.raises(ValueError, match="has shape"):
            strategy.aggregate(syn.state(), 0.0)
        assert sorted(u.update_id for u in strategy.pending()) == ["bad", "good"]
