"""The edge daemon's state machine (DESIGN.md section 5).

BOOT → SYNC (wait for the retained global adapter) → TRAIN (the profile's local steps) → PUBLISH
(outbox first, then MQTT; deleted on ack) → TRAIN ... An update trained on version v is sent even
if a newer global arrived meanwhile — that is the asynchronous part; the next round starts from the
newest global. Unacknowledged updates are resent from the outbox after reconnects and timeouts,
and the coordinator deduplicates them, so an outage never loses or doubles an update.
"""

from __future__ import annotations

import enum
import json
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass, field

import numpy as np

from alignfed import atomic, downlink, protocol
from alignfed import manifest as mf
from alignfed.adapter import compute_deltas, training_start
from alignfed.errors import AlignFedError, ProtocolError, TrainingError
from alignfed.profiles import capped_delta_rank, lora_rank
from alignfed.text import IGNORE, Batch, Batcher, hold_out, load_texts
from alignfed.topics import Topics
from alignfed.transport import Transport
from edge.allocator import current as current_allocator
from edge.config import DeviceConfig
from edge.memory_fit import shortfall
from edge.outbox import Outbox
from edge.trainer import Trainer
from edge.uplink import Uplink

log = logging.getLogger(__name__)

MAX_GLOBAL_BYTES = 1 << 30


class Phase(enum.Enum):
    BOOT = "boot"
    SYNC = "sync"
    TRAIN = "train"
    PUBLISH = "publish"
    STOPPED = "stopped"


@dataclass
class DeviceStats:
    published: int = 0
    acked: int = 0
    rejected: int = 0
    losses: list[float] = field(default_factory=list)
    versions_seen: list[int] = field(default_factory=list)
    deltas: int = 0  # versions reconstructed from a global delta
    snapshots: int = 0  # versions taken from a full snapshot
    fallbacks: int = 0  # deltas that did not chain or whose digest did not match: a snapshot was fetched


class EdgeDaemon:
    def __init__(self, cfg: DeviceConfig, *, stop: threading.Event | None = None) -> None:
        self.cfg = cfg
        self.stop = stop or threading.Event()
        self.phase = Phase.BOOT
        self.topics = Topics(cfg.federation)
        self.manifest = mf.load(cfg.bundle)
        mf.verify(cfg.bundle, self.manifest)
        self.bundle = mf.bundle_digest(self.manifest)
        p = cfg.profile
        if (why := shortfall(self.manifest, p, cfg.bundle)) is not None:  # as `flash` checked it
            raise TrainingError(why)
        r = self.manifest.lora.rank
        self.rank = lora_rank(p, r)  # the LoRA rank this device trains at
        if self.rank < r:
            log.info("%s: trains at LoRA rank %d (profile %r), the bundle's is %d", cfg.device_id, self.rank, p.name, r)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(cfg.state_dir / "outbox")
        self.uplink = Uplink(
            cfg.wire_quantization,
            capped_delta_rank(cfg.delta_rank, self.rank, self.manifest.lora.rank),
            feedback=cfg.delta_feedback,
            carry_rank=cfg.carry_rank,
        )
        self._state_file = cfg.state_dir / "state.json"
        saved = json.loads(self._state_file.read_text()) if self._state_file.exists() else {}
        self._seq = int(saved.get("seq", 0))
        # Counters persist with seq, so acks for updates published before a restart count against
        # those publishes. Every update still in the outbox was published (written there first),
        # which covers a kill between the outbox write and saving the counters.
        acked, rejected = int(saved.get("acked", 0)), int(saved.get("rejected", 0))
        published = max(int(saved.get("published", 0)), acked + rejected + len(self.outbox))
        self.stats = DeviceStats(published=published, acked=acked, rejected=rejected)
        self.global_adapter: protocol.GlobalAdapter | None = self._load_global()
        texts, held_out = hold_out(load_texts(cfg.data), cfg.eval_examples, cfg.seed)
        eos = int(self.manifest.tokenizer.get("eos_id", 0))
        self.batcher = Batcher(
            texts, cfg.bundle / mf.TOKENIZER, batch=p.batch, seq_len=p.seq_len, eos_id=eos, seed=cfg.seed
        )
        # Held-out batches of at most the training batch size, so evaluation never needs more memory.
        self.held_out: list[Batch] = []
        try:
            held = Batcher(held_out, cfg.bundle / mf.TOKENIZER, batch=p.batch, seq_len=p.seq_len, eos_id=eos, seed=0)
            self.held_out = [held.make(held.rows[i : i + p.batch]) for i in range(0, held.samples, p.batch)]
        except TrainingError:  # nothing held out, or only examples too short to score
            log.info("%s: no held-out examples; updates carry no eval loss", cfg.device_id)
        self.trainer = self._make_trainer()
        allocator = current_allocator()
        log.info(
            "%s: memory allocator %s%s",
            cfg.device_id,
            allocator,
            "" if allocator != "glibc malloc" else " (peaks higher than jemalloc's: install libjemalloc2, re-flash)",
        )
        self.transport = Transport(
            cfg.broker,
            f"alignfed-{cfg.device_id}",
            will=(self.topics.device_status(cfg.device_id), protocol.encode_status({"state": "offline"})),
        )
        self._sent_at: dict[str, float] = {}
        self._snapshots = False  # subscribed to the retained snapshot topic

    def _make_trainer(self) -> Trainer:
        p = self.cfg.profile
        if p.trainer == "ort":
            from edge.trainer import OrtTrainer

            return OrtTrainer(self.cfg.bundle, self.manifest, lr=p.lr, threads=p.threads)
        if p.trainer == "torch":  # aarch64: no onnxruntime-training wheels
            from edge.torch_trainer import TorchTrainer

            return TorchTrainer(
                self.cfg.bundle,
                self.manifest,
                lr=p.lr,
                threads=p.threads,
                accelerator=p.accelerator,
                checkpoint=p.checkpointing == "layers",
                embedding=p.embedding,
                loss_chunk=p.loss_chunk,
            )
        raise TrainingError(f"profile {p.name!r} asks for trainer {p.trainer!r}; expected 'ort' or 'torch'")

    # -- persistence ------------------------------------------------------------------------------

    def _load_global(self) -> protocol.GlobalAdapter | None:
        path = self.cfg.state_dir / "global.adapter"
        if not path.exists():
            return None
        try:
            g = protocol.decode_global(path.read_bytes(), MAX_GLOBAL_BYTES)
        except (ProtocolError, OSError) as exc:
            log.warning("ignoring corrupt %s: %s", path, exc)
            return None
        if g.bundle != self.bundle or {k: tuple(v.shape) for k, v in g.tensors.items()} != self.manifest.lora_shapes():
            log.warning("ignoring %s: global adapter v%d does not fit this bundle", path, g.version)
            return None
        return g

    def _save_global(self, payload: bytes, g: protocol.GlobalAdapter) -> None:
        atomic.write_bytes(self.cfg.state_dir / "global.adapter", payload)
        self.global_adapter = g
        self._write_inference_adapter(g)

    def _write_inference_adapter(self, g: protocol.GlobalAdapter) -> None:
        """Convert the global adapter to a llama.cpp LoRA GGUF for `alignfed generate`."""
        try:
            from alignfed.gguf_adapter import write_lora_gguf
            from runtime.llama import adapter_path, prune_adapters
        except ImportError:  # gguf / llama.cpp not installed: training still works, inference can't
            return

        adapters = self.cfg.state_dir / "adapters"
        try:
            adapters.mkdir(exist_ok=True)
            m = self.manifest
            write_lora_gguf(adapter_path(adapters, g.version), g.tensors, m.architecture, m.lora)
            prune_adapters(adapters, keep=2)
        except (AlignFedError, OSError) as exc:  # serving keeps the previous adapter; training goes on
            log.error("could not write the llama.cpp adapter for v%d: %s", g.version, exc)

    def _next_seq(self) -> int:
        self._seq += 1
        self._save_state()
        return self._seq

    def _save_state(self) -> None:
        s = self.stats
        state = {"seq": self._seq, "published": s.published, "acked": s.acked, "rejected": s.rejected}
        atomic.write_text(self._state_file, json.dumps(state))

    # -- messages ---------------------------------------------------------------------------------

    def _drain(self, timeout: float = 0.0) -> None:
        msg = self.transport.get(timeout=timeout)
        while msg is not None:
            try:
                if msg.topic == self.topics.global_adapter:
                    self._on_global(msg.payload)
                elif msg.topic == self.topics.global_delta:
                    self._on_delta(msg.payload)
                elif msg.topic == self.topics.ack(self.cfg.device_id):
                    self._on_ack(msg.payload)
            except Exception as exc:  # a device never dies of a message (issue 10): one line, go on
                log.error(
                    "ignoring a message on %s that could not be handled: %s: %s", msg.topic, type(exc).__name__, exc
                )
            msg = self.transport.get(timeout=0)

    def _on_global(self, payload: bytes) -> None:
        try:
            g = protocol.decode_global(payload, MAX_GLOBAL_BYTES)
        except ProtocolError as exc:
            log.error("ignoring malformed global adapter (keeping v%s): %s", self._version(), exc)
            return
        if g.bundle != self.bundle:
            log.error(
                "global adapter v%d is for bundle %s…, this device has %s…", g.version, g.bundle[:12], self.bundle[:12]
            )
            return
        shapes = {k: tuple(v.shape) for k, v in g.tensors.items()}
        if shapes != self.manifest.lora_shapes():
            log.error("ignoring global adapter v%d: its tensors do not match the bundle's LoRA layout", g.version)
            return
        if self.global_adapter is None or g.version > self.global_adapter.version:
            self._save_global(payload, g)
            self.stats.versions_seen.append(g.version)
            self.stats.snapshots += 1
            log.info("%s: global adapter v%d", self.cfg.device_id, g.version)
        if self.cfg.downlink == "delta":  # the retained snapshot is the newest: from here deltas chain on
            self._want_snapshots(False)

    def _want_snapshots(self, want: bool) -> None:
        """(Un)subscribe the retained full adapter; subscribing delivers it at once (MQTT retained)."""
        if want != self._snapshots:
            self._snapshots = want
            (self.transport.subscribe if want else self.transport.unsubscribe)(self.topics.global_adapter)

    def _on_delta(self, payload: bytes) -> None:
        """Apply a version-to-version delta if it chains on what this device holds and the result's
        digest matches; otherwise fetch the snapshot. A device never trains on an adapter the
        coordinator does not hold."""
        try:
            d = protocol.decode_global_delta(payload, MAX_GLOBAL_BYTES)
        except ProtocolError as exc:
            log.error("ignoring malformed global delta (keeping v%s): %s", self._version(), exc)
            return
        if d.bundle != self.bundle:
            log.error(
                "global delta v%d is for bundle %s…, this device has %s…", d.version, d.bundle[:12], self.bundle[:12]
            )
            return
        g = self.global_adapter
        outcome, tensors = downlink.follow(self._version(), g.tensors if g else None, d)
        if outcome is downlink.Outcome.APPLIED and tensors is not None:
            new = protocol.GlobalAdapter(
                d.version, d.parent_version, d.bundle, d.strategy, d.created_at, d.rank, d.alpha, tensors
            )
            self._save_global(protocol.encode_global(new), new)
            self.stats.versions_seen.append(d.version)
            self.stats.deltas += 1
            log.info("%s: global adapter v%d (delta)", self.cfg.device_id, d.version)
        elif outcome is not downlink.Outcome.OLD:
            log.warning(
                "%s: global delta v%d→v%d does not apply to v%s (%s): fetching the snapshot",
                self.cfg.device_id, d.parent_version, d.version, self._version(), outcome.value,
            )  # fmt: skip
            self.stats.fallbacks += 1
            self._want_snapshots(True)

    def _version(self) -> int | None:
        return self.global_adapter.version if self.global_adapter else None

    def _on_ack(self, payload: bytes) -> None:
        try:
            ack = protocol.decode_ack(payload)
        except ProtocolError as exc:
            log.error("ignoring malformed ack: %s", exc)
            return
        if self.outbox.remove(ack.update_id):
            self._sent_at.pop(ack.update_id, None)
            if ack.accepted:
                self.stats.acked += 1
            else:
                self.stats.rejected += 1
            self._save_state()
            if not ack.accepted:
                log.warning("%s: update %s rejected: %s", self.cfg.device_id, ack.update_id[:8], ack.reason)

    def _resend(self) -> None:
        """Publish outbox entries never sent in this session or unacknowledged for too long."""
        if not self.transport.connected.is_set():
            return
        now = time.monotonic()
        for update_id, path in self.outbox.items():
            sent = self._sent_at.get(update_id)
            due = sent is None or now - sent > self.cfg.resend_after_s
            if due and self.transport.publish(self.topics.update(self.cfg.device_id), path.read_bytes(), timeout=5):
                self._sent_at[update_id] = now

    def _status(self, state: str, *, timeout: float = 10.0) -> None:
        g = self.global_adapter
        body = {
            "state": state,
            "version": g.version if g else None,
            "seq": self._seq,
            "outbox": len(self.outbox),
            "profile": self.cfg.profile.name,
            "last_loss": self.stats.losses[-1] if self.stats.losses else None,
        }
        qos, retain = protocol.DELIVERY["devices/{id}/status"]
        self.transport.publish(
            self.topics.device_status(self.cfg.device_id),
            protocol.encode_status(body),
            qos=qos,
            retain=retain,
            timeout=timeout,
        )

    # -- the loop ---------------------------------------------------------------------------------

    def train_round(self, base: protocol.GlobalAdapter) -> protocol.AdapterUpdate:
        """TRAIN: local steps from `base`; returns the update (not yet published)."""
        p = self.cfg.profile
        self.trainer.load_adapter(base.tensors)
        eval_loss = self.evaluate()  # of `base`, on data this device never trains on
        # base's product in the server's balanced SVD basis, or (capped by the profile) its best
        # rank-k part: AdamW's steps depend on the factors' basis, not only on their product
        origin = training_start(base.tensors, self.manifest, self.rank)
        self.trainer.load_adapter(origin)
        start = time.monotonic()  # wall_time is the training's alone
        losses = []
        batches = iter(self.batcher)
        for _ in range(p.local_steps):
            losses.append(self.trainer.step(next(batches)))
            self._drain()  # stay responsive to acks and new versions between steps
            if self.stop.is_set():
                break
        trained = self.trainer.adapter()
        loss = float(np.mean(losses))
        self.stats.losses.append(loss)
        return protocol.AdapterUpdate(
            device_id=self.cfg.device_id,
            update_id=uuid.uuid4().hex,
            seq=self._next_seq(),
            base_version=base.version,
            bundle=self.bundle,
            samples=len(losses) * p.batch,
            local_steps=len(losses),
            train_loss=loss,
            wall_time=time.monotonic() - start,
            profile=p.name,
            created_at=time.time(),
            deltas=self.uplink.compress(compute_deltas(trained, origin, self.manifest, self.rank)),
            eval_loss=eval_loss,
            rank=self.rank,
        )

    def evaluate(self) -> float:
        """Token-weighted mean loss of the loaded adapter on the held-out examples (nan: none held out)."""
        if not self.held_out:
            return math.nan
        # The loss averages over predicted positions: every label but each row's first.
        losses = [(self.trainer.eval_loss(b), int(np.sum(b.labels[:, 1:] != IGNORE))) for b in self.held_out]
        mean = sum(loss * n for loss, n in losses) / max(sum(n for _, n in losses), 1)
        return mean if math.isfinite(mean) else math.inf  # a diverged model is measured, not "not measured"

    def publish(self, update: protocol.AdapterUpdate) -> None:
        """PUBLISH: outbox first (durable), then MQTT; the ack deletes it."""
        payload = protocol.encode_update(update, self.cfg.key, self.cfg.wire_quantization, self.cfg.wire_codec)
        self.outbox.put(update.seq, update.update_id, payload)
        self.stats.published += 1
        self._save_state()
        if self.transport.publish(self.topics.update(self.cfg.device_id), payload, timeout=10):
            self._sent_at[update.update_id] = time.monotonic()
        log.info(
            "%s: round %d on v%d, loss %.4f, %d bytes",
            self.cfg.device_id,
            update.seq,
            update.base_version,
            update.train_loss,
            len(payload),
        )

    def subscribe(self) -> None:
        """The topics this device listens to (before `transport.start`; kept across reconnects)."""
        if self.cfg.downlink == "delta":
            self.transport.subscribe(self.topics.global_delta)
        # snapshots: always in "snapshot" mode; in "delta" mode only without a base. A device that
        # holds one gets the retained newest delta on subscribing: it chains, is old, or shows a gap
        # (and the snapshot is fetched then), so what was missed while down is caught up either way.
        self._want_snapshots(self.cfg.downlink == "snapshot" or self.global_adapter is None)
        self.transport.subscribe(self.topics.ack(self.cfg.device_id))

    def run(self, *, drain_timeout: float = 60.0) -> DeviceStats:
        self.subscribe()
        self.transport.start(wait=None)  # outages at boot are fine: paho keeps trying
        try:
            self.phase = Phase.SYNC
            while self.global_adapter is None and not self.stop.is_set():
                self._drain(timeout=0.5)
            rounds = 0
            while not self.stop.is_set() and (self.cfg.max_rounds == 0 or rounds < self.cfg.max_rounds):
                self._drain()
                self._resend()
                if len(self.outbox) >= self.cfg.max_outbox:
                    self._drain(timeout=1.0)  # back-pressure: wait for acks before training more
                    continue
                assert self.global_adapter is not None
                self.phase = Phase.TRAIN
                started = time.monotonic()
                update = self.train_round(self.global_adapter)
                self.phase = Phase.PUBLISH
                self.publish(update)
                self._status("training")
                rounds += 1
                idle = (time.monotonic() - started) * (1.0 / self.cfg.profile.duty_cycle - 1.0)
                if idle > 0:
                    self.stop.wait(idle)
            deadline = time.monotonic() + drain_timeout
            while len(self.outbox) and time.monotonic() < deadline and not self.stop.is_set():
                self._resend()
                self._drain(timeout=0.5)
        finally:
            self.phase = Phase.STOPPED
            # A clean disconnect sends no will: say "offline" ourselves, retained as the will would be,
            # so a dashboard does not count a stopped device as online (best effort: the broker may be gone).
            self._status("offline", timeout=2.0)
            self.transport.stop()
        return self.stats
