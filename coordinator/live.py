"""The coordinator's live dashboard: the page and `/metrics` (package `dashboard`), fed by the service.

The service reports ingest, rejects and aggregations through its `observer`; devices online /
offline come from their retained status and wills through a separate subscribe-only MQTT client.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from alignfed.errors import AlignFedError
from coordinator.service import Coordinator
from dashboard.watch import StatusWatch

if TYPE_CHECKING:
    from dashboard.live import LiveDashboard

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Watching:
    dashboard: LiveDashboard
    status: StatusWatch | None
    url: str

    def stop(self) -> None:
        if self.status is not None:
            self.status.stop()
        self.dashboard.stop()


def watch(coordinator: Coordinator, *, connect_timeout: float = 30.0) -> Watching | None:
    """Serve the dashboard for `coordinator` per its `[dashboard]` table; None when off or it cannot
    listen (the federation matters more than its page: that is logged, not raised)."""
    cfg = coordinator.cfg.dashboard
    if not cfg.enabled:
        return None
    try:
        from dashboard.live import LiveDashboard
    except ImportError as exc:
        log.warning("the dashboard needs pip install 'alignfed[dashboard]' (%s); the coordinator runs without it", exc)
        return None
    dash = LiveDashboard(cfg, federation=coordinator.cfg.federation, strategy=coordinator.strategy.name)
    try:
        url = dash.start()
    except AlignFedError as exc:
        log.warning("%s; the coordinator runs without it", exc)
        return None
    coordinator.observer = dash.observe
    watcher = StatusWatch(coordinator.cfg.broker, coordinator.cfg.federation, dash.observe)
    status: StatusWatch | None = watcher
    try:
        watcher.start(wait=connect_timeout)
    except AlignFedError as exc:
        log.warning("dashboard: device status unavailable (%s)", exc)
        status = None
    log.info("dashboard at %s (metrics at %smetrics)", url, url)
    return Watching(dash, status, url)
