"""MQTT over TLS end to end: a real Mosquitto TLS listener, the project's Transport with a CA file."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from alignfed.errors import TransportError
from alignfed.transport import BrokerConfig, Transport
from tests.support.broker import Mosquitto, make_tls_files


def _client(url: str, ca: Path | None, name: str) -> Transport:
    return Transport(
        BrokerConfig(url, ca_file=str(ca) if ca else ""), f"{name}-{uuid.uuid4().hex[:6]}", clean_session=True
    )


def test_updates_travel_over_tls_and_untrusted_or_plain_clients_are_refused(tmp_path: Path) -> None:
    ca, cert, key = make_tls_files(tmp_path / "pki")
    other_ca, _, _ = make_tls_files(tmp_path / "other", name="Someone else")
    broker = Mosquitto(tmp_path / "broker", tls=(ca, cert, key)).start()
    try:
        assert broker.url.startswith("mqtts://")
        coordinator = _client(broker.url, ca, "coord")
        coordinator.subscribe("fed/devices/+/update")
        coordinator.start()
        device = _client(broker.url, ca, "dev")
        device.start()
        payload = bytes(range(256)) * 64
        assert device.publish("fed/devices/dev-1/update", payload, timeout=10)
        msg = coordinator.get(timeout=10)
        assert msg is not None and msg.topic == "fed/devices/dev-1/update" and msg.payload == payload
        device.stop()
        coordinator.stop()

        # a certificate signed by another CA is not trusted
        with pytest.raises(TransportError, match="could not connect"):
            _client(broker.url, other_ca, "mitm").start(wait=3)
        # and the TLS port does not speak plain MQTT
        with pytest.raises(TransportError, match="could not connect"):
            _client(f"mqtt://127.0.0.1:{broker.port}", None, "plain").start(wait=3)
    finally:
        broker.stop()
