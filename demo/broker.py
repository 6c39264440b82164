"""An embedded MQTT broker (amqtt) for running a federation without installing Mosquitto.

amqtt speaks MQTT 3.1.1 only, which is all the protocol needs (DESIGN.md section 4). It runs on its
own asyncio loop in a daemon thread and listens on loopback.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

from alignfed.errors import TransportError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    def __init__(self, port: int = 0) -> None:
        self.port = port or _free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="amqtt-broker", daemon=True)
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        try:
            from amqtt.broker import Broker
        except ImportError as exc:
            raise TransportError(
                "the embedded broker needs amqtt (pip install 'alignfed[demo]') or pass --broker"
            ) from exc
        # amqtt logs tracebacks for PUBACKs that arrive late under load (multi-MB adapters on a busy
        # machine); delivery still completes, and the demo's report says what arrived.
        logging.getLogger("amqtt").setLevel(logging.CRITICAL)
        logging.getLogger("transitions").setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._thread.start()
        self._broker = Broker(config, loop=self._loop)
        future = asyncio.run_coroutine_threadsafe(self._broker.start(), self._loop)
        try:
            future.result(timeout=15)
        except Exception as exc:
            raise TransportError(f"embedded broker could not listen on 127.0.0.1:{self.port}: {exc}") from exc
        return self

    def stop(self) -> None:
        if self._broker is not None:
            logging.getLogger("amqtt").setLevel(logging.CRITICAL)  # its shutdown logs cancelled tasks
            asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(timeout=15)
            self._broker = None
        self._loop.call_soon_threadsafe(self._loop.stop)
