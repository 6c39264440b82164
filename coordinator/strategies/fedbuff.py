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

from collections.abc import Sequence
from typing import ClassVar

from alignfed.lowrank import Method
from coordinator.strategies.base import ClientUpdate
from coordinator.strategies.buffered import BufferedStrategy, robust_config
from coordinator.strategies.robust import Aggregator
from coordinator.strategies.staleness import FEDBUFF, StalenessWeight, make


class FedBuff(BufferedStrategy):
    """Buffer K updates, then x += η · (1/K) Σ s(τ_i) Δ_i.

    Aggregation.weights holds each update's coefficient s(τ_i)/K (the weights need not sum to 1:
    staleness shrinks the step, as in the paper). Metrics: `staleness` and `weights` (lists in
    `used` order), `buffered`, `server_lr`, `residual_norm` (‖R‖_F deferred by error feedback).
    Robust options (off by default; `coordinator.strategies.robust`): `aggregator` mean | median |
    trimmed_mean (with `trim`), `clip_norm`, `clip_relative`, `outlier_factor`, `norm_window`.
    """

    name: ClassVar[str] = "fedbuff"

    def __init__(
        self,
        k: int,
        server_lr: float = 1.0,
        staleness: StalenessWeight | str = FEDBUFF,
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
        self.staleness = make(staleness)

    def weights(self, updates: Sequence[ClientUpdate], taus: Sequence[int]) -> list[float]:
        return [self.staleness(tau) / len(updates) for tau in taus]  # s(τ_i) / K
