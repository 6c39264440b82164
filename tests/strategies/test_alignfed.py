"""The AlignFed strategy end to end on synthetic adapters."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignfed.errors import RejectedUpdate
from coordinator.strategies import build
from coordinator.strategies.alignfed import AlignFed, AlignFedConfig

# (update id, device, base version, samples)
PLAN = [("u0", "a", 6, 10), ("u1", "b", 6, 40), ("u2", "a", 5, 10), ("u3", "c", 3, 25), ("u4", "d", 5, 5)]


def _strategy(syn: Any, **options: Any) -> AlignFed:
    options.setdefault("k", len(PLAN))
    cfg = AlignFedConfig(**options)
    chain = syn.chain()
    states = {v: syn.state(version=v, seed=v, shapes=syn.chain_shapes) for v in range(7)}
    return AlignFed(cfg, activations=chain, state_of=states.get, cache_dtype=np.float32)


def _updates(syn: Any) -> list[Any]:
    return [
        syn.update(uid, base, device=dev, samples=n, seed=i, shapes=syn.chain_shapes)
        for i, (uid, dev, base, n) in enumerate(PLAN)
    ]


def test_rejects_too_stale_and_future(syn: Any) -> None:
    af = AlignFed(AlignFedConfig(tau_max=8, alignment=False))
    with pytest.raises(RejectedUpdate) as info:
        af.add(syn.update("u1", 3), current_version=12)
    assert info.value.reason == "stale: base version 3 is 9 behind current 12 (tau_max 8)"
    with pytest.raises(RejectedUpdate, match="future: base version 13 is ahead of current 12"):
        af.add(syn.update("u2", 13), current_version=12)
    af.add(syn.update("u3", 4), current_version=12)  # τ = 8 is still fine
    assert [u.update_id for u in af.pending()] == ["u3"]


def test_ready_after_k_or_max_wait(syn: Any) -> None:
    af = AlignFed(AlignFedConfig(k=3, max_wait_s=10.0, alignment=False))
    assert not af.ready(100.0)
    af.add(syn.update("u1", 0, received_at=5.0), 0)
    af.add(syn.update("u2", 0, received_at=7.0), 0)
    assert not af.ready(14.9)
    assert af.ready(15.0)
    af.add(syn.update("u3", 0, received_at=8.0), 0)
    assert af.ready(8.0)
    agg = af.aggregate(syn.state(), 8.0)
    assert agg.metrics["trigger"] == "k"


def test_full_pipeline_metrics_and_conservation(syn: Any) -> None:
    af = _strategy(syn)
    current = syn.state(version=6, seed=6, shapes=syn.chain_shapes)
    updates = _updates(syn)
    for u in updates:
        af.add(u, 6)
    agg = af.aggregate(current, 0.0)
    m = agg.metrics
    assert agg.state.version == 7
    assert sorted(agg.used) == sorted(u.update_id for u in updates)
    assert sum(agg.weights.values()) == pytest.approx(1.0)
    assert m["staleness_histogram"] == {0: 2, 1: 2, 3: 1}
    groups = {g["base_version"]: g for g in m["groups"]}
    assert groups[6]["aligned"] is False and groups[6]["confidence"] == 1.0
    for v in (3, 5):
        assert groups[v]["aligned"] is True
        assert groups[v]["rho"]["0.q"] == 0.0  # layer 0 never drifts
        assert 0 < groups[v]["confidence"] <= 1
    assert set(m["alignment_residual"]) == {"0.q", "1.q", "2.v"}
    assert 0 < m["jain_index"] <= 1
    assert m["shares"] == {"a": 0.4, "b": 0.2, "c": 0.2, "d": 0.2}
    assert m["forward_passes"] == 3  # versions 3, 5 and 6
    # error feedback: s·B A + R moved by exactly η Σ w_i D′_i (nothing lost to the truncation)
    aligned = _aligned_deltas(syn, af.config.lam, updates, current)
    moved = max(np.abs(aligned["u3"][lid] - syn.dense(updates[3])[lid]).max() for lid in ("1.q", "2.v"))
    assert moved > 1e-2  # the stale groups really were changed by alignment (not a vacuous identity)
    before, after = syn.totals(current), syn.totals(agg.state)
    for lid in before:
        expected = sum(agg.weights[u.update_id] * aligned[u.update_id][lid] for u in updates)
        np.testing.assert_allclose(after[lid], before[lid] + expected, atol=1e-5)


def _aligned_deltas(syn: Any, lam: float, updates: list[Any], current: Any) -> dict[str, dict[str, np.ndarray]]:
    """D′ = D P per update from the design's formula, computed here with numpy on the chain's own
    activations (independent of the code under test):
    P = (X_vᵀX_t + λI)(X_tᵀX_t + λI)⁻¹, λ = lam · tr(X_tᵀX_t) / in."""
    chain = syn.chain()
    acts_t = chain.activations(current)
    out: dict[str, dict[str, np.ndarray]] = {}
    for u in updates:
        acts_v = chain.activations(syn.state(version=u.base_version, seed=u.base_version, shapes=syn.chain_shapes))
        out[u.update_id] = {}
        for lid, f in u.deltas.items():
            x_v, x_t = acts_v[lid], acts_t[lid]  # (n, in) each
            gram = x_t.T @ x_t  # (in, in)
            eye = np.eye(gram.shape[0])
            ridge = lam * np.trace(gram) / gram.shape[0]
            p = (x_v.T @ x_t + ridge * eye) @ np.linalg.inv(gram + ridge * eye)  # (in, in)
            out[u.update_id][lid] = f.dense() @ p  # (out, in)
    return out


@settings(max_examples=12, deadline=None)
@given(order=st.permutations(range(len(PLAN))), method=st.sampled_from(["pca", "qrcp", "cur"]))
def test_permutation_invariant(order: list[int], method: str, syn: Any) -> None:
    current = syn.state(version=6, seed=6, shapes=syn.chain_shapes)
    updates = _updates(syn)
    results = []
    for perm in (range(len(PLAN)), order):
        af = _strategy(syn, method=method)
        for i in perm:
            af.add(updates[i], 6)
        agg = af.aggregate(current, 0.0)
        results.append((syn.totals(agg.state), dict(agg.weights), syn.products(agg.state)))
    for lid in results[0][0]:
        np.testing.assert_array_equal(results[0][0][lid], results[1][0][lid])
        np.testing.assert_array_equal(results[0][2][lid], results[1][2][lid])
    assert results[0][1] == results[1][1]


def test_alignment_is_identity_when_nothing_drifts(syn: Any) -> None:
    """With activations that never change, alignment on == alignment off, bit for bit."""
    current = syn.state(version=6, seed=6)
    updates = [syn.update(uid, base, device=dev, samples=n, seed=i) for i, (uid, dev, base, n) in enumerate(PLAN)]
    results = []
    for alignment in (True, False):
        af = AlignFed(AlignFedConfig(k=5, alignment=alignment), activations=syn.frozen())
        for u in updates:
            af.add(u, 6)
        agg = af.aggregate(current, 0.0)
        results.append((syn.products(agg.state), agg.weights))
        if alignment:
            assert all(g["confidence"] == 1.0 for g in agg.metrics["groups"])
    for lid in results[0][0]:
        np.testing.assert_array_equal(results[0][0][lid], results[1][0][lid])
    assert results[0][1] == results[1][1]


def test_alignment_pulls_stale_updates_towards_their_intended_effect(syn: Any) -> None:
    """On the linear chain, the aligned aggregate reproduces each stale update's intended output change."""
    chain = syn.chain()
    old = syn.state(version=2, seed=2, shapes=syn.chain_shapes)
    current = syn.state(version=4, seed=4, shapes=syn.chain_shapes)
    upd = syn.update("u0", 2, seed=9, shapes=syn.chain_shapes)
    errs = {}
    for alignment in (True, False):
        states = {2: old}
        af = AlignFed(
            AlignFedConfig(k=1, alignment=alignment, lam=1e-4),
            activations=chain,
            state_of=states.get,
            cache_dtype=np.float32,
        )
        af.add(upd, 4)
        agg = af.aggregate(current, 0.0)
        moved = {lid: syn.totals(agg.state)[lid] - syn.totals(current)[lid] for lid in syn.chain_shapes}  # = D′
        x_v, x_t = chain.activations(old), chain.activations(current)
        num = sum(np.linalg.norm(x_t[lid] @ moved[lid].T - x_v[lid] @ syn.dense(upd)[lid].T) ** 2 for lid in moved)
        den = sum(np.linalg.norm(x_v[lid] @ syn.dense(upd)[lid].T) ** 2 for lid in moved)
        errs[alignment] = float(np.sqrt(num / den))
    assert errs[False] > 0.1
    assert errs[True] < 0.1 * errs[False]


def test_missing_old_state_skips_alignment(syn: Any) -> None:
    af = AlignFed(AlignFedConfig(k=1), activations=syn.chain(), state_of=lambda v: None, cache_dtype=np.float32)
    af.add(syn.update("u0", 1, shapes=syn.chain_shapes), 3)
    agg = af.aggregate(syn.state(version=3, shapes=syn.chain_shapes), 0.0)
    (group,) = agg.metrics["groups"]
    assert group["aligned"] is False and "no longer available" in group["skipped"]


def test_remembers_the_states_it_produced(syn: Any) -> None:
    """An update based on a version this strategy produced is aligned without `state_of`."""
    chain = syn.chain()
    af = AlignFed(AlignFedConfig(k=1), activations=chain, cache_dtype=np.float32)
    s0 = syn.state(version=0, shapes=syn.chain_shapes)
    af.add(syn.update("u0", 0, seed=1, shapes=syn.chain_shapes), 0)
    s1 = af.aggregate(s0, 0.0).state
    af.add(syn.update("u1", 0, seed=2, shapes=syn.chain_shapes), 1)
    s2 = af.aggregate(s1, 0.0).state
    af.add(syn.update("u2", 1, seed=3, shapes=syn.chain_shapes), 2)
    agg = af.aggregate(s2, 0.0)
    assert agg.metrics["groups"][0]["aligned"] is True


def test_grouping_off_treats_everything_as_fresh(syn: Any) -> None:
    af = AlignFed(AlignFedConfig(k=2, grouping=False, fairness=False, gamma=0.0))
    af.add(syn.update("u0", 6, device="a"), 6)
    af.add(syn.update("u1", 2, device="b"), 6)
    agg = af.aggregate(syn.state(version=6), 0.0)
    assert agg.weights == {"u0": 0.5, "u1": 0.5}
    assert agg.metrics["staleness"] == [4, 0]  # true τ still reported, canonical order (base 2 first)
    assert [g["base_version"] for g in agg.metrics["groups"]] == [6]


def test_fairness_downweights_frequent_devices(syn: Any) -> None:
    def weights_with(fair: bool) -> dict[str, float]:
        af = AlignFed(AlignFedConfig(k=4, fairness=fair, alignment=False, gamma=0.0, a=0.0))
        for i, dev in enumerate(["fast", "fast", "fast", "slow"]):
            af.add(syn.update(f"u{i}", 0, device=dev, seed=i), 0)
        return dict(af.aggregate(syn.state(), 0.0).weights)

    plain, fair = weights_with(False), weights_with(True)
    assert plain["u3"] == pytest.approx(0.25)
    assert fair["u3"] == pytest.approx(0.5)  # p̄ = 2: fast gets (2/3), slow gets 2 → slow's total = fast's total


def test_config_validation_and_registry(syn: Any) -> None:
    with pytest.raises(ValueError, match="tau_max must be ≥ 0, got -1"):
        AlignFedConfig(tau_max=-1)
    with pytest.raises(ValueError, match="method must be one of pca, qrcp, cur"):
        AlignFedConfig(method="svd")  # type: ignore[arg-type]  # a method the type forbids: the runtime check
    with pytest.raises(ValueError, match="needs an activation source"):
        AlignFed(AlignFedConfig())
    af = build("alignfed", k=3, alignment=False)
    assert isinstance(af, AlignFed) and af.config.k == 3
    af2 = build("alignfed", activations=syn.frozen(), tau_max=2)
    assert isinstance(af2, AlignFed) and af2.config.tau_max == 2
    with pytest.raises(ValueError, match="unknown option"):
        build("alignfed", kk=3)
