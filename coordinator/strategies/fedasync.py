"""FedAsync: apply every update the moment it arrives (Xie et al., "Asynchronous Federated
Optimization", 2019).

Each update is folded in on its own, oldest first:

    x_{t+1} = x_t + α · s(τ) · Δ,   τ = t − v,

the delta form of FedAsync's mixing x_{t+1} = (1 − α_t) x_t + α_t x_new with α_t = α·s(τ) (as in
FLSim's FedAsync aggregator): the paper mixes the device's whole model x_new = x_v + Δ, which also
pulls x_t back towards the stale x_v; the delta form keeps only the device's own progress. Here x
is each layer's adapter product s·B A (out, in), re-factorized to rank r afterwards.
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
from coordinator.strategies.buffer import UpdateBuffer, check_version
from coordinator.strategies.staleness import Polynomial, StalenessWeight, make

FEDASYNC_WEIGHT = Polynomial(0.5)  # FedAsync's polynomial s(τ) = (1 + τ)^(−a), a = 0.5


class FedAsync(Strategy):
    """x += α·s(τ)·Δ for one update at a time.

    Ready as soon as one update is buffered; `aggregate` consumes exactly one (the oldest) and leaves
    the rest buffered. Metrics: `staleness` and `weights` (one-element lists), `alpha`,
    `residual_norm`.
    """

    name: ClassVar[str] = "fedasync"

    def __init__(
        self,
        alpha: float = 0.6,
        staleness: StalenessWeight | str = FEDASYNC_WEIGHT,
        method: Method = "pca",
        error_feedback: bool = True,
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"fedasync: alpha (mixing weight) must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.staleness = make(staleness)
        self.method: Method = method
        self.error_feedback = error_feedback
        self._buffer = UpdateBuffer()

    def add(self, update: ClientUpdate, current_version: int) -> None:
        check_version(update, current_version)
        self._buffer.add(update)

    def ready(self, now: float) -> bool:
        return len(self._buffer) >= 1

    def pending(self) -> list[ClientUpdate]:
        return self._buffer.items()

    def aggregate(self, current: AdapterState, now: float) -> Aggregation:
        if not len(self._buffer):
            raise RuntimeError("fedasync: aggregate() with an empty buffer; call it only when ready()")
        update = self._buffer.items()[0]
        tau = check_version(update, current.version)
        weight = self.alpha * self.staleness(tau)  # α·s(τ)
        combined = server_update.combine_updates([update], [weight])
        state = server_update.apply(
            current, combined, server_lr=1.0, method=self.method, error_feedback=self.error_feedback
        )
        self._buffer.remove([update.update_id])
        return Aggregation(
            state=state,
            used=(update.update_id,),
            weights={update.update_id: weight},
            metrics={
                "staleness": [tau],
                "weights": [weight],
                "alpha": self.alpha,
                "residual_norm": server_update.residual_norm(state),
                "residual_dropped": state.dropped,
            },
        )
