"""Prometheus metrics for `/metrics`, fed by the same events as the page.

Each `Metrics` owns its registry (not prometheus_client's global one), so a coordinator, a
simulation and a test can each have theirs. Label sets are bounded: reject reasons are folded into
a fixed vocabulary (`REASONS`), and at most `max_devices` device ids get their own series; the
rest are counted in `alignfed_device_labels_dropped_total`.
"""

from __future__ import annotations

import math
import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from dashboard.feed import DeviceStatus, Event, HeldOutLoss, QueueDepth, UpdateReceived, VersionPublished

CONTENT_TYPE = CONTENT_TYPE_LATEST

# (label, pattern on the reject reason sent in the ack); first match wins. The reasons come from
# coordinator/ingest.py and the strategies' buffer checks.
REASONS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (label, re.compile(pattern))
    for label, pattern in (
        ("malformed", r"^malformed"),
        ("bad_signature", r"^bad signature"),
        ("unknown_device", r"^unknown device"),
        ("device_mismatch", r"^device id .* does not match"),
        ("wrong_bundle", r"^bundle "),
        ("future_version", r"^future"),
        ("unknown_base_version", r"^unknown base version"),
        ("stale", r"^stale"),
        ("duplicate", r"^duplicate"),
        ("non_finite", r"non-finite|expected a finite|expected a loss"),
        ("norm_bound", r"^norm of"),
        ("wrong_layers", r"^wrong layers"),
        ("wrong_shape", r"shape"),
        ("invalid", r"^invalid|^samples="),
        ("internal", r"^internal error"),
    )
)
OTHER = "other"
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def reason_label(reason: str) -> str:
    """The bounded label of a reject reason: 'staleness 9 > tau_max 8' -> 'stale'."""
    for label, pattern in REASONS:
        if pattern.search(reason):
            return label
    return OTHER


class Metrics:
    def __init__(self, *, max_devices: int = 64) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.max_devices = max_devices
        self._labelled: set[str] = set()
        self._online: dict[str, bool] = {}
        r = self.registry
        self.received = Counter("alignfed_updates_received", "Device updates received", registry=r)
        self.accepted = Counter("alignfed_updates_accepted", "Device updates accepted into the buffer", registry=r)
        self.rejected = Counter(
            "alignfed_updates_rejected", "Device updates rejected, by reason", ["reason"], registry=r
        )
        self.bytes_up = Counter("alignfed_update_bytes", "Bytes of device updates received", registry=r)
        self.versions = Counter("alignfed_versions", "Global versions made by aggregation", registry=r)
        self.version = Gauge("alignfed_global_version", "Current global adapter version", registry=r)
        self.aggregation_s = Histogram(
            "alignfed_aggregation_seconds", "Time of one aggregation", buckets=BUCKETS_S, registry=r
        )
        self.alignment_s = Histogram(
            "alignfed_alignment_seconds", "Time of cross-version alignment in one aggregation", buckets=BUCKETS_S,
            registry=r,
        )  # fmt: skip
        self.queue = Gauge("alignfed_ingest_queue_depth", "Update messages received and not yet handled", registry=r)
        self.buffered = Gauge("alignfed_buffered_updates", "Accepted updates waiting for aggregation", registry=r)
        self.online = Gauge("alignfed_devices_online", "Devices whose retained status is not offline", registry=r)
        self.staleness = Gauge(
            "alignfed_device_staleness", "Staleness τ of the device's last accepted update", ["device"], registry=r
        )
        self.eval_loss = Gauge(
            "alignfed_device_eval_loss", "Device's held-out loss of the newest global it measured", ["device"],
            registry=r,
        )  # fmt: skip
        self.dropped = Counter(
            "alignfed_device_labels_dropped", "Per-device samples not exported: over the device label cap", registry=r
        )

    def _labelled_device(self, device: str) -> bool:
        if device in self._labelled:
            return True
        if len(self._labelled) < self.max_devices:
            self._labelled.add(device)
            return True
        self.dropped.inc()
        return False

    def observe(self, event: Event) -> None:
        if isinstance(event, UpdateReceived):
            self.received.inc()
            self.bytes_up.inc(event.nbytes)
            if not event.accepted:
                self.rejected.labels(reason=reason_label(event.reason)).inc()
                return
            self.accepted.inc()
            if event.staleness is not None and self._labelled_device(event.device):
                self.staleness.labels(device=event.device).set(event.staleness)
            if event.eval_loss is not None and math.isfinite(event.eval_loss):
                self._loss(event.device, event.eval_loss)
        elif isinstance(event, VersionPublished):
            self.version.set(event.version)
            if event.aggregation_s is not None:
                self.versions.inc()
                self.aggregation_s.observe(event.aggregation_s)
            if event.alignment_s is not None:
                self.alignment_s.observe(event.alignment_s)
        elif isinstance(event, DeviceStatus):
            self._online[event.device] = event.online
            self.online.set(sum(self._online.values()))
        elif isinstance(event, HeldOutLoss):
            if math.isfinite(event.loss):
                self._loss(event.device, event.loss)
        elif isinstance(event, QueueDepth):
            self.queue.set(event.queued)
            self.buffered.set(event.buffered)

    def _loss(self, device: str, loss: float) -> None:
        if self._labelled_device(device):
            self.eval_loss.labels(device=device).set(loss)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
