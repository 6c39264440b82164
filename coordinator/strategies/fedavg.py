"""FedAvg: synchronous rounds (McMahan et al., "Communication-Efficient Learning of Deep Networks
from Decentralized Data", AISTATS 2017).

A round aggregates on one global version t: only updates trained on t are accepted, and the round
closes when n distinct devices have sent one each. Then

    x_{t+1} = x_t + η Σ_i (n_i / Σ_j n_j) Δ_i     (n_i: the device's training samples),

with x each layer's adapter product s·B A (out, in), re-factorized to rank r afterwards. This is
the synchronous baseline: the round waits for the slowest of the n devices.
"""

from __future__ import annotations

from typing import ClassVar

from alignfed.errors import RejectedUpdate
from alignfed.lowrank import Method
from coordinator.strategies import server_update
from coordinator.strategies.base import (
    AdapterState,
    Aggregation,
    ClientUpdate,
    Strategy,
)
from coordinator.strategies.buffer import UpdateBuffer, canonical, check_version


class FedAvg(Strategy):
    """Synchronous rounds over `n` devices, sample-weighted mean.

    Rejects updates not based on the current version ("stale: ...") and a second update from a
    device already in the round ("duplicate: ..."). Metrics: `round_version`, `devices`,
    `samples`, `weights`, `residual_norm`.
    """

    name: ClassVar[str] = "fedavg"

    def __init__(
        self,
        n: int,
        server_lr: float = 1.0,
        method: Method = "pca",
        error_feedback: bool = True,
    ) -> None:
        if n < 1:
            raise ValueError(f"fedavg: n (devices per round) must be ≥ 1, got {n}")
        if not server_lr > 0:
            raise ValueError(f"fedavg: server_lr must be > 0, got {server_lr}")
        self.n = n
        self.server_lr = server_lr
        self.method: Method = method
        self.error_feedback = error_feedback
        self._buffer = UpdateBuffer()

    def add(self, update: ClientUpdate, current_version: int) -> None:
        tau = check_version(update, current_version)
        if tau > 0:
            raise RejectedUpdate(
                f"stale: base version {update.base_version} but the synchronous round aggregates on "
                f"version {current_version}; retrain on the current global adapter"
            )
        if any(u.device_id == update.device_id for u in self._buffer):
            raise RejectedUpdate(
                f"duplicate: device {update.device_id} already contributed to the round on version {current_version}"
            )
        if update.samples < 0:
            raise RejectedUpdate(f"invalid: negative sample count {update.samples}")
        self._buffer.add(update)

    def ready(self, now: float) -> bool:
        return len({u.device_id for u in self._buffer}) >= self.n

    def pending(self) -> list[ClientUpdate]:
        return self._buffer.items()

    def aggregate(self, current: AdapterState, now: float) -> Aggregation:
        if not len(self._buffer):
            raise RuntimeError("fedavg: aggregate() with an empty round; call it only when ready()")
        off = [u.update_id for u in self._buffer if u.base_version != current.version]
        if off:
            raise RuntimeError(
                f"fedavg: updates {off} were accepted for another version than the current {current.version}"
            )
        updates = canonical(self._buffer.items())
        total = sum(u.samples for u in updates)
        # n_i / Σ n_j; uniform if no device reports samples
        weights = [u.samples / total for u in updates] if total > 0 else [1.0 / len(updates)] * len(updates)
        combined = server_update.combine_updates(updates, weights)
        state = server_update.apply(
            current, combined, server_lr=self.server_lr, method=self.method, error_feedback=self.error_feedback
        )
        self._buffer.remove(u.update_id for u in updates)
        return Aggregation(
            state=state,
            used=tuple(u.update_id for u in updates),
            weights={u.update_id: w for u, w in zip(updates, weights, strict=True)},
            metrics={
                "round_version": current.version,
                "devices": [u.device_id for u in updates],
                "samples": [u.samples for u in updates],
                "weights": weights,
                "residual_norm": server_update.residual_norm(state),
                "residual_dropped": state.dropped,
            },
        )
