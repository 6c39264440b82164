"""The virtual-clock engine: deterministic, host-independent, profile-charged time."""

from __future__ import annotations

import itertools
import time
from dataclasses import replace

import pytest

from alignfed.errors import ConfigError
from alignfed.profiles import DeviceProfile
from simulator.clock import EventQueue
from simulator.events import to_csv
from simulator.experiment import run_variant
from simulator.metrics import RunResult
from simulator.testbed import Testbed
from simulator.timing import Timing
from simulator.variants import standard_variant
from tests.simulator.conftest import make_sim_config


def _run(testbed: Testbed, name: str = "fedbuff", **changes: object) -> RunResult:
    variant = standard_variant(name, devices=len(testbed.devices), k=2)
    return run_variant(variant, testbed, make_sim_config(**changes))


def _csv(run: RunResult) -> str:
    return to_csv([(run.variant, run.events)])


def test_same_seed_gives_the_identical_event_log(testbed: Testbed) -> None:
    first, second = _run(testbed), _run(testbed)
    assert _csv(first) == _csv(second)
    assert first.rounds > 0 and first.versions > 0
    assert _csv(_run(testbed, seed=1)) != _csv(first)


def test_the_host_clock_changes_nothing(testbed: Testbed, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _csv(_run(testbed, "alignfed"))
    ticks = iter(range(10**9))

    def jumpy() -> float:
        return 1e6 * next(ticks)  # a host that is absurdly slow between any two readings

    def no_sleep(_: float) -> None:
        raise AssertionError("the simulator must not sleep")

    monkeypatch.setattr(time, "monotonic", jumpy)
    monkeypatch.setattr(time, "time", jumpy)
    monkeypatch.setattr(time, "perf_counter", jumpy)
    monkeypatch.setattr(time, "sleep", no_sleep)
    assert _csv(_run(testbed, "alignfed")) == expected


def test_fedavg_waits_for_the_new_version(testbed: Testbed) -> None:
    run = _run(testbed, "fedavg", horizon_s=40.0, max_versions=3)
    assert run.versions == 3
    assert set(run.staleness) == {0}
    assert not run.rejected
    arrivals = [e for e in run.events if e.kind == "arrive"]
    assert arrivals and all(e.staleness == 0 for e in arrivals)
    # every version folds one update from every device
    assert sorted(run.folded.values()) == [3] * len(testbed.devices)


def test_asynchronous_runs_are_stale(testbed: Testbed) -> None:
    run = _run(testbed, "fedasync")
    assert max(run.staleness) > 0


def test_first_arrival_is_charged_from_the_profile(testbed: Testbed) -> None:
    run = _run(testbed)
    timing = Timing()
    starts: dict[str, float] = {}
    for e in run.events:
        if e.kind == "start":
            starts.setdefault(e.device, e.time)  # each device's first round
    first = next(e for e in run.events if e.kind == "arrive")
    p = next(d.profile for d in testbed.devices if d.device_id == first.device)
    assert first.bytes is not None
    expected = starts[first.device] + timing.train_s(p) + timing.upload_s(p, first.bytes)
    assert first.time == pytest.approx(expected, abs=1e-9)
    # the fast class (x86 laptop, step_speed 1.0) arrives before the slow one (rpi4, 0.1)
    assert p.name == "x86-laptop"


def test_horizon_and_version_limit_bound_the_run(testbed: Testbed) -> None:
    short = _run(testbed, horizon_s=3.0, max_versions=0)
    assert short.events, "a 3-s horizon still sees the first updates"
    assert all(e.time <= 3.0 for e in short.events)
    capped = _run(testbed, horizon_s=1000.0, max_versions=2)
    assert capped.versions == 2
    assert [e.version for e in capped.events if e.kind == "aggregate"] == [1, 2]


def test_wall_limit_stops_a_run_where_it_got(testbed: Testbed, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = _run(testbed, horizon_s=12.0)
    assert not whole.wall_limited
    ticks = iter(range(10**9))
    monkeypatch.setattr(time, "monotonic", lambda: float(next(ticks)))  # each reading one wall second on
    cut = _run(testbed, horizon_s=12.0, wall_limit_s=20.0)
    assert cut.wall_limited
    assert 0 < cut.end_time < whole.end_time
    assert cut.final is not None and cut.curve[-1].version == cut.final.version  # the last version is scored


def test_evaluation_at_every_version(testbed: Testbed) -> None:
    run = _run(testbed)
    assert [p.version for p in run.curve] == list(range(run.versions + 1))
    assert [p.time for p in run.curve] == sorted(p.time for p in run.curve)
    assert set(run.curve[0].per_domain) == {"arithmetic", "code", "prose"}
    assert all(p.worst_device >= min(p.per_domain.values()) for p in run.curve)


def test_sparse_evaluation_still_scores_the_last_version_when_it_was_made(testbed: Testbed) -> None:
    run = _run(testbed, eval_every=4, max_versions=6)
    made = {e.version: e.time for e in run.events if e.kind == "aggregate"}
    assert [p.version for p in run.curve] == [0, 4, 6]
    assert run.curve[-1].time == made[6]


def test_evaluation_interval_is_in_virtual_time(testbed: Testbed) -> None:
    run = _run(testbed, "fedasync", eval_interval_s=2.0, max_versions=12)
    times = [p.time for p in run.curve]
    gaps = [b - a for a, b in itertools.pairwise(times[:-1])]  # the last one is always scored
    assert len(run.curve) < run.versions + 1
    assert all(g >= 2.0 for g in gaps)
    assert run.curve[-1].version == run.versions


def test_unavailable_devices_go_offline(testbed: Testbed) -> None:
    flaky = [replace(d, profile=replace(d.profile, availability=0.5)) for d in testbed.devices]
    tb = replace(testbed, devices=flaky)
    run = _run(tb, horizon_s=8.0, max_versions=0)
    offline = [e for e in run.events if e.kind == "offline"]
    assert offline
    assert _csv(run) == _csv(_run(tb, horizon_s=8.0, max_versions=0))


def test_bytes_are_counted_from_encoded_messages(testbed: Testbed) -> None:
    run = _run(testbed)
    up = sum(e.bytes or 0 for e in run.events if e.kind == "arrive")
    down = sum(e.bytes or 0 for e in run.events if e.kind == "receive")
    assert run.bytes_up == up > 0
    assert run.bytes_down >= down > 0
    int8 = next(e.bytes for e in run.events if e.kind == "arrive")
    fp32_run = _run(testbed, wire_quantization="fp32")
    fp32 = next(e.bytes for e in fp32_run.events if e.kind == "arrive")
    assert int8 is not None and fp32 is not None and fp32 > 2 * int8
    plain_run = _run(testbed, wire_codec="none")  # the same updates, not deflated
    plain = [e.bytes or 0 for e in plain_run.events if e.kind == "arrive"]
    deflated = [e.bytes or 0 for e in run.events if e.kind == "arrive"]
    assert len(plain) == len(deflated) and all(d < p for d, p in zip(deflated, plain, strict=True))


def test_event_queue_is_fifo_on_ties_and_refuses_the_past() -> None:
    q: EventQueue[str] = EventQueue()
    q.push(2.0, "b")
    q.push(1.0, "a")
    q.push(2.0, "c")
    assert [q.pop()[1] for _ in range(3)] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="before the current time"):
        q.push(1.0, "late")


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="horizon_s"):
        make_sim_config(horizon_s=0.0)
    with pytest.raises(ConfigError, match="wire_quantization"):
        make_sim_config(wire_quantization="int4")
    with pytest.raises(ConfigError, match="wall_limit_s must be ≥ 0 seconds"):
        make_sim_config(wall_limit_s=-1.0)
    with pytest.raises(ConfigError, match="wire_codec must be one of none, deflate, got 'zstd'"):
        make_sim_config(wire_codec="zstd")


class _SlowDownlink(Timing):
    """The slow class downloads a global adapter for longer than the fast class takes to make versions."""

    def download_s(self, p: DeviceProfile, nbytes: int) -> float:
        return 20.0 if p.step_speed < 0.5 else 0.05


def test_a_version_still_downloading_is_not_pruned(testbed: Testbed) -> None:
    # fedasync makes a version per arrival of the fast devices while the slow ones are still
    # downloading version 0; when it lands they must still be able to train from it.
    run = _run(testbed, "fedasync", timing=_SlowDownlink(), horizon_s=30.0, max_versions=0)
    starts = [e for e in run.events if e.kind == "start"]
    assert run.versions >= 5 and len(starts) > len(testbed.devices)
