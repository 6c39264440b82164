"""An ingest worker: one of N processes sharing the device updates of a federation.

Workers subscribe with an MQTT 5 shared subscription, so the broker hands each update to one of
them; each validates (decode, signature, layout, norms, staleness) and commits the update to the
shared PostgreSQL store before acking it, exactly as the single-process service does. Workers hold
no strategy state: the elected aggregator (`coordinator.aggregator`) folds the committed updates
into versions. A worker killed at any instant loses nothing: an update it had not committed is
not acked, so the broker redelivers it (persistent session) or the device resends it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from alignfed import manifest as mf
from alignfed import protocol
from alignfed.errors import ConfigError, RejectedUpdate
from alignfed.topics import Topics
from alignfed.transport import Message, Transport, shared_subscription
from coordinator.config import CoordinatorConfig
from coordinator.core import Intake
from coordinator.pgstore import PgStore
from coordinator.storage import is_postgres

log = logging.getLogger(__name__)

SHARE_GROUP = "alignfed-ingest"


class IngestWorker:
    """Validates and records updates; `handle_update` is the per-message step, `run` the MQTT loop."""

    def __init__(self, cfg: CoordinatorConfig, name: str, *, clock: Callable[[], float] = time.time) -> None:
        if not is_postgres(cfg.database):
            raise ConfigError(
                f"ingest worker {name!r}: database {cfg.database!s} is not a postgresql:// URL; "
                "parallel ingest needs the shared PostgreSQL store"
            )
        self.cfg = cfg
        self.name = name
        self.topics = Topics(cfg.federation)
        self.manifest = mf.load(cfg.bundle)
        self.store = PgStore(str(cfg.database), worker=name)
        self.intake = Intake(
            self.manifest, limits=cfg.limits, key_of=self.store.device_key, has_version=self.store.has_version
        )
        self.bundle = self.intake.bundle
        self.clock = clock
        self.transport: Transport | None = None
        self.handled = 0

    def _current_version(self) -> int:
        # Read per update: the aggregator moves it, and a cached value would call a fresh update "future".
        return self.store.latest_version() or 0

    def _seen(self, device_id: str, decoded: protocol.Decoded, current: int) -> protocol.Ack | None:
        """The stored outcome of a correctly signed resend (see `Coordinator._seen`)."""
        if not self.intake.signed_by(device_id, decoded):
            return None
        seen = self.store.lookup(device_id, decoded.update.update_id)
        if seen is None:
            return None
        return protocol.Ack(device_id, seen.update_id, seen.status != "rejected", seen.reason or "duplicate", current)

    def handle_update(self, device_id: str, payload: bytes) -> protocol.Ack:
        now = self.clock()
        current = self._current_version()
        decoded: protocol.Decoded | None = None
        try:
            decoded = self.intake.decode(payload)  # once: the checks and the resend lookup read this
            update = self.intake.validate(device_id, decoded, current)
        except RejectedUpdate as exc:
            if decoded is not None and (again := self._seen(device_id, decoded, current)) is not None:
                return again  # accepted before, stale now
            log.warning("rejected update from %s: %s", device_id, exc.reason)
            update_id = decoded.update.update_id if decoded is not None else self.intake.update_id_of(payload)
            return protocol.Ack(device_id, update_id, False, exc.reason, current)
        seen = self.store.lookup(device_id, update.update_id)
        if seen is not None:  # QoS 1 duplicate or resend, possibly handled by another worker
            return protocol.Ack(device_id, update.update_id, seen.status != "rejected", "duplicate", current)
        self.store.record(update, payload, now, status="pending")  # committed before the ack
        log.info("worker %s accepted update %s from %s (base v%d)", self.name, update.update_id[:8], device_id,
                 update.base_version)  # fmt: skip
        return protocol.Ack(device_id, update.update_id, True, "accepted", current)

    def dispatch(self, msg: Message) -> None:
        assert self.transport is not None
        device_id = self.topics.device_of(msg.topic)
        if device_id is None or not msg.topic.endswith("/update"):
            self.transport.ack(msg)
            return
        try:
            ack = self.handle_update(device_id, msg.payload)
        except RejectedUpdate as exc:
            ack = protocol.Ack(device_id, self.intake.update_id_of(msg.payload), False, exc.reason, -1)
        self.transport.ack(msg)  # the update is in PostgreSQL now: the broker may forget it
        self.transport.publish(self.topics.ack(device_id), protocol.encode_ack(ack))
        self.handled += 1

    def run(self, stop: threading.Event, *, connect_timeout: float = 30.0) -> None:
        """Serve until `stop`; a store error ends the worker (its unacked message is redelivered)."""
        self.transport = Transport(self.cfg.broker, f"{self.cfg.client_id}-{self.name}", manual_ack=True, mqtt5=True)
        self.transport.subscribe(shared_subscription(SHARE_GROUP, self.topics.all_updates))
        self.transport.start(wait=connect_timeout)
        log.info("ingest worker %s serving federation %r", self.name, self.cfg.federation)
        try:
            while not stop.is_set():
                msg = self.transport.get(timeout=0.5)
                if msg is not None:
                    self.dispatch(msg)
        finally:
            self.transport.stop()
            self.store.close()
