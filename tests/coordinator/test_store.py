"""The SQLite version store keeps the error-feedback residual as factors, and reads old dense rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from alignfed import protocol
from alignfed.lowrank import Factors
from coordinator.store import Store


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
