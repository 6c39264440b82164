"""Parallel ingest on PostgreSQL: two workers on an MQTT 5 shared subscription, an elected aggregator
with a standby; a worker and the leading aggregator SIGKILLed mid-run; every acknowledged update is
aggregated exactly once."""

from __future__ import annotations

import secrets
import signal
import subprocess
import time
from pathlib import Path

import psycopg
import pytest

from alignfed import tomlfile
from alignfed.manifest import load as load_manifest
from coordinator.pgstore import PgStore
from tests.support.broker import Mosquitto
from tests.support.federation import spawn, wait_for
from tests.support.publisher import UpdatePublisher

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

DEVICES = [f"dev-{i}" for i in range(6)]
UPDATES, K = 48, 4


def logs(root: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(root.glob("*.log")))


def test_workers_and_aggregator_killed_every_acked_update_aggregated_once(
    tmp_path: Path, broker: Mosquitto, tiny_bundle: Path, postgres_url: str
) -> None:
    cfg = tomlfile.write(
        tmp_path / "coordinator.toml",
        {
            "federation": "scale",
            "bundle": str(tiny_bundle),
            "database": postgres_url,
            "broker": {"url": broker.url},
            "strategy": {"name": "fedbuff", "k": K, "server_lr": 1.0},
        },
    )
    store = PgStore(postgres_url)
    keys = {d: secrets.token_bytes(32) for d in DEVICES}
    for d, key in keys.items():
        store.add_device(d, key.hex(), "x86-laptop")

    def run(role: str, name: str) -> subprocess.Popen[bytes]:
        return spawn("coordinator", role, "--config", str(cfg), "--name", name, log=tmp_path / f"{name}.log")

    def serving(name: str) -> bool:
        log = tmp_path / f"{name}.log"
        return log.exists() and "serving federation" in log.read_text(errors="replace")

    procs: dict[str, subprocess.Popen[bytes]] = {"a1": run("aggregator", "a1")}
    publisher: UpdatePublisher | None = None
    try:
        wait_for(lambda: serving("a1"), 60, "aggregator a1 leading")  # it wrote version 0
        procs["a2"] = run("aggregator", "a2")  # the standby
        procs["w1"], procs["w2"] = run("ingest-worker", "w1"), run("ingest-worker", "w2")
        wait_for(lambda: serving("w1") and serving("w2"), 60, "both workers subscribed")
        publisher = UpdatePublisher(
            broker.url, "scale", load_manifest(tiny_bundle), keys, lambda: store.latest_version() or 0
        ).start()
        killed: dict[str, int] = {}
        first: list[str] = []  # the updates under audit; later ones only fill the last buffer
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if len(first) < UPDATES:
                first.append(publisher.publish(DEVICES[len(first) % len(DEVICES)]))
            publisher.drain_acks()
            acked = publisher.acked()
            n_acked = sum(uid in acked for uid in first)
            if n_acked >= UPDATES // 4 and "a1" not in killed:
                procs["a1"].send_signal(signal.SIGKILL)  # the leader, mid-run
                procs["a1"].wait(timeout=10)
                killed["a1"] = store.latest_version() or 0
            if n_acked >= UPDATES // 2 and "w1" not in killed:
                procs["w1"].send_signal(signal.SIGKILL)  # a worker, mid-run; systemd would restart it
                procs["w1"].wait(timeout=10)
                killed["w1"] = n_acked
                procs["w1"] = run("ingest-worker", "w1")  # same client id: its session's messages come back
            publisher.resend_unacked(after_s=3.0)
            if n_acked == UPDATES:
                waiting = [u for u in first if (r := store.lookup(acked[u].device_id, u)) and r.status == "pending"]
                if not waiting:
                    break
                if len(publisher.sent) - UPDATES < K and time.monotonic() - publisher.sent[first[-1]].sent_at > 1:
                    publisher.publish(DEVICES[len(publisher.sent) % len(DEVICES)])  # fill the last buffer
        acked = publisher.acked()
        assert all(u in acked for u in first), logs(tmp_path)
        assert all(a.accepted for a in acked.values()), [a.reason for a in acked.values() if not a.accepted]
        assert set(killed) == {"a1", "w1"}
        # exactly once: every acked update folded into exactly one version, the version chain unbroken,
        # and the versions hold exactly the acked updates (none twice: the key is (device, update id))
        for uid in first:
            rec = store.lookup(acked[uid].device_id, uid)
            assert rec is not None and rec.status == "aggregated" and rec.version is not None, (
                uid,
                rec,
                logs(tmp_path),
            )
        audit = store.audit()
        assert audit["chain_ok"] and audit["rejected"] == 0, audit
        # a filler may be stored before its ack arrives; nothing stored that was not sent, nothing acked unstored
        assert len(acked) <= audit["aggregated"] + audit["pending"] <= len(publisher.sent), audit
        assert sum(audit["per_version"].values()) == audit["aggregated"] and min(audit["per_version"].values()) >= K
        assert audit["aggregated_without_version"] == 0 and audit["pending_with_version"] == 0
        assert (store.latest_version() or 0) > killed["a1"], "the standby made no version after the leader died"
        with psycopg.connect(postgres_url) as db:
            workers = {r[0] for r in db.execute("SELECT DISTINCT worker FROM updates")}
            stored = {r[0] for r in db.execute("SELECT update_id FROM updates")}
        assert stored <= set(publisher.sent)
        assert workers == {"w1", "w2"}, workers  # the shared subscription spread the load
    finally:
        if publisher is not None:
            publisher.stop()
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
        store.close()
