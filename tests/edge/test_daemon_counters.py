"""Issue 10, defect 6: a device's summary never reports more acks than publishes, across restarts."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from alignfed import protocol
from alignfed.corpora import DOMAINS, write_domain
from alignfed.manifest import bundle_digest
from alignfed.manifest import load as load_manifest
from alignfed.topics import Topics
from alignfed.transport import BrokerConfig, Transport
from edge import config
from edge.daemon import EdgeDaemon
from tests.edge.test_config import write
from tests.support.broker import Mosquitto
from tests.support.federation import fast_profile


def daemon(tmp_path: Path, bundle: Path) -> EdgeDaemon:
    profile = fast_profile(tmp_path / "p.toml")
    data = write_domain(tmp_path / "d.jsonl", DOMAINS[0], 8, seed=0)
    cfg = config.load(write(tmp_path, bundle=str(bundle), data=str(data), profile=str(profile), state_dir="state"))
    d = EdgeDaemon(cfg)
    d.transport.publish = lambda *a, **k: False  # type: ignore[method-assign]  # the broker is down
    return d


def update(d: EdgeDaemon) -> protocol.AdapterUpdate:
    m = load_manifest(d.cfg.bundle)
    return protocol.AdapterUpdate(
        "dev-1", uuid.uuid4().hex, d._next_seq(), 0, bundle_digest(m), 2, 1, 1.0, 0.1, "test-fast", 0.0, {}
    )


@pytest.mark.parametrize("crash_before_counting", [False, True])
def test_acks_after_a_restart_never_exceed_publishes(
    tmp_path: Path, tiny_bundle: Path, crash_before_counting: bool
) -> None:
    first = daemon(tmp_path, tiny_bundle)
    sent = [update(first) for _ in range(3)]
    for u in sent:
        first.publish(u)  # into the outbox; no ack comes before the "reboot"
    if crash_before_counting:  # killed after the outbox write, before the counters were saved
        (tmp_path / "state" / "state.json").write_text('{"seq": 3}')
    first.transport.stop()

    second = daemon(tmp_path, tiny_bundle)  # restart: the outbox is resent, the acks arrive now
    for i, u in enumerate(sent):
        second._on_ack(protocol.encode_ack(protocol.Ack("dev-1", u.update_id, i != 2, "accepted", 1)))
    s = second.stats
    assert (s.published, s.acked, s.rejected) == (3, 2, 1)
    assert s.acked + s.rejected <= s.published
    second.transport.stop()

    third = daemon(tmp_path, tiny_bundle)  # and the counts survive one more restart
    assert (third.stats.published, third.stats.acked, third.stats.rejected) == (3, 2, 1)
    third.transport.stop()


def test_device_status_goes_at_the_qos_of_its_last_will(
    tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 10, defect 7: the will on devices/{id}/status is QoS 1, retained; so is every status message."""
    d = daemon(tmp_path, tiny_bundle)
    calls: list[dict[str, object]] = []

    def publish(topic: str, payload: bytes, **kw: object) -> bool:
        calls.append(kw)
        return True

    monkeypatch.setattr(d.transport, "publish", publish)
    d._status("idle")
    assert [(c["qos"], c["retain"]) for c in calls] == [protocol.DELIVERY["devices/{id}/status"]] == [(1, True)]
    d.transport.stop()


def test_a_clean_exit_leaves_a_retained_offline_status(broker: Mosquitto, tmp_path: Path, tiny_bundle: Path) -> None:
    """A clean disconnect sends no will, so the daemon says "offline" itself, retained, before it goes."""
    profile = fast_profile(tmp_path / "p.toml")
    data = write_domain(tmp_path / "d.jsonl", DOMAINS[0], 8, seed=0)
    path = write(tmp_path, bundle=str(tiny_bundle), data=str(data), profile=str(profile), state_dir="state")
    path.write_text(path.read_text().replace("mqtt://h:1", broker.url))
    d = EdgeDaemon(config.load(path))
    d.stop.set()  # stop at once: the loop ends before any global adapter arrives
    d.run(drain_timeout=0)
    watcher = Transport(BrokerConfig(broker.url), "watcher", clean_session=True)
    watcher.subscribe(Topics("f").device_status("dev-1"))
    watcher.start(wait=10)
    msg = watcher.get(timeout=10)  # the retained status, delivered on subscribe
    watcher.stop()
    assert msg is not None and msg.retain
    assert protocol.decode_status(msg.payload)["state"] == "offline"
