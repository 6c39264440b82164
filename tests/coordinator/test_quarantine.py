"""Issue 10, defect 8: an aggregation that keeps raising is retried with backoff, then the update
it fails on is quarantined (out of the buffer, reason in the store and the status) and the
federation goes on."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from alignfed import protocol, tomlfile
from coordinator import config as ccfg
from coordinator.service import MAX_AGGREGATION_ATTEMPTS, Coordinator
from coordinator.store import Store
from coordinator.strategies.base import AdapterState, Aggregation
from coordinator.strategies.fedbuff import FedBuff
from tests.coordinator.test_service import KEY, update

POISON = 13  # samples of the update this strategy cannot aggregate


class Poisoned(FedBuff):
    attempts = 0

    def aggregate(self, current: AdapterState, now: float) -> Aggregation:
        Poisoned.attempts += 1
        if any(u.samples == POISON for u in self.pending()):
            raise FloatingPointError("SVD did not converge")
        return super().aggregate(current, now)


def test_a_failing_update_is_retried_with_backoff_then_quarantined(tmp_path: Path, tiny_bundle: Path) -> None:
    path = tomlfile.write(
        tmp_path / "c.toml",
        {"federation": "t", "bundle": str(tiny_bundle), "database": str(tmp_path / "c.sqlite"),
         "broker": {"url": "mqtt://127.0.0.1:1"}, "strategy": {"k": 2}},
    )  # fmt: skip
    now = [1000.0]
    Poisoned.attempts = 0
    c = Coordinator(ccfg.load(path), strategy=lambda: Poisoned(k=2), clock=lambda: now[0])
    c.store.add_device("dev-1", KEY.hex(), "x86-laptop")
    good = update(tiny_bundle, 0)
    bad = update(tiny_bundle, 0, samples=POISON)
    assert c.handle_update("dev-1", good).accepted
    ack = c.handle_update("dev-1", bad)
    assert ack.accepted  # nothing wrong with it that ingest could see

    for _ in range(20):  # the 0.5 s service loop: no retry storm while backing off
        assert c.aggregate_step() is None
    assert Poisoned.attempts == 1 and c.aggregation_failures == 1
    for n in range(2, MAX_AGGREGATION_ATTEMPTS + 1):
        now[0] += 2.0 ** (n - 1)  # 1 s, then 2 s, ...
        assert c.aggregate_step() is None

    # quarantined: out of the buffer, the reason in the store and in the retained status
    assert [u.update_id for u in c.strategy.pending()] == [protocol.decode_update(good, 1 << 24).update.update_id]
    status = c.status()
    (q,) = status["quarantined"]
    assert q["update_id"] == ack.update_id and q["device_id"] == "dev-1"
    assert "aggregation failed 3 times (FloatingPointError: SVD did not converge)" in q["reason"]
    assert status["aggregation_failures"] == 0 and c.store.stats()["dev-1"]["quarantined"] == 1

    # and the federation goes on: the next good update makes version 1 with both good ones
    assert c.handle_update("dev-1", update(tiny_bundle, 0)).accepted
    published = c.aggregate_step()
    assert published is not None and published.version == 1
    assert c.store.stats()["dev-1"] == {
        "pending": 0,
        "aggregated": 2,
        "rejected": 0,
        "quarantined": 1,
        "bytes": c.store.stats()["dev-1"]["bytes"],
    }

    # a restart does not bring the quarantined update back into the buffer
    c.store.close()
    again = Coordinator(ccfg.load(path), strategy=lambda: Poisoned(k=2), clock=lambda: now[0])
    assert again.strategy.pending() == [] and len(again.status()["quarantined"]) == 1
    again.store.close()


def test_a_store_from_before_quarantine_gains_the_status(tmp_path: Path) -> None:
    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as old:
        old.execute(
            "CREATE TABLE updates (device_id TEXT NOT NULL, update_id TEXT NOT NULL, seq INTEGER NOT NULL, "
            "base_version INTEGER NOT NULL, samples INTEGER NOT NULL, train_loss REAL NOT NULL, "
            "received_at REAL NOT NULL, status TEXT NOT NULL CHECK (status IN ('pending', 'aggregated', 'rejected')), "
            "reason TEXT NOT NULL DEFAULT '', version INTEGER, weight REAL, bytes INTEGER NOT NULL, payload BLOB, "
            "PRIMARY KEY (device_id, update_id))"
        )
        old.execute("INSERT INTO updates VALUES ('d', 'u', 1, 0, 1, 1.0, 5.0, 'pending', '', NULL, NULL, 3, x'00')")
    store = Store(db)
    store.quarantine("d", "u", "why")
    assert store.quarantined() == [{"device_id": "d", "update_id": "u", "received_at": 5.0, "reason": "why"}]
    assert store.stats()["d"]["quarantined"] == 1
    store.close()
