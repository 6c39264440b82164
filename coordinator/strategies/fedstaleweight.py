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

from typing import ClassVar

from alignfed.lowrank import Method
from coordinator.strategies import server_update
from coordinator.strategies.base import (
    AdapterState,
    Aggregation,
    ClientUpdate,
    Strategy,
)
from coordinator.strategies.buffer import UpdateBuffer, canonical, check_version


class FedStaleWeight(Strategy):
    """Buffer K updates, weight each by its device's average (1 + τ), normalised.

    Metrics: `staleness`, `weights` (lists in `used` order), `device_staleness` (device -> τ̄ after
    this aggregation), `buffered`, `server_lr`, `residual_norm`. The per-device history lives in
    memory (`history()` / `restore()` let the service persist it).
    """

    name: ClassVar[str] = "fedstaleweight"

    def __init__(
        self,
        k: int,
        server_lr: float = 1.0,
        method: Method = "pca",
        error_feedback: bool = True,
    ) -> None:
        if k < 1:
            raise ValueError(f"fedstaleweight: k (buffer size) must be ≥ 1, got {k}")
        if not server_lr > 0:
            raise ValueError(f"fedstaleweight: server_lr must be > 0, got {server_lr}")
        self.k = k
        self.server_lr = server_lr
        self.method: Method = method
        self.error_feedback = error_feedback
        self._buffer = UpdateBuffer()
        self._count: dict[str, int] = {}  # device -> aggregated updates
        self._sum: dict[str, int] = {}  # device -> Σ τ over them

    def add(self, update: ClientUpdate, current_version: int) -> None:
        check_version(update, current_version)
        self._buffer.add(update)

    def ready(self, now: float) -> bool:
        return len(self._buffer) >= self.k

    def pending(self) -> list[ClientUpdate]:
        return self._buffer.items()

    def mean_staleness(self, device_id: str) -> float:
        """τ̄ of a device over its aggregated updates (0 before its first)."""
        count = self._count.get(device_id, 0)
        return self._sum[device_id] / count if count else 0.0

    def history(self) -> dict[str, tuple[int, int]]:
        """device -> (aggregated updates, Σ τ): everything needed to resume the weights."""
        return {d: (self._count[d], self._sum[d]) for d in sorted(self._count)}

    def restore(self, history: dict[str, tuple[int, int]]) -> None:
        self._count = {d: int(c) for d, (c, _) in history.items()}
        self._sum = {d: int(s) for d, (_, s) in history.items()}

    def aggregate(self, current: AdapterState, now: float) -> Aggregation:
        if not len(self._buffer):
            raise RuntimeError("fedstaleweight: aggregate() with an empty buffer; call it only when ready()")
        for u in self._buffer:
            check_version(u, current.version)
        updates = canonical(self._buffer.items())
        taus = [current.version - u.base_version for u in updates]
        count, total_tau = dict(self._count), dict(self._sum)  # committed only on success
        for u, tau in zip(updates, taus, strict=True):
            count[u.device_id] = count.get(u.device_id, 0) + 1
            total_tau[u.device_id] = total_tau.get(u.device_id, 0) + tau
        raw = [1.0 + total_tau[u.device_id] / count[u.device_id] for u in updates]  # 1 + τ̄_d
        total = sum(raw)
        weights = [r / total for r in raw]
        combined = server_update.combine_updates(updates, weights)
        state = server_update.apply(
            current, combined, server_lr=self.server_lr, method=self.method, error_feedback=self.error_feedback
        )
        devices = sorted({u.device_id for u in updates})
        self._buffer.remove(u.update_id for u in updates)
        self._count, self._sum = count, total_tau
        return Aggregation(
            state=state,
            used=tuple(u.update_id for u in updates),
            weights={u.update_id: w for u, w in zip(updates, weights, strict=True)},
            metrics={
                "staleness": taus,
                "weights": weights,
                "device_staleness": {d: self.mean_staleness(d) for d in devices},
                "buffered": len(updates),
                "server_lr": self.server_lr,
                "residual_norm": server_update.residual_norm(state),
                "residual_dropped": state.dropped,
            },
        )
