"""Non-IID partitions: every example placed once, Dirichlet skew follows α."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignfed.errors import ConfigError
from simulator.partition import Kind, PartitionConfig, by_label, dirichlet, ensure_minimum, label_mix, partition


def _labels(sizes: list[int]) -> np.ndarray:
    return np.concatenate([np.full(n, k, dtype=np.int64) for k, n in enumerate(sizes)])


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 60), min_size=1, max_size=5),
    devices=st.integers(1, 9),
    alpha=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**16),
)
def test_dirichlet_places_every_example_exactly_once(sizes: list[int], devices: int, alpha: float, seed: int) -> None:
    labels = _labels(sizes)
    shards = dirichlet(labels, devices, alpha, np.random.default_rng(seed))
    assert len(shards) == devices
    assert sum(s.size for s in shards) == labels.size
    assert np.array_equal(np.sort(np.concatenate(shards)), np.arange(labels.size))


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(3, 40), min_size=1, max_size=4),
    devices=st.integers(1, 6),
    kind=st.sampled_from(["dirichlet", "iid"]),
    seed=st.integers(0, 2**16),
)
def test_partition_sizes_sum_and_respect_the_minimum(sizes: list[int], devices: int, kind: Kind, seed: int) -> None:
    labels = _labels(sizes)
    if labels.size < 2 * devices:
        return
    shards = partition(labels, devices, PartitionConfig(kind=kind, alpha=0.05, min_examples=2), seed)
    assert sum(s.size for s in shards) == labels.size
    assert len(np.unique(np.concatenate(shards))) == labels.size
    assert min(s.size for s in shards) >= 2


def test_large_alpha_is_near_uniform() -> None:
    labels = _labels([3000, 3000, 3000])
    shards = dirichlet(labels, 6, 1e4, np.random.default_rng(0))
    for s in shards:
        per_label = np.bincount(labels[s], minlength=3)
        np.testing.assert_allclose(per_label, 500, rtol=0.1)  # 3000 / 6 each


def test_small_alpha_is_skewed() -> None:
    labels = _labels([3000, 3000, 3000])
    shards = dirichlet(labels, 6, 0.05, np.random.default_rng(0))
    mixes = np.array([label_mix(labels, s, 3) for s in shards if s.size])  # (devices, labels)
    # devices are dominated by one label (with α = 1e4 the top share is ≈ 1/3)
    assert mixes.max(axis=1).mean() > 0.6
    # and each label sits mostly on one device (≈ 1/6 with α = 1e4)
    for k in range(3):
        counts = np.array([np.sum(labels[s] == k) for s in shards])
        assert counts.max() / counts.sum() > 0.5


def test_by_label_gives_each_device_one_label_in_disjoint_shards() -> None:
    labels = _labels([10, 11, 12])
    shards = by_label(labels, 5, np.random.default_rng(1))
    for i, s in enumerate(shards):
        assert set(labels[s]) == {i % 3}
    assert sum(s.size for s in shards) == labels.size
    assert len(np.unique(np.concatenate(shards))) == labels.size  # devices 0 and 3 split label 0


def test_ensure_minimum_moves_from_the_largest() -> None:
    shards = [np.array([0, 1, 2, 3, 4]), np.array([], dtype=np.int64), np.array([5])]
    fixed = ensure_minimum(shards, 2)
    assert [s.size for s in fixed] == [2, 2, 2]
    assert sorted(np.concatenate(fixed).tolist()) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match="cannot give 3 devices 3 each"):
        ensure_minimum(shards, 3)


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="alpha"):
        PartitionConfig(kind="dirichlet", alpha=0.0)
    with pytest.raises(ConfigError, match="kind"):
        PartitionConfig(kind="shuffled")  # type: ignore[arg-type]  # a kind the type forbids: the runtime check
