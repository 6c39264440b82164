"""Version publication on the virtual clock: the store of global adapters a run still needs, and
each new version's delivery to every device (download time each)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

from coordinator.strategies.base import AdapterState
from simulator.accounting import Ledger
from simulator.clock import EventQueue
from simulator.events import Event
from simulator.fleet import SimDevice
from simulator.timeline import Deliver, Item
from simulator.timing import Timing


class VersionHistory:
    """Global adapters by version (A/B only: the error-feedback residual stays with the current one)."""

    def __init__(self, initial: AdapterState) -> None:
        self._states: dict[int, AdapterState] = {}
        self.add(initial)

    def add(self, state: AdapterState) -> None:
        self._states[state.version] = AdapterState(
            version=state.version, tensors=state.tensors, scale=state.scale, rank=state.rank
        )

    def get(self, version: int) -> AdapterState | None:
        """The role of the coordinator's version store for `state_of`."""
        return self._states.get(version)

    def prune(self, below: int) -> None:
        for v in [v for v in self._states if v < below]:
            del self._states[v]

    def __len__(self) -> int:
        return len(self._states)


class Publisher:
    """Sends versions to devices and keeps those still in use: the current one, those devices hold
    or are downloading, and the bases of buffered updates."""

    def __init__(
        self,
        history: VersionHistory,
        queue: EventQueue[Item],
        timing: Timing,
        ledger: Ledger,
        *,
        deltas: bool = False,
    ) -> None:
        """`deltas`: versions after the first go out as deltas of the one before (a delta downlink)."""
        self.history = history
        self.queue = queue
        self.timing = timing
        self.ledger = ledger
        self.deltas = deltas
        self.newest = 0  # the newest version published
        self.global_bytes = 0  # encoded size of the newest version (what a device coming online fetches)
        self.delta_bytes = 0  # encoded size of the newest version's delta (delta downlink)
        self.since = 0.0  # virtual time the newest version was made
        self._in_flight: Counter[int] = Counter()  # versions still downloading, by version
        self._link_at: dict[str, float] = {}  # delta downlink: when a device's last message lands

    def send(self, device: SimDevice, at: float, version: int, nbytes: int, parent: int = -1) -> None:
        """Schedule a global adapter's arrival at a device (`parent` ≥ 0: a delta from that version);
        the version is kept until it lands."""
        self._in_flight[version] += 1
        if self.deltas:  # one link, in order: a delta must not overtake the snapshot it applies to
            at = self._link_at[device.device_id] = max(at, self._link_at.get(device.device_id, -math.inf))
        self.queue.push(at, Deliver(device.device_id, version, nbytes, parent))

    def send_newest(self, device: SimDevice, now: float, *, snapshot: bool) -> None:
        """The retained newest version: its snapshot, or (delta downlink, after version 0) its delta."""
        v, p = self.newest, device.profile
        if snapshot or not self.deltas or v == 0:
            self.send(device, now + self.timing.download_s(p, self.global_bytes), v, self.global_bytes)
        else:
            self.send(device, now + self.timing.download_s(p, self.delta_bytes), v, self.delta_bytes, v - 1)

    def landed(self, version: int) -> None:
        self._in_flight[version] -= 1

    def publish(
        self,
        state: AdapterState,
        now: float,
        nbytes: int,
        recipients: Iterable[SimDevice],
        *,
        max_tau: int = 0,
        delta_bytes: int = 0,
    ) -> None:
        """Store a new version and send it to `recipients` (`nbytes`: its encoded size, `delta_bytes`
        its delta's); then the caller prunes (`prune`) and the ledger evaluates."""
        self.newest = state.version
        self.global_bytes = nbytes
        self.delta_bytes = delta_bytes
        self.since = now
        self.history.add(state)
        if state.version > 0:
            self.ledger.log(Event(now, "aggregate", version=state.version, staleness=max_tau, bytes=nbytes))
        for device in recipients:
            self.send_newest(device, now, snapshot=False)

    def prune(self, current: int, held: Iterable[int], bases: Iterable[int]) -> None:
        """Drop versions below everything still in use: `current`, the versions devices `held`,
        the `bases` of buffered updates and those in flight."""
        in_flight = [v for v, n in self._in_flight.items() if n > 0]
        self.history.prune(min([current, *held, *bases, *in_flight]))
