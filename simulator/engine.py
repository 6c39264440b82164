"""The virtual-clock federation: devices, links and the coordinator's strategy as timed events.

One run drives one `Strategy` (the same classes the live coordinator uses) over the testbed's
devices. Per device:

    ┌ start ─ train (local_steps × step time) ─ upload (bytes / uplink + latency) ┐
    │                                                                            arrive
    └─ (duty-cycle rest) ─ start from the newest global *received* ────────────────┘

- A round's result depends only on its start adapter, the device's batches (drawn when it starts)
  and, with `optimizer="device"`, the device's own optimizer moments — nothing that happens while
  it trains changes it. So started rounds wait, and are trained together in one
  `trainer.train_many` call just before the clock reaches the earliest moment one of them could
  arrive (start + training time + link latency); the batched trainer steps them all in one pass
  per step. Each arrival keeps the queue position it would have had if pushed at its start, so
  the event log is that of training each round when it starts.
- Asynchronous strategies: the next round starts right after the upload (plus the duty-cycle
  rest), from the newest global the device has received. Synchronous runs (`fedavg`): the device
  waits until it has received a version newer than the one it last trained on.
- Every new global version is delivered to every online device after download time
  (encoded size / downlink + latency) and evaluated on the held-out sets. With a delta downlink
  (`downlink` = int4c | int8c | fp32) the version is what devices rebuild from the chain
  (alignfed.downlink), each device's messages land in order, and a device that misses one (back
  from offline) gets the retained delta and, when it does not chain, the snapshot: both charged.
- Availability: at each round start the device is online with probability `availability`
  (seeded per device); otherwise it stays offline for one round's training time, misses the
  versions published meanwhile, and fetches the retained newest version when it is back.
- Time-triggered aggregation (AlignFed's T): while updates are buffered, `ready(now)` is
  re-checked every `poll_s` virtual seconds, like the service's idle loop.

Nothing reads the host clock except the coordinator CPU-time metric, which is not part of the
event log, so the event log is the same for a seed on any machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, TypeVar

import numpy as np

from alignfed import protocol
from alignfed.adapter import compute_deltas
from alignfed.downlink import Broadcaster
from alignfed.errors import ConfigError, RejectedUpdate
from alignfed.text import Batch
from coordinator.ingest import IngestLimits, payload_limit
from coordinator.strategies.base import AdapterState, ClientUpdate, Strategy
from edge.uplink import Uplink
from simulator import attacks
from simulator.accuracy import AccuracyHook
from simulator.clock import EventQueue
from simulator.events import Event
from simulator.fleet import SimDevice
from simulator.metrics import AccuracyPoint, EvalPoint, RunResult
from simulator.testbed import DeviceData, Testbed
from simulator.timing import Timing
from simulator.training import Moments, TrainJob

OptimizerScope = Literal["round", "device"]
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    horizon_s: float = 3600.0  # virtual seconds to simulate
    max_versions: int = 0  # stop after this many aggregations (0: no limit)
    wire_quantization: str = "int8c"  # how update factors travel: "int8c" | "int8" | "fp32"
    wire_codec: str = "deflate"  # envelope of each update: "deflate" | "none" (lossless)
    delta_rank: int = 0  # rank of the sent delta factors; 0 = exact (2r)
    delta_feedback: bool = True  # devices carry what compression drops into their next update
    carry_rank: int = 0  # rank of that carry per layer; 0 = the sent rank
    # how new versions reach devices: "snapshot" (the full float32 adapter every version) or the
    # quantization of version-to-version deltas ("int4c" | "int8c" | "fp32"; alignfed.downlink)
    downlink: str = "snapshot"
    poll_s: float = 1.0  # re-check `ready` this often while updates are buffered
    optimizer: OptimizerScope = "round"  # AdamW moments: fresh every round, or kept per device
    eval_every: int = 1  # evaluate every n-th version (and always the last)
    eval_interval_s: float = 0.0  # ... and only if this many virtual seconds passed since the last one
    accuracy_every: int = 0  # call the accuracy hook every n-th version too (0: final adapter only)
    timing: Timing = field(default_factory=Timing)
    seed: int = 0
    byzantine: float = 0.0  # fraction of devices that send hostile, correctly signed updates
    attack: str = "scale"  # what they send: scale | signflip | random | mixed (simulator.attacks)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.horizon_s) and self.horizon_s > 0):
            raise ConfigError(f"simulation: horizon_s must be > 0 seconds, got {self.horizon_s}")
        if self.max_versions < 0:
            raise ConfigError(f"simulation: max_versions must be ≥ 0 (0 = no limit), got {self.max_versions}")
        if self.wire_quantization not in protocol.QUANTIZATIONS:
            raise ConfigError(
                f"simulation: wire_quantization must be one of {', '.join(protocol.QUANTIZATIONS)}, "
                f"got {self.wire_quantization!r}"
            )
        if self.wire_codec not in protocol.CODECS:
            raise ConfigError(
                f"simulation: wire_codec must be one of {', '.join(protocol.CODECS)}, got {self.wire_codec!r}"
            )
        if self.delta_rank < 0 or self.carry_rank < 0:
            raise ConfigError(
                f"simulation: delta_rank and carry_rank must be ≥ 0, got {self.delta_rank}, {self.carry_rank}"
            )
        if self.downlink not in ("snapshot", *protocol.DOWNLINK_QUANTIZATIONS):
            raise ConfigError(
                f"simulation: downlink must be 'snapshot' or one of {', '.join(protocol.DOWNLINK_QUANTIZATIONS)}, "
                f"got {self.downlink!r}"
            )
        if not self.poll_s > 0:
            raise ConfigError(f"simulation: poll_s must be > 0 seconds, got {self.poll_s}")
        if self.optimizer not in ("round", "device"):
            raise ConfigError(f"simulation: optimizer must be 'round' or 'device', got {self.optimizer!r}")
        if not (math.isfinite(self.eval_interval_s) and self.eval_interval_s >= 0):
            raise ConfigError(f"simulation: eval_interval_s must be ≥ 0 seconds, got {self.eval_interval_s}")
        attacks.check(self.byzantine, self.attack)
        if self.eval_every < 1 or self.accuracy_every < 0:
            raise ConfigError(
                f"simulation: eval_every must be ≥ 1 and accuracy_every ≥ 0, got {self.eval_every}, "
                f"{self.accuracy_every}"
            )


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


# -- queue items ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Deliver:
    device: str
    version: int
    nbytes: int
    parent: int = -1  # a delta from this version; −1: a snapshot


@dataclass(frozen=True, slots=True)
class _Arrive:
    device: str
    update: ClientUpdate
    nbytes: int
    busy_s: float  # train + upload time of the round


@dataclass(frozen=True, slots=True)
class _Free:
    device: str


@dataclass(frozen=True, slots=True)
class _Online:
    device: str


@dataclass(frozen=True, slots=True)
class _Poll:
    pass


_Item = _Deliver | _Arrive | _Free | _Online | _Poll


@dataclass(frozen=True, slots=True)
class _Round:
    """A started round not yet trained; `order` is its arrival's reserved queue position."""

    device: str
    base: AdapterState
    start: float
    train_s: float
    batches: list[Batch]
    index: int  # the device's round number
    order: int
    earliest: float  # its arrival comes no sooner: start + training + the upload of an empty payload


@dataclass(slots=True)
class _DeviceState:
    device: SimDevice
    data: DeviceData
    batch_rng: np.random.Generator
    avail_rng: np.random.Generator
    key: bytes
    uplink: Uplink
    moments: Moments | None = None
    received: int = -1  # newest global version received
    last_base: int = -1  # version the last round started from
    waiting: bool = True  # ready to train but holds no usable version (SYNC at boot)
    offline_until: float = -math.inf
    rounds: int = 0
    stopped: bool = False  # its next round would end past the horizon
    attack: str | None = None  # a Byzantine device's attack (simulator.attacks)
    link_at: float = -math.inf  # delta downlink: when its last message lands (one link, in order)
    fetching: bool = False  # delta downlink: a snapshot is on its way


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
        self._payload_limit = payload_limit(IngestLimits(), testbed.manifest)  # as the coordinator decodes
        self.synchronous = strategy.name == "fedavg" if synchronous is None else synchronous
        self.history = history if history is not None else VersionHistory(testbed.initial)
        self._in_flight: Counter[int] = Counter()  # global versions still downloading, by version
        if self.history.get(testbed.initial.version) is None:
            self.history.add(testbed.initial)
        self.accuracy = accuracy
        self.progress = progress
        self.on_event = on_event
        self.queue: EventQueue[_Item] = EventQueue()
        self.current = testbed.initial
        self.result = RunResult(variant=variant, strategy=strategy.name, devices=[d.device_id for d in testbed.devices])
        self._poll_pending = False
        self._done = False
        self._started: list[_Round] = []  # rounds waiting to be trained together
        self._last_eval = -1
        self._last_eval_at = -math.inf
        self._global_bytes = 0
        self._broadcaster = Broadcaster(config.downlink) if config.downlink != "snapshot" else None
        self._delta_bytes = 0  # the newest version's delta message
        self._current_since = 0.0  # virtual time the current version was made
        self.devices: dict[str, _DeviceState] = {}
        self.byzantine = attacks.assign(
            [d.device_id for d in testbed.devices],
            [config.timing.train_s(d.profile) for d in testbed.devices],
            config.byzantine,
            config.attack,
            config.seed,
        )
        for d in testbed.devices:
            self.devices[d.device_id] = _DeviceState(
                device=d,
                data=testbed.data[d.device_id],
                batch_rng=np.random.default_rng([config.seed, d.index, 1]),
                avail_rng=np.random.default_rng([config.seed, d.index, 2]),
                key=hashlib.sha256(f"alignfed-sim:{d.device_id}".encode()).digest(),
                uplink=Uplink(
                    config.wire_quantization,
                    config.delta_rank,
                    feedback=config.delta_feedback,
                    carry_rank=config.carry_rank,
                ),
                moments=testbed.trainer.fresh_moments() if config.optimizer == "device" else None,
                attack=self.byzantine.get(d.device_id),
            )

    # -- the loop ---------------------------------------------------------------------------------

    def run(self) -> RunResult:
        self._publish(self.current, 0.0, metrics={})
        while not self._done:
            due = self.queue.next_time()
            if self._started and (due is None or due >= min(r.earliest for r in self._started)):
                self._train_started()  # an arrival may now come before the next event
                continue
            if due is None or due > self.cfg.horizon_s:
                break
            now, item = self.queue.pop()
            self.result.end_time = now
            self._handle(item, now)
            if self.progress is not None:
                self.progress(now)
        if self._last_eval != self.current.version:
            self._evaluate(self.current, self._current_since)
        self.result.final = self.current
        if self.accuracy is not None and (
            not self.result.accuracy or self.result.accuracy[-1].version != self.current.version
        ):
            self._accuracy(self.current, self._current_since)
        return self.result

    def _handle(self, item: _Item, now: float) -> None:
        if isinstance(item, _Deliver):
            self._on_deliver(item, now)
        elif isinstance(item, _Arrive):
            self._on_arrive(item, now)
        elif isinstance(item, _Free):
            self._try_start(self.devices[item.device], now)
        elif isinstance(item, _Online):
            self._on_online(self.devices[item.device], now)
        else:
            self._poll_pending = False
            self._aggregate_while_ready(now)
            self._schedule_poll(now)

    # -- devices ----------------------------------------------------------------------------------

    def _send(self, dev: _DeviceState, at: float, version: int, nbytes: int, parent: int = -1) -> None:
        """Schedule a global adapter's arrival at a device; the version is kept until it lands."""
        self._in_flight[version] += 1
        if self._broadcaster is not None:  # a delta must not overtake the snapshot it applies to
            at = dev.link_at = max(at, dev.link_at)
        self.queue.push(at, _Deliver(dev.device.device_id, version, nbytes, parent))

    def _send_current(self, dev: _DeviceState, now: float, *, snapshot: bool) -> None:
        """The retained newest version: its snapshot, or (delta downlink) its delta."""
        v, p = self.current.version, dev.device.profile
        if snapshot or self._broadcaster is None or v == 0:
            dev.fetching = self._broadcaster is not None
            self._send(dev, now + self.cfg.timing.download_s(p, self._global_bytes), v, self._global_bytes)
        else:
            self._send(dev, now + self.cfg.timing.download_s(p, self._delta_bytes), v, self._delta_bytes, v - 1)

    def _on_deliver(self, item: _Deliver, now: float) -> None:
        self._in_flight[item.version] -= 1
        dev = self.devices[item.device]
        if now < dev.offline_until:
            return  # offline: the message is missed; the retained newest is fetched on return
        self.result.bytes_down += item.nbytes
        if item.parent >= 0 and item.parent != dev.received:  # a delta that does not chain: a gap
            if item.version > dev.received and not dev.fetching:
                self._send_current(dev, now, snapshot=True)
            return
        if item.parent < 0:
            dev.fetching = False
        if item.version > dev.received:
            dev.received = item.version
            self._log(Event(now, "receive", item.device, version=item.version, bytes=item.nbytes))
        if dev.waiting:
            self._try_start(dev, now)

    def _on_online(self, dev: _DeviceState, now: float) -> None:
        dev.offline_until = now
        if self.current.version > dev.received:
            dev.waiting = True  # SYNC: wait for the retained newest version
            dev.fetching = False  # a snapshot sent while it was away was missed; it subscribes anew
            self._send_current(dev, now, snapshot=False)
        else:
            self._try_start(dev, now)

    def _try_start(self, dev: _DeviceState, now: float) -> None:
        if dev.stopped or self._done:
            return
        need = dev.last_base + 1 if self.synchronous else 0
        if dev.received < need:
            dev.waiting = True
            return
        dev.waiting = False
        p = dev.device.profile
        train_s = self.cfg.timing.train_s(p)
        if now + train_s > self.cfg.horizon_s:
            dev.stopped = True  # the round could not arrive within the horizon
            return
        if dev.avail_rng.random() >= p.availability:
            dev.offline_until = now + train_s
            self._log(Event(now, "offline", dev.device.device_id, version=dev.received))
            self.queue.push(dev.offline_until, _Online(dev.device.device_id))
            return
        base = self.history.get(dev.received)
        if base is None:
            raise RuntimeError(f"simulation: version {dev.received} held by {dev.device.device_id} was pruned")
        self._log(Event(now, "start", dev.device.device_id, version=base.version))
        batches = list(self._batches(dev, p.local_steps))
        earliest = now + train_s + self.cfg.timing.upload_s(p, 0)
        order = self.queue.reserve()
        self._started.append(_Round(dev.device.device_id, base, now, train_s, batches, dev.rounds, order, earliest))
        dev.last_base = base.version
        dev.rounds += 1
        self.result.rounds += 1

    def _train_started(self) -> None:
        """Train every started round in one `train_many` call and schedule their arrivals."""
        started, self._started = self._started, []
        jobs = [
            TrainJob(
                r.base.tensors, r.batches, self.devices[r.device].device.profile.lr, self.devices[r.device].moments
            )
            for r in started
        ]
        for r, trained in zip(started, self.tb.trainer.train_many(jobs), strict=True):
            dev = self.devices[r.device]
            _, payload = self._encode_round(dev, r, trained.tensors, float(np.mean(trained.losses)))
            upload_s = self.cfg.timing.upload_s(dev.device.profile, len(payload))
            arrive = r.start + r.train_s + upload_s
            decoded = protocol.decode_update(payload, self._payload_limit).update  # what the coordinator sees
            client = ClientUpdate.from_message(decoded, arrive)
            self.queue.push(arrive, _Arrive(r.device, client, len(payload), r.train_s + upload_s), order=r.order)

    def _encode_round(
        self, dev: _DeviceState, r: _Round, tensors: dict[str, np.ndarray], loss: float
    ) -> tuple[protocol.AdapterUpdate, bytes]:
        p = dev.device.profile
        base, batches, now, train_s = r.base, r.batches, r.start, r.train_s
        exact = compute_deltas(tensors, dict(base.tensors), self.tb.manifest)
        if dev.attack is not None:  # hostile, then compressed and signed like any update
            exact = attacks.corrupt(exact, dev.attack, dev.batch_rng)
        deltas = dev.uplink.compress(exact)
        update = protocol.AdapterUpdate(
            device_id=dev.device.device_id,
            update_id=f"{dev.device.device_id}-r{r.index:05d}",
            seq=r.index + 1,
            base_version=base.version,
            bundle=self.tb.bundle_digest,
            samples=len(batches) * p.batch,
            local_steps=len(batches),
            train_loss=loss,
            wall_time=train_s,
            profile=p.name,
            created_at=now + train_s,
            deltas=deltas,
        )
        return update, protocol.encode_update(update, dev.key, self.cfg.wire_quantization, self.cfg.wire_codec)

    def _batches(self, dev: _DeviceState, steps: int) -> Iterator[Batch]:
        """Random batches of the device's examples, from its own seeded stream (as alignfed.text.Batcher)."""
        batcher = dev.data.batcher
        rows = batcher.rows
        for _ in range(steps):
            idx = dev.batch_rng.choice(len(rows), size=batcher.batch, replace=len(rows) < batcher.batch)
            yield batcher.make([rows[int(i)] for i in idx])

    # -- coordinator ------------------------------------------------------------------------------

    def _on_arrive(self, item: _Arrive, now: float) -> None:
        u = item.update
        tau = self.current.version - u.base_version
        self.result.bytes_up += item.nbytes
        arrive = Event(
            now, "arrive", u.device_id, version=u.base_version, staleness=tau, bytes=item.nbytes, loss=u.train_loss
        )
        self._log(arrive)
        try:
            self._timed(lambda: self.strategy.add(u, self.current.version))
            self.result.accepted[u.device_id] += 1
        except RejectedUpdate as exc:
            self.result.rejected[u.device_id] += 1
            self._log(Event(now, "reject", u.device_id, version=u.base_version, staleness=tau, detail=exc.reason))
        self._aggregate_while_ready(now)
        self._schedule_poll(now)
        dev = self.devices[item.device]
        self.queue.push(now + self.cfg.timing.idle_s(dev.device.profile, item.busy_s), _Free(item.device))

    def _aggregate_while_ready(self, now: float) -> None:
        while not self._done and self._timed(lambda: self.strategy.ready(now)):
            pending = {u.update_id: u for u in self.strategy.pending()}
            current = self.current
            agg = self._timed(partial(self.strategy.aggregate, current, now))
            new = agg.state
            if new.version != current.version + 1:
                raise RuntimeError(
                    f"strategy {self.strategy.name} made version {new.version} from {current.version}; "
                    f"expected {current.version + 1}"
                )
            for uid in agg.used:
                u = pending[uid]
                tau = current.version - u.base_version
                w = float(agg.weights.get(uid, 0.0))
                self.result.staleness[tau] += 1
                self.result.folded[u.device_id] += 1
                self.result.add_weight(u.device_id, w)
                self._log(Event(now, "fold", u.device_id, version=new.version, staleness=tau, detail=f"weight={w:.6g}"))
            residual = agg.metrics.get("alignment_residual")
            if isinstance(residual, dict) and residual:
                self.result.alignment.append({str(k): float(v) for k, v in residual.items()})
            if self._broadcaster is not None:  # the version is what devices reconstruct
                new = self._broadcast(current, new, now)
            self.current = new
            taus = [current.version - pending[uid].base_version for uid in agg.used]
            self._publish(new, now, metrics=agg.metrics, max_tau=max(taus, default=0))
            if self.cfg.max_versions and new.version >= self.cfg.max_versions:
                self._done = True

    def _broadcast(self, current: AdapterState, new: AdapterState, now: float) -> AdapterState:
        """P_v of the delta chain (alignfed.downlink) in place of the strategy's adapter; sizes its message."""
        assert self._broadcaster is not None
        step = self._broadcaster.step(current.tensors, new.tensors)
        self._broadcaster.accept(step)
        delta = protocol.GlobalDelta(
            version=new.version,
            parent_version=current.version,
            bundle=self.tb.bundle_digest,
            strategy=self.strategy.name,
            created_at=now,
            rank=self.tb.manifest.lora.rank,
            alpha=self.tb.manifest.lora.alpha,
            quantization=self._broadcaster.quantization,
            digest=step.digest,
            wire=step.wire,
        )
        self._delta_bytes = len(protocol.encode_global_delta(delta, self.cfg.wire_codec))
        return dataclasses.replace(new, tensors=step.published)

    def _schedule_poll(self, now: float) -> None:
        if not self._poll_pending and not self._done and self.strategy.pending():
            self._poll_pending = True
            self.queue.push(now + self.cfg.poll_s, _Poll())

    def _publish(self, state: AdapterState, now: float, *, metrics: Any, max_tau: int = 0) -> None:
        """Store the version, send it to every device (download time each) and evaluate it."""
        g = protocol.GlobalAdapter(
            version=state.version,
            parent_version=state.version - 1,
            bundle=self.tb.bundle_digest,
            strategy=self.strategy.name,
            created_at=now,
            rank=self.tb.manifest.lora.rank,
            alpha=self.tb.manifest.lora.alpha,
            tensors=state.tensors,
            metrics=metrics,
        )
        nbytes = len(protocol.encode_global(g))
        self._global_bytes = nbytes
        self._current_since = now
        self.history.add(state)
        if state.version > 0:
            self._log(Event(now, "aggregate", version=state.version, staleness=max_tau, bytes=nbytes))
        for dev in self.devices.values():
            if dev.stopped:
                continue
            if self._broadcaster is not None and state.version > 0:
                self._send_current(dev, now, snapshot=False)
            else:
                self._send(dev, now + self.cfg.timing.download_s(dev.device.profile, nbytes), state.version, nbytes)
        self._prune()
        if state.version % self.cfg.eval_every == 0 and now - self._last_eval_at >= self.cfg.eval_interval_s:
            self._evaluate(state, now)
        if self.accuracy is not None and self.cfg.accuracy_every and state.version % self.cfg.accuracy_every == 0:
            self._accuracy(state, now)

    def _prune(self) -> None:
        """Keep the versions a device may still train from or a buffered update is based on."""
        held = [d.received for d in self.devices.values() if d.received >= 0]
        bases = [u.base_version for u in self.strategy.pending()]
        in_flight = [v for v, n in self._in_flight.items() if n > 0]
        self.history.prune(min([self.current.version, *held, *bases, *in_flight]))

    def _evaluate(self, state: AdapterState, now: float) -> None:
        ev = self.tb.evaluator.evaluate(state.tensors)
        self._last_eval = state.version
        self._last_eval_at = now
        self.result.curve.append(
            EvalPoint(
                time=now,
                version=state.version,
                mean=ev.mean,
                worst_domain=ev.worst_domain,
                worst_device=ev.worst_device,
                per_domain=ev.per_domain,
                per_device=ev.per_device,
            )
        )
        self._log(
            Event(
                now,
                "eval",
                version=state.version,
                loss=ev.mean,
                detail=f"worst_domain={ev.worst_domain:.6g};worst_device={ev.worst_device:.6g}",
            )
        )

    def _accuracy(self, state: AdapterState, now: float) -> None:
        assert self.accuracy is not None
        acc = float(self.accuracy(state.tensors))
        if not 0.0 <= acc <= 1.0:
            raise ValueError(f"accuracy hook returned {acc}; expected a fraction in [0, 1]")
        self.result.accuracy.append(AccuracyPoint(time=now, version=state.version, accuracy=acc))

    # -- helpers ----------------------------------------------------------------------------------

    def _timed(self, fn: Callable[[], T]) -> T:
        """Run a strategy call, charging its process time to the coordinator CPU metric."""
        start = time.process_time()
        try:
            return fn()
        finally:
            self.result.cpu_s += time.process_time() - start

    def _log(self, event: Event) -> None:
        self.result.events.append(event)
        if self.on_event is not None:
            self.on_event(event, self.result)
