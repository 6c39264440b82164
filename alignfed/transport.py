"""MQTT transport: the only module that imports paho-mqtt.

The paho network thread never runs AlignFed logic: it only puts received messages on a queue that
the owner's main loop drains. Subscriptions are remembered and redone on every (re)connect,
because a broker restart may forget them and retained messages replay on subscribe. Publishing
with QoS 1 waits for the broker's PUBACK, so "published" means the broker has it.

Everything in the payloads is MQTT-version independent (DESIGN.md section 4): the client speaks
MQTT 3.1.1 so the same code works with Mosquitto, EMQX and the embedded amqtt broker. Ingest
workers opt into MQTT 5 (`mqtt5=True`) for shared subscriptions (`shared_subscription`), which
Mosquitto 2, EMQX, HiveMQ and VerneMQ all implement.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
import threading
from dataclasses import dataclass
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from alignfed.errors import ConfigError, TransportError

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 7 * 24 * 3600  # MQTT 5: how long the broker keeps a persistent session offline


def shared_subscription(group: str, topic_filter: str) -> str:
    """MQTT 5 shared subscription: the broker hands each message to one subscriber of `group`."""
    if not group or any(c in group for c in "/+#"):
        raise ConfigError(f"shared subscription group {group!r}: expected a name without '/', '+' or '#'")
    return f"$share/{group}/{topic_filter}"


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    url: str  # mqtt://host:port or mqtts://host:port
    username: str = ""
    password: str = ""
    ca_file: str = ""  # CA bundle for mqtts; empty = system trust store
    keepalive: int = 30

    def endpoint(self) -> tuple[str, int, bool]:
        parsed = urlparse(self.url)
        if parsed.scheme not in ("mqtt", "mqtts") or not parsed.hostname:
            raise ConfigError(f"broker url {self.url!r}: expected mqtt://host:port or mqtts://host:port")
        tls = parsed.scheme == "mqtts"
        return parsed.hostname, parsed.port or (8883 if tls else 1883), tls


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    payload: bytes
    retain: bool
    mid: int = 0
    qos: int = 0


class Transport:
    """A connected MQTT client with a message queue, durable session and a last will."""

    def __init__(
        self,
        broker: BrokerConfig,
        client_id: str,
        *,
        will: tuple[str, bytes] | None = None,
        clean_session: bool = False,
        manual_ack: bool = False,
        mqtt5: bool = False,
    ) -> None:
        """`manual_ack`: received QoS 1 messages are acknowledged only by `ack(msg)`, so a message the
        owner has not yet made durable is redelivered by the broker after a crash (the session is
        persistent unless `clean_session`). `mqtt5`: speak MQTT 5 (needed for shared subscriptions);
        a persistent session then lives `SESSION_EXPIRY_S` after a disconnect."""
        self.broker = broker
        self.messages: queue.Queue[Message] = queue.Queue()
        self.connected = threading.Event()
        self._subscriptions: dict[str, int] = {}
        self._lock = threading.Lock()
        self._refused: str | None = None
        self._stopping = False
        self._clean = clean_session
        self._mqtt5 = mqtt5
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=None if mqtt5 else clean_session,
            protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311,
            manual_ack=manual_ack,
        )
        # Large adapters are fine; keep paho's own in-flight window small so acks pace publishing.
        self._client.max_inflight_messages_set(20)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        if broker.username:
            self._client.username_pw_set(broker.username, broker.password or None)
        host, port, tls = broker.endpoint()
        self._host, self._port = host, port
        if tls:
            self._client.tls_set(ca_certs=broker.ca_file or None, cert_reqs=ssl.CERT_REQUIRED)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message

    # -- paho callbacks (network thread): only bookkeeping and queueing --------------------------

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object = None
    ) -> None:
        if getattr(rc, "is_failure", False):
            self._refused = str(rc)
            log.error("broker %s:%s refused the connection: %s", self._host, self._port, rc)
            return
        self._refused = None
        # Without TCP_NODELAY a small write (a PUBACK, an ack) right after another waits for the
        # peer's delayed TCP ACK: measured 45 ms per handled update on loopback, 12x the work.
        sock = client.socket()
        if sock is not None and hasattr(sock, "setsockopt"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            subs = list(self._subscriptions.items())
        for topic, qos in subs:
            client.subscribe(topic, qos)
        self.connected.set()
        log.info("connected to %s:%s", self._host, self._port)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object = None
    ) -> None:
        self.connected.clear()
        if self._stopping:
            return
        log.warning("disconnected from %s:%s (%s); paho reconnects", self._host, self._port, rc)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.messages.put(
            Message(topic=msg.topic, payload=bytes(msg.payload), retain=bool(msg.retain), mid=msg.mid, qos=msg.qos)
        )

    # -- API for the owner's thread ---------------------------------------------------------------

    def start(self, wait: float | None = 10.0) -> None:
        """Connect in the background; with `wait`, block until connected or raise TransportError."""
        try:
            if self._mqtt5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = 0 if self._clean else SESSION_EXPIRY_S
                self._client.connect_async(
                    self._host,
                    self._port,
                    keepalive=self.broker.keepalive,
                    clean_start=self._clean,
                    properties=props,
                )
            else:
                self._client.connect_async(self._host, self._port, keepalive=self.broker.keepalive)
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot reach broker {self.broker.url}: {exc}") from exc
        self._client.loop_start()
        if wait is not None and not self.connected.wait(wait):
            detail = f"refused: {self._refused}" if self._refused else "no answer"
            self.stop()
            raise TransportError(f"could not connect to broker {self.broker.url} within {wait:.0f} s ({detail})")

    def subscribe(self, topic: str, qos: int = 1) -> None:
        with self._lock:
            self._subscriptions[topic] = qos
        if self.connected.is_set():
            self._client.subscribe(topic, qos)

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            self._subscriptions.pop(topic, None)
        if self.connected.is_set():
            self._client.unsubscribe(topic)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, timeout: float = 10.0) -> bool:
        """Publish and wait for the broker's acknowledgement; False if it did not come in time."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN, mqtt.MQTT_ERR_QUEUE_SIZE):
            log.warning("publish to %s failed: %s", topic, mqtt.error_string(info.rc))
            return False
        if qos == 0:
            return info.rc == mqtt.MQTT_ERR_SUCCESS
        try:
            info.wait_for_publish(timeout)
        except (RuntimeError, ValueError):
            return False
        return info.is_published()

    def ack(self, msg: Message) -> None:
        """Acknowledge a received message (with `manual_ack`); a no-op for QoS 0."""
        if msg.qos > 0:
            self._client.ack(msg.mid, msg.qos)

    def get(self, timeout: float | None = None) -> Message | None:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def stop(self) -> None:
        self._stopping = True
        self._client.disconnect()
        self._client.loop_stop()
