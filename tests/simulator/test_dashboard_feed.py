"""`alignfed simulate --dashboard`: the simulator's events fill the same board and metrics."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dashboard.config import DashboardConfig
from dashboard.live import LiveDashboard
from simulator.cli import add_simulate_parser
from simulator.experiment import ExperimentConfig, run_experiment
from simulator.live import VariantFeed, feeds
from simulator.testbed import Testbed
from simulator.variants import select_variants
from tests.simulator.conftest import make_sim_config


def test_a_simulation_feeds_the_dashboard(testbed: Testbed) -> None:
    variants = select_variants(["fedbuff", "alignfed"], devices=len(testbed.devices), k=2,
                               overrides=["alignfed.max_wait_s=0.5"])  # fmt: skip
    config = ExperimentConfig(variants=tuple(variants), simulation=make_sim_config(horizon_s=12.0, max_versions=4))
    live = LiveDashboard(DashboardConfig(port=0), federation="simulation")
    url = live.start()
    seen: dict[str, dict[str, Any]] = {}  # variant -> the board's JSON snapshot
    factory = feeds(live, {v.name: v.strategy for v in variants})

    def events(variant: str) -> VariantFeed:
        if seen:  # the previous variant's picture, just before the board is reset for this one
            seen[list(seen)[-1]] = live.board.snapshot()
        seen[variant] = {}
        return factory(variant)

    try:
        result = run_experiment(testbed, config, events=events)
        seen[list(seen)[-1]] = live.board.snapshot()
        with urllib.request.urlopen(url + "api/state", timeout=5) as r:
            served = json.loads(r.read())
        with urllib.request.urlopen(url + "metrics", timeout=5) as r:
            metrics = {s.name: s.value for f in text_string_to_metric_families(r.read().decode()) for s in f.samples
                       if not s.labels}  # fmt: skip
    finally:
        live.stop()
    assert served["federation"] == "alignfed" and served["seq"] >= seen["alignfed"]["seq"]
    for run in result.runs:
        snap = seen[run.variant]
        assert snap["strategy"] == run.strategy
        assert snap["version"] == run.versions >= 1
        assert [v["version"] for v in snap["lineage"]] == list(range(run.versions + 1))
        totals = snap["totals"]
        assert totals["accepted"] == sum(run.accepted.values())
        assert totals["rejected"] == sum(run.rejected.values())
        assert {d["id"] for d in snap["devices"]} == set(run.devices)
        # each evaluation's per-device held-out losses became the page's loss-over-time series
        last = run.curve[-1]
        for device, loss in last.per_device.items():
            assert snap["eval_loss"][device][-1][1] == pytest.approx(loss)
        folded = sum(run.folded.values())
        assert sum(snap["staleness_histogram"].values()) == sum(run.accepted.values()) >= folded
    align = seen["alignfed"]
    assert len(align["residuals"]) == len(result.runs[1].alignment)
    # Prometheus counts over the whole invocation: both variants
    assert metrics["alignfed_updates_accepted_total"] == sum(sum(r.accepted.values()) for r in result.runs)
    assert metrics["alignfed_global_version"] == result.runs[-1].versions


def test_simulate_takes_dashboard_address() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_simulate_parser(parser.add_subparsers())
    base = ["simulate", "--bundle", "b"]
    assert parser.parse_args(base).dashboard is None
    assert parser.parse_args([*base, "--dashboard"]).dashboard == "127.0.0.1:8080"
    assert parser.parse_args([*base, "--dashboard", "0.0.0.0:9100"]).dashboard == "0.0.0.0:9100"
