"""One live dashboard: the board (page), the metrics (`/metrics`) and their server, fed as one observer."""

from __future__ import annotations

import logging

from dashboard.board import Board
from dashboard.config import DashboardConfig
from dashboard.feed import Event
from dashboard.metrics import Metrics
from dashboard.server import DashboardServer

log = logging.getLogger(__name__)


class LiveDashboard:
    def __init__(self, cfg: DashboardConfig, *, federation: str, strategy: str = "") -> None:
        self.cfg = cfg
        self.board = Board(federation, strategy)
        self.metrics = Metrics(max_devices=cfg.max_device_labels)
        self.server = DashboardServer(self.board, self.metrics, cfg)

    def observe(self, event: Event) -> None:
        """The observer handed to the coordinator or the simulator; never raises into them."""
        try:
            self.board.observe(event)
            self.metrics.observe(event)
        except Exception:  # a display problem must not stop a federation
            log.exception("dashboard could not take event %r", type(event).__name__)

    def start(self) -> str:
        return self.server.start()

    def stop(self) -> None:
        self.server.stop()
