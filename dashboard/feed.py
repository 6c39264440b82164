"""What a federation tells the dashboard: one frozen message type per thing that happened.

The coordinator (after ingest, aggregation and reject), its MQTT device-status watcher and the
simulator (from its event log) all speak these; `Board` and `Metrics` consume them. Times are
seconds: wall-clock for a live coordinator, virtual for the simulator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class UpdateReceived:
    """One device update after ingest: accepted into the buffer, or rejected with a reason."""

    at: float
    device: str
    accepted: bool
    reason: str  # "accepted" or the reject reason sent in the ack
    nbytes: int
    staleness: int | None = None  # τ = current version − base version, when the header was readable
    train_loss: float | None = None
    eval_loss: float | None = None  # the device's held-out loss of the global adapter it trained from
    eval_version: int | None = None  # ... which is that version


@dataclass(frozen=True, slots=True)
class VersionPublished:
    """A new global version made by aggregation (or version 0 / the stored version at start)."""

    at: float
    version: int
    parent: int
    strategy: str
    devices: tuple[str, ...] = ()  # the device of every update folded in (repeats allowed)
    nbytes: int = 0  # size of the published adapter message
    aggregation_s: float | None = None
    alignment_s: float | None = None
    alignment_residual: Mapping[str, float] = field(default_factory=dict)  # layer -> mean ρ
    jain: float | None = None


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """A device's retained status message, or its last will ("offline")."""

    at: float
    device: str
    state: str  # "training", "idle", ... or "offline"
    version: int | None = None
    profile: str = ""

    @property
    def online(self) -> bool:
        return self.state != "offline"


@dataclass(frozen=True, slots=True)
class HeldOutLoss:
    """A measured eval loss of one global version on one device's held-out data."""

    at: float
    device: str
    version: int
    loss: float


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """Ingest backlog: messages received and not yet handled, and updates buffered for aggregation."""

    at: float
    queued: int
    buffered: int


Event = UpdateReceived | VersionPublished | DeviceStatus | HeldOutLoss | QueueDepth
Observer = Callable[[Event], None]
