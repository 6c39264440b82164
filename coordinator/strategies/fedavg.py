"""FedAvg: synchronous rounds (McMahan et al., "Communication-Efficient Learning of Deep Networks
from Decentralized Data", AISTATS 2017).

A round aggregates on one global version t: only updates trained on t are accepted, and the round
closes when n distinct devices have sent one each. Then

    x_{t+1} = x_t + η Σ_i (n_i / Σ_j n_j) Δ_i     (n_i: the device's training samples),

with x each layer's adapter product s·B A (out, in), re-factorized to rank r afterwards. This is
the synchronous baseline: the round waits for the slowest of the n devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from alignfed.errors import RejectedUpdate
from alignfed.lowrank import Method
from coordinator.strategies.base import AdapterState, ClientUpdate
from coordinator.strategies.buffer import canonical
from coordinator.strategies.buffered import BufferedStrategy, robust_config
from coordinator.strategies.robust import Aggregator


class FedAvg(BufferedStrategy):
    """Synchronous rounds over `n` devices, sample-weighted mean.

    Rejects updates not based on the current version ("stale: ...") and a second update from a
    device already in the round ("duplicate: ..."). Metrics: `round_version`, `devices`,
    `samples`, `weights`, `residual_norm`.
    Robust options (off by default; `coordinator.strategies.robust`): `aggregator` mean | median |
    trimmed_mean (with `trim`), `clip_norm`, `clip_relative`, `outlier_factor`, `norm_window`.
    """

    name: ClassVar[str] = "fedavg"
    size_name = "n (devices per round)"

    def __init__(
        self,
        n: int,
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
            n,
            server_lr,
            method,
            error_feedback,
            robust_config(aggregator, trim, clip_norm, clip_relative, outlier_factor, norm_window),
        )
        self.n = n
        self._round = 0  # the version of the round being aggregated

    def admit(self, update: ClientUpdate, tau: int, current_version: int) -> None:
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

    def ready(self, now: float) -> bool:
        return len({u.device_id for u in self._buffer}) >= self.n

    def take(self, current: AdapterState) -> list[ClientUpdate]:
        off = [u.update_id for u in self._buffer if u.base_version != current.version]
        if off:
            raise RuntimeError(
                f"fedavg: updates {off} were accepted for another version than the current {current.version}"
            )
        self._round = current.version
        return canonical(self._buffer.items())

    def weights(self, updates: Sequence[ClientUpdate], taus: Sequence[int]) -> list[float]:
        total = sum(u.samples for u in updates)
        # n_i / Σ n_j; uniform if no device reports samples
        return [u.samples / total for u in updates] if total > 0 else [1.0 / len(updates)] * len(updates)

    def describe(self, updates: Sequence[ClientUpdate], taus: Sequence[int], weights: list[float]) -> dict[str, Any]:
        return {
            "round_version": self._round,
            "devices": [u.device_id for u in updates],
            "samples": [u.samples for u in updates],
            "weights": weights,
        }
