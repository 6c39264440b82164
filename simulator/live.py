"""`alignfed simulate --dashboard`: the simulator's event log as the live dashboard's feed.

The same page as the coordinator's, in virtual seconds. Each variant starts a fresh picture (the
board is reset; Prometheus counters keep counting over the whole invocation, as counters do).
"""

from __future__ import annotations

from collections.abc import Callable

from coordinator.fairness import jain_index
from dashboard import feed
from dashboard.live import LiveDashboard
from simulator.events import Event
from simulator.metrics import RunResult


class VariantFeed:
    """Translates one variant's events. An `arrive` is reported once it is known whether a `reject`
    followed it (the engine logs the arrival before the strategy decides)."""

    def __init__(self, observe: feed.Observer, strategy: str) -> None:
        self.observe = observe
        self.strategy = strategy
        self._arrival: Event | None = None
        self._alignments = 0

    def __call__(self, e: Event, result: RunResult) -> None:
        held, self._arrival = self._arrival, None
        if held is not None:
            rejected = e.kind == "reject" and e.device == held.device and e.time == held.time
            self.observe(
                feed.UpdateReceived(
                    held.time, held.device, not rejected, e.detail if rejected else "accepted", held.bytes or 0,
                    held.staleness, held.loss,
                )
            )  # fmt: skip
            if rejected:
                return
        if e.kind == "arrive":
            self._arrival = e
        elif e.kind in ("receive", "start", "offline"):
            state = {"receive": "idle", "start": "training", "offline": "offline"}[e.kind]
            self.observe(feed.DeviceStatus(e.time, e.device, state, e.version))
        elif e.kind == "aggregate" and e.version is not None:
            residual = result.alignment[-1] if len(result.alignment) > self._alignments else {}
            self._alignments = len(result.alignment)
            folded = tuple(x.device for x in result.events if x.kind == "fold" and x.version == e.version)
            self.observe(
                feed.VersionPublished(
                    e.time, e.version, e.version - 1, self.strategy, folded, e.bytes or 0, None, None, residual,
                    jain_index(result.folded.values()) if result.folded else None,
                )
            )  # fmt: skip
        elif e.kind == "eval" and result.curve and result.curve[-1].version == e.version:
            for device, loss in result.curve[-1].per_device.items():
                self.observe(feed.HeldOutLoss(e.time, device, result.curve[-1].version, float(loss)))


def feeds(dashboard: LiveDashboard, strategies: dict[str, str]) -> Callable[[str], VariantFeed]:
    """The `events` factory for `run_experiment`: variant name -> its feed, the board reset for it."""

    def start(variant: str) -> VariantFeed:
        dashboard.board.reset(variant, strategies.get(variant, variant))
        dashboard.observe(feed.VersionPublished(0.0, 0, -1, strategies.get(variant, variant)))
        return VariantFeed(dashboard.observe, strategies.get(variant, variant))

    return start
