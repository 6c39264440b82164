"""No accepted update is lost when the coordinator is SIGKILLed or the broker restarts."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignfed import tomlfile
from alignfed.corpora import DOMAINS, write_domain
from coordinator.store import Store
from demo.local import DeviceSpec, lay_out
from tests.integration.conftest import FIGURES
from tests.support.broker import Mosquitto
from tests.support.federation import REPO, domain_devices, fast_profile, read_logs, spawn, wait_for

pytestmark = pytest.mark.integration

ROUNDS = 6


def test_coordinator_kill_and_broker_restart_lose_nothing(tmp_path: Path, broker: Mosquitto, tiny_bundle: Path) -> None:
    # slower rounds (duty cycle) so the outages happen while devices are mid-run
    profile = fast_profile(tmp_path / "p.toml", duty_cycle=0.1, local_steps=10)
    specs = domain_devices(tmp_path, [profile] * 2, ROUNDS, examples=20, extras=[{"resend_after_s": 3.0}] * 2)
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
            assert e.wait(timeout=180) == 0, read_logs(tmp_path, tail=2500)
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


# -- chaos with an audit ----------------------------------------------------------------------------

CHAOS_SLOW = bool(os.environ.get("ALIGNFED_CHAOS_SLOW"))  # 100 / 20 / 20 kills instead of 30 / 5 / 6
COORDINATOR_KILLS = 100 if CHAOS_SLOW else 30
BROKER_KILLS = 20 if CHAOS_SLOW else 5
DEVICE_KILLS = 20 if CHAOS_SLOW else 6
CHAOS_DEVICES = 3
CHAOS_PERIOD_S = 2.5  # seconds between a device's updates: they keep coming for most of the chaos


def chaos_device(
    state: Path, broker: Mosquitto, device_id: str, key: str, n: int, bundle: Path
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OPENBLAS_NUM_THREADS": "1"}
    state.parent.mkdir(parents=True, exist_ok=True)
    log = open(state.parent / f"{device_id}.log", "ab")  # noqa: SIM115 - handed to the child
    args = [sys.executable, "-m", "tests.integration.chaos_device", str(state), broker.url, "chaos", device_id, key,
            str(n), str(bundle), str(CHAOS_PERIOD_S)]  # fmt: skip
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def jsonl(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_chaos_audit(tmp_path: Path, broker: Mosquitto, tiny_bundle: Path) -> None:
    """SIGKILL the coordinator at random points, kill -9 and restart Mosquitto (persistence on),
    SIGKILL devices mid-publish, while devices publish; then audit the store against the acks
    every device received: every acknowledged update aggregated exactly once, no version gap,
    nothing lost. Devices are light (chaos_device.py: the daemon's outbox and publish path, no
    training) so the chaos fits CI; the real daemons get the same treatment, less often, above."""
    rng = random.Random(10)
    per_device = 24 if not CHAOS_SLOW else 80
    data = write_domain(tmp_path / "unused.jsonl", DOMAINS[0], 2, seed=0)  # flash checks it; chaos devices don't train
    fed = lay_out(
        tmp_path / "fed", bundle=tiny_bundle, broker_url=broker.url, federation="chaos",
        devices=[DeviceSpec(f"dev-{i}", "x86-laptop", data) for i in range(CHAOS_DEVICES)],
        strategy={"name": "fedbuff", "k": 2}, ingest={"tau_max": 1000},
    )  # fmt: skip
    keys = {d: str(tomlfile.read(p)["key"]) for d, p in fed.device_configs.items()}
    states = {d: tmp_path / "chaos" / d for d in keys}
    devices = {d: chaos_device(states[d], broker, d, keys[d], per_device, tiny_bundle) for d in keys}
    counts = {"coordinator SIGKILLs": 0, "broker kill -9 + restart": 0, "device SIGKILLs": 0}
    broker_at = set(rng.sample(range(COORDINATOR_KILLS), BROKER_KILLS))
    device_at = set(rng.sample(range(COORDINATOR_KILLS), DEVICE_KILLS))
    started = time.monotonic()
    coord = None
    try:
        for i in range(COORDINATOR_KILLS):
            log = tmp_path / f"coordinator-{i}.log"
            coord = spawn("coordinator", "--config", str(fed.coordinator_config), log=log)
            if rng.random() < 0.2:  # killed while starting (restoring the buffer, connecting, ...)
                time.sleep(rng.uniform(0.2, 2.0))
            else:  # killed at a random point of serving traffic
                deadline = time.monotonic() + 8
                while "coordinator serving" not in log.read_text() and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(rng.uniform(0.0, 1.0))
            if i in device_at:
                d = rng.choice(sorted(devices))
                devices[d].send_signal(signal.SIGKILL)
                devices[d].wait(timeout=10)
                devices[d] = chaos_device(states[d], broker, d, keys[d], per_device, tiny_bundle)
                counts["device SIGKILLs"] += 1
            if i in broker_at:
                broker.stop(kill=True)
                time.sleep(rng.uniform(0.1, 0.5))
                broker.start()
                counts["broker kill -9 + restart"] += 1
            coord.send_signal(signal.SIGKILL)
            coord.wait(timeout=10)
            counts["coordinator SIGKILLs"] += 1
        chaos_s = time.monotonic() - started
        coord = spawn("coordinator", "--config", str(fed.coordinator_config), log=tmp_path / "coordinator-final.log")
        for d, p in devices.items():
            assert p.wait(timeout=120) == 0, (tmp_path / "chaos" / f"{d}.log").read_text()[-2000:]
    finally:
        for p in [*devices.values(), *([coord] if coord else [])]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=20)

    store = Store(tmp_path / "fed" / "coordinator" / "coordinator.sqlite")
    db = store._db
    made = {d: [r["update_id"] for r in jsonl(states[d] / "made.jsonl")] for d in keys}
    acked = {d: {str(r["update_id"]): r for r in jsonl(states[d] / "acks.jsonl")} for d in keys}
    for d in keys:
        # nothing lost: every update a device made was answered, and it made exactly what it was asked to
        assert len(made[d]) == len(set(made[d])) == per_device, d
        assert set(acked[d]) == set(made[d]), f"{d}: {len(set(made[d]) - set(acked[d]))} updates never answered"
        rows = dict(db.execute("SELECT update_id, status FROM updates WHERE device_id = ?", (d,)).fetchall())
        for uid, ack in acked[d].items():
            if ack["accepted"]:  # every acknowledged update is in the store, aggregated or still buffered
                assert rows.get(uid) in ("aggregated", "pending"), (d, uid, ack, rows.get(uid))
            else:
                assert rows.get(uid) in (None, "rejected"), (d, uid, ack, rows.get(uid))
        # and the store accepted nothing the device was not told about
        assert {u for u, s in rows.items() if s in ("aggregated", "pending")} == {
            u for u, a in acked[d].items() if a["accepted"]
        }
    # no version gap, each version built on the one before
    versions = db.execute("SELECT version, parent, metrics FROM versions ORDER BY version").fetchall()
    assert [v for v, _, _ in versions] == list(range(len(versions)))
    assert all(parent == v - 1 for v, parent, _ in versions)
    # exactly once: each version folded in exactly the updates that point to it, none twice
    for v, _, metrics in versions[1:]:
        used = db.execute("SELECT COUNT(*) FROM updates WHERE version = ? AND status = 'aggregated'", (v,)).fetchone()
        assert len(json.loads(metrics)["weights"]) == used[0], f"version {v}"
    pending = db.execute("SELECT COUNT(*) FROM updates WHERE status = 'pending'").fetchone()[0]
    assert pending < 2  # k = 2: at most one left waiting for a partner
    accepted = sum(bool(a["accepted"]) for acks in acked.values() for a in acks.values())
    rejected = sum(not a["accepted"] for acks in acked.values() for a in acks.values())
    store.close()
    served = sum("coordinator serving" in p.read_text() for p in tmp_path.glob("coordinator-*.log"))
    FIGURES.append(
        f"chaos: {counts['coordinator SIGKILLs']} coordinator SIGKILLs, {counts['broker kill -9 + restart']} broker "
        f"kill -9 + restarts, {counts['device SIGKILLs']} device SIGKILLs in {chaos_s:.0f} s "
        f"({served} of {COORDINATOR_KILLS + 1} coordinator runs got to serving); "
        f"{CHAOS_DEVICES * per_device} updates made, {accepted} acknowledged accepted, {rejected} rejected, "
        f"{len(versions) - 1} versions, {pending} pending; audit: every acknowledged update aggregated exactly once "
        f"(or buffered), no version gap, nothing lost"
    )
