"""The delta downlink live: a coordinator process publishes quantized deltas over Mosquitto, an edge
daemon reconstructs every version bit for bit, fetches the retained snapshot after a gap and refuses
a delta whose digest does not match."""

from __future__ import annotations

import signal
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest

from alignfed import downlink, protocol
from alignfed.corpora import DOMAINS, write_domain
from alignfed.manifest import load as load_manifest
from alignfed.topics import Topics
from alignfed.transport import BrokerConfig, Transport
from coordinator.store import Store
from demo.local import DeviceSpec, lay_out
from edge import config as edge_config
from edge.daemon import EdgeDaemon
from tests.support.broker import Mosquitto
from tests.support.federation import fast_profile, spawn, wait_for
from tests.support.publisher import UpdatePublisher

pytestmark = pytest.mark.integration


def _stored(store: Store, version: int) -> protocol.GlobalAdapter:
    return protocol.decode_global(store.version(version)[0], 1 << 30)


def _until(daemon: EdgeDaemon, what: str, predicate: object, timeout: float = 10) -> None:
    """Handle the device's messages until `predicate()` holds."""

    def done() -> bool:
        daemon._drain(timeout=0.1)
        return bool(predicate())  # type: ignore[operator]

    wait_for(done, timeout, what, poll=0)


def _follow(daemon: EdgeDaemon, version: int, timeout: float = 30) -> None:
    def caught_up() -> bool:
        daemon._drain(timeout=0.1)
        return daemon._version() == version

    wait_for(caught_up, timeout, f"the device at v{version}", poll=0)


def test_device_follows_deltas_falls_back_to_the_snapshot_and_refuses_a_bad_digest(
    tmp_path: Path, broker: Mosquitto, tiny_bundle: Path
) -> None:
    profile = fast_profile(tmp_path / "fast.toml")
    data = write_domain(tmp_path / "data.jsonl", DOMAINS[0], 12, seed=0)
    fed = lay_out(
        tmp_path / "fed",
        bundle=tiny_bundle,
        broker_url=broker.url,
        devices=[DeviceSpec(d, str(profile), data) for d in ("pub", "dev")],
        strategy={"name": "fedbuff", "k": 1, "server_lr": 1.0},  # a version per update
    )
    store = Store(tmp_path / "fed" / "coordinator" / "coordinator.sqlite")
    coord = spawn("coordinator", "--config", str(fed.coordinator_config), log=tmp_path / "coordinator.log")
    key = edge_config.load(fed.device_configs["pub"]).key
    publisher: UpdatePublisher | None = None
    daemons: list[EdgeDaemon] = []

    def device() -> EdgeDaemon:
        d = EdgeDaemon(edge_config.load(fed.device_configs["dev"]))
        d.subscribe()
        d.transport.start(wait=10)
        daemons.append(d)
        return d

    def new_version() -> int:
        assert publisher is not None
        before = store.latest_version() or 0
        publisher.publish("pub")
        wait_for(lambda: (store.latest_version() or 0) > before, 30, f"version {before + 1}")
        return before + 1

    def holds_what_the_coordinator_holds(d: EdgeDaemon, version: int) -> None:
        assert d.global_adapter is not None and d.global_adapter.version == version
        want = _stored(store, version).tensors
        assert protocol.adapter_digest(d.global_adapter.tensors) == protocol.adapter_digest(want)
        for name, t in want.items():
            np.testing.assert_array_equal(d.global_adapter.tensors[name], t)

    try:
        wait_for(lambda: "serving federation" in (tmp_path / "coordinator.log").read_text(), 60, "the coordinator")
        publisher = UpdatePublisher(
            broker.url, "demo", load_manifest(tiny_bundle), {"pub": key}, lambda: store.latest_version() or 0
        ).start()
        # a device without a base takes the retained snapshot, then follows deltas only
        dev = device()
        _follow(dev, 0)
        assert dev.stats.snapshots == 1 and not dev._snapshots
        for _ in range(3):
            v = new_version()
            _follow(dev, v)
            holds_what_the_coordinator_holds(dev, v)
        assert (dev.stats.snapshots, dev.stats.deltas) == (1, 3)
        assert dev.global_adapter is not None
        assert any(np.abs(t).max() > 0 for k, t in dev.global_adapter.tensors.items() if k.endswith(".B"))
        # the deltas are what travelled: each far smaller than the snapshot retained beside it
        watcher = Transport(BrokerConfig(broker.url), "watcher-" + uuid.uuid4().hex[:6], clean_session=True)
        watcher.subscribe(Topics("demo").global_delta)
        watcher.start()
        retained = watcher.get(timeout=10)
        watcher.stop()
        assert retained is not None and retained.retain
        d3 = protocol.decode_global_delta(retained.payload, 1 << 30)
        assert (d3.version, d3.parent_version, d3.quantization) == (3, 2, "int4c")
        assert len(retained.payload) < 0.5 * len(store.version(3)[0])

        # down while a version is made: its persistent session keeps the delta, which chains on restart
        dev.transport.stop()
        v = new_version()
        dev = device()
        assert dev._version() == 3
        _follow(dev, v)
        holds_what_the_coordinator_holds(dev, v)
        assert (dev.stats.snapshots, dev.stats.deltas, dev.stats.fallbacks) == (0, 1, 0)

        # a gap: the session is lost (a clean connect under its client id ends it) while two versions
        # are made; on restart the retained delta (v6 from v5) does not chain on its saved v4, and it
        # takes the retained snapshot of v6
        dev.transport.stop()
        wipe = Transport(BrokerConfig(broker.url), "alignfed-dev", clean_session=True)
        wipe.start()
        wipe.stop()
        new_version()
        v = new_version()
        dev = device()
        assert dev._version() == 4
        _follow(dev, v)
        holds_what_the_coordinator_holds(dev, v)
        assert (dev.stats.snapshots, dev.stats.deltas, dev.stats.fallbacks) == (1, 0, 1)
        _until(dev, "the snapshot unsubscribed", lambda: not dev._snapshots)
        v = new_version()
        _follow(dev, v)
        holds_what_the_coordinator_holds(dev, v)
        assert dev.stats.deltas == 1

        # a delta that chains but whose result is not what the coordinator holds (its digest says
        # so) is never trained on: the device fetches the snapshot and keeps the true v
        held = dev.global_adapter
        assert held is not None
        changes = {n: np.full_like(t, 0.5) for n, t in held.tensors.items()}
        forged = protocol.GlobalDelta(
            version=v + 1,
            parent_version=v,
            bundle=held.bundle,
            strategy="fedbuff",
            created_at=0.0,
            rank=held.rank,
            alpha=held.alpha,
            quantization="fp32",
            digest=protocol.adapter_digest(held.tensors),  # not that of held + changes
            wire=protocol.quantize_changes(changes, "fp32"),
        )
        assert downlink.follow(v, held.tensors, forged)[0] is downlink.Outcome.MISMATCH
        publisher.transport.publish(Topics("demo").global_delta, protocol.encode_global_delta(forged), retain=False)
        _until(dev, "the delta refused", lambda: dev.stats.fallbacks == 2)
        _until(dev, "the snapshot received", lambda: not dev._snapshots)
        holds_what_the_coordinator_holds(dev, v)
        assert (dev.stats.snapshots, dev.stats.deltas) == (1, 1)  # the snapshot of v was no news: not taken
    finally:
        for d in daemons:
            d.transport.stop()
        if publisher is not None:
            publisher.stop()
        coord.send_signal(signal.SIGTERM)
        try:
            coord.wait(timeout=20)
        except subprocess.TimeoutExpired:
            coord.kill()
        store.close()
    assert coord.returncode == 0, (tmp_path / "coordinator.log").read_text()[-3000:]
