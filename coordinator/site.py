"""A site coordinator: the gateway of one site in a two-tier federation (docs/scale.md).

It runs beside the site's broker. Devices talk only to that broker, exactly as to a root
coordinator: the site validates their updates, commits them (SQLite) and acks them. Every `k`
device updates (or after `max_wait_s`), it combines the buffered updates of each base version into
one site update (`tier.combine`), signs it with the site's key (registered at the root with
`alignfed coordinator add-device`) and publishes it as the site's own update; a Mosquitto bridge
carries it to the root broker and the root's ack back. Global versions flow down the same bridge;
the site keeps a copy of each (devices' base versions are validated against them) and never makes
versions of its own, so a version number means the same adapter on both tiers and τ = t − v is
exact at the root.

Crash safety: a device update is committed before its ack; a site update is committed in the same
transaction that marks its members forwarded (`site_updates` table beside the store's tables), then
published and resent until the root acks it; the root dedupes on its update id.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from alignfed import manifest as mf
from alignfed import protocol, tomlfile
from alignfed.errors import ConfigError, ProtocolError, RejectedUpdate
from alignfed.lowrank import Factors
from alignfed.topics import Topics, check_id
from alignfed.transport import Message, Transport
from coordinator.config import CoordinatorConfig
from coordinator.core import Intake
from coordinator.fairness import ParticipationWindow
from coordinator.store import Store
from coordinator.tier import WEIGHTINGS, combine, member_weights, members_of

log = logging.getLogger(__name__)

_OUTBOX = """
CREATE TABLE IF NOT EXISTS site_updates (
    update_id     TEXT PRIMARY KEY,
    seq           INTEGER NOT NULL,
    base_version  INTEGER NOT NULL,
    created_at    REAL NOT NULL,
    payload       BLOB NOT NULL,
    members       TEXT NOT NULL,     -- JSON [[device, update id], ...]
    sent_at       REAL NOT NULL,
    outcome       TEXT,              -- NULL until the root acks: 'accepted' or the reject reason
    global_version INTEGER
);
"""


@dataclass(frozen=True, slots=True)
class SiteConfig:
    """`site.toml`: who this site is at the root and when it forwards."""

    site_id: str  # the site's device id at the root
    key: bytes  # its HMAC key, from the root's `add-device`
    k: int = 3  # device updates per site update
    max_wait_s: float = 30.0  # forward fewer than k after this long
    weighting: str = "uniform"  # within-site split: match the root strategy (coordinator/tier.py)
    window: int = 64  # "fairness": accepted device updates in the site's participation window
    resend_s: float = 10.0  # resend a site update the root has not acked after this long


def load_site(path: Path) -> SiteConfig:
    raw = tomlfile.read(path)
    fields = {"id", "key", "k", "max_wait_s", "weighting", "resend_s", "window"}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {unknown}; expected some of {sorted(fields)}")
    for name in ("id", "key"):
        if name not in raw:
            raise ConfigError(f"{path}: missing field {name!r}")
    try:
        key = bytes.fromhex(str(raw["key"]))
    except ValueError as exc:
        raise ConfigError(f"{path}: key = {raw['key']!r}; expected the hex key `add-device` printed") from exc
    site = SiteConfig(
        site_id=check_id(str(raw["id"]), f"{path}: site id"),
        key=key,
        k=int(raw.get("k", 3)),
        max_wait_s=float(raw.get("max_wait_s", 30.0)),
        weighting=str(raw.get("weighting", "uniform")),
        resend_s=float(raw.get("resend_s", 10.0)),
        window=int(raw.get("window", 64)),
    )
    if site.k < 1 or site.window < 1 or site.max_wait_s <= 0 or site.resend_s <= 0:
        raise ConfigError(f"{path}: need k ≥ 1, max_wait_s > 0 and resend_s > 0; got {site.k}, "
                          f"{site.max_wait_s}, {site.resend_s}")  # fmt: skip
    if site.weighting not in WEIGHTINGS:
        raise ConfigError(f"{path}: weighting = {site.weighting!r}; expected one of {', '.join(WEIGHTINGS)}")
    return site


class SiteOutbox:
    """Site updates waiting for (or holding) the root's ack, in the site store's SQLite file."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_OUTBOX)

    def forward(self, update: protocol.AdapterUpdate, payload: bytes, now: float) -> None:
        """Commit a site update and mark its members forwarded, together."""
        members = [[m.device_id, m.update_id] for m in update.members]
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute(
                "INSERT INTO site_updates VALUES (?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
                (update.update_id, update.seq, update.base_version, now, payload, json.dumps(members), now),
            )
            for device_id, update_id in members:
                cur = self._db.execute(
                    "UPDATE updates SET status = 'aggregated', reason = ?, payload = NULL "
                    "WHERE device_id = ? AND update_id = ? AND status = 'pending'",
                    (f"site update {update.update_id}", device_id, update_id),
                )
                if cur.rowcount != 1:
                    raise ConfigError(f"site store: update {update_id} of {device_id} is not pending")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def recent_devices(self, n: int) -> list[str]:
        """Device ids of the last `n` accepted device updates, oldest first (the participation window)."""
        rows = self._db.execute(
            "SELECT device_id FROM updates WHERE status != 'rejected' ORDER BY received_at DESC, rowid DESC LIMIT ?",
            (n,),
        )
        return [str(r[0]) for r in rows][::-1]

    def next_seq(self) -> int:
        return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM site_updates").fetchone()[0])

    def unacked(self, older_than: float) -> list[tuple[str, bytes]]:
        rows = self._db.execute(
            "SELECT update_id, payload FROM site_updates WHERE outcome IS NULL AND sent_at < ? ORDER BY seq",
            (older_than,),
        )
        return [(str(u), bytes(p)) for u, p in rows]

    def sent(self, update_id: str, now: float) -> None:
        self._db.execute("UPDATE site_updates SET sent_at = ? WHERE update_id = ?", (now, update_id))

    def acked(self, ack: protocol.Ack) -> None:
        outcome = "accepted" if ack.accepted else ack.reason or "rejected"
        self._db.execute(
            "UPDATE site_updates SET outcome = ?, global_version = ? WHERE update_id = ? AND outcome IS NULL",
            (outcome, ack.global_version, ack.update_id),
        )

    def outcomes(self) -> dict[str, tuple[str | None, list[tuple[str, str]]]]:
        """site update id -> (root's outcome or None, its members as (device, update id))."""
        rows = self._db.execute("SELECT update_id, outcome, members FROM site_updates ORDER BY seq")
        return {str(u): (o, [(d, i) for d, i in json.loads(m)]) for u, o, m in rows}

    def close(self) -> None:
        self._db.close()


class SiteCoordinator:
    def __init__(self, cfg: CoordinatorConfig, site: SiteConfig, *, clock: Callable[[], float] = time.time) -> None:
        if not isinstance(cfg.database, Path):
            raise ConfigError(f"site coordinator: database {cfg.database!s}; a site keeps its state in SQLite")
        self.cfg, self.site = cfg, site
        self.topics = Topics(cfg.federation)
        self.manifest = mf.load(cfg.bundle)
        self.store = Store(cfg.database)
        self.intake = Intake(
            self.manifest, limits=cfg.limits, key_of=self.store.device_key, has_version=self.store.has_version
        )
        self.bundle = self.intake.bundle
        self.outbox = SiteOutbox(cfg.database)
        self.clock = clock
        self.transport: Transport | None = None
        self.residual: dict[str, Factors] = {}  # the site's error feedback (kept in memory)
        self._next_residual: dict[str, Factors] = {}  # what `residual` becomes once a built update is committed
        # p_i of AlignFed's fairness, per device, over the site's last accepted device updates (restored)
        self.window = ParticipationWindow(site.window, self.outbox.recent_devices(site.window))

    def current_version(self) -> int | None:
        return self.store.latest_version()

    # -- global versions coming down --------------------------------------------------------------

    def on_global(self, payload: bytes) -> None:
        try:
            g = protocol.decode_global(payload, max_bytes=1 << 34)
        except ProtocolError as exc:
            log.warning("ignored a global adapter that does not decode: %s", exc)
            return
        if g.bundle != self.bundle:
            log.warning("ignored global version %d of another bundle %s…", g.version, g.bundle[:12])
            return
        if not self.store.has_version(g.version):
            self.store.save_version(g, payload, {}, {})
            log.info("site %s holds global version %d", self.site.site_id, g.version)

    # -- device updates coming up -----------------------------------------------------------------

    def handle_update(self, device_id: str, payload: bytes) -> protocol.Ack:
        now = self.clock()
        current = self.current_version()
        if current is None:
            reason = "no global version yet: the root has not reached this site"
            return protocol.Ack(device_id, self.intake.update_id_of(payload), False, reason, -1)
        decoded: protocol.Decoded | None = None
        try:
            decoded = self.intake.decode(payload)  # once: the checks and the resend lookup read this
            update = self.intake.validate(device_id, decoded, current)
        except RejectedUpdate as exc:
            seen = self._seen(device_id, decoded) if decoded is not None else None
            if seen is not None:
                return protocol.Ack(device_id, seen[0], seen[1], "duplicate", current)
            log.warning("rejected update from %s: %s", device_id, exc.reason)
            update_id = decoded.update.update_id if decoded is not None else self.intake.update_id_of(payload)
            return protocol.Ack(device_id, update_id, False, exc.reason, current)
        seen_rec = self.store.lookup(device_id, update.update_id)
        if seen_rec is not None:
            return protocol.Ack(device_id, update.update_id, seen_rec.status != "rejected", "duplicate", current)
        if update.members:
            return protocol.Ack(device_id, update.update_id, False, "a site takes device updates only", current)
        self.store.record(update, payload, now, status="pending")
        self.window.record(device_id)
        log.info("site %s accepted update %s from %s (base v%d)", self.site.site_id, update.update_id[:8], device_id,
                 update.base_version)  # fmt: skip
        return protocol.Ack(device_id, update.update_id, True, "accepted", current)

    def _seen(self, device_id: str, decoded: protocol.Decoded) -> tuple[str, bool] | None:
        """(update id, accepted) of a correctly signed resend the site stored before."""
        if not self.intake.signed_by(device_id, decoded):
            return None
        rec = self.store.lookup(device_id, decoded.update.update_id)
        return None if rec is None else (rec.update_id, rec.status != "rejected")

    # -- site updates -----------------------------------------------------------------------------

    def build(self, group: list[protocol.AdapterUpdate], now: float) -> protocol.AdapterUpdate:
        """One signed site update of device updates sharing a base version."""
        weights = member_weights(
            [u.samples for u in group], self.site.weighting, [u.device_id for u in group], self.window
        )
        deltas, self._next_residual = combine(group, list(weights), 2 * self.manifest.lora.rank, self.residual)
        losses = [u.train_loss for u in group]
        return protocol.AdapterUpdate(
            device_id=self.site.site_id,
            update_id=uuid.uuid4().hex,
            seq=self.outbox.next_seq(),
            base_version=group[0].base_version,
            bundle=self.bundle,
            samples=sum(u.samples for u in group),
            local_steps=sum(u.local_steps for u in group),
            train_loss=float(sum(w * x for w, x in zip(weights, losses, strict=True))),
            wall_time=max(u.wall_time for u in group),
            profile="site",
            created_at=now,
            deltas=deltas,
            eval_loss=_mean_finite([u.eval_loss for u in group]),
            members=members_of(group, list(weights)),
        )

    def maybe_forward(self) -> list[str]:
        """Forward the buffer if it holds k updates or its oldest waited max_wait_s; returns the ids sent."""
        now = self.clock()
        pending = self.store.pending()
        if not pending:
            return []
        if len(pending) < self.site.k and now - min(t for _, t in pending) < self.site.max_wait_s:
            return []
        groups: dict[int, list[protocol.AdapterUpdate]] = {}
        for payload, _ in pending:
            u = protocol.decode_update(payload, self.intake.payload_limit).update
            groups.setdefault(u.base_version, []).append(u)
        sent = []
        for base in sorted(groups):  # version-aware grouping: one site update per base version
            update = self.build(groups[base], now)
            payload = protocol.encode_update(update, self.site.key)
            self.outbox.forward(update, payload, now)
            self.residual = self._next_residual
            self._publish(update.update_id, payload, now)
            log.info("site %s forwarded %s: %d device updates on v%d", self.site.site_id, update.update_id[:8],
                     len(update.members), base)  # fmt: skip
            sent.append(update.update_id)
        return sent

    def _publish(self, update_id: str, payload: bytes, now: float) -> None:
        if self.transport is not None:
            self.transport.publish(self.topics.update(self.site.site_id), payload, timeout=30)
            self.outbox.sent(update_id, now)

    def resend(self) -> None:
        now = self.clock()
        for update_id, payload in self.outbox.unacked(now - self.site.resend_s):
            self._publish(update_id, payload, now)

    # -- MQTT loop --------------------------------------------------------------------------------

    def dispatch(self, msg: Message) -> None:
        assert self.transport is not None
        if msg.topic == self.topics.global_adapter:
            self.on_global(msg.payload)
        elif msg.topic == self.topics.ack(self.site.site_id):
            try:
                self.outbox.acked(protocol.decode_ack(msg.payload))
            except ProtocolError as exc:
                log.warning("ignored a root ack that does not decode: %s", exc)
        else:
            device_id = self.topics.device_of(msg.topic)
            if device_id is not None and device_id != self.site.site_id and msg.topic.endswith("/update"):
                try:
                    ack = self.handle_update(device_id, msg.payload)
                except Exception as exc:  # one bad message must never stop the site
                    log.exception("update from %s could not be handled", device_id)
                    uid = self.intake.update_id_of(msg.payload)
                    ack = protocol.Ack(device_id, uid, False, f"internal error: {exc}", -1)
                self.transport.ack(msg)
                self.transport.publish(self.topics.ack(device_id), protocol.encode_ack(ack))
                return
        self.transport.ack(msg)

    def run(self, stop: threading.Event, *, connect_timeout: float = 30.0) -> None:
        self.transport = Transport(self.cfg.broker, self.cfg.client_id, manual_ack=True)
        for topic in (self.topics.all_updates, self.topics.global_adapter, self.topics.ack(self.site.site_id)):
            self.transport.subscribe(topic)
        self.transport.start(wait=connect_timeout)
        log.info("site coordinator %s serving federation %r", self.site.site_id, self.cfg.federation)
        try:
            while not stop.is_set():
                msg = self.transport.get(timeout=0.5)
                if msg is not None:
                    self.dispatch(msg)
                self.maybe_forward()
                self.resend()
        finally:
            self.transport.stop()
            self.outbox.close()
            self.store.close()


def _mean_finite(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan
