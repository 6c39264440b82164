"""FedBuff: buffered asynchronous aggregation (Nguyen et al., "Federated Learning with Buffered
Asynchronous Aggregation", AISTATS 2022, Algorithm 1).

Updates are buffered as they arrive; once K are in the buffer the server applies

    Δ = (1/K) Σ_i s(τ_i) Δ_i,   x_{t+1} = x_t + η Δ,   s(τ) = 1/√(1 + τ),

with τ_i = t − v_i measured when the buffer is flushed (t: current version, v_i: the update's
base version). Here x is each layer's adapter product s·B A (out, in), re-factorized to rank r
afterwards (`server_update.apply`, error feedback on by default).

`aggregate` folds in every buffered update (normally exactly K, because the service asks `ready`
after each `add`), dividing by the number folded in, in a canonical order (base version, device,
update id), so the result does not depend on arrival order.
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
from coordinator.strategies.staleness import FEDBUFF, StalenessWeight, make


class FedBuff(Strategy):
    """Buffer K updates, then x += η · (1/K) Σ s(τ_i) Δ_i.

    Aggregation.weights holds each update's coefficient s(τ_i)/K (the weights need not sum to 1:
    staleness shrinks the step, as in the paper). Metrics: `staleness` and `weights` (lists in
    `used` order), `buffered`, `server_lr`, `residual_norm` (‖R‖_F deferred by error feedback).
    """

    name: ClassVar[str] = "fedbuff"

    def __init__(
        self,
        k: int,
        server_lr: float = 1.0,
        staleness: StalenessWeight | str = FEDBUFF,
        method: Method = "pca",
        error_feedback: bool = True,
    ) -> None:
        if k < 1:
            raise ValueError(f"fedbuff: k (buffer size) must be ≥ 1, got {k}")
        if not server_lr > 0:
            raise ValueError(f"fedbuff: server_lr must be > 0, got {server_lr}")
        self.k = k
        self.server_lr = server_lr
        self.staleness = make(staleness)
        self.method: Method = method
        self.error_feedback = error_feedback
        self._buffer = UpdateBuffer()

    def add(self, update: ClientUpdate, current_version: int) -> None:
        check_version(update, current_version)
        self._buffer.add(update)

    def ready(self, now: float) -> bool:
        return len(self._buffer) >= self.k

    def pending(self) -> list[ClientUpdate]:
        return self._buffer.items()

    def aggregate(self, current: AdapterState, now: float) -> Aggregation:
        if not len(self._buffer):
            raise RuntimeError("fedbuff: aggregate() with an empty buffer; call it only when ready()")
        for u in self._buffer:
            check_version(u, current.version)
        updates = canonical(self._buffer.items())
        taus = [current.version - u.base_version for u in updates]
        count = len(updates)
        weights = [self.staleness(tau) / count for tau in taus]  # s(τ_i) / K
        combined = server_update.combine_updates(updates, weights)  # Δ per layer, (out, in)
        state = server_update.apply(
            current, combined, server_lr=self.server_lr, method=self.method, error_feedback=self.error_feedback
        )
        self._buffer.remove(u.update_id for u in updates)
        return Aggregation(
            state=state,
            used=tuple(u.update_id for u in updates),
            weights={u.update_id: w for u, w in zip(updates, weights, strict=True)},
            metrics={
                "staleness": taus,
                "weights": weights,
                "buffered": count,
                "server_lr": self.server_lr,
                "residual_norm": server_update.residual_norm(state),
                "residual_dropped": state.dropped,
            },
        )
