"""The simulator's delta downlink (alignfed.downlink): what devices receive, train from and are charged."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from alignfed import protocol
from alignfed.errors import ConfigError
from simulator.experiment import run_variant
from simulator.metrics import RunResult
from simulator.testbed import Testbed
from simulator.variants import standard_variant
from tests.simulator.conftest import make_sim_config


def _run(testbed: Testbed, **changes: object) -> RunResult:
    variant = standard_variant("fedbuff", devices=len(testbed.devices), k=2)
    return run_variant(variant, testbed, make_sim_config(**changes))


def _receipts(run: RunResult) -> dict[str, list[tuple[int, int]]]:
    got: dict[str, list[tuple[int, int]]] = {}
    for e in run.events:
        if e.kind == "receive" and e.device is not None:
            got.setdefault(e.device, []).append((e.version or 0, e.bytes or 0))
    return got


def test_deltas_cost_a_fraction_of_snapshots_and_chain_version_by_version(testbed: Testbed) -> None:
    snap = _run(testbed, max_versions=8)
    delta = _run(testbed, max_versions=8, downlink="int4c")
    assert delta.versions == snap.versions == 8
    assert delta.bytes_down < 0.5 * snap.bytes_down
    assert delta.final is not None
    final = protocol.GlobalAdapter(0, -1, "b" * 64, "fedbuff", 0.0, 4, 8.0, delta.final.tensors)
    snapshot_bytes = len(protocol.encode_global(final))
    for device, receipts in _receipts(delta).items():
        versions = [v for v, _ in receipts]
        assert versions == sorted(set(versions)), device  # a chain: every version once, in order
        assert receipts[0][0] == 0
        assert all(n < 0.5 * snapshot_bytes for v, n in receipts[1:]), (device, receipts)


def test_a_device_back_from_offline_fetches_the_snapshot_when_the_retained_delta_does_not_chain(
    testbed: Testbed,
) -> None:
    flaky = [replace(d, profile=replace(d.profile, availability=0.4)) for d in testbed.devices]
    tb = replace(testbed, devices=flaky)
    run = _run(tb, horizon_s=12.0, max_versions=0, downlink="int8c")
    assert any(e.kind == "offline" for e in run.events)
    first = {d: r[0][1] for d, r in _receipts(run).items()}  # version 0: a snapshot
    snapshots_later = [(d, v) for d, receipts in _receipts(run).items() for v, n in receipts[1:] if n >= 0.9 * first[d]]
    assert snapshots_later, "no device fell behind by more than one version"
    for device, receipts in _receipts(run).items():
        versions = [v for v, _ in receipts]
        assert versions == sorted(set(versions)), device
    # bytes: every receipt counted, plus deltas that arrived but did not chain (charged, not applied)
    assert run.bytes_down >= sum(n for r in _receipts(run).values() for _, n in r)


def test_each_downlink_feedback_runs_and_the_residual_fold_reaches_the_strategy(testbed: Testbed) -> None:
    """`downlink_feedback`: carry (factor space, the broadcaster's), residual (the strategy's error
    feedback, tests/strategies/test_downlink_fold.py) or off: each runs the engine to the end, and
    the published chains differ (each choice reaches the adapter devices train from)."""
    runs = {
        fb: _run(testbed, max_versions=6, downlink="int4c", downlink_feedback=fb) for fb in ("carry", "residual", "off")
    }
    finals = {fb: r.final for fb, r in runs.items()}
    assert all(f is not None and r.versions == 6 for f, r in zip(finals.values(), runs.values(), strict=True))
    tensors = {fb: f.tensors for fb, f in finals.items() if f is not None}
    name = sorted(tensors["carry"])[0]
    assert not np.array_equal(tensors["carry"][name], tensors["residual"][name])
    assert not np.array_equal(tensors["residual"][name], tensors["off"][name])
    with pytest.raises(ConfigError, match="downlink_feedback must be one of carry, residual, off, got 'both'"):
        make_sim_config(downlink_feedback="both")
