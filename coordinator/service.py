"""The coordinator service: moves messages between MQTT, the store and the coordinator's core.

MQTT → intake (validate) → store (commit) → ack → strategy → version store → retained publish.
All logic that decides anything lives in `core` (with `ingest` and the strategies); this module
only orders the steps so that a crash at any point loses nothing (see `store`).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from alignfed import manifest as mf
from alignfed import protocol
from alignfed.adapter import initial_adapter
from alignfed.downlink import Broadcaster, Step
from alignfed.errors import ConfigError, RejectedUpdate
from alignfed.topics import Topics
from alignfed.transport import Message, Transport
from coordinator import strategies
from coordinator.backend import open_store
from coordinator.config import CoordinatorConfig, strategy_options
from coordinator.core import Core, Intake, NewVersion, broadcast, make_adapter
from coordinator.fairness import jain_index
from coordinator.storage import CoordinatorStore
from coordinator.strategies.base import AdapterState, Strategy
from coordinator.tier import stored_keys
from dashboard import feed

log = logging.getLogger(__name__)

MAX_AGGREGATION_ATTEMPTS = 3  # failures in a row before the failing updates are quarantined
AGGREGATION_BACKOFF_S = 1.0  # wait after the first failure; doubles after each


class Coordinator:
    """Owns the store and the core (strategy, current adapter); `handle_update` is called per message."""

    def __init__(
        self,
        cfg: CoordinatorConfig,
        *,
        strategy: Strategy | Callable[[], Strategy] | None = None,
        clock: Callable[[], float] = time.time,
        observer: feed.Observer | None = None,
        store: CoordinatorStore | None = None,
    ) -> None:
        """`strategy`: the strategy, or a function that builds a fresh one (default: from the config).
        Fresh ones isolate and quarantine an update whose aggregation keeps failing; given a ready
        strategy, those are built from the config."""
        self.cfg = cfg
        self.observer = observer  # told after every ingest, reject and aggregation (the dashboard)
        self.topics = Topics(cfg.federation)
        self.manifest = mf.load(cfg.bundle)
        mf.verify(cfg.bundle, self.manifest)
        self.store = store or open_store(cfg.database)  # the elected aggregator passes its own
        self.intake = Intake(
            self.manifest, limits=cfg.limits, key_of=self.store.device_key, has_version=self.store.has_version
        )
        self.bundle = self.intake.bundle
        self.clock = clock
        self.transport: Transport | None = None
        self.staleness: Counter[int] = Counter()
        self.last_metrics: dict[str, Any] = {}
        latest = self.store.latest_version()
        if latest is None:
            self._publishable = self._create_version_zero()
        else:
            self._publishable = self.store.version(latest)[0]
        # Versions also go out as quantized deltas of the one before (alignfed.downlink); None: snapshots only
        self._broadcaster = Broadcaster(cfg.downlink) if cfg.downlink != "snapshot" else None
        self._publishable_delta: bytes | None = None  # the newest version's delta, retained on global/delta
        self._options: dict[str, Any] | None = None
        if isinstance(strategy, Strategy):
            self._build: Callable[[], Strategy] = self._from_config
        else:
            self._build = strategy or self._from_config
            strategy = self._build()
        self.core = Core(self.intake, strategy, self._state(self.store.latest_version() or 0))
        # Aggregation failures: retried with backoff, then the failing updates are quarantined.
        self.aggregation_failures = 0
        self._retry_at = -math.inf
        self._restore_buffer()

    def _from_config(self) -> Strategy:
        if self._options is None:  # built once: the calibration runner is reused by rebuilt strategies
            cfg = self.cfg
            strategy_options({"name": cfg.strategy, **cfg.strategy_options}, cfg.source, complete=True)
            self._options = self._strategy_options()
        try:
            return strategies.build(self.cfg.strategy, **self._options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"coordinator config: [strategy] name = {self.cfg.strategy!r}: {exc}") from exc

    # -- state ------------------------------------------------------------------------------------

    @property
    def current(self) -> AdapterState:
        return self.core.current

    @property
    def strategy(self) -> Strategy:
        return self.core.strategy

    @strategy.setter
    def strategy(self, strategy: Strategy) -> None:
        self.core.strategy = strategy

    def _create_version_zero(self) -> bytes:
        adapter = make_adapter(
            self.manifest,
            self.bundle,
            version=0,
            parent_version=-1,
            strategy=self.cfg.strategy,
            tensors=initial_adapter(self.cfg.bundle, self.manifest),
            created_at=self.clock(),
        )
        encoded = protocol.encode_global(adapter)
        self.store.save_version(adapter, encoded, {}, {})
        return encoded

    def _state(self, version: int) -> AdapterState:
        encoded, residual = self.store.version(version)
        g = protocol.decode_global(encoded, max_bytes=1 << 34)
        return AdapterState(
            version=g.version,
            tensors=g.tensors,
            scale=g.alpha / g.rank,
            rank=g.rank,
            residual=residual,
        )

    def state_of(self, version: int) -> AdapterState | None:
        return self._state(version) if self.store.has_version(version) else None

    def _strategy_options(self) -> dict[str, Any]:
        """The config's options plus what the strategy declares it needs (`Strategy.needs`)."""
        providers: dict[str, Callable[[], Any]] = {"activations": self._calibration, "state_of": lambda: self.state_of}
        needs = strategies.strategy_class(self.cfg.strategy).needs
        return {**self.cfg.strategy_options, **{need: providers[need]() for need in needs}}

    def _calibration(self) -> Any:
        from coordinator.calibration import CalibrationRunner

        return CalibrationRunner.from_bundle(
            self.cfg.bundle, self.manifest, self.cfg.calibration_data, self.cfg.calibration_tokens
        )

    def _restore_history(self) -> None:
        """Rebuild the strategy's per-device memory (fairness, staleness) from the store's log."""
        self.strategy.replay(self.store.aggregated())

    def _restore_buffer(self) -> None:
        self._restore_history()
        restored = 0
        for payload, received_at in self.store.pending():
            update = protocol.decode_update(payload, self.intake.payload_limit).update
            try:
                self.core.offer(update, received_at)
                restored += 1
            except RejectedUpdate as exc:
                self.store.reject_pending(update.device_id, update.update_id, exc.reason)
        if restored:
            log.info("restored %d pending updates at version %d", restored, self.current.version)

    # -- message handling -------------------------------------------------------------------------

    def _seen(self, device_id: str, decoded: protocol.Decoded) -> protocol.Ack | None:
        """The stored outcome of a correctly signed resend, answered before any version check: the
        current version may have moved past tau_max since the first copy was accepted."""
        if not self.intake.signed_by(device_id, decoded):
            return None
        seen = self.store.lookup(device_id, decoded.update.update_id)
        if seen is None:
            return None
        accepted = seen.status != "rejected"
        return protocol.Ack(device_id, seen.update_id, accepted, seen.reason or "duplicate", self.current.version)

    def handle_update(self, device_id: str, payload: bytes) -> protocol.Ack:
        """Validate, persist and buffer one update; returns the ack to send."""
        now = self.clock()
        decoded: protocol.Decoded | None = None
        try:
            decoded = self.intake.decode(payload)  # once: every check below reads this
            if (again := self._seen(device_id, decoded)) is not None:  # QoS 1 duplicate or resend
                return again
            update = self.intake.validate(device_id, decoded, self.current.version)
        except RejectedUpdate as exc:
            log.warning("rejected update from %s: %s", device_id, exc.reason)
            self._emit(feed.UpdateReceived(now, device_id, False, exc.reason, len(payload)))
            # a payload that did not decode may still carry its id in a readable header
            update_id = decoded.update.update_id if decoded is not None else self.intake.update_id_of(payload)
            return protocol.Ack(device_id, update_id, False, exc.reason, self.current.version)
        # Durable first: a crash between here and the strategy replays it from the store on restart.
        self.store.record(update, payload, now, status="pending")
        try:
            self.core.offer(update, now)  # a site update enters as its member devices (coordinator/tier.py)
        except RejectedUpdate as exc:
            self.store.reject_pending(device_id, update.update_id, exc.reason)
            log.warning("strategy rejected update %s from %s: %s", update.update_id, device_id, exc.reason)
            self._emit(feed.UpdateReceived(now, device_id, False, exc.reason, len(payload)))
            return protocol.Ack(device_id, update.update_id, False, exc.reason, self.current.version)
        self.staleness[self.current.version - update.base_version] += 1
        log.info(
            "accepted update %s from %s (base v%d, tau %d, loss %.4f)",
            update.update_id[:8],
            device_id,
            update.base_version,
            self.current.version - update.base_version,
            update.train_loss,
        )
        measured = math.isfinite(update.eval_loss)
        self._emit(
            feed.UpdateReceived(
                now, device_id, True, "accepted", len(payload), self.current.version - update.base_version,
                update.train_loss, update.eval_loss if measured else None, update.base_version if measured else None,
            )
        )  # fmt: skip
        return protocol.Ack(device_id, update.update_id, True, "accepted", self.current.version)

    def maybe_aggregate(self) -> protocol.GlobalAdapter | None:
        """Aggregate if the strategy is ready; commit the new version before returning it."""
        now = self.clock()
        new: NewVersion | None = self.core.next_version(now, self._fleet_metrics)
        if new is None:
            return None
        new, delta, step = self._downlink(new, now)
        adapter = new.adapter
        used = stored_keys({f.update.update_id: (f.update.device_id, f.weight) for f in new.folded})
        self.store.save_version(adapter, new.encoded, new.state.residual, used)
        if self._broadcaster is not None and step is not None:
            self._broadcaster.accept(step)  # the carry moves on only once the version is stored
        self.core.advance(new)
        self._publishable = new.encoded
        self._publishable_delta = delta
        self.last_metrics = dict(adapter.metrics)
        log.info("version %d from %d updates", adapter.version, len(new.folded))
        devices = tuple(f.update.device_id for f in new.folded)
        self._emit_version(adapter, devices, new.took_s, now, new.timings.get("alignment"))
        return adapter

    def _downlink(self, new: NewVersion, now: float) -> tuple[NewVersion, bytes | None, Step | None]:
        """The version as devices rebuild it from the delta chain, its delta and step (`core.broadcast`);
        unchanged and None with snapshots only."""
        if self._broadcaster is None:
            return new, None, None
        return broadcast(new, self._broadcaster, now)

    # -- observer (the dashboard) ----------------------------------------------------------------

    def _emit(self, event: feed.Event) -> None:
        if self.observer is not None:
            try:
                self.observer(event)
            except Exception:  # watching must never stop the service
                log.exception("the observer failed on %s", type(event).__name__)

    def _emit_version(
        self,
        adapter: protocol.GlobalAdapter,
        devices: tuple[str, ...],
        took: float | None,
        at: float,
        aligning: float | None = None,
    ) -> None:
        m = adapter.metrics
        self._emit(
            feed.VersionPublished(
                at, adapter.version, adapter.parent_version, adapter.strategy, devices,
                len(self._publishable), took, aligning, m.get("alignment_residual", {}),
                m.get("jain_index"),
            )
        )  # fmt: skip

    def _emit_queue(self) -> None:
        if self.observer is not None and self.transport is not None:
            self._emit(feed.QueueDepth(self.clock(), self.transport.messages.qsize(), len(self.strategy.pending())))

    def _fleet_metrics(self) -> dict[str, Any]:
        stats = self.store.stats()
        accepted = {d: s["pending"] + s["aggregated"] for d, s in stats.items()}
        total = sum(accepted.values()) or 1
        losses = self.store.last_losses()
        evals = self.store.last_eval_losses()
        finite = [loss for loss, _ in evals.values() if math.isfinite(loss)]
        return {
            "accepted_share": {d: n / total for d, n in sorted(accepted.items())},
            "jain_index": jain_index(accepted.values()),
            "staleness_histogram": {str(k): v for k, v in sorted(self.staleness.items())},
            "bytes_up": sum(s["bytes"] for s in stats.values()),
            "global_adapter_bytes": len(self._publishable),
            "device_train_loss": losses,
            "worst_device_train_loss": max(losses.values()) if losses else None,
            # each device's loss of the global adapter it last trained from, on its own held-out examples
            # (strict JSON has no Infinity: a diverged device shows loss null and is listed apart)
            "device_eval_loss": {
                d: {"loss": loss if math.isfinite(loss) else None, "version": v}
                for d, (loss, v) in sorted(evals.items())
            },
            "worst_device_eval_loss": max(finite) if finite else None,
            "diverged_devices": sorted(d for d, (loss, _) in evals.items() if not math.isfinite(loss)),
        }

    def status(self) -> dict[str, Any]:
        return {
            "state": "online",
            "version": self.current.version,
            "strategy": self.strategy.name,
            **self._fleet_metrics(),
            "aggregation_failures": self.aggregation_failures,
            "quarantined": self.store.quarantined(),
            "last_aggregation": {
                k: self.last_metrics[k]
                for k in ("alignment_residual", "staleness", "weights", "trigger", "residual_norm", "residual_dropped")
                if k in self.last_metrics
            },
        }

    # -- MQTT loop --------------------------------------------------------------------------------

    def dispatch(self, msg: Message) -> None:
        assert self.transport is not None
        device_id = self.topics.device_of(msg.topic)
        if device_id is None or not msg.topic.endswith("/update"):
            self.transport.ack(msg)
            return
        try:
            ack = self.handle_update(device_id, msg.payload)
        except Exception as exc:  # one bad message must never stop the service
            log.exception("update from %s could not be handled", device_id)
            ack = protocol.Ack(
                device_id,
                self.intake.update_id_of(msg.payload),
                False,
                f"internal error: {exc}",
                self.current.version,
            )
            self._emit(feed.UpdateReceived(self.clock(), device_id, False, ack.reason, len(msg.payload)))
        # The update is in SQLite now: only then tell the broker it may forget the message.
        self.transport.ack(msg)
        self.transport.publish(self.topics.ack(device_id), protocol.encode_ack(ack))
        self.aggregate_step()
        self._emit_queue()

    def aggregate_step(self) -> protocol.GlobalAdapter | None:
        """Aggregate if ready and not backing off after a failure; publish when connected.

        An aggregation that raises is retried after AGGREGATION_BACKOFF_S · 2^(n−1) seconds; after
        MAX_AGGREGATION_ATTEMPTS failures in a row the updates that make it fail are quarantined,
        so one bad update cannot stall the federation (issue 10, defect 8)."""
        now = self.clock()
        if now < self._retry_at:
            return None
        try:
            published = self.maybe_aggregate()
        except Exception as exc:  # the buffer stays in SQLite
            self._aggregation_failed(exc, now)
            return None
        self.aggregation_failures = 0
        if published is not None and self.transport is not None:
            self.publish_global()
        return published

    def _aggregation_failed(self, exc: Exception, now: float) -> None:
        self.aggregation_failures += 1
        n = self.aggregation_failures
        if n == 1:  # the traceback once, for the bug report; then one line per retry
            log.exception("aggregation failed at version %d", self.current.version)
        if n < MAX_AGGREGATION_ATTEMPTS:
            delay = min(AGGREGATION_BACKOFF_S * 2 ** (n - 1), 60.0)
            self._retry_at = now + delay
            log.error("aggregation failed %d times (%s: %s); retrying in %.1f s", n, type(exc).__name__, exc, delay)
            return
        self.quarantine_failing(f"aggregation failed {n} times ({type(exc).__name__}: {exc})", now)

    def quarantine_failing(self, why: str, now: float) -> list[str]:
        """Find the buffered updates aggregation fails on, move them out of the buffer; returns their ids.

        Each update is tried alone on a fresh strategy; those that fail alone are the culprits. When
        every one passes alone (they fail only together), the whole buffer is quarantined."""
        pending = self.strategy.pending()
        culprits: dict[str, tuple[str, str]] = {}  # update id -> (device, what failed)
        for update in pending:
            probe = self._build()
            try:
                probe.add(update, self.current.version)
                probe.aggregate(self.current, now)
            except Exception as exc:
                culprits[update.update_id] = (update.device_id, f"{type(exc).__name__}: {exc}")
            finally:
                probe.close()
        if not culprits:
            culprits = {u.update_id: (u.device_id, "fails only together with the rest of the buffer") for u in pending}
        for update_id, (device_id, alone) in culprits.items():
            reason = f"quarantined: {why}; alone: {alone}"[:500]
            self.store.quarantine(device_id, update_id, reason)
            log.error("quarantined update %s from %s: %s", update_id[:8], device_id, reason)
        self.strategy.close()
        self.strategy = self._build()  # the buffer again, without them
        self._restore_buffer()
        self.aggregation_failures = 0
        self._retry_at = -math.inf
        if self.transport is not None:
            self.transport.publish(self.topics.global_status, protocol.encode_status(self.status()), retain=True)
        return list(culprits)

    def publish_global(self) -> None:
        assert self.transport is not None
        self.transport.publish(self.topics.global_adapter, self._publishable, retain=True, timeout=60)
        if self._publishable_delta is not None:  # after the snapshot: a device that fetched it can chain on
            qos, retain = protocol.DELIVERY["global/delta"]
            self.transport.publish(
                self.topics.global_delta, self._publishable_delta, qos=qos, retain=retain, timeout=60
            )
        self.transport.publish(self.topics.global_status, protocol.encode_status(self.status()), retain=True)

    def run(self, stop: threading.Event, *, connect_timeout: float = 30.0) -> None:
        self.transport = Transport(
            self.cfg.broker,
            self.cfg.client_id,
            will=(self.topics.global_status, protocol.encode_status({"state": "offline"})),
            manual_ack=True,
        )
        self.transport.subscribe(self.topics.all_updates)
        self.transport.start(wait=connect_timeout)
        self.publish_global()
        if self.observer is not None:
            self._emit_version(protocol.decode_global(self._publishable, 1 << 34), (), None, self.clock())
        log.info("coordinator serving federation %r at version %d", self.cfg.federation, self.current.version)
        try:
            while not stop.is_set():
                msg = self.transport.get(timeout=0.5)
                if msg is not None:
                    self.dispatch(msg)
                elif self.aggregate_step() is not None:  # time-triggered aggregation
                    self._emit_queue()  # it emptied the buffer between messages
        finally:
            self.transport.publish(
                self.topics.global_status, protocol.encode_status({"state": "offline"}), retain=True, timeout=2
            )
            self.transport.stop()
            self.strategy.close()
            self.store.close()
