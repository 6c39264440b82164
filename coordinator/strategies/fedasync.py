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

from collections.abc import Sequence
from typing import Any, ClassVar

from alignfed.lowrank import Method
from coordinator.strategies.base import AdapterState, ClientUpdate
from coordinator.strategies.buffered import BufferedStrategy, robust_config
from coordinator.strategies.robust import Aggregator
from coordinator.strategies.staleness import FEDBUFF, StalenessWeight, make

FEDASYNC_WEIGHT = FEDBUFF  # FedAsync's polynomial s(τ) = (1 + τ)^(−a), a = 0.5


class FedAsync(BufferedStrategy):
    """x += α·s(τ)·Δ for one update at a time.

    Ready as soon as one update is buffered; `aggregate` consumes exactly one (the oldest) and leaves
    the rest buffered. Metrics: `staleness` and `weights` (one-element lists), `alpha`,
    `residual_norm`. Robust options as FedBuff's; the median and trimmed mean of one update are
    that update, so clipping and the outlier filter (judged against recent norms) are the ones
    that act here.
    """

    name: ClassVar[str] = "fedasync"

    def __init__(
        self,
        alpha: float = 0.6,
        staleness: StalenessWeight | str = FEDASYNC_WEIGHT,
        method: Method = "pca",
        error_feedback: bool = True,
        aggregator: Aggregator = "mean",
        trim: float = 0.2,
        clip_norm: float = 0.0,
        clip_relative: float = 0.0,
        outlier_factor: float = 0.0,
        norm_window: int = 64,
    ) -> None:
        if not (isinstance(alpha, int | float) and 0 < alpha <= 1):
            raise ValueError(f"fedasync: alpha (mixing weight) must be in (0, 1], got {alpha!r}")
        super().__init__(
            1,
            1.0,
            method,
            error_feedback,
            robust_config(aggregator, trim, clip_norm, clip_relative, outlier_factor, norm_window),
        )
        self.alpha = float(alpha)
        self.staleness = make(staleness)

    def take(self, current: AdapterState) -> list[ClientUpdate]:
        return self._buffer.items()[:1]  # the oldest arrival

    def weights(self, updates: Sequence[ClientUpdate], taus: Sequence[int]) -> list[float]:
        return [self.alpha * self.staleness(tau) for tau in taus]  # α·s(τ)

    def describe(self, updates: Sequence[ClientUpdate], taus: Sequence[int], weights: list[float]) -> dict[str, Any]:
        return {"staleness": list(taus), "weights": weights, "alpha": self.alpha}
