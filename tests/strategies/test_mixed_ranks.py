"""Mixed LoRA ranks in every strategy: a rank-k update is a product delta D = U V of rank ≤ 2k.

Every strategy combines deltas as products, x_{t+1} = x_t + η Σ w_i U_i V_i (stacked factors,
`server_update.combine`), so an update from a device capped at rank k < r needs no special case:
its narrower factors mean exactly the matrix they multiply to. These tests hold each strategy to
that, and show that zero-padding a narrow update's factors to the full width 2r changes nothing
(zero columns of U and rows of V add nothing to U V; AlignFed's alignment V′ = V P keeps zero rows
zero), which is why the two readings of a rank-k update agree here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from alignfed.lowrank import Factors
from coordinator.alignment import ActivationSource
from coordinator.strategies.alignfed import AlignFed, AlignFedConfig
from coordinator.strategies.base import AdapterState, ClientUpdate, Strategy
from coordinator.strategies.fedasync import FedAsync
from coordinator.strategies.fedavg import FedAvg
from coordinator.strategies.fedbuff import FedBuff
from coordinator.strategies.fedstaleweight import FedStaleWeight
from tests.strategies.conftest import Synthetic

CURRENT = 4
SERVER_RANK = 8  # ≥ rank of every product here, so re-factorization truncates nothing


def _alignfed(syn: Synthetic, activations: ActivationSource) -> AlignFed:
    def state_of(v: int) -> AdapterState:
        return syn.state(version=v, seed=100 + v, rank=SERVER_RANK)

    return AlignFed(AlignFedConfig(k=3, prefetch=False), activations=activations, state_of=state_of)


# name -> (factory, base versions of the three updates: FedAvg's round takes only fresh ones)
STRATEGIES: dict[str, tuple[Callable[[Any], Strategy], list[int]]] = {
    "fedavg": (lambda syn: FedAvg(n=3), [CURRENT] * 3),
    "fedasync": (lambda syn: FedAsync(alpha=0.6), [CURRENT, CURRENT - 1, CURRENT - 2]),
    "fedbuff": (lambda syn: FedBuff(k=3, server_lr=0.8), [CURRENT, CURRENT - 1, CURRENT - 2]),
    "fedbuff-median": (
        lambda syn: FedBuff(k=3, aggregator="median"),
        [CURRENT, CURRENT - 1, CURRENT],
    ),
    "fedstaleweight": (lambda syn: FedStaleWeight(k=3), [CURRENT, CURRENT - 1, CURRENT - 2]),
    "alignfed": (lambda syn: _alignfed(syn, syn.frozen()), [CURRENT, CURRENT - 1, CURRENT - 2]),
}


def _updates(syn: Any, bases: list[int]) -> list[ClientUpdate]:
    """Three devices: full rank r = 2 (factors 2r = 4 wide), capped at 1 (2 wide), and at 1 again."""
    widths = [2 * syn.rank, 2, 2]
    return [
        syn.update(f"u{i}", base, device=f"dev-{i}", samples=10 * (i + 1), seed=i, k=k)
        for i, (base, k) in enumerate(zip(bases, widths, strict=True))
    ]


def _padded(update: ClientUpdate, width: int) -> ClientUpdate:
    """The same update with its factors zero-padded to `width` columns of U / rows of V."""
    deltas = {}
    for lid, f in update.deltas.items():
        extra = width - f.rank
        u = np.concatenate([f.u, np.zeros((f.u.shape[0], extra), np.float32)], axis=1)
        v = np.concatenate([f.v, np.zeros((extra, f.v.shape[1]), np.float32)], axis=0)
        deltas[lid] = Factors(u=u, v=v)
    return ClientUpdate(
        device_id=update.device_id,
        update_id=update.update_id,
        base_version=update.base_version,
        samples=update.samples,
        deltas=deltas,
    )


def _run(
    strategy: Strategy, updates: list[ClientUpdate], current: AdapterState
) -> tuple[AdapterState, dict[str, float]]:
    """Add every update, aggregate until the buffer is empty; the last state and every weight used."""
    for u in updates:
        strategy.add(u, current.version)
    weights: dict[str, float] = {}
    state = current
    while strategy.pending():
        assert strategy.ready(1e9)
        agg = strategy.aggregate(state, 1e9)
        weights.update(agg.weights)
        state = agg.state
    return state, weights


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_mixed_rank_updates_add_as_products(name: str, syn: Any) -> None:
    """x_{t+1} = x_t + η Σ w_i D_i for updates of rank 2r and 2k < 2r alike (D_i = U_i V_i dense)."""
    make, bases = STRATEGIES[name]
    strategy = make(syn)
    updates = _updates(syn, bases)
    assert sorted({f.rank for u in updates for f in u.deltas.values()}) == [2, 2 * syn.rank]
    current = syn.state(version=CURRENT, rank=SERVER_RANK)
    after, weights = _run(strategy, updates, current)
    lr = getattr(strategy, "server_lr", 1.0)
    totals = syn.totals(after)
    if name == "fedbuff-median":  # the coordinate-wise median of the dense deltas, scaled by Σ w
        stack = {lid: np.stack([syn.dense(u)[lid] for u in updates]) for lid in totals}
        expected = {lid: np.median(s, axis=0) * sum(weights.values()) for lid, s in stack.items()}
    else:
        expected = syn.weighted_sum(updates, [weights[u.update_id] for u in updates])
    before = syn.products(current)
    for lid in before:
        np.testing.assert_allclose(totals[lid], before[lid] + lr * expected[lid], atol=2e-5)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_zero_padding_a_narrow_update_changes_nothing(name: str, syn: Any) -> None:
    make, bases = STRATEGIES[name]
    updates = _updates(syn, bases)
    current = syn.state(version=CURRENT, rank=SERVER_RANK)
    narrow, w_narrow = _run(make(syn), updates, current)
    wide, w_wide = _run(make(syn), [_padded(u, 2 * syn.rank) for u in updates], current)
    assert w_narrow == pytest.approx(w_wide)
    got, want = syn.totals(narrow), syn.totals(wide)
    for lid in got:
        np.testing.assert_allclose(got[lid], want[lid], atol=2e-5)


def test_alignment_maps_a_narrow_update_like_its_padded_form(syn: Any) -> None:
    """With real drift (a chain of layers), AlignFed's V′ = V P treats a rank-k update like its
    zero-padded form: stale capped updates are aligned, not special-cased."""
    shapes = syn.chain_shapes

    def updates(pad: bool) -> list[ClientUpdate]:
        out = [
            syn.update(f"u{i}", CURRENT - 1, device=f"dev-{i}", seed=i, k=k, shapes=shapes)
            for i, k in enumerate([2 * syn.rank, 2, 2])
        ]
        return [_padded(u, 2 * syn.rank) for u in out] if pad else out

    def aggregate(pad: bool) -> tuple[AdapterState, Any]:
        af = AlignFed(
            AlignFedConfig(k=3, prefetch=False),
            activations=syn.chain(shapes),
            state_of=lambda v: syn.state(version=v, seed=7, shapes=shapes),
        )
        for u in updates(pad):
            af.add(u, CURRENT)
        agg = af.aggregate(syn.state(version=CURRENT, seed=8, rank=SERVER_RANK, shapes=shapes), 0.0)
        return agg.state, agg.metrics

    (narrow, m_narrow), (wide, m_wide) = aggregate(False), aggregate(True)
    assert m_narrow["groups"][0]["aligned"] and m_narrow["groups"][0]["rho_mean"] > 0  # alignment acted
    assert m_narrow["weights"] == pytest.approx(m_wide["weights"])
    got, want = syn.totals(narrow), syn.totals(wide)
    for lid in got:
        np.testing.assert_allclose(got[lid], want[lid], atol=2e-5)
