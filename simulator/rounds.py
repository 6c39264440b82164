"""The devices' side of a run: when each device starts a round, what it trains on, what it sends.

A round's result depends only on its start adapter, the device's batches (drawn when it starts)
and, with `optimizer="device"`, the device's own optimizer moments — nothing that happens while it
trains changes it. So started rounds wait, and `train_started` trains them together in one
`trainer.train_many` call just before the clock reaches the earliest moment one of them could
arrive (start + training time + link latency); the batched trainer steps them all in one pass per
step. Each arrival keeps the queue position it would have had if pushed at its start, so the event
log is that of training each round when it starts.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from alignfed import protocol
from alignfed.adapter import compute_deltas, training_start
from alignfed.profiles import DeviceProfile, capped_delta_rank, lora_rank
from alignfed.text import Batch
from coordinator.strategies.base import AdapterState
from edge.adamw import Moments
from edge.uplink import Uplink
from simulator import attacks
from simulator.accounting import Ledger
from simulator.clock import EventQueue
from simulator.config import SimulationConfig
from simulator.events import Event
from simulator.fleet import SimDevice
from simulator.testbed import DeviceData, Testbed
from simulator.timeline import Arrive, Deliver, Free, Item, Online
from simulator.training import TrainJob
from simulator.versions import Publisher, VersionHistory

STARTS_KEPT = 16  # (version, rank) training starts of the global remembered: a few versions × ranks


@dataclass(frozen=True, slots=True)
class Round:
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
class DeviceState:
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
    fetching: bool = False  # delta downlink: a snapshot is on its way


class Rounds:
    """Every device's state and its rounds: started, trained together, encoded and sent."""

    def __init__(
        self,
        testbed: Testbed,
        config: SimulationConfig,
        queue: EventQueue[Item],
        ledger: Ledger,
        publisher: Publisher,
        history: VersionHistory,
        *,
        synchronous: bool,
        closed: Callable[[], bool],
    ) -> None:
        """`synchronous`: a device waits for a version newer than its last base (fedavg);
        `closed`: whether the run has ended (no round starts after that)."""
        self.tb = testbed
        self.cfg = config
        self.queue = queue
        self.ledger = ledger
        self.publisher = publisher
        self.history = history
        self.synchronous = synchronous
        self.closed = closed
        self.started: list[Round] = []  # rounds waiting to be trained together
        # (version, rank) -> the global as devices of that rank train from it: devices share it, and
        # each round needs it twice (its start, its delta); the last STARTS_KEPT are kept
        self._starts: OrderedDict[tuple[int, int], dict[str, np.ndarray]] = OrderedDict()
        self.byzantine = attacks.assign(
            [d.device_id for d in testbed.devices],
            [config.timing.train_s(d.profile) for d in testbed.devices],
            config.byzantine,
            config.attack,
            config.seed,
        )
        self.devices: dict[str, DeviceState] = {}
        for d in testbed.devices:
            self.devices[d.device_id] = DeviceState(
                device=d,
                data=testbed.data[d.device_id],
                batch_rng=np.random.default_rng([config.seed, d.index, 1]),
                avail_rng=np.random.default_rng([config.seed, d.index, 2]),
                key=hashlib.sha256(f"alignfed-sim:{d.device_id}".encode()).digest(),
                uplink=Uplink(
                    config.wire_quantization,
                    capped_delta_rank(config.delta_rank, self._rank(d.profile), testbed.manifest.lora.rank),
                    feedback=config.delta_feedback,
                    carry_rank=config.carry_rank,
                ),
                moments=testbed.trainer.fresh_moments() if config.optimizer == "device" else None,
                attack=self.byzantine.get(d.device_id),
            )

    def keys(self) -> dict[str, bytes]:
        """Each device's HMAC key, as the coordinator's store holds them."""
        return {device_id: dev.key for device_id, dev in self.devices.items()}

    def recipients(self) -> list[SimDevice]:
        """The devices a new version is sent to: all but those whose last round would pass the horizon."""
        return [dev.device for dev in self.devices.values() if not dev.stopped]

    def held(self) -> list[int]:
        """The newest version each device received (none yet: left out)."""
        return [d.received for d in self.devices.values() if d.received >= 0]

    def due(self) -> float | None:
        """The earliest moment a started, untrained round could arrive (None: none started)."""
        return min((r.earliest for r in self.started), default=None)

    # -- events ---------------------------------------------------------------------------------

    def on_deliver(self, item: Deliver, now: float) -> None:
        dev = self.devices[item.device]
        if now < dev.offline_until:
            return  # offline: the message is missed; the retained newest is fetched on return
        self.ledger.result.bytes_down += item.nbytes
        if item.parent >= 0 and item.parent != dev.received:  # a delta that does not chain: a gap
            if item.version > dev.received and not dev.fetching:
                dev.fetching = True  # the retained snapshot, charged like any message
                self.publisher.send_newest(dev.device, now, snapshot=True)
            return
        if item.parent < 0:
            dev.fetching = False
        if item.version > dev.received:
            dev.received = item.version
            self.ledger.log(Event(now, "receive", item.device, version=item.version, bytes=item.nbytes))
        if dev.waiting:
            self.try_start(item.device, now)

    def on_online(self, device_id: str, now: float, current: int) -> None:
        """Back online while `current` is the newest version."""
        dev = self.devices[device_id]
        dev.offline_until = now
        if current > dev.received:
            dev.waiting = True  # SYNC: wait for the retained newest version
            dev.fetching = False  # a snapshot sent while it was away was missed; it subscribes anew
            self.publisher.send_newest(dev.device, now, snapshot=False)
        else:
            self.try_start(device_id, now)

    def on_arrived(self, item: Arrive, now: float) -> None:
        """The round's update reached the coordinator: the device is free after its rest."""
        dev = self.devices[item.device]
        self.queue.push(now + self.cfg.timing.idle_s(dev.device.profile, item.busy_s), Free(item.device))

    def try_start(self, device_id: str, now: float) -> None:
        dev = self.devices[device_id]
        if dev.stopped or self.closed():
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
            self.ledger.log(Event(now, "offline", device_id, version=dev.received))
            self.queue.push(dev.offline_until, Online(device_id))
            return
        base = self.history.get(dev.received)
        if base is None:
            raise RuntimeError(f"simulation: version {dev.received} held by {device_id} was pruned")
        self.ledger.log(Event(now, "start", device_id, version=base.version))
        batches = list(self.batches(dev, p.local_steps))
        earliest = now + train_s + self.cfg.timing.upload_s(p, 0)
        order = self.queue.reserve()
        self.started.append(Round(device_id, base, now, train_s, batches, dev.rounds, order, earliest))
        dev.last_base = base.version
        dev.rounds += 1
        self.ledger.result.rounds += 1

    # -- training and sending -------------------------------------------------------------------

    def train_started(self) -> None:
        """Train every started round in one `train_many` call and schedule their arrivals."""
        started, self.started = self.started, []
        jobs = [
            TrainJob(
                self._origin(self.devices[r.device], r.base),
                r.batches,
                self.devices[r.device].device.profile.lr,
                self.devices[r.device].moments,
            )
            for r in started
        ]
        for r, trained in zip(started, self.tb.trainer.train_many(jobs), strict=True):
            dev = self.devices[r.device]
            update, payload = self.encode(dev, r, trained.tensors, float(np.mean(trained.losses)))
            upload_s = self.cfg.timing.upload_s(dev.device.profile, len(payload))
            arrive = r.start + r.train_s + upload_s
            item = Arrive(r.device, update.base_version, update.train_loss, payload, r.train_s + upload_s)
            self.queue.push(arrive, item, order=r.order)

    def encode(
        self, dev: DeviceState, r: Round, tensors: dict[str, np.ndarray], loss: float
    ) -> tuple[protocol.AdapterUpdate, bytes]:
        """The update a trained round sends, and its signed payload (hostile if the device is)."""
        p = dev.device.profile
        base, batches, now, train_s = r.base, r.batches, r.start, r.train_s
        rank = self._rank(p)
        exact = compute_deltas(tensors, self._origin(dev, base), self.tb.manifest, rank)
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
            rank=rank,  # stated, as the daemon states it
        )
        return update, protocol.encode_update(update, dev.key, self.cfg.wire_quantization, self.cfg.wire_codec)

    def _rank(self, profile: DeviceProfile) -> int:
        """The LoRA rank a device of this profile trains at (its `max_rank`, at most the bundle's)."""
        return lora_rank(profile, self.tb.manifest.lora.rank)

    def _origin(self, dev: DeviceState, base: AdapterState) -> Mapping[str, np.ndarray]:
        """What a device trains from: the global adapter in the server's SVD basis, truncated to the
        device's rank if capped (`alignfed.adapter.training_start`), as the daemon does."""
        rank = self._rank(dev.device.profile)
        key = (base.version, rank)
        hit = self._starts.get(key)
        if hit is None:
            hit = self._starts[key] = training_start(base.tensors, self.tb.manifest, rank)
            while len(self._starts) > STARTS_KEPT:
                self._starts.popitem(last=False)
        self._starts.move_to_end(key)
        return hit

    def batches(self, dev: DeviceState, steps: int) -> Iterator[Batch]:
        """Random batches of the device's examples, from its own seeded stream (as alignfed.text.Batcher)."""
        batcher = dev.data.batcher
        rows = batcher.rows
        for _ in range(steps):
            idx = dev.batch_rng.choice(len(rows), size=batcher.batch, replace=len(rows) < batcher.batch)
            yield batcher.make([rows[int(i)] for i in idx])
