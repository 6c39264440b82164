"""Robust aggregation options of the buffered strategies: median, trimmed mean, clipping, outliers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignfed.lowrank import Factors
from coordinator.strategies import build
from coordinator.strategies.base import Aggregation, ClientUpdate, Strategy
from coordinator.strategies.fedbuff import FedBuff
from coordinator.strategies.robust import Aggregator, RobustCombiner, RobustConfig, update_norm

OPTIONS: dict[str, dict[str, Any]] = {
    "fedbuff": {"k": 4},
    "fedstaleweight": {"k": 4},
    "fedavg": {"n": 4},
    "alignfed": {"k": 4, "alignment": False},
}


def _with_scale(update: ClientUpdate, factor: float, uid: str, device: str) -> ClientUpdate:
    deltas = {lid: Factors(u=factor * f.u, v=f.v) for lid, f in update.deltas.items()}
    return ClientUpdate(device_id=device, update_id=uid, base_version=update.base_version, samples=10, deltas=deltas)


def _step(
    syn: Any, strategy: Strategy, updates: list[ClientUpdate], version: int = 3
) -> tuple[dict[str, np.ndarray], Aggregation]:
    """What one aggregation added to s·B A + R, per layer (rank 8 adapters hold it all)."""
    current = syn.state(version=version, rank=8)
    for u in updates:
        strategy.add(u, version)
    agg = strategy.aggregate(current, 0.0)
    before, after = syn.totals(current), syn.totals(agg.state)
    return {lid: after[lid] - before[lid] for lid in before}, agg


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(min_value=3, max_value=7),
    seed=st.integers(min_value=0, max_value=10_000),
    aggregator=st.sampled_from(["median", "trimmed_mean"]),
    trim=st.sampled_from([0.1, 0.2, 0.34, 0.45]),
)
def test_median_and_trimmed_mean_equal_numpys_on_reconstructed_deltas(
    syn: Any, m: int, seed: int, aggregator: Aggregator, trim: float
) -> None:
    updates = [syn.update(f"u{i}", 3, device=f"d{i}", seed=seed + i) for i in range(m)]
    fb = FedBuff(k=m, aggregator=aggregator, trim=trim)
    step, _ = _step(syn, fb, updates)
    dense = {lid: np.stack([syn.dense(u)[lid] for u in updates]) for lid in step}  # (m, out, in)
    for lid, stacked in dense.items():
        if aggregator == "median":
            center = np.median(stacked, axis=0)
        else:  # numpy's own trimmed mean: sort each coordinate, drop ⌊trim·m⌋ at both ends
            cut = int(trim * m)
            center = np.sort(stacked, axis=0)[cut : m - cut].mean(axis=0)
        np.testing.assert_allclose(step[lid], center, atol=1e-5)  # Σ w = 1 for fresh FedBuff updates


def test_trimmed_mean_matches_scipy(syn: Any) -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    updates = [syn.update(f"u{i}", 3, device=f"d{i}", seed=40 + i) for i in range(10)]
    step, _ = _step(syn, FedBuff(k=10, aggregator="trimmed_mean", trim=0.2), updates)
    for lid in step:
        stacked = np.stack([syn.dense(u)[lid] for u in updates])
        np.testing.assert_allclose(step[lid], scipy_stats.trim_mean(stacked, 0.2, axis=0), atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(min_value=0, max_value=10_000), bound=st.floats(min_value=0.01, max_value=5.0))
def test_clipping_bounds_every_update_norm(syn: Any, seed: int, bound: float) -> None:
    updates = [syn.update(f"u{i}", 3, device=f"d{i}", seed=seed + i) for i in range(3)]
    updates.append(_with_scale(updates[0], 30.0, "big", "dz"))
    combiner = RobustCombiner(RobustConfig(clip_norm=bound))
    result = combiner.combine([u.deltas for u in updates], [1.0] * 4)
    for i, u in enumerate(updates):  # Σ of the clipped updates, each one's norm ≤ bound
        scale = min(1.0, bound / update_norm(u.deltas))
        assert update_norm({lid: Factors(u=scale * f.u, v=f.v) for lid, f in u.deltas.items()}) <= bound * (1 + 1e-6)
        assert result.weights[i] == 1.0
    expected = syn.weighted_sum(updates, [min(1.0, bound / update_norm(u.deltas)) for u in updates])
    for lid, f in result.combined.items():
        np.testing.assert_allclose(f.dense(), expected[lid], atol=1e-5)
    total = np.sqrt(sum(np.sum(f.dense() ** 2) for f in result.combined.values()))
    assert total <= 4 * bound * (1 + 1e-6)  # the triangle inequality over four clipped updates


def test_relative_clipping_shrinks_a_scaled_update_to_the_median_norm(syn: Any) -> None:
    honest = [syn.update(f"u{i}", 3, device=f"d{i}", seed=i) for i in range(4)]
    attack = _with_scale(honest[0], 10.0, "x", "evil")
    combiner = RobustCombiner(RobustConfig(clip_relative=1.0, norm_window=0))
    result = combiner.combine([u.deltas for u in [*honest, attack]], [0.2] * 5)
    ref = float(np.median([update_norm(u.deltas) for u in [*honest, attack]]))
    assert result.metrics["clipped"] >= 1 and result.metrics["reference_norm"] == pytest.approx(ref)
    total = np.sqrt(sum(np.sum(f.dense() ** 2) for f in result.combined.values()))
    assert total <= ref * (1 + 1e-6)  # 0.2 · Σ of five updates each ≤ ref


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_outlier_filter_drops_a_tenfold_update_on_every_buffered_strategy(syn: Any, name: str) -> None:
    honest = [syn.update(f"u{i}", 3, device=f"d{i}", seed=i) for i in range(3)]
    attack = _with_scale(honest[0], 10.0, "x", "evil")
    strategy = build(name, **OPTIONS[name], outlier_factor=3.0)
    step, agg = _step(syn, strategy, [*honest, attack])
    assert agg.metrics["outliers"] == ["x"] and agg.metrics["dropped"] == 1
    assert agg.weights["x"] == 0.0
    assert "x" in agg.used  # consumed (answered), not folded in
    kept = [agg.weights[u.update_id] for u in honest]
    expected = syn.weighted_sum(honest, kept)
    for lid in step:
        np.testing.assert_allclose(step[lid], expected[lid], atol=1e-5)


def test_outlier_filter_remembers_recent_norms_for_single_updates(syn: Any) -> None:
    fa = build("fedasync", alpha=0.5, outlier_factor=3.0)
    state = syn.state(version=0, rank=8)
    for i in range(3):
        fa.add(syn.update(f"u{i}", state.version, device=f"d{i}", seed=i), state.version)
        state = fa.aggregate(state, 0.0).state
    fa.add(_with_scale(syn.update("y", state.version, seed=0), 10.0, "x", "evil"), state.version)
    agg = fa.aggregate(state, 0.0)
    assert agg.metrics["outliers"] == ["x"]
    np.testing.assert_allclose(syn.totals(agg.state)["0.q"], syn.totals(state)["0.q"], atol=1e-6)


def test_off_by_default_is_bit_identical_and_reports_nothing(syn: Any) -> None:
    updates = [syn.update(f"u{i}", 3 - i % 2, device=f"d{i}", seed=i) for i in range(4)]
    plain = FedBuff(k=4)
    same = FedBuff(k=4, aggregator="mean", clip_norm=0.0, outlier_factor=0.0)
    (a, agg), (b, _) = _step(syn, plain, updates), _step(syn, same, updates)
    for lid in a:
        np.testing.assert_array_equal(a[lid], b[lid])
    assert "outliers" not in agg.metrics


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"aggregator": "mode"}, "aggregator must be one of mean, median, trimmed_mean"),
        ({"trim": 0.5}, r"trim must be in \[0, 0.5\)"),
        ({"clip_norm": -1.0}, "clip_norm must be a finite number ≥ 0"),
        ({"outlier_factor": 0.5}, "outlier_factor must be 0 .off. or a finite number > 1"),
    ],
)
def test_bad_robust_options_are_named(options: dict[str, Any], message: str) -> None:
    for name in OPTIONS:
        with pytest.raises(ValueError, match=message):
            build(name, **OPTIONS[name], **options)


def test_outlier_filter_catches_a_buffer_that_is_mostly_hostile(syn: Any) -> None:
    """Two tenfold updates in a buffer of three: the buffer's median is hostile, the history's is not."""
    fb = FedBuff(k=3, outlier_factor=3.0)
    state = syn.state(version=0, rank=8)
    for r in range(2):  # honest history
        for i in range(3):
            fb.add(syn.update(f"h{r}{i}", state.version, device=f"d{i}", seed=10 * r + i), state.version)
        state = fb.aggregate(state, 0.0).state
    honest = syn.update("ok", state.version, device="d0", seed=7)
    attacks = [_with_scale(syn.update(f"x{i}", state.version, seed=i), 10.0, f"x{i}", f"e{i}") for i in range(2)]
    for u in [honest, *attacks]:
        fb.add(u, state.version)
    agg = fb.aggregate(state, 0.0)
    assert sorted(agg.metrics["outliers"]) == ["x0", "x1"]
