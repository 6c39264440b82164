"""The flow every buffered strategy shares: check, buffer, fold in with weights, re-factorize.

    add(u)        τ = t − v checked (no future base), `admit` hook (strategy rules), buffered
    ready(now)    K updates buffered (strategies may add a timer or a device count)
    aggregate(x)  take the buffer in canonical order → `prepare` (e.g. alignment) → `weights` →
                  robust combine (`coordinator.strategies.robust`, off by default) →
                  x_{t+1} = x_t + η Σ w_i Δ_i re-factorized (`server_update.apply`) → `commit`

A subclass supplies `weights()` (and, where it needs them, `admit`, `take`, `prepare`, `commit`,
`describe`). The buffer is emptied only after the new state exists, so an aggregation that raises
leaves everything as it was.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from alignfed.lowrank import Factors, Method
from coordinator.strategies import server_update
from coordinator.strategies.base import AdapterState, Aggregation, ClientUpdate, Strategy
from coordinator.strategies.buffer import UpdateBuffer, canonical, check_version
from coordinator.strategies.robust import Aggregator, RobustCombiner, RobustConfig

METHODS: tuple[str, ...] = ("pca", "qrcp", "cur")


class BufferedStrategy(Strategy):
    """Base of FedBuff, FedStaleWeight, FedAsync, FedAvg and AlignFed.

    `k` is the buffer size that makes `ready()` true; `server_lr` is η. The robust options
    (`RobustConfig`'s fields) are off by default.
    """

    # what the buffer size is called in errors (FedAvg: "n (devices per round)")
    size_name: str = "k (buffer size)"

    def __init__(
        self,
        k: int,
        server_lr: float = 1.0,
        method: Method = "pca",
        error_feedback: bool = True,
        robust: RobustConfig | None = None,
    ) -> None:
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"{self.name}: {self.size_name} must be an integer ≥ 1, got {k!r}")
        if not (isinstance(server_lr, int | float) and server_lr > 0):
            raise ValueError(f"{self.name}: server_lr must be > 0, got {server_lr!r}")
        if method not in METHODS:
            raise ValueError(f"{self.name}: method must be one of {', '.join(METHODS)}, got {method!r}")
        self.k = k
        self.server_lr = float(server_lr)
        self.method: Method = method
        self.error_feedback = error_feedback
        self.robust = RobustCombiner(robust)
        self._buffer = UpdateBuffer()

    # -- Strategy interface -------------------------------------------------------------------

    def add(self, update: ClientUpdate, current_version: int) -> None:
        tau = check_version(update, current_version)
        self.admit(update, tau, current_version)
        self._buffer.add(update)
        self.accepted(update)

    def ready(self, now: float) -> bool:
        return len(self._buffer) >= self.k

    def pending(self) -> list[ClientUpdate]:
        return self._buffer.items()

    def aggregate(self, current: AdapterState, now: float) -> Aggregation:
        if not len(self._buffer):
            raise RuntimeError(f"{self.name}: aggregate() with an empty buffer; call it only when ready()")
        for u in self._buffer:
            check_version(u, current.version)
        updates = self.take(current)
        taus = [current.version - u.base_version for u in updates]
        deltas = self.prepare(updates, taus, current)
        weights = [float(w) for w in self.weights(updates, taus)]
        robust = self.robust.combine(deltas, weights)
        state = server_update.apply(
            current, robust.combined, server_lr=self.step_lr(), method=self.method, error_feedback=self.error_feedback
        )
        self.commit(updates, taus, state)
        self._buffer.remove(u.update_id for u in updates)
        metrics = self.describe(updates, taus, robust.weights)
        metrics["residual_norm"] = server_update.residual_norm(state)
        metrics["residual_dropped"] = state.dropped
        if robust.metrics:
            metrics.update(robust.metrics)
            metrics["outliers"] = [updates[i].update_id for i in robust.dropped]
        return Aggregation(
            state=state,
            used=tuple(u.update_id for u in updates),
            weights={u.update_id: w for u, w in zip(updates, robust.weights, strict=True)},
            metrics=metrics,
            timings=self.timings(),
        )

    # -- hooks ----------------------------------------------------------------------------------

    @abstractmethod
    def weights(self, updates: Sequence[ClientUpdate], taus: Sequence[int]) -> Sequence[float]:
        """w_i per update of `take()`'s list (τ_i = t − v_i alongside): the Σ w_i Δ_i coefficients."""

    def admit(self, update: ClientUpdate, tau: int, current_version: int) -> None:
        """Strategy-specific rules for an incoming update; raise RejectedUpdate to refuse it."""

    def accepted(self, update: ClientUpdate) -> None:
        """Called once an update is buffered."""

    def take(self, current: AdapterState) -> list[ClientUpdate]:
        """The updates this aggregation folds in: the whole buffer in canonical order."""
        return canonical(self._buffer.items())

    def prepare(
        self, updates: Sequence[ClientUpdate], taus: Sequence[int], current: AdapterState
    ) -> list[Mapping[str, Factors]]:
        """The deltas to combine (AlignFed aligns stale ones here); called before `weights`."""
        return [u.deltas for u in updates]

    def step_lr(self) -> float:
        """η of `server_update.apply`."""
        return self.server_lr

    def commit(self, updates: Sequence[ClientUpdate], taus: Sequence[int], state: AdapterState) -> None:
        """Record history once the new state exists (never before: a failed aggregation changes nothing)."""

    def timings(self) -> dict[str, float]:
        """Host seconds of this aggregation's stages (`Aggregation.timings`)."""
        return {}

    def describe(self, updates: Sequence[ClientUpdate], taus: Sequence[int], weights: list[float]) -> dict[str, Any]:
        """Metrics of the aggregation (the base adds residual and robust ones)."""
        return {"staleness": list(taus), "weights": weights, "buffered": len(updates), "server_lr": self.server_lr}


def robust_config(
    aggregator: Aggregator = "mean",
    trim: float = 0.2,
    clip_norm: float = 0.0,
    clip_relative: float = 0.0,
    outlier_factor: float = 0.0,
    norm_window: int = 64,
) -> RobustConfig:
    """A `RobustConfig` from the flat constructor arguments the strategies take."""
    return RobustConfig(
        aggregator=aggregator,
        trim=trim,
        clip_norm=clip_norm,
        clip_relative=clip_relative,
        outlier_factor=outlier_factor,
        norm_window=norm_window,
    )
