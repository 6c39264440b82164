"""An ingest worker's answer to each update: accept once, answer resends from the store (even when
another worker stored them or the version moved past tau_max), reject bad input without storing it."""

from __future__ import annotations

import dataclasses
import secrets
from pathlib import Path

import pytest

from alignfed import protocol
from alignfed.manifest import load as load_manifest
from alignfed.transport import BrokerConfig
from coordinator.config import CoordinatorConfig
from coordinator.ingest import IngestLimits
from coordinator.pgstore import PgStore
from coordinator.worker import IngestWorker
from tests.support.publisher import UpdatePublisher

pytestmark = pytest.mark.postgres


def _version(store: PgStore, version: int, bundle: str) -> None:
    g = protocol.GlobalAdapter(version, version - 1, bundle, "fedbuff", 0.0, 4, 8.0, {})
    store.save_version(g, protocol.encode_global(g), {}, {})


def test_worker_accepts_once_answers_resends_and_rejects_bad_input(tiny_bundle: Path, postgres_url: str) -> None:
    cfg = CoordinatorConfig(
        federation="f", bundle=tiny_bundle, database=postgres_url, broker=BrokerConfig("mqtt://127.0.0.1:1"),
        limits=IngestLimits(tau_max=1),
    )  # fmt: skip
    admin = PgStore(postgres_url)
    key = secrets.token_bytes(32)
    admin.add_device("dev-1", key.hex(), "x86-laptop")
    w1, w2 = IngestWorker(cfg, "w1"), IngestWorker(cfg, "w2")
    _version(admin, 0, w1.bundle)
    fleet = UpdatePublisher("mqtt://127.0.0.1:1", "f", load_manifest(tiny_bundle), {"dev-1": key}, lambda: 0)
    uid, payload = fleet.make("dev-1", 0)

    first = w1.handle_update("dev-1", payload)
    assert first.accepted and first.reason == "accepted" and first.update_id == uid
    again = w2.handle_update("dev-1", payload)  # the broker redelivered it to the other worker
    assert again.accepted and again.reason == "duplicate"
    assert admin.audit()["pending"] == 1 and admin.lookup("dev-1", uid) is not None

    _version(admin, 1, w1.bundle)
    _version(admin, 2, w1.bundle)  # now base 0 is 2 behind: stale for a new update, not for a resend
    assert w2.handle_update("dev-1", payload).accepted
    _, stale = fleet.make("dev-1", 0)
    answer = w1.handle_update("dev-1", stale)
    assert not answer.accepted and answer.reason.startswith("stale")

    _, fresh = fleet.make("dev-1", 2)
    forged = dataclasses.replace(protocol.decode_update(fresh, 1 << 24).update, samples=10_000)
    bad_sig = protocol.encode_update(forged, b"x" * 32)
    assert "bad signature" in w1.handle_update("dev-1", bad_sig).reason
    assert "unknown device" in w1.handle_update("dev-9", fresh.replace(b"dev-1", b"dev-9")).reason
    assert not w1.handle_update("dev-1", b"\x00garbage").accepted
    assert admin.audit()["pending"] == 1  # nothing rejected was stored
    for store in (w1.store, w2.store, admin):
        store.close()
