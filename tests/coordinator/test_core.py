"""The coordinator's core without a store or a broker: validate → strategy → new version."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from alignfed import protocol
from alignfed.adapter import initial_adapter
from alignfed.errors import RejectedUpdate
from alignfed.manifest import load as load_manifest
from coordinator.core import Core, Intake, NewVersion
from coordinator.ingest import IngestLimits
from coordinator.strategies import build
from coordinator.strategies.base import AdapterState, Aggregation, ClientUpdate, Strategy
from tests.coordinator.test_service import KEY, update


def _core(bundle: Path, strategy: Strategy, versions: int = 1) -> Core:
    m = load_manifest(bundle)
    current = AdapterState(version=0, tensors=initial_adapter(bundle, m), scale=m.lora.scale, rank=m.lora.rank)
    keys = {"dev-1": KEY, "dev-2": KEY[::-1]}
    limits = IngestLimits(max_delta_norm=1.0)
    intake = Intake(m, limits=limits, key_of=keys.get, has_version=lambda v: 0 <= v < versions)
    return Core(intake, strategy, current)


def test_an_update_reaches_the_strategy_only_once_ingest_accepts_it(tiny_bundle: Path) -> None:
    core = _core(tiny_bundle, build("fedbuff", k=2))
    with pytest.raises(RejectedUpdate, match="bad signature"):
        core.admit("dev-2", update(tiny_bundle, 0, device_id="dev-2", key=KEY), 1.0)  # signed with dev-1's key
    with pytest.raises(RejectedUpdate, match=r"norm of layer .* bound is 1"):
        core.admit("dev-1", update(tiny_bundle, 0, scale=1.0), 1.0)
    assert core.strategy.pending() == []
    got = core.admit("dev-1", core.intake.decode(update(tiny_bundle, 0)), 2.0)  # the decoded form, too
    (pending,) = core.strategy.pending()
    assert (pending.update_id, pending.device_id, pending.received_at) == (got.update_id, "dev-1", 2.0)


def test_a_site_update_enters_as_its_member_devices(tiny_bundle: Path) -> None:
    core = _core(tiny_bundle, build("fedbuff", k=9))
    u = protocol.decode_update(update(tiny_bundle, 0), 1 << 24).update
    site = dataclasses.replace(u, members=(protocol.Member("a", "ua", 3, 0.25), protocol.Member("b", "ub", 5, 0.75)))
    core.offer(site, 7.0)
    assert [(p.device_id, p.samples, p.received_at) for p in core.strategy.pending()] == [("a", 3, 7.0), ("b", 5, 7.0)]


def test_next_version_is_made_when_ready_and_current_moves_only_on_advance(tiny_bundle: Path) -> None:
    core = _core(tiny_bundle, build("fedbuff", k=2))
    first = core.admit("dev-1", update(tiny_bundle, 0), 1.0)
    assert core.next_version(1.0) is None  # K = 2: not ready
    second = core.admit("dev-1", update(tiny_bundle, 0), 2.0)
    new = core.next_version(3.0, lambda: {"fleet": 1})
    assert isinstance(new, NewVersion)
    assert core.current.version == 0  # not before the caller stored it
    assert sorted(f.update.update_id for f in new.folded) == sorted([first.update_id, second.update_id])
    assert [new.staleness(f) for f in new.folded] == [0, 0]
    assert sum(f.weight for f in new.folded) == pytest.approx(1.0)
    published = protocol.decode_global(new.encoded, 1 << 30)
    assert (published.version, published.parent_version, published.strategy) == (1, 0, "fedbuff")
    assert published.metrics["fleet"] == 1 and "staleness" in published.metrics
    for name, t in new.state.tensors.items():
        np.testing.assert_array_equal(published.tensors[name], t)
    core.advance(new)
    assert core.current is new.state
    with pytest.raises(RuntimeError, match="made from 0, but the current version is 1"):
        core.advance(new)


class _Skipping(Strategy):
    """A broken strategy: jumps a version."""

    name = "skipping"

    def __init__(self) -> None:
        self.buffer: list[ClientUpdate] = []

    def add(self, update: ClientUpdate, current_version: int) -> None:
        self.buffer.append(update)

    def ready(self, now: float) -> bool:
        return bool(self.buffer)

    def aggregate(self, current: AdapterState, now: float) -> Aggregation:
        used, self.buffer = tuple(u.update_id for u in self.buffer), []
        return Aggregation(dataclasses.replace(current, version=current.version + 2), used, {})

    def pending(self) -> list[ClientUpdate]:
        return list(self.buffer)


def test_a_strategy_that_skips_a_version_is_refused(tiny_bundle: Path) -> None:
    core = _core(tiny_bundle, _Skipping())
    core.admit("dev-1", update(tiny_bundle, 0), 1.0)
    with pytest.raises(RuntimeError, match="made version 2 from 0; expected 1"):
        core.next_version(1.0)
