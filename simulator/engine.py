"""The virtual-clock federation: devices, links and the coordinator's core as timed events.

One run drives one `Strategy` (the same classes the live coordinator uses) over the testbed's
devices. Per device:

    ┌ start ─ train (local_steps × step time) ─ upload (bytes / uplink + latency) ┐
    │                                                                            arrive
    └─ (duty-cycle rest) ─ start from the newest global *received* ────────────────┘

- Started rounds wait and are trained together just before one of them could arrive (`rounds`).
- Asynchronous strategies: the next round starts right after the upload (plus the duty-cycle
  rest), from the newest global the device has received. Synchronous runs (`fedavg`): the device
  waits until it has received a version newer than the one it last trained on.
- Every new global version is delivered to every online device after download time
  (encoded size / downlink + latency, `versions`) and evaluated on the held-out sets (`accounting`).
- Availability: at each round start the device is online with probability `availability`
  (seeded per device); otherwise it stays offline for one round's training time, misses the
  versions published meanwhile, and fetches the retained newest version when it is back.
- The coordinator's side is the live coordinator's core (`coordination`): each arriving payload
  is validated by ingest before the strategy sees it; while updates are buffered, `ready(now)` is
  re-checked every `poll_s` virtual seconds (AlignFed's time trigger T).

This module is the loop and the wiring: which part each queue item (`timeline`) goes to.

Nothing reads the host clock except the coordinator CPU-time metric, which is not part of the
event log, so the event log is the same for a seed on any machine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from alignfed import protocol
from coordinator.core import Core, make_adapter
from coordinator.strategies.base import AdapterState, Strategy
from simulator.accounting import Ledger
from simulator.accuracy import AccuracyHook
from simulator.clock import EventQueue
from simulator.config import SimulationConfig
from simulator.coordination import Coordination
from simulator.events import Event
from simulator.metrics import RunResult
from simulator.rounds import DeviceState, Rounds
from simulator.testbed import Testbed
from simulator.timeline import Arrive, Deliver, Free, Item, Online
from simulator.versions import Publisher, VersionHistory


class Simulation:
    """One strategy over the testbed's fleet on a virtual clock; `run()` returns what happened."""

    def __init__(
        self,
        variant: str,
        strategy: Strategy,
        testbed: Testbed,
        config: SimulationConfig,
        *,
        synchronous: bool | None = None,
        history: VersionHistory | None = None,
        accuracy: AccuracyHook | None = None,
        progress: Callable[[float], None] | None = None,
        on_event: Callable[[Event, RunResult], None] | None = None,
    ) -> None:
        """`on_event` sees every logged event with the result so far (the live dashboard's feed).
        `synchronous` defaults to True for fedavg; `history` is the version store the strategy's
        `state_of` reads (give the same object to both); `accuracy` maps adapter tensors to [0, 1]."""
        self.variant = variant
        self.strategy = strategy
        self.tb = testbed
        self.cfg = config
        self.history = history if history is not None else VersionHistory(testbed.initial)
        if self.history.get(testbed.initial.version) is None:
            self.history.add(testbed.initial)
        self.progress = progress
        self.queue: EventQueue[Item] = EventQueue()
        self.result = RunResult(variant=variant, strategy=strategy.name, devices=[d.device_id for d in testbed.devices])
        self.ledger = Ledger(self.result, testbed.evaluator, config, accuracy=accuracy, on_event=on_event)
        self.publisher = Publisher(
            self.history, self.queue, config.timing, self.ledger, deltas=config.downlink != "snapshot"
        )
        self.rounds = Rounds(
            testbed,
            config,
            self.queue,
            self.ledger,
            self.publisher,
            self.history,
            synchronous=strategy.name == "fedavg" if synchronous is None else synchronous,
            closed=lambda: self.coordination.done,
        )
        self.coordination = Coordination(
            strategy, testbed, config, self.rounds.keys(), self.queue, self.ledger, self._publish
        )

    @property
    def core(self) -> Core:
        return self.coordination.core

    @property
    def current(self) -> AdapterState:
        return self.coordination.core.current

    @property
    def devices(self) -> dict[str, DeviceState]:
        return self.rounds.devices

    @property
    def byzantine(self) -> dict[str, str]:
        """device id -> its attack (simulator.attacks)."""
        return self.rounds.byzantine

    def run(self) -> RunResult:
        initial = make_adapter(
            self.tb.manifest,
            self.tb.bundle_digest,
            version=self.current.version,
            parent_version=self.current.version - 1,
            strategy=self.strategy.name,
            tensors=self.current.tensors,
            created_at=0.0,
        )
        self._publish(self.current, 0.0, len(protocol.encode_global(initial)), 0, 0)
        deadline = time.monotonic() + self.cfg.wall_limit_s if self.cfg.wall_limit_s else math.inf
        while not self.coordination.done:
            if time.monotonic() > deadline:
                self.result.wall_limited = True  # the report says where the run stopped
                break
            due = self.queue.next_time()
            earliest = self.rounds.due()
            if earliest is not None and (due is None or due >= earliest):
                self.rounds.train_started()  # an arrival may now come before the next event
                continue
            if due is None or due > self.cfg.horizon_s:
                break
            now, item = self.queue.pop()
            self.result.end_time = now
            self._handle(item, now)
            if self.progress is not None:
                self.progress(now)
        self.ledger.close(self.current, self.publisher.since)
        return self.result

    def _handle(self, item: Item, now: float) -> None:
        if isinstance(item, Deliver):
            self.publisher.landed(item.version)
            self.rounds.on_deliver(item, now)
        elif isinstance(item, Arrive):
            self.coordination.on_arrive(item, now)
            self.rounds.on_arrived(item, now)
        elif isinstance(item, Free):
            self.rounds.try_start(item.device, now)
        elif isinstance(item, Online):
            self.rounds.on_online(item.device, now, self.current.version)
        else:
            self.coordination.on_poll(now)

    def _publish(self, state: AdapterState, now: float, nbytes: int, max_tau: int, delta_bytes: int) -> None:
        """Store a new version, send it to every device, keep only the versions still in use, evaluate it."""
        self.publisher.publish(state, now, nbytes, self.rounds.recipients(), max_tau=max_tau, delta_bytes=delta_bytes)
        bases = [u.base_version for u in self.coordination.core.strategy.pending()]
        self.publisher.prune(self.current.version, self.rounds.held(), bases)
        self.ledger.published(state, now)
