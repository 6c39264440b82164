"""No accepted update is lost when the coordinator is SIGKILLed or the broker restarts."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from alignfed.corpora import DOMAINS, write_domain
from coordinator.store import Store
from demo.local import DeviceSpec, lay_out
from tests.support.broker import Mosquitto
from tests.support.federation import fast_profile, spawn, wait_for

pytestmark = pytest.mark.integration

ROUNDS = 6


def logs(root: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(root.glob("*.log")))


def test_coordinator_kill_and_broker_restart_lose_nothing(tmp_path: Path, broker: Mosquitto, tiny_bundle: Path) -> None:
    # slower rounds (duty cycle) so the outages happen while devices are mid-run
    profile = fast_profile(tmp_path / "p.toml", duty_cycle=0.1, local_steps=10)
    specs = [
        DeviceSpec(
            f"dev-{i}",
            str(profile),
            write_domain(tmp_path / f"d{i}.jsonl", DOMAINS[i], 20, seed=i),
            extra={"max_rounds": ROUNDS, "seed": i, "resend_after_s": 3.0},
        )
        for i in range(2)
    ]
    fed = lay_out(
        tmp_path / "fed", bundle=tiny_bundle, broker_url=broker.url, devices=specs, strategy={"name": "fedbuff", "k": 2}
    )
    db = tmp_path / "fed" / "coordinator" / "coordinator.sqlite"
    store = Store(db)

    def accepted() -> int:
        s = store.stats()
        return sum(d["pending"] + d["aggregated"] for d in s.values())

    coord = spawn("coordinator", "--config", str(fed.coordinator_config), log=tmp_path / "coordinator-1.log")
    edges = [spawn("edge", "--config", str(p), log=tmp_path / f"{d}.log") for d, p in fed.device_configs.items()]
    try:
        wait_for(lambda: accepted() >= 2, 60, "first updates")
        coord.send_signal(signal.SIGKILL)  # no chance to clean up
        coord.wait(timeout=10)
        time.sleep(1.0)
        coord = spawn("coordinator", "--config", str(fed.coordinator_config), log=tmp_path / "coordinator-2.log")
        wait_for(lambda: accepted() >= 4, 60, "updates after the coordinator restart")
        assert all(e.poll() is None for e in edges), "devices finished before the broker outage"
        broker.stop()
        time.sleep(1.5)  # devices keep training; their updates wait in the outbox
        broker.start()  # same port, persistent sessions
        for e in edges:
            assert e.wait(timeout=180) == 0, logs(tmp_path)
        wait_for(lambda: accepted() == 2 * ROUNDS, 60, f"all {2 * ROUNDS} updates accepted")
    finally:
        for p in [*edges, coord]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=20)
    stats = store.stats()
    assert {d: s["rejected"] for d, s in stats.items()} == {"dev-0": 0, "dev-1": 0}
    assert sum(s["pending"] + s["aggregated"] for s in stats.values()) == 2 * ROUNDS  # no loss, no double count
    for d in fed.device_configs:
        assert not list((tmp_path / "fed" / d / "state" / "outbox").glob("*.update")), f"{d} still holds updates"
    latest = store.latest_version()
    assert latest is not None and latest >= ROUNDS - 1  # k = 2: one version per two updates, give or take the tail
    store.close()
