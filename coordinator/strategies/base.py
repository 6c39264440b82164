"""The interface every aggregation strategy implements, and the values it works on.

A strategy is pure: it never touches MQTT, SQLite or the clock. The service feeds it validated
updates with `add`, asks `ready(now)`, and calls `aggregate(current, now)` to get the next global
adapter. `now` is whatever clock the caller runs on (wall seconds live, virtual seconds in the
simulator); staleness is always a difference of version numbers, never of clocks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from alignfed.lowrank import Factors
from alignfed.protocol import AdapterUpdate


@dataclass(frozen=True, slots=True)
class ClientUpdate:
    """A validated device update as strategies see it.

    `deltas[layer_id]`: delta = u @ v = s·(B_i A_i − B_v A_v), shape (out, in), where v is the
    global version the device started from (`base_version`).
    """

    device_id: str
    update_id: str
    base_version: int
    samples: int
    deltas: Mapping[str, Factors]
    received_at: float = 0.0
    train_loss: float = float("nan")

    @classmethod
    def from_message(cls, update: AdapterUpdate, received_at: float) -> ClientUpdate:
        """The strategy's view of a decoded wire update, stamped with its arrival time."""
        return cls(
            device_id=update.device_id,
            update_id=update.update_id,
            base_version=update.base_version,
            samples=update.samples,
            deltas=update.deltas,
            received_at=received_at,
            train_loss=update.train_loss,
        )


@dataclass(frozen=True, slots=True)
class AdapterState:
    """A global adapter: canonical `lora.{i}.{m}.A` (r, in) / `.B` (out, r) tensors, s = alpha/r.

    `residual[layer_id]` is the server-side error feedback, as factors (out, q) @ (q, in): what
    re-factorization to rank r dropped last time, added back at the next aggregation. `dropped` is
    ‖what the residual's rank cap could not keep‖_F at the step that made this state.
    """

    version: int
    tensors: Mapping[str, np.ndarray]
    scale: float
    rank: int
    residual: Mapping[str, Factors] = field(default_factory=dict)
    dropped: float = 0.0


@dataclass(frozen=True, slots=True)
class Aggregation:
    """The result of one aggregation: the new state and how it was made."""

    state: AdapterState
    used: tuple[str, ...]  # update ids folded into this version
    weights: Mapping[str, float]  # update id -> normalised weight
    metrics: Mapping[str, Any] = field(default_factory=dict)
    # host seconds of its stages ("alignment"), for the operator's dashboard; never part of the
    # published adapter, whose bytes a simulation on a virtual clock must not take from the host
    timings: Mapping[str, float] = field(default_factory=dict)


class Strategy(ABC):
    name: ClassVar[str]
    # What the strategy asks of the program that runs it, handed to its constructor by name:
    # "activations" (an `alignment.ActivationSource` over the bundle's calibration set) and
    # "state_of" (version -> AdapterState of a stored version). The coordinator and the simulator
    # provide each by name, so neither needs to know which strategy wants what.
    needs: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def add(self, update: ClientUpdate, current_version: int) -> None:
        """Buffer an update; raise `alignfed.errors.RejectedUpdate` to refuse it with a reason."""

    @abstractmethod
    def ready(self, now: float) -> bool:
        """Whether `aggregate` should run now."""

    @abstractmethod
    def aggregate(self, current: AdapterState, now: float) -> Aggregation:
        """Fold the buffered updates into `current`; returns version current.version + 1."""

    @abstractmethod
    def pending(self) -> list[ClientUpdate]:
        """Updates buffered but not yet aggregated (in arrival order)."""

    # -- per-device history (fairness, staleness reweighting, robust norms) ----------------------
    # A strategy that weighs by what it saw before owns that memory: `history()` is a JSON-able
    # snapshot and `restore()` takes it back; `replay()` rebuilds it from the version store's log
    # of aggregated updates, which is what the coordinator does after a restart.

    def close(self) -> None:  # noqa: B027 - optional hook
        """Stop background work the strategy started (AlignFed's calibration thread)."""

    def history(self) -> Mapping[str, Any]:
        """A JSON-able snapshot of what the weights depend on besides the buffer ({} if nothing)."""
        return {}

    def restore(self, history: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        """Resume from a `history()` snapshot."""

    def replay(self, aggregated: Iterable[tuple[str, int, int]]) -> None:  # noqa: B027 - optional hook
        """Rebuild the history from the store's log of aggregated updates, oldest first:
        (device id, base version, version that folded it in)."""
