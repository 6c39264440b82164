"""A coordinator and three edge daemons, each its own process, over a real Mosquitto broker."""

from __future__ import annotations

import dataclasses
import signal
import uuid
from pathlib import Path

import numpy as np
import pytest

from alignfed import protocol
from alignfed.corpora import write_domain
from alignfed.lowrank import Factors
from alignfed.manifest import bundle_digest
from alignfed.manifest import load as load_manifest
from alignfed.topics import Topics
from alignfed.transport import BrokerConfig, Message, Transport
from coordinator.store import Store
from demo.local import DeviceSpec, lay_out
from tests.support.broker import Mosquitto
from tests.support.federation import domain_devices, fast_profile, read_logs, spawn, stop, wait_for

pytestmark = pytest.mark.integration


STRATEGIES = {
    "fedbuff": {"name": "fedbuff", "k": 3, "server_lr": 1.0},
    # the live AlignFed path: calibration runner (ORT inference), grouping, alignment, fairness
    "alignfed": {"name": "alignfed", "k": 3, "max_wait_s": 5.0, "tau_max": 8},
}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_three_devices_federate(tmp_path: Path, broker: Mosquitto, tiny_bundle: Path, strategy: str) -> None:
    profiles = [
        fast_profile(tmp_path / "fast.toml"),
        fast_profile(tmp_path / "fast.toml"),
        fast_profile(tmp_path / "torch.toml", name="test-torch", trainer="torch"),  # the aarch64 backend
    ]
    wires: list[dict[str, object]] = [  # every wire format, and a truncated delta with device-side error feedback
        {"wire_quantization": "int8"},
        {"wire_quantization": "int8c", "delta_rank": 2},
        {"wire_quantization": "fp32", "wire_codec": "none"},
    ]
    specs = domain_devices(tmp_path, profiles, 4, extras=wires)
    fed = lay_out(
        tmp_path / "fed",
        bundle=tiny_bundle,
        broker_url=broker.url,
        devices=specs,
        strategy=STRATEGIES[strategy],
    )
    coord = spawn("coordinator", "--config", str(fed.coordinator_config), log=tmp_path / "coordinator.log")
    edges = [spawn("edge", "--config", str(p), log=tmp_path / f"{d}.log") for d, p in fed.device_configs.items()]
    try:
        for e in edges:
            assert e.wait(timeout=240) == 0, read_logs(tmp_path)
        store = Store(tmp_path / "fed" / "coordinator" / "coordinator.sqlite")
        wait_for(lambda: (store.latest_version() or 0) >= 3, 60, "global version 3")
        latest = store.latest_version()
        assert latest is not None and latest >= 3
        stats = store.stats()
        for d in fed.device_configs:
            assert stats[d]["aggregated"] + stats[d]["pending"] >= 1, stats  # every device contributed
            assert stats[d]["rejected"] == 0, stats
        # every device measured the global adapters it trained from on its own held-out examples
        evals = store.last_eval_losses()
        assert set(evals) == set(fed.device_configs) and all(np.isfinite(x) and x > 0 for x, _ in evals.values())

        # The retained global adapter a newcomer receives is exactly the newest version in SQLite.
        watcher = Transport(BrokerConfig(broker.url), "watcher-" + uuid.uuid4().hex[:6], clean_session=True)
        watcher.subscribe(Topics("demo").global_adapter)
        watcher.start()
        msg = watcher.get(timeout=10)
        watcher.stop()
        assert msg is not None and msg.retain
        latest = store.latest_version()
        assert latest is not None
        assert msg.payload == store.version(latest)[0]
        g = protocol.decode_global(msg.payload, 1 << 30)
        assert g.version == latest and g.parent_version == latest - 1 and g.strategy == strategy
        assert any(np.abs(t).max() > 0 for k, t in g.tensors.items() if k.endswith(".B"))  # B moved off zero
        assert set(g.metrics["accepted_share"]) == set(fed.device_configs)
        if strategy == "alignfed":
            aligned = [
                grp
                for v in range(1, latest + 1)
                for grp in protocol.decode_global(store.version(v)[0], 1 << 30).metrics["groups"]
                if grp["tau"] > 0
            ]
            # stale groups met the calibration runner: residuals are finite numbers
            assert all(np.isfinite(grp["rho_mean"]) for grp in aligned if grp.get("aligned")), aligned
            # layer 0's input never depends on the adapter: its alignment is the identity (ρ = 0)
            assert all(grp["rho"]["0.q"] == 0.0 == grp["rho"]["0.v"] for grp in aligned if grp.get("aligned"))
        store.close()

        # Each device converted the newest global it saw into a llama.cpp LoRA, and answers with it.
        adapters = sorted((tmp_path / "fed" / "dev-0" / "state" / "adapters").glob("adapter-*.gguf"))
        assert adapters, "the daemon wrote no GGUF adapter"
        gen = spawn(
            "generate",
            "--config",
            str(fed.device_configs["dev-0"]),
            "--max-tokens",
            "8",
            "Hello",
            log=tmp_path / "generate.log",
        )
        assert gen.wait(timeout=60) == 0, read_logs(tmp_path)
    finally:
        stop([*edges, coord])
    assert coord.returncode == 0, read_logs(tmp_path)


def test_malformed_update_gets_reject_ack_and_service_continues(
    tmp_path: Path, broker: Mosquitto, tiny_bundle: Path
) -> None:
    profile = fast_profile(tmp_path / "fast.toml")
    data = write_domain(tmp_path / "d.jsonl", "prose", 10, seed=0)
    fed = lay_out(
        tmp_path / "fed",
        bundle=tiny_bundle,
        broker_url=broker.url,
        devices=[DeviceSpec("dev-1", str(profile), data)],
        strategy={"name": "fedbuff", "k": 1},
    )
    stored_key = Store(tmp_path / "fed" / "coordinator" / "coordinator.sqlite").device_key("dev-1")
    assert stored_key is not None
    key = bytes.fromhex(stored_key.hex())
    coord = spawn("coordinator", "--config", str(fed.coordinator_config), log=tmp_path / "coordinator.log")
    topics = Topics("demo")
    client = Transport(BrokerConfig(broker.url), "tester", clean_session=True)
    client.subscribe(topics.ack("dev-1"))
    client.subscribe(topics.global_status)
    client.start()
    try:
        wait_for(lambda: any(m.topic == topics.global_status for m in drain(client)), 30, "coordinator online")
        acks: list[protocol.Ack] = []

        def next_ack() -> protocol.Ack:
            msg = client.get(timeout=20)
            while msg is not None and msg.topic != topics.ack("dev-1"):
                msg = client.get(timeout=20)
            assert msg is not None, read_logs(tmp_path)
            return protocol.decode_ack(msg.payload)

        # 1) garbage bytes
        client.publish(topics.update("dev-1"), b"\x07not a safetensors payload")
        acks.append(next_ack())
        assert not acks[-1].accepted and "malformed" in acks[-1].reason

        # 2) a well-formed update with NaN in it
        m = load_manifest(tiny_bundle)
        deltas = {
            lid: Factors(u=np.full((o, 2), 0.01, np.float32), v=np.full((2, i), 0.01, np.float32))
            for lid, (o, i) in m.delta_shapes().items()
        }
        good = protocol.AdapterUpdate(
            "dev-1", uuid.uuid4().hex, 1, 0, bundle_digest(m), 4, 1, 1.0, 0.1, "test", 0.0, deltas
        )
        bad_deltas = dict(deltas)
        first = next(iter(bad_deltas))
        bad_deltas[first] = Factors(u=np.full_like(deltas[first].u, np.nan), v=deltas[first].v)
        bad = dataclasses.replace(good, deltas=bad_deltas, update_id="nan-one")
        client.publish(topics.update("dev-1"), protocol.encode_update(bad, key))
        acks.append(next_ack())
        assert not acks[-1].accepted and "non-finite" in acks[-1].reason and acks[-1].update_id == "nan-one"

        # 3) the coordinator still serves: a valid update is accepted and aggregated (k = 1)
        client.publish(topics.update("dev-1"), protocol.encode_update(good, key))
        acks.append(next_ack())
        assert acks[-1].accepted, acks[-1]
        # ... and a QoS-1 style duplicate is answered the same without a second aggregation
        client.publish(topics.update("dev-1"), protocol.encode_update(good, key))
        acks.append(next_ack())
        assert acks[-1].accepted and acks[-1].reason in ("accepted", "duplicate")
        assert coord.poll() is None, read_logs(tmp_path)
    finally:
        client.stop()
        coord.send_signal(signal.SIGTERM)
        coord.wait(timeout=20)
    store = Store(tmp_path / "fed" / "coordinator" / "coordinator.sqlite")
    assert store.latest_version() == 1  # exactly one aggregation: the duplicate changed nothing
    assert store.stats()["dev-1"]["aggregated"] == 1


def drain(t: Transport) -> list[Message]:
    out: list[Message] = []
    while (m := t.get(timeout=0.2)) is not None:
        out.append(m)
    return out
