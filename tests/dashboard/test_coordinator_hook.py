"""The coordinator's observer hook (no broker): what it reports after ingest, reject and aggregation."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np

from alignfed import protocol, tomlfile
from alignfed.lowrank import Factors
from alignfed.manifest import bundle_digest
from alignfed.manifest import load as load_manifest
from coordinator import config as ccfg
from coordinator.service import Coordinator
from dashboard import feed

KEY = bytes(range(32))


def signed_update(bundle: Path, base_version: int, eval_loss: float) -> bytes:
    m = load_manifest(bundle)
    deltas = {
        lid: Factors(u=np.full((o, 2), 0.01, np.float32), v=np.full((2, i), 0.01, np.float32))
        for lid, (o, i) in m.delta_shapes().items()
    }
    msg = protocol.AdapterUpdate("dev-1", uuid.uuid4().hex, 1, base_version, bundle_digest(m), 4, 1, 1.0, 0.5,
                                 "x86-laptop", 0.0, deltas, eval_loss)  # fmt: skip
    return protocol.encode_update(msg, KEY)


def test_observer_hears_accepts_rejects_and_versions(tmp_path: Path, tiny_bundle: Path) -> None:
    path = tomlfile.write(
        tmp_path / "c.toml",
        {"federation": "t", "bundle": str(tiny_bundle), "database": str(tmp_path / "c.sqlite"),
         "broker": {"url": "mqtt://127.0.0.1:1"}, "strategy": {"name": "fedbuff", "k": 1},
         "dashboard": {"enabled": False}},
    )  # fmt: skip
    cfg = ccfg.load(path)
    assert not cfg.dashboard.enabled
    events: list[feed.Event] = []
    c = Coordinator(cfg, observer=events.append)
    c.store.add_device("dev-1", KEY.hex(), "x86-laptop")
    payload = signed_update(tiny_bundle, 0, eval_loss=2.5)
    assert c.handle_update("dev-1", payload).accepted
    assert not c.handle_update("dev-1", b"garbage").accepted
    assert c.maybe_aggregate() is not None
    accepted, rejected, version = events
    assert accepted == feed.UpdateReceived(
        accepted.at, "dev-1", True, "accepted", len(payload), 0, 1.0, 2.5, 0
    )  # τ 0, train loss, and the held-out loss of the version it trained from
    assert isinstance(rejected, feed.UpdateReceived) and not rejected.accepted
    assert rejected.reason.startswith("malformed") and rejected.nbytes == len(b"garbage")
    assert isinstance(version, feed.VersionPublished)
    assert (version.version, version.parent, version.strategy, version.devices) == (1, 0, "fedbuff", ("dev-1",))
    assert version.aggregation_s is not None and version.aggregation_s >= 0 and version.nbytes > 0
    assert version.alignment_s is None  # FedBuff does not align


def test_a_failing_observer_does_not_stop_ingest(tmp_path: Path, tiny_bundle: Path) -> None:
    path = tomlfile.write(
        tmp_path / "c.toml",
        {"federation": "t", "bundle": str(tiny_bundle), "database": str(tmp_path / "c.sqlite"),
         "broker": {"url": "mqtt://127.0.0.1:1"}, "strategy": {"name": "fedbuff", "k": 1}},
    )  # fmt: skip

    def broken(event: feed.Event) -> None:
        raise RuntimeError("display down")

    c = Coordinator(ccfg.load(path), observer=broken)
    c.store.add_device("dev-1", KEY.hex(), "x86-laptop")
    assert c.handle_update("dev-1", signed_update(tiny_bundle, 0, eval_loss=2.5)).accepted
    assert c.maybe_aggregate() is not None
