"""The dashboard's picture of a federation: folds `feed` events into a JSON-ready snapshot.

Thread-safe: the coordinator's loop, the MQTT status watcher and the web server touch it from
different threads. Every list is bounded, so a long run keeps constant memory. The snapshot holds
only what an operator may see: ids, counts, losses, reasons; never keys, passwords or tensors.
"""

from __future__ import annotations

import math
import threading
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from dashboard.feed import DeviceStatus, Event, HeldOutLoss, QueueDepth, UpdateReceived, VersionPublished

SERIES_POINTS = 500  # points kept per time series
LINEAGE = 50  # versions listed in the lineage
REJECTS = 20  # last rejects shown


@dataclass(slots=True)
class _Device:
    state: str = "unknown"  # no status message seen yet
    online: bool | None = None
    profile: str = ""
    version: int | None = None  # newest global version the device reported
    last_update: float | None = None
    accepted: int = 0
    rejected: int = 0
    staleness: int | None = None
    eval_loss: float | None = None
    eval_version: int | None = None
    losses: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=SERIES_POINTS))


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


class Board:
    def __init__(self, federation: str, strategy: str = "") -> None:
        self._lock = threading.Lock()
        self._seq = 0
        self.reset(federation, strategy)

    def reset(self, federation: str, strategy: str = "") -> None:
        """Start a fresh picture (a new simulated variant); `seq` keeps growing so pages refresh."""
        with self._lock:
            self._clear(federation, strategy)
            self._seq += 1

    def _clear(self, federation: str, strategy: str) -> None:
        self.federation = federation
        self.strategy = strategy
        self._origin: float | None = None
        self._devices: dict[str, _Device] = {}
        self._version = 0
        self._lineage: deque[dict[str, Any]] = deque(maxlen=LINEAGE)
        self._staleness: Counter[int] = Counter()
        self._jain: deque[tuple[int, float]] = deque(maxlen=SERIES_POINTS)
        self._residuals: deque[tuple[int, float, float]] = deque(maxlen=SERIES_POINTS)
        self._held_out: deque[tuple[float, float]] = deque(maxlen=SERIES_POINTS)
        self._bytes: deque[tuple[float, int, int]] = deque(maxlen=SERIES_POINTS)
        self._rejects: deque[dict[str, Any]] = deque(maxlen=REJECTS)
        self._totals = {"received": 0, "accepted": 0, "rejected": 0, "bytes_up": 0, "bytes_down": 0}
        self._queue = {"queued": 0, "buffered": 0}

    @property
    def seq(self) -> int:
        """Bumped on every event: the server streams a new snapshot when it changes."""
        return self._seq

    def observe(self, event: Event) -> None:
        with self._lock:
            if self._origin is None:
                self._origin = event.at
            if isinstance(event, UpdateReceived):
                self._update(event)
            elif isinstance(event, VersionPublished):
                self._published(event)
            elif isinstance(event, DeviceStatus):
                d = self._device(event.device)
                d.state, d.online = event.state, event.online
                d.version = event.version if event.version is not None else d.version
                d.profile = event.profile or d.profile
            elif isinstance(event, HeldOutLoss):
                self._loss(event.device, event.at, event.loss, event.version)
            elif isinstance(event, QueueDepth):
                self._queue = {"queued": event.queued, "buffered": event.buffered}
            self._seq += 1

    def _device(self, name: str) -> _Device:
        return self._devices.setdefault(name, _Device())

    def _update(self, e: UpdateReceived) -> None:
        d = self._device(e.device)
        d.last_update = e.at
        self._totals["received"] += 1
        self._totals["bytes_up"] += e.nbytes
        self._bytes.append((e.at, self._totals["bytes_up"], self._totals["bytes_down"]))
        if e.accepted:
            d.accepted += 1
            self._totals["accepted"] += 1
            if e.staleness is not None:
                d.staleness = e.staleness
                self._staleness[e.staleness] += 1
            if e.eval_loss is not None and e.eval_version is not None:
                self._loss(e.device, e.at, e.eval_loss, e.eval_version)
        else:
            d.rejected += 1
            self._totals["rejected"] += 1
            self._rejects.append({"at": e.at, "device": e.device, "reason": e.reason})

    def _loss(self, device: str, at: float, loss: float, version: int) -> None:
        d = self._device(device)
        d.eval_loss, d.eval_version = _finite(loss), version
        if d.eval_loss is not None:
            d.losses.append((at, d.eval_loss))
        latest = [x.eval_loss for x in self._devices.values() if x.eval_loss is not None]
        if latest:
            self._held_out.append((at, sum(latest) / len(latest)))

    def _published(self, e: VersionPublished) -> None:
        self._version = max(self._version, e.version)
        self.strategy = e.strategy or self.strategy
        self._lineage.append(
            {"version": e.version, "parent": e.parent, "at": e.at, "updates": len(e.devices),
             "devices": dict(sorted(Counter(e.devices).items()))}
        )  # fmt: skip
        if e.jain is not None and math.isfinite(e.jain):
            self._jain.append((e.version, e.jain))
        rhos = [r for r in e.alignment_residual.values() if math.isfinite(r)]
        if rhos:
            self._residuals.append((e.version, sum(rhos) / len(rhos), max(rhos)))
        # every known device that is not offline receives the retained adapter once
        receivers = sum(1 for d in self._devices.values() if d.online is not False)
        self._totals["bytes_down"] += e.nbytes * receivers
        self._bytes.append((e.at, self._totals["bytes_up"], self._totals["bytes_down"]))

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            accepted_total = sum(d.accepted for d in self._devices.values()) or 1
            return {
                "federation": self.federation,
                "strategy": self.strategy,
                "seq": self._seq,
                "origin": self._origin or 0.0,
                "version": self._version,
                "lineage": list(self._lineage),
                "devices": [
                    {
                        "id": name,
                        "state": d.state,
                        "online": d.online,
                        "profile": d.profile,
                        "version": d.version,
                        "last_update": d.last_update,
                        "accepted": d.accepted,
                        "rejected": d.rejected,
                        "share": d.accepted / accepted_total,
                        "staleness": d.staleness,
                        "eval_loss": d.eval_loss,
                        "eval_version": d.eval_version,
                    }
                    for name, d in sorted(self._devices.items())
                ],
                "devices_online": sum(1 for d in self._devices.values() if d.online),
                "staleness_histogram": {str(k): v for k, v in sorted(self._staleness.items())},
                "eval_loss": {name: list(d.losses) for name, d in sorted(self._devices.items()) if d.losses},
                "held_out_loss": list(self._held_out),
                "jain": list(self._jain),
                "residuals": list(self._residuals),
                "bytes": list(self._bytes),
                "rejects": list(self._rejects)[::-1],
                "totals": dict(self._totals),
                "queue": dict(self._queue),
            }
