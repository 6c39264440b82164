"""Devices online / offline for the dashboard: their retained status messages and last wills.

A separate MQTT client (clean session, subscribe only) so the coordinator's own session and its
manual acks stay untouched. Retained messages replay on every (re)connect, so a restarted
coordinator sees the whole fleet at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from alignfed import protocol
from alignfed.errors import ProtocolError
from alignfed.topics import Topics
from alignfed.transport import BrokerConfig, Transport
from dashboard.feed import DeviceStatus, Observer

log = logging.getLogger(__name__)


class StatusWatch:
    def __init__(self, broker: BrokerConfig, federation: str, observer: Observer) -> None:
        self.topics = Topics(federation)
        self.observer = observer
        self._transport = Transport(broker, f"alignfed-dashboard-{os.getpid()}", clean_session=True)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dashboard-status", daemon=True)

    def start(self, wait: float = 30.0) -> None:
        self._transport.subscribe(self.topics.all_device_status)
        self._transport.start(wait=wait)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            msg = self._transport.get(timeout=0.5)
            if msg is None:
                continue
            device = self.topics.device_of(msg.topic)
            if device is None:
                continue
            try:
                body = protocol.decode_status(msg.payload)
            except ProtocolError as exc:
                log.warning("status of %s is not readable: %s", device, exc)
                continue
            version = body.get("version")
            self.observer(
                DeviceStatus(
                    at=time.time(),
                    device=device,
                    state=str(body.get("state", "unknown")),
                    version=version if isinstance(version, int) else None,
                    profile=str(body.get("profile", "")),
                )
            )

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._transport.stop()
