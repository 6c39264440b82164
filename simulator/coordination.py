"""The coordinator's side of a run: the live coordinator's core (`coordinator.core`) on the virtual clock.

Each arriving payload is decoded and validated by ingest — signature, layout, staleness bound and
the per-layer norm bound, per `SimulationConfig.limits` — before the strategy sees it, exactly as
the MQTT service does; versions are made by the same `Core.next_version`. The version store holds
every version made, so an update's base is known if it is at most the current version.
While updates are buffered, `ready(now)` is re-checked every `poll_s` virtual seconds, like the
service's idle loop (AlignFed's time trigger T).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial

from alignfed.downlink import Broadcaster
from alignfed.errors import RejectedUpdate
from coordinator.core import Core, Intake, NewVersion, broadcast
from coordinator.strategies.base import AdapterState, Strategy
from simulator.accounting import Ledger
from simulator.clock import EventQueue
from simulator.config import SimulationConfig
from simulator.events import Event
from simulator.testbed import Testbed
from simulator.timeline import Arrive, Item, Poll

# (new state, now, its encoded size, the largest staleness folded into it, its delta's size) -> None
Publish = Callable[[AdapterState, float, int, int, int], None]


class Coordination:
    """Validates arrivals, feeds the strategy and publishes each version it makes."""

    def __init__(
        self,
        strategy: Strategy,
        testbed: Testbed,
        config: SimulationConfig,
        keys: Mapping[str, bytes],
        queue: EventQueue[Item],
        ledger: Ledger,
        publish: Publish,
    ) -> None:
        self.cfg = config
        self.queue = queue
        self.ledger = ledger
        self.publish = publish
        intake = Intake(
            testbed.manifest,
            limits=config.limits,
            key_of=dict(keys).get,
            has_version=lambda v: 0 <= v <= self.core.current.version,
        )
        self.core = Core(intake, strategy, testbed.initial)
        # a delta downlink: each version is what devices rebuild from the chain (coordinator.core.broadcast)
        self.broadcaster = (
            Broadcaster(config.downlink, feedback=config.downlink_feedback == "carry")
            if config.downlink != "snapshot"
            else None
        )
        self.done = False  # max_versions reached
        self._poll_pending = False

    def on_arrive(self, item: Arrive, now: float) -> None:
        device, base = item.device, item.base_version
        result = self.ledger.result
        tau = self.core.current.version - base
        nbytes = len(item.payload)
        result.bytes_up += nbytes
        self.ledger.log(Event(now, "arrive", device, version=base, staleness=tau, bytes=nbytes, loss=item.train_loss))
        try:  # validate → strategy, as the live coordinator does
            self.ledger.timed(lambda: self.core.admit(device, item.payload, now))
            result.accepted[device] += 1
        except RejectedUpdate as exc:
            result.rejected[device] += 1
            self.ledger.log(Event(now, "reject", device, version=base, staleness=tau, detail=exc.reason))
        self.aggregate_while_ready(now)
        self.schedule_poll(now)

    def on_poll(self, now: float) -> None:
        self._poll_pending = False
        self.aggregate_while_ready(now)
        self.schedule_poll(now)

    def aggregate_while_ready(self, now: float) -> None:
        result = self.ledger.result
        while not self.done:
            new: NewVersion | None = self.ledger.timed(partial(self.core.next_version, now))
            if new is None:
                return
            version = new.state.version
            for f in new.folded:
                tau = new.staleness(f)
                device = f.update.device_id
                result.staleness[tau] += 1
                result.folded[device] += 1
                result.add_weight(device, f.weight)
                self.ledger.log(
                    Event(now, "fold", device, version=version, staleness=tau, detail=f"weight={f.weight:.6g}")
                )
            residual = new.adapter.metrics.get("alignment_residual")
            if isinstance(residual, dict) and residual:
                result.alignment.append({str(k): float(v) for k, v in residual.items()})
            delta_bytes = 0
            if self.broadcaster is not None:
                fold = self.cfg.downlink_feedback == "residual"
                new, delta, step = broadcast(new, self.broadcaster, now, self.cfg.wire_codec, fold=fold)
                self.broadcaster.accept(step)
                delta_bytes = len(delta)
            self.core.advance(new)
            max_tau = max((new.staleness(f) for f in new.folded), default=0)
            self.publish(new.state, now, len(new.encoded), max_tau, delta_bytes)
            if self.cfg.max_versions and version >= self.cfg.max_versions:
                self.done = True

    def schedule_poll(self, now: float) -> None:
        if not self._poll_pending and not self.done and self.core.strategy.pending():
            self._poll_pending = True
            self.queue.push(now + self.cfg.poll_s, Poll())
