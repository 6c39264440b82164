"""The elected aggregator: turns the updates the ingest workers committed into versions.

Any number of aggregator processes may run; the one holding the store's advisory lock leads and
the others wait for it. The leader is an ordinary `Coordinator` without MQTT ingest: it restores
the pending buffer from PostgreSQL, then keeps feeding the strategy the updates workers commit,
aggregates when the strategy is ready and publishes the retained global adapter. If it dies, its
connection dies with it, PostgreSQL drops the lock, and a standby takes over from the stored
state. `PgStore.save_version` refuses to fold an update twice, so even a leader that lost its lock
without noticing cannot double count (it gets `StoreConflict` and exits).
"""

from __future__ import annotations

import logging
import threading

from alignfed import protocol
from alignfed.errors import ConfigError, ProtocolError, RejectedUpdate
from alignfed.transport import Transport
from coordinator.config import CoordinatorConfig
from coordinator.pgstore import PgStore
from coordinator.service import Coordinator
from coordinator.storage import StoreConflict, is_postgres
from coordinator.tier import stored_key

log = logging.getLogger(__name__)


class Aggregator:
    def __init__(self, cfg: CoordinatorConfig, name: str, *, poll_s: float = 0.1) -> None:
        if not is_postgres(cfg.database):
            raise ConfigError(
                f"aggregator {name!r}: database {cfg.database!s} is not a postgresql:// URL; "
                "a single coordinator with SQLite needs no separate aggregator"
            )
        self.cfg = cfg
        self.name = name
        self.poll_s = poll_s
        self.store = PgStore(str(cfg.database), worker=name)
        self.coordinator: Coordinator | None = None
        self._known: set[tuple[str, str]] = set()

    def wait_for_lead(self, stop: threading.Event) -> bool:
        while not stop.is_set():
            if self.store.try_lead():
                log.info("aggregator %s leads", self.name)
                return True
            stop.wait(self.poll_s * 5)
        return False

    def feed(self) -> int:
        """Add the newly committed pending updates to the strategy; returns how many."""
        c = self.coordinator
        assert c is not None
        keys = self.store.pending_keys()
        self._known &= set(keys)  # forget what was aggregated or rejected
        added = 0
        for device_id, update_id in keys:
            if (device_id, update_id) in self._known:
                continue
            row = self.store.pending_payload(device_id, update_id)
            self._known.add((device_id, update_id))
            if row is None:
                continue
            payload, received_at = row
            try:
                c.core.offer(protocol.decode_update(payload, c.intake.payload_limit).update, received_at)  # validated
                added += 1
            except (RejectedUpdate, ProtocolError) as exc:
                reason = exc.reason if isinstance(exc, RejectedUpdate) else str(exc)
                self.store.reject_pending(device_id, update_id, reason)
                log.warning("strategy rejected update %s from %s: %s", update_id, device_id, reason)
        return added

    def step(self) -> protocol.GlobalAdapter | None:
        """One round: feed, then aggregate and publish if the strategy is ready."""
        c = self.coordinator
        assert c is not None
        self.feed()
        try:
            adapter = c.maybe_aggregate()
        except StoreConflict:
            raise
        except Exception:  # the buffer stays in PostgreSQL; the next round retries
            log.exception("aggregation failed at version %d; the buffered updates are kept", c.current.version)
            return None
        if adapter is not None and c.transport is not None:
            c.publish_global()
        return adapter

    def run(self, stop: threading.Event, *, connect_timeout: float = 30.0) -> None:
        try:
            if not self.wait_for_lead(stop):
                return
            c = Coordinator(self.cfg, store=self.store)
            self.coordinator = c
            self._known = {stored_key(u.device_id, u.update_id) for u in c.strategy.pending()}
            c.transport = Transport(
                self.cfg.broker,
                f"{self.cfg.client_id}-aggregator",
                will=(c.topics.global_status, protocol.encode_status({"state": "offline"})),
            )
            c.transport.start(wait=connect_timeout)
            c.publish_global()
            log.info("aggregator %s serving federation %r at version %d", self.name, self.cfg.federation,
                     c.current.version)  # fmt: skip
            while not stop.is_set():
                if not self.store.still_leading():  # the connection that held the lock is gone: step down
                    raise StoreConflict(f"aggregator {self.name} lost the leader lock")
                self.step()
                stop.wait(self.poll_s)
        finally:
            if self.coordinator is not None and self.coordinator.transport is not None:
                self.coordinator.transport.stop()
            self.store.close()
