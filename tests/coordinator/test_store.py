"""The SQLite version store keeps the error-feedback residual as factors, and reads old dense rows."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

from alignfed import protocol
from alignfed.lowrank import Factors
from coordinator.store import Store
from tests.support.messages import adapter_update


def _adapter(version: int) -> protocol.GlobalAdapter:
    a = np.ones((2, 5), np.float32)
    return protocol.GlobalAdapter(
        version=version,
        parent_version=version - 1,
        bundle="b",
        strategy="fedbuff",
        created_at=1.0,
        rank=2,
        alpha=4.0,
        tensors={"lora.0.q.A": a, "lora.0.q.B": np.zeros((6, 2), np.float32)},
    )


def test_residual_factors_round_trip_through_sqlite(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    residual = {
        "0.q": Factors(u=rng.normal(size=(6, 3)).astype(np.float32), v=rng.normal(size=(3, 5)).astype(np.float32)),
        "0.v": Factors(u=np.zeros((4, 0), np.float32), v=np.zeros((0, 5), np.float32)),  # nothing deferred
    }
    store = Store(tmp_path / "c.sqlite")
    g = _adapter(1)
    store.save_version(g, protocol.encode_global(g), residual, {})
    store.close()
    encoded, back = Store(tmp_path / "c.sqlite").version(1)
    assert encoded == protocol.encode_global(g)
    assert set(back) == {"0.q", "0.v"}
    np.testing.assert_array_equal(back["0.q"].u, residual["0.q"].u)
    np.testing.assert_array_equal(back["0.q"].v, residual["0.q"].v)
    assert back["0.v"].dense().shape == (4, 5) and back["0.v"].rank == 0


def test_a_dense_residual_from_an_older_store_reads_back_as_exact_factors(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.sqlite")
    g = _adapter(1)
    dense = np.random.default_rng(1).normal(size=(6, 5)).astype(np.float32)
    store.save_version(g, protocol.encode_global(g), {}, {})
    store._db.execute("UPDATE versions SET residual = ? WHERE version = 1", (protocol.pack({"0.q": dense}, {}),))
    _, back = store.version(1)
    np.testing.assert_allclose(back["0.q"].dense(), dense, atol=1e-5)


def _update(device: str, uid: str, base: int, eval_loss: float) -> protocol.AdapterUpdate:
    return adapter_update(device_id=device, update_id=uid, base_version=base, eval_loss=eval_loss)


def test_newest_held_out_loss_per_device(tmp_path: Path) -> None:
    store = Store(tmp_path / "c.sqlite")
    store.record(_update("a", "1", 0, 2.5), b"x", 1.0, status="pending")
    store.record(_update("a", "2", 1, 2.25), b"x", 2.0, status="pending")
    store.record(_update("a", "3", 2, float("nan")), b"x", 3.0, status="pending")  # not measured: keep 2.25
    store.record(_update("b", "1", 1, 3.5), b"x", 2.5, status="pending")
    store.record(_update("b", "2", 0, 9.0), b"", 4.0, status="rejected", reason="stale")
    assert store.last_eval_losses() == {"a": (2.25, 1), "b": (3.5, 1)}


def test_a_store_from_before_eval_losses_gains_the_column(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE updates DROP COLUMN eval_loss")  # the schema older coordinators wrote
    db.execute(
        "INSERT INTO updates (device_id, update_id, seq, base_version, samples, train_loss, received_at, status, "
        "bytes) VALUES ('a', '1', 1, 0, 4, 3.0, 1.0, 'aggregated', 10)"
    )
    db.commit()
    db.close()
    store = Store(path)
    assert store.last_losses() == {"a": 3.0} and store.last_eval_losses() == {}
    store.record(_update("a", "2", 1, 2.0), b"x", 2.0, status="pending")
    assert store.last_eval_losses() == {"a": (2.0, 1)}
