"""Site coordinators between the fleet and the root strategy, on the virtual clock.

`SiteTier` wraps the root's strategy: a device's update waits in its site's buffer until the site
holds `k` (or the oldest waited `max_wait_s`), then each base-version group becomes one site update
(`coordinator.tier.combine`, the same code the live site coordinator runs) that enters the root
strategy as its member devices (`coordinator.tier.member_updates`). Site-to-root links are not
timed: the difference from the flat run is the sites' buffering, the rank cut with error feedback
and the within-site split — what decision 20 argues leaves AlignFed's modules correct.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from alignfed.errors import RejectedUpdate
from alignfed.lowrank import Factors
from coordinator.fairness import ParticipationWindow
from coordinator.strategies.base import AdapterState, Aggregation, ClientUpdate, Strategy
from coordinator.strategies.buffer import check_version
from coordinator.tier import combine, member_updates, member_weights, members_of


class SiteTier(Strategy):
    name: ClassVar[str] = "sites"

    def __init__(
        self,
        root: Strategy,
        site_of: Mapping[str, str],
        *,
        k: int,
        max_wait_s: float,
        weighting: str,
        max_rank: int,
        window: int = 64,
    ) -> None:
        self.root = root
        self.site_of = dict(site_of)
        self.k, self.max_wait_s, self.weighting, self.max_rank = k, max_wait_s, weighting, max_rank
        sites = sorted(set(self.site_of.values()))
        self._buffers: dict[str, list[ClientUpdate]] = {s: [] for s in sites}
        self._residual: dict[str, dict[str, Factors]] = {s: {} for s in sites}
        self._windows = {s: ParticipationWindow(window) for s in sites}
        self._current = 0
        self._seq = 0
        self.site_updates = 0
        self.dropped = 0

    def add(self, update: ClientUpdate, current_version: int) -> None:
        check_version(update, current_version)  # the site validates against the global versions it holds
        self._current = current_version
        site = self.site_of[update.device_id]
        self._buffers[site].append(update)
        self._windows[site].record(update.device_id)
        if len(self._buffers[site]) >= self.k:
            self._flush(site)

    def _flush(self, site: str) -> None:
        buffered, self._buffers[site] = self._buffers[site], []
        groups: dict[int, list[ClientUpdate]] = {}
        for u in buffered:
            groups.setdefault(u.base_version, []).append(u)
        for base in sorted(groups):
            group = groups[base]
            weights = list(
                member_weights(
                    [u.samples for u in group], self.weighting, [u.device_id for u in group], self._windows[site]
                )
            )
            deltas, self._residual[site] = combine(group, weights, self.max_rank, self._residual[site])
            self._seq += 1
            self.site_updates += 1
            arrived = max(u.received_at for u in group)
            members = member_updates(members_of(group, weights), site, f"s{self._seq}", base, deltas, arrived)
            try:
                for c in members:
                    self.root.add(c, self._current)
            except RejectedUpdate:
                self.dropped += len(members)  # too stale by the time the site forwarded it

    def ready(self, now: float) -> bool:
        for site, buf in self._buffers.items():
            if buf and now - min(u.received_at for u in buf) >= self.max_wait_s:
                self._flush(site)
        return self.root.ready(now)

    def aggregate(self, current: AdapterState, now: float) -> Aggregation:
        self._current = current.version + 1
        return self.root.aggregate(current, now)

    def pending(self) -> list[ClientUpdate]:
        return [*self.root.pending(), *(u for buf in self._buffers.values() for u in buf)]
