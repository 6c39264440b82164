"""What the virtual clock's queue holds: the moments a run reacts to (see `engine`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Deliver:
    """A global version lands at a device."""

    device: str
    version: int
    nbytes: int
    parent: int = -1  # a delta from this version; −1: a snapshot


@dataclass(frozen=True, slots=True)
class Arrive:
    """A device's update reaches the coordinator."""

    device: str
    base_version: int
    train_loss: float
    payload: bytes  # the signed update as it travels; the coordinator's core decodes it on arrival
    busy_s: float  # train + upload time of the round


@dataclass(frozen=True, slots=True)
class Free:
    """A device may start its next round (after its duty-cycle rest)."""

    device: str


@dataclass(frozen=True, slots=True)
class Online:
    """A device comes back from a round's time offline."""

    device: str


@dataclass(frozen=True, slots=True)
class Poll:
    """Re-check the strategy's `ready` while updates are buffered (time-triggered aggregation)."""


Item = Deliver | Arrive | Free | Online | Poll
