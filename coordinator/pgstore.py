"""Durable coordinator state in PostgreSQL, shared by ingest workers and one elected aggregator.

The same guarantees as the SQLite store (`store.Store`), across processes and machines:
- an update is committed (synchronous commit) before any worker acks it; `(device_id, update_id)`
  is the primary key, so a QoS 1 duplicate that reaches two workers is stored once;
- a version is inserted together with marking the updates it folded in, in one transaction that
  fails unless every one of them was still pending and the version number was still free — so a
  deposed aggregator that wakes up late cannot fold an update a second time (`StoreConflict`);
- one aggregator leads at a time: it holds a session-level advisory lock on its own connection,
  which PostgreSQL releases when that connection dies (SIGKILL, power loss, network partition).

The schema is versioned: `schema_version` lists the migrations applied, each applied once under a
transaction-level advisory lock so that processes starting together do not race.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg

from alignfed import protocol
from alignfed.errors import ConfigError
from alignfed.lowrank import Factors
from coordinator.storage import StoreConflict, pack_residual, unpack_residual

# (number, SQL): append only; a released migration is never edited.
MIGRATIONS: tuple[tuple[int, str], ...] = (
    (
        1,
        """
        CREATE TABLE devices (
            device_id TEXT PRIMARY KEY,
            key_hex   TEXT NOT NULL,
            profile   TEXT NOT NULL,
            added_at  DOUBLE PRECISION NOT NULL
        );
        CREATE TABLE versions (
            version    INTEGER PRIMARY KEY,
            parent     INTEGER NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            strategy   TEXT NOT NULL,
            adapter    BYTEA NOT NULL,
            residual   BYTEA NOT NULL,
            metrics    TEXT NOT NULL
        );
        CREATE TABLE updates (
            device_id    TEXT NOT NULL,
            update_id    TEXT NOT NULL,
            arrival      BIGSERIAL,            -- commit order across workers
            seq          BIGINT NOT NULL,
            base_version INTEGER NOT NULL,
            samples      INTEGER NOT NULL,
            train_loss   DOUBLE PRECISION NOT NULL,
            eval_loss    DOUBLE PRECISION,
            received_at  DOUBLE PRECISION NOT NULL,
            status       TEXT NOT NULL CHECK (status IN ('pending', 'aggregated', 'rejected')),
            reason       TEXT NOT NULL DEFAULT '',
            version      INTEGER REFERENCES versions(version),
            weight       DOUBLE PRECISION,
            bytes        INTEGER NOT NULL,
            worker       TEXT NOT NULL DEFAULT '',
            payload      BYTEA,
            PRIMARY KEY (device_id, update_id)
        );
        CREATE INDEX updates_pending ON updates(arrival) WHERE status = 'pending';
        CREATE INDEX updates_device_time ON updates(device_id, received_at);
        """,
    ),
    (
        2,
        # an update whose aggregation keeps failing leaves the buffer, payload kept (coordinator.service)
        """
        ALTER TABLE updates DROP CONSTRAINT updates_status_check;
        ALTER TABLE updates ADD CONSTRAINT updates_status_check
            CHECK (status IN ('pending', 'aggregated', 'rejected', 'quarantined'));
        """,
    ),
)

_MIGRATION_LOCK = 0x616C6967  # "alig": serialises schema migrations
LEADER_LOCK = 0x6C656164  # "lead": held by the one aggregator


@dataclass(frozen=True, slots=True)
class PgUpdateRecord:
    device_id: str
    update_id: str
    status: str
    reason: str
    version: int | None


@dataclass(frozen=True, slots=True)
class PendingUpdate:
    arrival: int
    payload: bytes
    received_at: float


class PgStore:
    """The coordinator store on a PostgreSQL database named by a `postgresql://` URL."""

    def __init__(self, url: str, *, worker: str = "") -> None:
        self.url = url
        self.worker = worker
        try:
            self._db = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise ConfigError(f"database {_redact(url)}: cannot connect to PostgreSQL ({exc})") from exc
        self.migrate()

    # -- schema -----------------------------------------------------------------------------------

    def migrate(self) -> int:
        """Apply the migrations this database lacks; returns the schema version."""
        with self._db.transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS schema_version ("
                "version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)"
            )
            row = self._db.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
            have = int(row[0]) if row else 0
            newest = MIGRATIONS[-1][0]
            if have > newest:
                raise ConfigError(
                    f"database {_redact(self.url)}: schema version {have} is newer than this program's {newest}; "
                    "upgrade alignfed"
                )
            for number, sql in MIGRATIONS:
                if number > have:
                    self._db.execute(sql)  # type: ignore[arg-type]  # trusted, fixed text
                    self._db.execute("INSERT INTO schema_version VALUES (%s, %s)", (number, time.time()))
            return newest

    def schema_version(self) -> int:
        row = self._db.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def close(self) -> None:
        self._db.close()

    # -- leadership -------------------------------------------------------------------------------

    def try_lead(self) -> bool:
        """Take the aggregator's advisory lock on this connection if nobody holds it."""
        row = self._db.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK,)).fetchone()
        return bool(row and row[0])

    def still_leading(self) -> bool:
        """Whether this connection holds the lock (false once the connection was lost)."""
        try:
            row = self._db.execute(
                "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
                "AND objid = %s AND granted",
                (LEADER_LOCK,),
            ).fetchone()
        except psycopg.Error:
            return False
        return row is not None

    # -- devices ----------------------------------------------------------------------------------

    def add_device(self, device_id: str, key_hex: str, profile: str) -> None:
        self._db.execute(
            "INSERT INTO devices VALUES (%s, %s, %s, %s) ON CONFLICT (device_id) DO UPDATE "
            "SET key_hex = EXCLUDED.key_hex, profile = EXCLUDED.profile, added_at = EXCLUDED.added_at",
            (device_id, key_hex, profile, time.time()),
        )

    def remove_device(self, device_id: str) -> bool:
        """Forget a device's key (its stored updates stay, for the record); False if it was unknown."""
        return self._db.execute("DELETE FROM devices WHERE device_id = %s", (device_id,)).rowcount > 0

    def device_key(self, device_id: str) -> bytes | None:
        row = self._db.execute("SELECT key_hex FROM devices WHERE device_id = %s", (device_id,)).fetchone()
        return bytes.fromhex(row[0]) if row else None

    def devices(self) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in self._db.execute("SELECT device_id, profile FROM devices ORDER BY device_id")]

    # -- versions ---------------------------------------------------------------------------------

    def latest_version(self) -> int | None:
        row = self._db.execute("SELECT MAX(version) FROM versions").fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def has_version(self, version: int) -> bool:
        return self._db.execute("SELECT 1 FROM versions WHERE version = %s", (version,)).fetchone() is not None

    def version(self, version: int) -> tuple[bytes, dict[str, Factors]]:
        row = self._db.execute("SELECT adapter, residual FROM versions WHERE version = %s", (version,)).fetchone()
        if row is None:
            raise KeyError(version)
        return bytes(row[0]), unpack_residual(bytes(row[1]))

    def save_version(
        self,
        adapter: protocol.GlobalAdapter,
        encoded: bytes,
        residual: Mapping[str, Factors],
        used: Mapping[str, tuple[str, float]],
    ) -> None:
        """Commit a version and fold in its updates (update id -> (device, weight)), or nothing.

        Raises StoreConflict when the version exists or an update is no longer pending: another
        aggregator got there first, and this one must step down and reload.
        """
        try:
            with self._db.transaction():
                self._db.execute(
                    "INSERT INTO versions VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (
                        adapter.version,
                        adapter.parent_version,
                        adapter.created_at,
                        adapter.strategy,
                        encoded,
                        pack_residual(residual),
                        json.dumps(adapter.metrics, default=float),
                    ),
                )
                for update_id, (device_id, weight) in used.items():
                    cur = self._db.execute(
                        "UPDATE updates SET status = 'aggregated', version = %s, weight = %s, payload = NULL "
                        "WHERE device_id = %s AND update_id = %s AND status = 'pending'",
                        (adapter.version, weight, device_id, update_id),
                    )
                    if cur.rowcount != 1:
                        raise StoreConflict(
                            f"update {update_id} of {device_id} is no longer pending; version {adapter.version} "
                            "not saved"
                        )
        except psycopg.errors.UniqueViolation as exc:
            raise StoreConflict(f"version {adapter.version} already exists") from exc

    # -- updates ----------------------------------------------------------------------------------

    def lookup(self, device_id: str, update_id: str) -> PgUpdateRecord | None:
        row = self._db.execute(
            "SELECT status, reason, version FROM updates WHERE device_id = %s AND update_id = %s",
            (device_id, update_id),
        ).fetchone()
        return None if row is None else PgUpdateRecord(device_id, update_id, row[0], row[1], row[2])

    def record(
        self, update: protocol.AdapterUpdate, payload: bytes, received_at: float, *, status: str, reason: str = ""
    ) -> None:
        """Insert an update (pending with its payload, or rejected without). Idempotent on the key."""
        self._db.execute(
            "INSERT INTO updates (device_id, update_id, seq, base_version, samples, train_loss, eval_loss, "
            "received_at, status, reason, bytes, worker, payload) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (
                update.device_id,
                update.update_id,
                update.seq,
                update.base_version,
                update.samples,
                update.train_loss,
                None if math.isnan(update.eval_loss) else update.eval_loss,
                received_at,
                status,
                reason,
                len(payload),
                self.worker,
                payload if status == "pending" else None,
            ),
        )

    def reject_pending(self, device_id: str, update_id: str, reason: str) -> None:
        self._db.execute(
            "UPDATE updates SET status = 'rejected', reason = %s, payload = NULL "
            "WHERE device_id = %s AND update_id = %s AND status = 'pending'",
            (reason, device_id, update_id),
        )

    def quarantine(self, device_id: str, update_id: str, reason: str) -> None:
        """Move a pending update out of the buffer, payload kept (see `store.Store.quarantine`)."""
        self._db.execute(
            "UPDATE updates SET status = 'quarantined', reason = %s "
            "WHERE device_id = %s AND update_id = %s AND status = 'pending'",
            (reason, device_id, update_id),
        )

    def quarantined(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest quarantined updates: device, update id, when received and why."""
        rows = self._db.execute(
            "SELECT device_id, update_id, received_at, reason FROM updates WHERE status = 'quarantined' "
            "ORDER BY received_at DESC, arrival DESC LIMIT %s",
            (limit,),
        )
        return [{"device_id": d, "update_id": u, "received_at": t, "reason": r} for d, u, t, r in rows]

    def aggregated(self) -> list[tuple[str, int, int]]:
        rows = self._db.execute(
            "SELECT device_id, base_version, version FROM updates WHERE status = 'aggregated' ORDER BY version, arrival"
        )
        return [(str(d), int(b), int(v)) for d, b, v in rows]

    def pending(self) -> list[tuple[bytes, float]]:
        return [(p.payload, p.received_at) for p in self.pending_after(0)]

    def pending_after(self, arrival: int) -> list[PendingUpdate]:
        """Pending updates committed after `arrival`, in commit order (the aggregator's feed)."""
        rows = self._db.execute(
            "SELECT arrival, payload, received_at FROM updates WHERE status = 'pending' AND arrival > %s "
            "ORDER BY arrival",
            (arrival,),
        )
        return [PendingUpdate(int(a), bytes(p), float(t)) for a, p, t in rows]

    def pending_keys(self) -> list[tuple[str, str]]:
        """(device, update id) of every pending update, in commit order."""
        rows = self._db.execute("SELECT device_id, update_id FROM updates WHERE status = 'pending' ORDER BY arrival")
        return [(str(d), str(u)) for d, u in rows]

    def pending_payload(self, device_id: str, update_id: str) -> tuple[bytes, float] | None:
        row = self._db.execute(
            "SELECT payload, received_at FROM updates WHERE device_id = %s AND update_id = %s AND status = 'pending'",
            (device_id, update_id),
        ).fetchone()
        return None if row is None else (bytes(row[0]), float(row[1]))

    def stats(self) -> dict[str, Any]:
        per_device: dict[str, dict[str, int]] = {}
        for device_id, status, n, nbytes in self._db.execute(
            "SELECT device_id, status, COUNT(*), SUM(bytes) FROM updates GROUP BY device_id, status"
        ):
            d = per_device.setdefault(device_id, {"pending": 0, "aggregated": 0, "rejected": 0, "bytes": 0})
            d[status] = int(n)
            d["bytes"] += int(nbytes or 0)
        return per_device

    def last_eval_losses(self) -> dict[str, tuple[float, int]]:
        rows = self._db.execute(
            "SELECT DISTINCT ON (device_id) device_id, eval_loss, base_version FROM updates "
            "WHERE status != 'rejected' AND eval_loss IS NOT NULL ORDER BY device_id, received_at DESC"
        )
        return {str(d): (float(loss), int(v)) for d, loss, v in rows}

    def last_losses(self) -> dict[str, float]:
        rows = self._db.execute(
            "SELECT DISTINCT ON (device_id) device_id, train_loss FROM updates "
            "WHERE status != 'rejected' ORDER BY device_id, received_at DESC"
        )
        return {str(d): float(loss) for d, loss in rows}

    def audit(self) -> dict[str, Any]:
        """Invariants a clean run keeps: versions form one chain 0..latest, each aggregated update names
        an existing version, no pending update holds a version, no aggregated one keeps its payload."""
        versions = [(int(v), int(p)) for v, p in self._db.execute("SELECT version, parent FROM versions ORDER BY 1")]
        chain_ok = all(v == i and p == i - 1 for i, (v, p) in enumerate(versions))

        def count(sql: str) -> int:
            row = self._db.execute(sql).fetchone()
            return int(row[0]) if row else 0

        return {
            "versions": len(versions),
            "chain_ok": chain_ok,
            "aggregated": count("SELECT COUNT(*) FROM updates WHERE status = 'aggregated'"),
            "pending": count("SELECT COUNT(*) FROM updates WHERE status = 'pending'"),
            "rejected": count("SELECT COUNT(*) FROM updates WHERE status = 'rejected'"),
            "aggregated_without_version": count(
                "SELECT COUNT(*) FROM updates WHERE status = 'aggregated' AND (version IS NULL OR payload IS NOT NULL)"
            ),
            "pending_with_version": count(
                "SELECT COUNT(*) FROM updates WHERE status = 'pending' AND version IS NOT NULL"
            ),
            "per_version": {
                int(v): int(n)
                for v, n in self._db.execute(
                    "SELECT version, COUNT(*) FROM updates WHERE status = 'aggregated' GROUP BY version ORDER BY 1"
                )
            },
        }


def _redact(url: str) -> str:
    """The URL without its password, for messages."""
    head, sep, tail = url.partition("@")
    if not sep or ":" not in head.split("//", 1)[-1]:
        return url
    scheme, _, userpass = head.partition("//")
    return f"{scheme}//{userpass.split(':', 1)[0]}:***@{tail}"
