"""A federation of devices at the bundle's LoRA rank and devices whose profile caps it, over Mosquitto.

The tiny bundle has rank r = 4. dev-0 trains at rank 4 (ORT), dev-1 (ORT) and dev-2 (PyTorch, the
aarch64 backend) are capped at k = 2 by `max_rank` in their profiles. Each process is real (the
coordinator and three edge daemons); a watcher reads every update off the broker to check what the
devices sent.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from alignfed import protocol
from alignfed.topics import Topics
from alignfed.transport import BrokerConfig, Transport
from coordinator.store import Store
from demo.local import lay_out
from tests.support.broker import Mosquitto
from tests.support.federation import domain_devices, fast_profile, read_logs, spawn, stop, wait_for

pytestmark = pytest.mark.integration

RANKS = {"dev-0": 4, "dev-1": 2, "dev-2": 2}


def test_devices_of_mixed_ranks_federate(tmp_path: Path, broker: Mosquitto, tiny_bundle: Path) -> None:
    profiles = [
        fast_profile(tmp_path / "full.toml"),
        fast_profile(tmp_path / "capped.toml", name="test-capped", max_rank=2),
        fast_profile(tmp_path / "capped-torch.toml", name="test-capped-torch", trainer="torch", max_rank=2),
    ]
    wires: list[dict[str, object]] = [
        {"wire_quantization": "int8c"},
        {"wire_quantization": "int8c", "delta_rank": 8},  # asks for more than a rank-2 device has: sends 2k = 4
        {"wire_quantization": "fp32", "wire_codec": "none"},
    ]
    specs = domain_devices(tmp_path, profiles, 3, extras=wires)
    fed = lay_out(
        tmp_path / "fed",
        bundle=tiny_bundle,
        broker_url=broker.url,
        devices=specs,
        strategy={"name": "alignfed", "k": 3, "max_wait_s": 5.0, "tau_max": 8},
    )
    topics = Topics("demo")
    watcher = Transport(BrokerConfig(broker.url), "watcher-" + uuid.uuid4().hex[:6], clean_session=True)
    for device in RANKS:
        watcher.subscribe(topics.update(device))
    watcher.start()
    coord = spawn("coordinator", "--config", str(fed.coordinator_config), log=tmp_path / "coordinator.log")
    edges = [spawn("edge", "--config", str(p), log=tmp_path / f"{d}.log") for d, p in fed.device_configs.items()]
    sent: list[protocol.AdapterUpdate] = []
    try:
        for e in edges:
            assert e.wait(timeout=240) == 0, read_logs(tmp_path)
        store = Store(tmp_path / "fed" / "coordinator" / "coordinator.sqlite")
        wait_for(lambda: (store.latest_version() or 0) >= 3, 60, "global version 3")
        stats = store.stats()
        for d in fed.device_configs:  # every device, capped or not, contributed and none was refused
            assert stats[d]["aggregated"] + stats[d]["pending"] >= 1 and stats[d]["rejected"] == 0, stats
        assert sum(stats[d]["aggregated"] for d in ("dev-1", "dev-2")) >= 1, stats  # capped updates are in a version
        latest = store.latest_version()
        assert latest is not None and latest >= 3
        g = protocol.decode_global(store.version(latest)[0], 1 << 30)
        assert g.rank == 4 and g.parent_version == latest - 1
        assert any(np.abs(t).max() > 0 for k, t in g.tensors.items() if k.endswith(".B"))
        store.close()
        while (msg := watcher.get(timeout=0.5)) is not None:
            sent.append(protocol.decode_update(msg.payload, 1 << 30).update)
    finally:
        watcher.stop()
        stop([*edges, coord])
    assert coord.returncode == 0, read_logs(tmp_path)
    # what travelled: each update states its device's rank, and a rank-k update is at most 2k wide
    assert {u.device_id for u in sent} == set(RANKS)
    for u in sent:
        assert u.rank == RANKS[u.device_id], (u.device_id, u.rank)
        widths = {f.rank for f in u.deltas.values()}
        assert max(widths) <= 2 * u.rank, (u.device_id, widths)
    assert max(f.rank for u in sent if u.device_id == "dev-0" for f in u.deltas.values()) > 4  # full rank uses 2r
