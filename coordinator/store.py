"""Durable coordinator state in one SQLite file: devices, updates and adapter versions.

An update is committed here before its ack is sent, and a new version is committed together with
marking the updates it consumed, in one transaction. So a SIGKILL at any instant loses nothing:
on restart the coordinator resumes at the newest stored version with the buffer of pending
updates intact, and a device resending an update it saw no ack for is answered from here.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alignfed import protocol
from alignfed.errors import ConfigError
from alignfed.lowrank import Factors, Svd

_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    key_hex   TEXT NOT NULL,
    profile   TEXT NOT NULL,
    added_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    version    INTEGER PRIMARY KEY,
    parent     INTEGER NOT NULL,
    created_at REAL NOT NULL,
    strategy   TEXT NOT NULL,
    adapter    BLOB NOT NULL,   -- the encoded GlobalAdapter exactly as published
    residual   BLOB NOT NULL,   -- safetensors of the server error feedback per layer id
    metrics    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS updates (
    device_id    TEXT NOT NULL,
    update_id    TEXT NOT NULL,
    seq          INTEGER NOT NULL,
    base_version INTEGER NOT NULL,
    samples      INTEGER NOT NULL,
    train_loss   REAL NOT NULL,
    eval_loss    REAL,           -- base version's loss on the device's held-out examples, if measured
    received_at  REAL NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('pending', 'aggregated', 'rejected', 'quarantined')),
    reason       TEXT NOT NULL DEFAULT '',
    version      INTEGER,        -- the global version that folded it in
    weight       REAL,
    bytes        INTEGER NOT NULL,
    payload      BLOB,           -- kept while pending, so a restart can rebuild the buffer
    PRIMARY KEY (device_id, update_id)
);
CREATE INDEX IF NOT EXISTS updates_status ON updates(status);
CREATE INDEX IF NOT EXISTS updates_device_time ON updates(device_id, received_at);
"""


_UPDATES_DDL = _SCHEMA[_SCHEMA.index("CREATE TABLE IF NOT EXISTS updates (") : _SCHEMA.index("CREATE INDEX")]
_INDEXES = _SCHEMA[_SCHEMA.index("CREATE INDEX") :]


@dataclass(frozen=True, slots=True)
class UpdateRecord:
    device_id: str
    update_id: str
    status: str
    reason: str
    version: int | None


class Store:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"{self.path}: cannot open coordinator database ({exc})") from exc

    def _migrate(self) -> None:
        """Bring a database written by an older version up to this schema (columns only ever added)."""
        columns = {str(row[1]) for row in self._db.execute("PRAGMA table_info(updates)")}
        if "eval_loss" not in columns:
            self._db.execute("ALTER TABLE updates ADD COLUMN eval_loss REAL")
        (ddl,) = self._db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'updates'").fetchone()
        if "'quarantined'" not in ddl:  # SQLite cannot alter a CHECK constraint: copy into a new table
            names = ", ".join(str(row[1]) for row in self._db.execute("PRAGMA table_info(updates)"))
            with self._tx() as db:
                db.execute(_UPDATES_DDL.replace("IF NOT EXISTS updates", "updates_new"))
                db.execute(f"INSERT INTO updates_new ({names}) SELECT {names} FROM updates")
                db.execute("DROP TABLE updates")
                db.execute("ALTER TABLE updates_new RENAME TO updates")
                for statement in _INDEXES.strip().split(";"):
                    if statement.strip():
                        db.execute(statement)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    # -- devices ----------------------------------------------------------------------------------

    def add_device(self, device_id: str, key_hex: str, profile: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO devices VALUES (?, ?, ?, ?)", (device_id, key_hex, profile, time.time()))

    def remove_device(self, device_id: str) -> bool:
        """Forget a device's key (its stored updates stay, for the record); False if it was unknown."""
        with self._tx() as db:
            return db.execute("DELETE FROM devices WHERE device_id = ?", (device_id,)).rowcount > 0

    def device_key(self, device_id: str) -> bytes | None:
        row = self._db.execute("SELECT key_hex FROM devices WHERE device_id = ?", (device_id,)).fetchone()
        return bytes.fromhex(row[0]) if row else None

    def devices(self) -> list[tuple[str, str]]:
        return [(r[0], r[1]) for r in self._db.execute("SELECT device_id, profile FROM devices ORDER BY device_id")]

    # -- versions ---------------------------------------------------------------------------------

    def latest_version(self) -> int | None:
        row = self._db.execute("SELECT MAX(version) FROM versions").fetchone()
        return None if row[0] is None else int(row[0])

    def has_version(self, version: int) -> bool:
        return self._db.execute("SELECT 1 FROM versions WHERE version = ?", (version,)).fetchone() is not None

    def version(self, version: int) -> tuple[bytes, dict[str, Factors]]:
        """(encoded GlobalAdapter, error-feedback residual factors per layer id) of a stored version.

        Rows written before residuals were kept as factors hold a dense (out, in) matrix under the
        bare layer id; it is read back exactly as its SVD factors.
        """
        row = self._db.execute("SELECT adapter, residual FROM versions WHERE version = ?", (version,)).fetchone()
        if row is None:
            raise KeyError(version)
        tensors, _ = protocol.unpack(bytes(row[1]), max_bytes=1 << 34)
        residual: dict[str, Factors] = {}
        for name, t in tensors.items():
            lid, _, part = name.rpartition(".")
            if part == "u":
                residual[lid] = Factors(u=np.array(t), v=np.array(tensors[f"{lid}.v"]))
            elif part != "v":
                sv = Svd.of_dense(t)
                residual[name] = sv.head(sv.s.size)
        return bytes(row[0]), residual

    def save_version(
        self,
        adapter: protocol.GlobalAdapter,
        encoded: bytes,
        residual: Mapping[str, Factors],
        used: Mapping[str, tuple[str, float]],
    ) -> None:
        """Commit a new version and mark the updates it consumed (update id -> (device, weight)).

        The residual of layer `lid` is stored as `lid.u` (out, q) and `lid.v` (q, in), float32.
        """
        parts = {
            f"{lid}.{n}": np.asarray(t, np.float32) for lid, f in residual.items() for n, t in (("u", f.u), ("v", f.v))
        }
        blob = protocol.pack(parts, {})
        with self._tx() as db:
            db.execute(
                "INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    adapter.version,
                    adapter.parent_version,
                    adapter.created_at,
                    adapter.strategy,
                    encoded,
                    blob,
                    json.dumps(adapter.metrics, default=float),
                ),
            )
            for update_id, (device_id, weight) in used.items():
                db.execute(
                    "UPDATE updates SET status = 'aggregated', version = ?, weight = ?, payload = NULL "
                    "WHERE device_id = ? AND update_id = ? AND status = 'pending'",
                    (adapter.version, weight, device_id, update_id),
                )

    # -- updates ----------------------------------------------------------------------------------

    def lookup(self, device_id: str, update_id: str) -> UpdateRecord | None:
        row = self._db.execute(
            "SELECT status, reason, version FROM updates WHERE device_id = ? AND update_id = ?",
            (device_id, update_id),
        ).fetchone()
        return None if row is None else UpdateRecord(device_id, update_id, row[0], row[1], row[2])

    def record(
        self, update: protocol.AdapterUpdate, payload: bytes, received_at: float, *, status: str, reason: str = ""
    ) -> None:
        """Insert an update (pending with its payload, or rejected without). Idempotent on the key."""
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO updates (device_id, update_id, seq, base_version, samples, train_loss, "
                "eval_loss, received_at, status, reason, bytes, payload) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    update.device_id,
                    update.update_id,
                    update.seq,
                    update.base_version,
                    update.samples,
                    update.train_loss,
                    None if math.isnan(update.eval_loss) else update.eval_loss,  # inf: diverged
                    received_at,
                    status,
                    reason,
                    len(payload),
                    payload if status == "pending" else None,
                ),
            )

    def reject_pending(self, device_id: str, update_id: str, reason: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE updates SET status = 'rejected', reason = ?, payload = NULL "
                "WHERE device_id = ? AND update_id = ? AND status = 'pending'",
                (reason, device_id, update_id),
            )

    def quarantine(self, device_id: str, update_id: str, reason: str) -> None:
        """Move a pending update out of the buffer: it was acknowledged, but aggregating it keeps failing.

        The payload is kept, so an operator can inspect it (and put it back by setting it pending)."""
        with self._tx() as db:
            db.execute(
                "UPDATE updates SET status = 'quarantined', reason = ? "
                "WHERE device_id = ? AND update_id = ? AND status = 'pending'",
                (reason, device_id, update_id),
            )

    def quarantined(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest quarantined updates: device, update id, when received and why."""
        rows = self._db.execute(
            "SELECT device_id, update_id, received_at, reason FROM updates WHERE status = 'quarantined' "
            "ORDER BY received_at DESC, rowid DESC LIMIT ?",
            (limit,),
        )
        return [{"device_id": d, "update_id": u, "received_at": t, "reason": r} for d, u, t, r in rows]

    def aggregated(self) -> list[tuple[str, int, int]]:
        """(device, base version, version that folded it in) of every aggregated update, oldest first."""
        rows = self._db.execute(
            "SELECT device_id, base_version, version FROM updates WHERE status = 'aggregated' "
            "ORDER BY version, received_at, rowid"
        )
        return [(str(d), int(b), int(v)) for d, b, v in rows]

    def pending(self) -> list[tuple[bytes, float]]:
        """(payload, received_at) of every pending update, in arrival order."""
        rows = self._db.execute(
            "SELECT payload, received_at FROM updates WHERE status = 'pending' ORDER BY received_at, rowid"
        )
        return [(bytes(r[0]), float(r[1])) for r in rows]

    def stats(self) -> dict[str, Any]:
        """Per-device counts and bytes, for status messages and reports."""
        per_device: dict[str, dict[str, int]] = {}
        for device_id, status, n, nbytes in self._db.execute(
            "SELECT device_id, status, COUNT(*), SUM(bytes) FROM updates GROUP BY device_id, status"
        ):
            d = per_device.setdefault(
                device_id, {"pending": 0, "aggregated": 0, "rejected": 0, "quarantined": 0, "bytes": 0}
            )
            d[status] = int(n)
            d["bytes"] += int(nbytes or 0)
        return per_device

    def last_eval_losses(self) -> dict[str, tuple[float, int]]:
        """Each device's newest measured held-out loss: (loss, the global version it was measured on)."""
        # SQLite takes the bare columns of a MAX() aggregate from the row holding the maximum.
        rows = self._db.execute(
            "SELECT device_id, eval_loss, base_version, MAX(received_at) FROM updates "
            "WHERE status != 'rejected' AND eval_loss IS NOT NULL GROUP BY device_id"
        )
        return {str(d): (float(loss), int(v)) for d, loss, v, _ in rows}

    def last_losses(self) -> dict[str, float]:
        """Each device's training loss in its newest accepted update."""
        rows = self._db.execute(
            "SELECT device_id, train_loss, MAX(received_at) FROM updates WHERE status != 'rejected' GROUP BY device_id"
        )
        return {str(d): float(loss) for d, loss, _ in rows}
