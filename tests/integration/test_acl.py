"""Per-device passwords and ACLs from `add-device`: a device may publish only to its own topics."""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from pathlib import Path

import pytest

from alignfed import tomlfile
from alignfed.errors import TransportError
from alignfed.topics import Topics
from alignfed.transport import BrokerConfig, Transport
from coordinator import config as ccfg
from coordinator.devices import add_device, coordinator_acl, set_password
from tests.support.broker import Mosquitto

pytestmark = pytest.mark.integration


def test_device_acl(tmp_path: Path, tiny_bundle: Path) -> None:
    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    topics = Topics("fleet")
    set_password(passwd, "coordinator", "coord-secret")
    acl.write_text(coordinator_acl(topics, "coordinator"))
    conf = tomlfile.write(
        tmp_path / "coordinator.toml",
        {
            "federation": "fleet",
            "bundle": str(tiny_bundle),
            "database": str(tmp_path / "c.sqlite"),
            "broker": {"url": "mqtt://127.0.0.1:1"},
        },
    )
    cfg = ccfg.load(conf)
    creds = {
        d: json.loads(add_device(cfg, d, "rpi5-8gb", passwd_file=str(passwd), acl_file=str(acl)))
        for d in ("dev-a", "dev-b")
    }
    broker = Mosquitto(tmp_path / "broker", passwd_file=passwd, acl_file=acl).start()
    try:
        coord = Transport(BrokerConfig(broker.url, "coordinator", "coord-secret"), "coord", clean_session=True)
        coord.subscribe(f"{topics.root}/#")
        coord.start()
        a = creds["dev-a"]
        dev_a = Transport(
            BrokerConfig(broker.url, a["username"], a["password"]), "dev-a-" + uuid.uuid4().hex[:4], clean_session=True
        )
        dev_a.start()
        assert dev_a.publish(topics.update("dev-a"), b"own topic")
        dev_a.publish(topics.update("dev-b"), b"impersonation")  # the broker drops it
        dev_a.publish(topics.global_adapter, b"forged global", retain=True)  # read-only for devices
        dev_a.publish(topics.update("dev-a"), b"marker")
        seen = []
        while (m := coord.get(timeout=3)) is not None:
            seen.append((m.topic, m.payload))
            if m.payload == b"marker":
                break
        assert (topics.update("dev-a"), b"own topic") in seen
        assert all(p not in (b"impersonation", b"forged global") for _, p in seen), seen
        # a wrong password is refused with a clear error
        with pytest.raises(TransportError, match="could not connect"):
            Transport(BrokerConfig(broker.url, "dev-b", "wrong"), "x", clean_session=True).start(wait=3)
        dev_a.stop()
        coord.stop()
    finally:
        broker.stop()


def test_init_broker_and_remove_device_against_a_closed_broker(tmp_path: Path, tiny_bundle: Path) -> None:
    """Issue 10, defect 5: with `allow_anonymous false`, `init-broker` makes the coordinator's own
    user and ACL; `remove-device` revokes a device (password, ACL, key) and its updates are then
    answered as from an unknown device."""
    import signal
    import threading

    from alignfed import protocol
    from alignfed.cli import main
    from coordinator.service import Coordinator

    passwd, acl = tmp_path / "passwd", tmp_path / "acl"
    conf = tomlfile.write(
        tmp_path / "coordinator.toml",
        {"federation": "fleet", "bundle": str(tiny_bundle), "database": str(tmp_path / "c.sqlite"),
         "broker": {"url": "mqtt://127.0.0.1:1"}, "strategy": {"name": "fedbuff", "k": 5}},
    )  # fmt: skip
    files = ["--config", str(conf), "--mosquitto-passwd", str(passwd), "--mosquitto-acl", str(acl)]
    assert main(["coordinator", "init-broker", *files]) == 0
    assert main(["coordinator", "init-broker", *files]) == 0  # again: a new password, still one ACL block
    creds = {d: json.loads(add_device(ccfg.load(conf), d, "rpi5-8gb", passwd_file=str(passwd), acl_file=str(acl)))
             for d in ("dev-a", "dev-b")}  # fmt: skip
    assert acl.read_text().count("user alignfed-coordinator") == 1
    broker = Mosquitto(tmp_path / "broker", passwd_file=passwd, acl_file=acl).start()
    cfg = ccfg.load(conf)
    cfg = dataclasses.replace(cfg, broker=BrokerConfig(broker.url, cfg.broker.username, cfg.broker.password))
    assert cfg.broker.username == "alignfed-coordinator" and cfg.broker.password
    coordinator = Coordinator(cfg)
    key_a = coordinator.store.device_key("dev-a")
    assert key_a is not None
    stop = threading.Event()
    thread = threading.Thread(target=coordinator.run, args=(stop,), daemon=True)
    thread.start()
    topics = Topics("fleet")

    def device(name: str) -> Transport:
        c = creds[name]
        t = Transport(BrokerConfig(broker.url, c["username"], c["password"]), f"{name}-{uuid.uuid4().hex[:4]}",
                      clean_session=True)  # fmt: skip
        t.subscribe(topics.ack(name))
        t.subscribe(topics.global_adapter)
        t.start()
        return t

    def ack_of(t: Transport) -> protocol.Ack:
        while (m := t.get(timeout=10)) is not None:
            if m.topic.endswith("/ack"):
                return protocol.decode_ack(m.payload)
        raise AssertionError("no ack")

    try:
        dev_a = device("dev-a")
        first = dev_a.get(timeout=10)  # the coordinator could publish the retained global: its user works
        assert first is not None and first.topic == topics.global_adapter
        assert dev_a.publish(topics.update("dev-a"), signed(tiny_bundle, key_a))
        assert ack_of(dev_a).accepted
        dev_a.stop()

        assert main(["coordinator", "remove-device", "--device-id", "dev-a", *files[2:], "--config", str(conf)]) == 0
        assert "user dev-a" not in acl.read_text() and "user dev-b" in acl.read_text()
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGHUP)  # Mosquitto reloads its password and ACL files
        with pytest.raises(TransportError, match="could not connect"):
            Transport(BrokerConfig(broker.url, "dev-a", creds["dev-a"]["password"]), "x", clean_session=True).start(3)

        # an update signed with the revoked key, carried by a client allowed to write the topic
        admin = Transport(BrokerConfig(broker.url, cfg.broker.username, cfg.broker.password), "admin",
                          clean_session=True)  # fmt: skip
        admin.subscribe(topics.ack("dev-a"))
        admin.start()
        time.sleep(0.3)
        assert admin.publish(topics.update("dev-a"), signed(tiny_bundle, key_a))
        refused = ack_of(admin)
        assert not refused.accepted and refused.reason.startswith("unknown device 'dev-a'")
        admin.stop()

        dev_b = device("dev-b")  # the other device is untouched
        assert dev_b.publish(topics.update("dev-b"), b"garbage")
        assert ack_of(dev_b).reason.startswith("malformed")
        dev_b.stop()
    finally:
        stop.set()
        thread.join(timeout=10)
        broker.stop()
    assert main(["coordinator", "remove-device", "--device-id", "dev-a", "--config", str(conf)]) == 2  # gone already


def signed(bundle: Path, key: bytes) -> bytes:
    from tests.coordinator.test_service import update

    return update(bundle, 0, device_id="dev-a", key=key)
