"""A simulated fleet whose slow class is capped at a lower LoRA rank than the bundle's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from alignfed import protocol
from alignfed.errors import ConfigError
from simulator.cli import parse_ranks
from simulator.experiment import run_variant
from simulator.fleet import FleetConfig, build_fleet
from simulator.testbed import Testbed
from simulator.variants import standard_variant
from tests.simulator.conftest import OVERRIDES, make_sim_config, make_testbed_config


def test_class_ranks_cap_each_class(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Class 0 (the slowest) trains at rank 2, class 1 at the bundle's 4: both contribute, each
    update states its rank and is at most 2k wide."""
    fleet = FleetConfig(devices=4, classes=2, overrides=OVERRIDES, class_ranks=(2, 0))
    testbed = Testbed.build(make_testbed_config(tiny_bundle, fleet=fleet))
    rank_of = {d.device_id: 2 if d.device_class == 0 else 4 for d in testbed.devices}
    assert sorted(rank_of.values()) == [2, 2, 4, 4] and testbed.manifest.lora.rank == 4
    seen: list[protocol.AdapterUpdate] = []
    decode = protocol.decode_update

    def recording(payload: bytes, max_bytes: int) -> Any:
        decoded = decode(payload, max_bytes)
        seen.append(decoded.update)
        return decoded

    monkeypatch.setattr(protocol, "decode_update", recording)
    from alignfed.adapter import training_start
    from simulator import rounds

    truncations: list[int] = []  # rank of each start computed from a global

    def counting(tensors: Any, manifest: Any, rank: int) -> Any:
        truncations.append(rank)
        return training_start(tensors, manifest, rank)

    monkeypatch.setattr(rounds, "training_start", counting)
    run = run_variant(
        standard_variant("fedbuff", devices=4, k=2), testbed, make_sim_config(horizon_s=40.0, max_versions=0)
    )
    assert run.versions >= 3 and not run.rejected
    assert all(run.folded[d] >= 1 for d in rank_of), run.folded
    assert {u.device_id for u in seen} == set(rank_of)
    for u in seen:
        assert u.rank == rank_of[u.device_id]
        assert max(f.rank for f in u.deltas.values()) <= 2 * u.rank
    # a version is truncated once for the capped class, however many of its rounds start from it;
    # each round reads it twice (its start, its delta), so without the cache this would be 2× the rounds
    capped_rounds = sum(1 for u in seen if u.rank == 2)
    assert set(truncations) == {2, 4}
    assert 0 < truncations.count(2) <= capped_rounds


def test_class_ranks_are_checked() -> None:
    with pytest.raises(ConfigError, match="1 class ranks \\[2\\] for 2 classes; expected one per class"):
        FleetConfig(devices=4, classes=2, class_ranks=(2,))
    assert [d.profile.max_rank for d in build_fleet(FleetConfig(devices=2, classes=2, class_ranks=(1, 0)))] == [1, 0]
    assert parse_ranks("2, 2,4") == (2, 2, 4)
    with pytest.raises(ConfigError, match="expected comma-separated integers ≥ 0"):
        parse_ranks("2,x")
