"""A fleet of fake devices that publish valid signed updates and track their acks.

It stands in for edge daemons where training is not the point (ingest, failover, throughput): each
update carries random low-rank deltas of the bundle's shapes, well inside the norm bound, on the
newest global version. Unacked updates are resent with the same update id, as the edge outbox does.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from alignfed import protocol
from alignfed.lowrank import Factors
from alignfed.manifest import Manifest, bundle_digest
from alignfed.topics import Topics
from alignfed.transport import BrokerConfig, Transport


@dataclass
class Sent:
    device_id: str
    payload: bytes
    sent_at: float
    ack: protocol.Ack | None = None


@dataclass
class UpdatePublisher:
    broker_url: str
    federation: str
    manifest: Manifest
    keys: dict[str, bytes]  # device id -> HMAC key
    version_of: Callable[[], int]  # the newest global version (devices read it from the retained adapter)
    rank: int = 2
    seed: int = 0
    quantization: str = "fp32"  # wire format of the factors, as devices choose it
    codec: str = "none"
    sent: dict[str, Sent] = field(default_factory=dict)  # update id -> what was sent and its ack

    def __post_init__(self) -> None:
        self.topics = Topics(self.federation)
        self._rng = np.random.default_rng(self.seed)
        self._lock = threading.Lock()
        self._seq = dict.fromkeys(self.keys, 0)
        self._bundle = bundle_digest(self.manifest)
        self.transport = Transport(
            BrokerConfig(self.broker_url), f"publisher-{uuid.uuid4().hex[:8]}", clean_session=True
        )
        self.transport.subscribe(f"{self.topics.root}/devices/+/ack")

    def start(self) -> UpdatePublisher:
        self.transport.start(wait=10)
        return self

    def stop(self) -> None:
        self.transport.stop()

    def make(self, device_id: str, base_version: int) -> tuple[str, bytes]:
        deltas = {
            lid: Factors(
                u=self._rng.normal(0, 0.01, (out, self.rank)).astype(np.float32),
                v=self._rng.normal(0, 0.01, (self.rank, inp)).astype(np.float32),
            )
            for lid, (out, inp) in self.manifest.delta_shapes().items()
        }
        self._seq[device_id] += 1
        update = protocol.AdapterUpdate(
            device_id=device_id,
            update_id=uuid.uuid4().hex,
            seq=self._seq[device_id],
            base_version=base_version,
            bundle=self._bundle,
            samples=int(self._rng.integers(4, 32)),
            local_steps=3,
            train_loss=float(self._rng.uniform(1.0, 3.0)),
            wall_time=0.1,
            profile="x86-laptop",
            created_at=time.time(),
            deltas=deltas,
        )
        return update.update_id, protocol.encode_update(update, self.keys[device_id], self.quantization, self.codec)

    def publish(self, device_id: str, made: tuple[str, bytes] | None = None) -> str:
        """Publish a new update of `device_id` (or one `make` prepared) and remember it for its ack."""
        update_id, payload = made or self.make(device_id, self.version_of())
        with self._lock:
            self.sent[update_id] = Sent(device_id, payload, time.monotonic())
        self.transport.publish(self.topics.update(device_id), payload, timeout=10)
        return update_id

    def drain_acks(self, timeout: float = 0.05) -> None:
        while (msg := self.transport.get(timeout=timeout)) is not None:
            ack = protocol.decode_ack(msg.payload)
            with self._lock:
                s = self.sent.get(ack.update_id)
                if s is not None and s.ack is None:
                    s.ack = ack

    def resend_unacked(self, after_s: float) -> int:
        now = time.monotonic()
        with self._lock:
            due = [(uid, s) for uid, s in self.sent.items() if s.ack is None and now - s.sent_at > after_s]
            for _, s in due:
                s.sent_at = now
        for _, s in due:
            self.transport.publish(self.topics.update(s.device_id), s.payload, timeout=10)
        return len(due)

    def acked(self) -> dict[str, protocol.Ack]:
        with self._lock:
            return {uid: s.ack for uid, s in self.sent.items() if s.ack is not None}
