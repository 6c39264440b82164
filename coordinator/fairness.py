"""Fairness-aware aggregation weights (AlignFed stage 3, arXiv 2606.08197) and fairness metrics.

For buffered update i from device d with n_i training samples, staleness τ_i = t − v_i and group
confidence c_v (from cross-version alignment, 1 when not aligned):

    w̃_i = n_i^γ · (1 + τ_i)^(−a) · clip((p̄ / p_d)^β, h_min, h_max) · c_v,    w_i = w̃_i / Σ_j w̃_j

- n_i^γ: data size; γ < 1 keeps one data-rich device from dominating.
- (1 + τ_i)^(−a): freshness, `staleness.polynomial` (a = 0.5 is FedBuff's 1/√(1+τ)).
- (p̄ / p_d)^β: participation; p_d counts device d's accepted updates among the last `window`
  accepted updates, p̄ is the mean count over the devices active in that window. A device that
  reports twice as often as average gets 2^(−β) of the weight, so slow devices are not drowned
  (the bias FedStaleWeight, Ma et al. 2024, also targets); the clip bounds the correction.

The weights are a convex combination (non-negative, summing to 1).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from coordinator.strategies.staleness import polynomial


@dataclass(frozen=True, slots=True)
class FairnessParams:
    """Exponents and clip of the weight formula above."""

    gamma: float = 0.5  # sample-count exponent γ
    a: float = 0.5  # freshness exponent
    beta: float = 1.0  # participation exponent β
    h_min: float = 0.25  # clip of the participation factor
    h_max: float = 4.0

    def __post_init__(self) -> None:
        for name in ("gamma", "a", "beta"):
            value = getattr(self, name)
            if not (np.isfinite(value) and value >= 0):
                raise ValueError(f"fairness: {name} must be a finite number ≥ 0, got {value}")
        if not (0 < self.h_min <= 1 <= self.h_max < np.inf):
            raise ValueError(f"fairness: need 0 < h_min ≤ 1 ≤ h_max < ∞, got h_min={self.h_min}, h_max={self.h_max}")


class ParticipationWindow:
    """Device ids of the last `size` accepted updates, oldest first."""

    def __init__(self, size: int, devices: Iterable[str] = ()) -> None:
        if size < 1:
            raise ValueError(f"fairness: participation window must hold ≥ 1 update, got {size}")
        self.size = size
        self._ids: deque[str] = deque(devices, maxlen=size)

    def record(self, device_id: str) -> None:
        self._ids.append(device_id)

    def counts(self) -> dict[str, int]:
        """device -> p_d, its accepted updates in the window (active devices only), sorted by id."""
        c = Counter(self._ids)
        return {d: c[d] for d in sorted(c)}

    def mean(self) -> float:
        """p̄: the mean count over active devices (0 for an empty window)."""
        counts = self.counts()
        return len(self._ids) / len(counts) if counts else 0.0

    def devices(self) -> list[str]:
        """The window's contents, oldest first (to persist and restore it)."""
        return list(self._ids)

    def __len__(self) -> int:
        return len(self._ids)


def participation_factor(p: float, p_bar: float, params: FairnessParams) -> float:
    """clip((p̄/p)^β, h_min, h_max); a device absent from the window (p = 0) gets h_max."""
    if p <= 0:
        return params.h_max
    if p_bar <= 0:
        return 1.0
    return float(np.clip((p_bar / p) ** params.beta, params.h_min, params.h_max))


def weights(
    samples: Sequence[int],
    taus: Sequence[int],
    devices: Sequence[str],
    confidences: Sequence[float],
    window: ParticipationWindow | None,
    params: FairnessParams,
) -> np.ndarray:
    """Normalised weights w (m,), one per update; `window=None` drops the participation factor.

    If every raw weight is 0 (e.g. all updates report 0 samples with γ > 0) the weights fall back
    to uniform, so the result is always a convex combination.
    """
    m = len(samples)
    if not (len(taus) == len(devices) == len(confidences) == m):
        raise ValueError(
            f"fairness: {m} sample counts, {len(taus)} staleness values, {len(devices)} devices, "
            f"{len(confidences)} confidences; expected one of each per update"
        )
    if m == 0:
        return np.zeros(0)
    n = np.asarray(samples, dtype=np.float64)  # (m,)
    tau = np.asarray(taus, dtype=np.float64)  # (m,)
    c = np.asarray(confidences, dtype=np.float64)  # (m,)
    if np.any(n < 0) or np.any(tau < 0) or np.any(~np.isfinite(c)) or np.any(c < 0):
        raise ValueError("fairness: samples, staleness and confidences must be ≥ 0 and finite")
    raw = np.power(n, params.gamma) * polynomial(tau, params.a) * c
    if window is not None:
        counts = window.counts()
        p_bar = window.mean()
        raw = raw * np.array([participation_factor(counts.get(d, 0), p_bar, params) for d in devices])
    total = float(raw.sum())
    if not (total > 0 and np.isfinite(total)):
        return np.full(m, 1.0 / m)
    return np.asarray(raw / total)


def jain_index(values: Iterable[float]) -> float:
    """Jain's fairness index (Σx)² / (N Σx²): 1 when all equal, 1/N when one takes everything."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return 1.0
    sq = float(np.sum(x * x))
    return float(x.sum() ** 2 / (x.size * sq)) if sq > 0 else 1.0


def shares(counts: Mapping[str, float]) -> dict[str, float]:
    """Each device's fraction of the total (e.g. of accepted updates), sorted by device id."""
    total = float(sum(counts.values()))
    return {d: (counts[d] / total if total > 0 else 0.0) for d in sorted(counts)}
