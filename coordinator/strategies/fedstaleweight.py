"""FedStaleWeight: buffered asynchronous aggregation reweighted by each device's average staleness
(Ma, Tu, Chen, Janapa Reddi, "FedStaleWeight: Buffered Asynchronous Federated Learning with Fair
Aggregation via Staleness Reweighting", 2024, arXiv 2406.02877).

In FedBuff a device that trains k times faster fills k times as many buffer slots, so the global
model drifts towards fast devices' data. A device's average staleness grows with its round-trip
time, so weighting each update by its device's average staleness τ̄_d (observed by the server
only, nothing self-reported) gives every device about the same total weight per unit time:

    w_i = (1 + τ̄_{d(i)}) / Σ_{j in buffer} (1 + τ̄_{d(j)}),   x_{t+1} = x_t + η Σ_i w_i Δ_i.

τ̄_d is the mean over all of device d's aggregated updates so far, including those in this
buffer (recorded before the weights are computed, so the result does not depend on arrival
order). The paper's staleness counts the server steps an update spans, which is ≥ 1; with τ =
t − v (0 for an update on the newest version) that is 1 + τ, so a device that is always fresh
keeps a positive weight.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from alignfed.lowrank import Method
from coordinator.strategies.base import AdapterState, ClientUpdate
from coordinator.strategies.buffered import BufferedStrategy, robust_config
from coordinator.strategies.robust import Aggregator


class FedStaleWeight(BufferedStrategy):
    """Buffer K updates, weight each by its device's average (1 + τ), normalised.

    Metrics: `staleness`, `weights` (lists in `used` order), `device_staleness` (device -> τ̄ after
    this aggregation), `buffered`, `server_lr`, `residual_norm`. The per-device history lives in
    memory (`history()` / `restore()` / `replay()` let the service persist it).
    Robust options (off by default; `coordinator.strategies.robust`): `aggregator` mean | median |
    trimmed_mean (with `trim`), `clip_norm`, `clip_relative`, `outlier_factor`, `norm_window`.
    """

    name: ClassVar[str] = "fedstaleweight"

    def __init__(
        self,
        k: int,
        server_lr: float = 1.0,
        method: Method = "pca",
        error_feedback: bool = True,
        aggregator: Aggregator = "mean",
        trim: float = 0.2,
        clip_norm: float = 0.0,
        clip_relative: float = 0.0,
        outlier_factor: float = 0.0,
        norm_window: int = 64,
    ) -> None:
        super().__init__(
            k,
            server_lr,
            method,
            error_feedback,
            robust_config(aggregator, trim, clip_norm, clip_relative, outlier_factor, norm_window),
        )
        self._count: dict[str, int] = {}  # device -> aggregated updates
        self._sum: dict[str, int] = {}  # device -> Σ τ over them
        self._next: tuple[dict[str, int], dict[str, int]] | None = None  # history once this aggregation commits

    def mean_staleness(self, device_id: str) -> float:
        """τ̄ of a device over its aggregated updates (0 before its first)."""
        count = self._count.get(device_id, 0)
        return self._sum[device_id] / count if count else 0.0

    def history(self) -> dict[str, tuple[int, int]]:
        """device -> (aggregated updates, Σ τ): everything needed to resume the weights."""
        return {d: (self._count[d], self._sum[d]) for d in sorted(self._count)}

    def restore(self, history: Mapping[str, Any]) -> None:
        self._count = {d: int(c) for d, (c, _) in history.items()}
        self._sum = {d: int(s) for d, (_, s) in history.items()}

    def replay(self, aggregated: Iterable[tuple[str, int, int]]) -> None:
        history: dict[str, tuple[int, int]] = {}
        for device, base, version in aggregated:
            count, total = history.get(device, (0, 0))
            history[device] = (count + 1, total + (version - 1 - base))  # τ when it was aggregated
        self.restore(history)

    def weights(self, updates: Sequence[ClientUpdate], taus: Sequence[int]) -> list[float]:
        count, total_tau = dict(self._count), dict(self._sum)  # committed only on success
        for u, tau in zip(updates, taus, strict=True):
            count[u.device_id] = count.get(u.device_id, 0) + 1
            total_tau[u.device_id] = total_tau.get(u.device_id, 0) + tau
        self._next = (count, total_tau)
        raw = [1.0 + total_tau[u.device_id] / count[u.device_id] for u in updates]  # 1 + τ̄_d
        total = sum(raw)
        return [r / total for r in raw]

    def commit(self, updates: Sequence[ClientUpdate], taus: Sequence[int], state: AdapterState) -> None:
        if self._next is not None:
            self._count, self._sum = self._next
            self._next = None

    def describe(self, updates: Sequence[ClientUpdate], taus: Sequence[int], weights: list[float]) -> dict[str, Any]:
        metrics = super().describe(updates, taus, weights)
        devices = sorted({u.device_id for u in updates})
        metrics["device_staleness"] = {d: self.mean_staleness(d) for d in devices}
        return metrics
