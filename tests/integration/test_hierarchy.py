"""Two tiers over bridged Mosquittos: a root coordinator, two site coordinators beside their own
brokers, three tiny-model edge daemons per site; every device update reaches a global version."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest

from alignfed import protocol, tomlfile
from alignfed.corpora import DOMAINS, write_domain
from alignfed.topics import Topics
from alignfed.transport import BrokerConfig, Transport
from coordinator import config as ccfg
from coordinator.devices import add_device
from coordinator.site import SiteOutbox
from coordinator.store import Store
from demo.local import DeviceSpec, lay_out
from tests.support.bridge import BridgedMosquitto, bridge_lines
from tests.support.broker import Mosquitto
from tests.support.federation import fast_profile, spawn, wait_for

pytestmark = pytest.mark.integration

SITES = ("site-a", "site-b")
ROUNDS = 3


def logs(root: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(root.glob("*.log")))


def retained_version(url: str, topics: Topics) -> int:
    t = Transport(BrokerConfig(url), "probe", clean_session=True)
    t.subscribe(topics.global_adapter)
    t.start(wait=10)
    try:
        msg = t.get(timeout=10)
        assert msg is not None and msg.retain, "no retained global adapter on the site broker"
        return protocol.decode_global(msg.payload, 1 << 30).version
    finally:
        t.stop()


def test_two_bridged_sites_fold_every_device_update_into_global_versions(tmp_path: Path, tiny_bundle: Path) -> None:
    topics = Topics("fed")
    brokers: list[Mosquitto] = [Mosquitto(tmp_path / "root-broker").start()]
    root_broker = brokers[0]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        root = lay_out(
            tmp_path / "root",
            bundle=tiny_bundle,
            broker_url=root_broker.url,
            devices=[],
            federation="fed",
            strategy={"name": "fedbuff", "k": 1, "server_lr": 1.0},  # sites already buffer
        )
        root_cfg = ccfg.load(root.coordinator_config)
        profile = fast_profile(tmp_path / "p.toml", duty_cycle=0.1, local_steps=6)  # rounds long enough to see versions
        site_dirs: dict[str, Path] = {}
        edges: list[subprocess.Popen[bytes]] = []
        for s_i, site in enumerate(SITES):
            creds = json.loads(add_device(root_cfg, site, "x86-laptop"))  # the site is a device of the root
            broker = BridgedMosquitto(tmp_path / f"{site}-broker", bridge_lines(site, root_broker.port, topics, site))
            brokers.append(broker.start())
            specs = [
                DeviceSpec(
                    f"{site}-dev-{i}",
                    str(profile),
                    write_domain(tmp_path / f"{site}-{i}.jsonl", DOMAINS[(s_i + i) % len(DOMAINS)], 20, seed=i),
                    extra={"max_rounds": ROUNDS, "seed": 10 * s_i + i, "resend_after_s": 5.0},
                )
                for i in range(3)
            ]
            fed = lay_out(tmp_path / site, bundle=tiny_bundle, broker_url=broker.url, devices=specs, federation="fed")
            site_toml = tomlfile.write(
                tmp_path / site / "site.toml",
                {
                    "id": site,
                    "key": creds["key"],
                    "k": 3,
                    "max_wait_s": 3.0,
                    "resend_s": 5.0,
                    "weighting": ("uniform", "fairness")[s_i],
                },  # site-b splits as AlignFed would
            )
            site_dirs[site] = tmp_path / site
            procs.append(
                spawn(
                    "coordinator",
                    "site",
                    "--config",
                    str(fed.coordinator_config),
                    "--site",
                    str(site_toml),
                    log=tmp_path / f"{site}.log",
                )
            )
            edges += [
                spawn("edge", "--config", str(p), log=tmp_path / f"{d}.log") for d, p in fed.device_configs.items()
            ]
        procs.append(spawn("coordinator", "--config", str(root.coordinator_config), log=tmp_path / "root.log"))
        procs += edges
        for e in edges:
            assert e.wait(timeout=300) == 0, logs(tmp_path)

        root_store = Store(tmp_path / "root" / "coordinator" / "coordinator.sqlite")
        outboxes = {s: SiteOutbox(d / "coordinator" / "coordinator.sqlite") for s, d in site_dirs.items()}

        def all_folded() -> bool:
            for site, box in outboxes.items():
                for uid, (outcome, _) in box.outcomes().items():
                    rec = root_store.lookup(site, uid)
                    if outcome != "accepted" or rec is None or rec.status != "aggregated":
                        return False
            return True

        wait_for(all_folded, 60, "every site update accepted and aggregated at the root")
        latest = root_store.latest_version()
        assert latest is not None and latest >= 2
        # the root's store audits clean: versions 0..latest, every site update aggregated, none rejected
        assert all(root_store.has_version(v) for v in range(latest + 1))
        stats = root_store.stats()
        assert set(stats) == set(SITES), stats
        assert all(s["pending"] == 0 and s["rejected"] == 0 and s["aggregated"] >= 1 for s in stats.values()), stats
        for site, box in outboxes.items():
            site_store = Store(site_dirs[site] / "coordinator" / "coordinator.sqlite")
            site_stats = site_store.stats()
            devices = {f"{site}-dev-{i}" for i in range(3)}
            # every device update was accepted at the site and forwarded in exactly one site update
            assert set(site_stats) == devices, site_stats
            assert all(d["aggregated"] == ROUNDS and d["pending"] == d["rejected"] == 0 for d in site_stats.values())
            forwarded = [m for _, members in box.outcomes().values() for m in members]
            assert len(forwarded) == len(set(forwarded)) == 3 * ROUNDS
            # global versions came down the bridge: the site holds the root's newest, retained for its devices,
            # and every device trained on a version the root made after the start
            wait_for(lambda s=site_store: s.latest_version() == root_store.latest_version(), 20, "site mirror")
            assert retained_version(brokers[1 + SITES.index(site)].url, topics) == root_store.latest_version()
            bases = site_store._db.execute("SELECT device_id, MAX(base_version) FROM updates GROUP BY device_id")
            assert all(int(b) >= 1 for _, b in bases), "a device never received a global version from the root"
            site_store.close()
        # fairness by device: the root's strategy saw one update per member device, not one per site
        site_updates = sum(len(box.outcomes()) for box in outboxes.values())
        assert sum(s["aggregated"] for s in stats.values()) == site_updates
        folded = [
            json.loads(m)["buffered"]
            for (m,) in root_store._db.execute("SELECT metrics FROM versions WHERE version > 0")
        ]
        assert sum(folded) == 2 * 3 * ROUNDS and len(folded) == site_updates, folded
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
        for b in brokers:
            b.stop()
