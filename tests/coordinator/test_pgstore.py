"""The PostgreSQL store: versioned schema, idempotent records, all-or-nothing versions, one leader."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest

from alignfed import protocol
from alignfed.errors import ConfigError
from alignfed.lowrank import Factors
from coordinator.backend import open_store
from coordinator.pgstore import MIGRATIONS, PgStore
from coordinator.storage import StoreConflict
from tests.support.messages import adapter_update
from tests.support.postgres import LocalCluster, fresh_database

pytestmark = pytest.mark.postgres


def _adapter(version: int) -> protocol.GlobalAdapter:
    return protocol.GlobalAdapter(
        version=version,
        parent_version=version - 1,
        bundle="b",
        strategy="fedbuff",
        created_at=1.0,
        rank=2,
        alpha=4.0,
        tensors={"lora.0.q.A": np.ones((2, 5), np.float32), "lora.0.q.B": np.zeros((6, 2), np.float32)},
    )


def _save(store: PgStore, version: int, used: dict[str, tuple[str, float]] | None = None) -> None:
    g = _adapter(version)
    store.save_version(g, protocol.encode_global(g), {}, used or {})


def test_schema_is_versioned_and_migrated_once(postgres_url: str) -> None:
    store = PgStore(postgres_url)
    assert store.schema_version() == MIGRATIONS[-1][0]
    store.close()
    again = PgStore(postgres_url)  # a second start applies nothing twice (it would fail: tables exist)
    assert again.schema_version() == MIGRATIONS[-1][0]
    again._db.execute("INSERT INTO schema_version VALUES (999, 0)")
    again.close()
    with pytest.raises(ConfigError, match="schema version 999 is newer"):
        PgStore(postgres_url)


def test_open_store_picks_postgres_for_a_url_and_residuals_round_trip(postgres_url: str) -> None:
    store = open_store(postgres_url)
    assert isinstance(store, PgStore)
    rng = np.random.default_rng(0)
    residual = {
        "0.q": Factors(u=rng.normal(size=(6, 3)).astype(np.float32), v=rng.normal(size=(3, 5)).astype(np.float32))
    }
    g = _adapter(0)
    store.save_version(g, protocol.encode_global(g), residual, {})
    encoded, back = store.version(0)
    assert encoded == protocol.encode_global(g) and store.latest_version() == 0 and store.has_version(0)
    np.testing.assert_array_equal(back["0.q"].u, residual["0.q"].u)
    np.testing.assert_array_equal(back["0.q"].v, residual["0.q"].v)


def test_records_are_idempotent_and_versions_fold_each_update_once(postgres_url: str) -> None:
    store = PgStore(postgres_url, worker="w1")
    _save(store, 0)
    u1, u2 = adapter_update(update_id="u1", base_version=0), adapter_update(update_id="u2", base_version=0)
    store.record(u1, b"p1", 1.0, status="pending")
    store.record(u1, b"other", 2.0, status="pending")  # a duplicate changes nothing
    store.record(u2, b"p2", 3.0, status="pending")
    assert store.pending() == [(b"p1", 1.0), (b"p2", 3.0)]
    assert store.pending_keys() == [("dev-1", "u1"), ("dev-1", "u2")]
    _save(store, 1, {"u1": ("dev-1", 0.5)})
    rec = store.lookup("dev-1", "u1")
    assert rec is not None and (rec.status, rec.version) == ("aggregated", 1)
    # a deposed leader replaying the same fold: the version exists
    with pytest.raises(StoreConflict, match="version 1 already exists"):
        _save(store, 1, {"u1": ("dev-1", 0.5)})
    # a new version that would fold u1 a second time is refused as a whole: v2 is not written, u2 stays pending
    with pytest.raises(StoreConflict, match="u1 of dev-1 is no longer pending"):
        _save(store, 2, {"u2": ("dev-1", 0.5), "u1": ("dev-1", 0.5)})
    assert store.latest_version() == 1
    pending = store.lookup("dev-1", "u2")
    assert pending is not None and pending.status == "pending"
    audit = store.audit()
    assert audit["chain_ok"] and audit["aggregated"] == 1 and audit["pending"] == 1
    assert audit["aggregated_without_version"] == 0 and audit["per_version"] == {1: 1}


def test_one_leader_at_a_time_and_the_lock_dies_with_its_connection(postgres_url: str) -> None:
    a, b = PgStore(postgres_url), PgStore(postgres_url)
    assert a.try_lead() and a.still_leading()
    assert not b.try_lead() and not b.still_leading()
    a._db.close()  # what a SIGKILL does to the leader's session
    assert not a.still_leading()
    assert b.try_lead()


def test_a_fresh_machine_gets_its_own_cluster() -> None:
    """With no server configured the tests start one: initdb + pg_ctl on a free port."""
    cluster = LocalCluster().start()
    try:
        with fresh_database(cluster.admin_url) as url:
            assert PgStore(url).schema_version() == MIGRATIONS[-1][0]
            with psycopg.connect(url) as db:
                assert db.execute("SELECT current_setting('port')").fetchone() == (str(cluster.port),)
    finally:
        cluster.stop()


def test_quarantine_and_device_removal_work_on_postgres_too(postgres_url: str) -> None:
    """The coordinator's quarantine (an aggregation that keeps failing) and remove-device on PgStore."""
    store = PgStore(postgres_url)
    store.add_device("dev-1", "00" * 32, "x86-laptop")
    store.record(adapter_update(), b"p1", 1.0, status="pending")
    store.quarantine("dev-1", "u1", "quarantined: aggregation failed 3 times")
    assert store.pending() == []
    (row,) = store.quarantined()
    assert (row["device_id"], row["update_id"]) == ("dev-1", "u1")
    assert row["reason"] == "quarantined: aggregation failed 3 times"
    looked_up = store.lookup("dev-1", "u1")
    assert looked_up is not None and looked_up.status == "quarantined"
    assert store.remove_device("dev-1") and not store.remove_device("dev-1")
    assert store.device_key("dev-1") is None
    store.close()
