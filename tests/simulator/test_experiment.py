"""Every strategy and ablation in a test-sized simulation, the report, and the CLI."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import pytest

from alignfed.errors import ConfigError
from simulator import report
from simulator.cli import add_simulate_parser
from simulator.experiment import ExperimentConfig, ExperimentResult, run_experiment
from simulator.testbed import Testbed
from simulator.variants import VARIANT_NAMES, parse_override, select_variants
from tests.simulator.conftest import make_sim_config


@pytest.fixture(scope="module")
def experiment(testbed: Testbed) -> ExperimentResult:
    variants = select_variants(["all"], devices=len(testbed.devices), k=2, overrides=["alignfed.max_wait_s=0.5"])
    config = ExperimentConfig(variants=tuple(variants), simulation=make_sim_config(horizon_s=12.0, max_versions=6))
    return run_experiment(testbed, config, accuracy=lambda tensors: 0.25)


def test_every_strategy_and_ablation_runs(experiment: ExperimentResult) -> None:
    assert [r.variant for r in experiment.runs] == list(VARIANT_NAMES)
    for run in experiment.runs:
        assert run.rounds > 0, run.variant
        assert run.versions >= 1, run.variant
        assert np.isfinite(run.curve[-1].mean), run.variant
        assert run.accuracy and run.accuracy[-1].version == run.versions


def test_variants_really_differ(experiment: ExperimentResult) -> None:
    by_name = {r.variant: r for r in experiment.runs}
    align = by_name["alignfed"]
    assert align.strategy == "alignfed" and by_name["alignfed-cur"].strategy == "alignfed"
    assert align.alignment, "alignfed should report alignment residuals"
    assert not by_name["alignfed-no-alignment"].alignment
    finals = {r.variant: r.curve[-1].mean for r in experiment.runs}
    assert len({round(v, 9) for v in finals.values()}) > 3


def test_target_defaults_to_fedavg_final_loss(experiment: ExperimentResult) -> None:
    fedavg = experiment.runs[0]
    assert fedavg.variant == "fedavg"
    assert experiment.target == fedavg.curve[-1].mean
    assert experiment.summaries[0].time_to_target_s is not None


def test_report_files_and_one_row_per_variant(experiment: ExperimentResult, testbed: Testbed, tmp_path: Path) -> None:
    files = report.write_report(experiment, testbed, make_sim_config(), tmp_path)
    for name in (
        report.REPORT,
        report.RESULTS_CSV,
        report.CURVES_CSV,
        report.EVENTS_CSV,
        report.LOSS_PNG,
        report.ACCURACY_PNG,
        report.STALENESS_PNG,
        report.CONTRIBUTIONS_PNG,
    ):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    assert files.markdown == tmp_path / report.REPORT
    rows = list(csv.DictReader((tmp_path / report.RESULTS_CSV).open()))
    assert [r["variant"] for r in rows] == list(VARIANT_NAMES)
    md = files.markdown.read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in VARIANT_NAMES]
    assert len(table) == len(VARIANT_NAMES)
    assert "time-to-target (s)" in md and "Jain's index" in md and "coordinator CPU (s)" in md
    events = list(csv.DictReader((tmp_path / report.EVENTS_CSV).open()))
    assert {e["variant"] for e in events} == set(VARIANT_NAMES)
    assert set(events[0]) >= {"time", "kind", "device", "version", "staleness", "bytes", "loss"}


def test_select_variants_and_overrides() -> None:
    vs = select_variants(["fedavg,alignfed-cur", "fedbuff"], devices=6, overrides=["alignfed.tau_max=16"])
    assert [v.name for v in vs] == ["fedavg", "alignfed-cur", "fedbuff"]
    assert vs[0].options == {"n": 6} and vs[0].synchronous
    assert vs[1].options == {"k": 2, "method": "cur", "tau_max": 16}
    assert parse_override("fedasync.alpha=0.4") == ("fedasync", "alpha", 0.4)
    assert parse_override("alignfed.method=qrcp") == ("alignfed", "method", "qrcp")
    with pytest.raises(ConfigError, match="unknown variant"):
        select_variants(["fedprox"], devices=4)
    with pytest.raises(ConfigError, match=r"TARGET\.KEY=VALUE"):
        parse_override("tau_max=3")
    with pytest.raises(ConfigError, match="neither a variant nor a strategy"):
        select_variants(["fedbuff"], devices=4, overrides=["fedprox.mu=1"])


def test_bad_strategy_option_names_the_variant(testbed: Testbed) -> None:
    vs = select_variants(["fedbuff"], devices=4, overrides=["fedbuff.buffer=3"])
    with pytest.raises(ConfigError, match="variant 'fedbuff'"):
        run_experiment(testbed, ExperimentConfig(variants=tuple(vs), simulation=make_sim_config()))


def test_cli_runs_and_writes_the_report(tiny_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="alignfed")
    add_simulate_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "report"
    args = parser.parse_args(
        [
            "simulate",
            "--bundle",
            str(tiny_bundle),
            "--devices",
            "3",
            "--classes",
            "2",
            "--local-steps",
            "2",
            "--batch",
            "2",
            "--seq-len",
            "16",
            "--strategies",
            "fedbuff,alignfed",
            "--horizon",
            "6",
            "--max-versions",
            "3",
            "--eval-examples",
            "3",
            "--train-examples",
            "12",
            "--eval-seq-len",
            "24",
            "--calibration-tokens",
            "24",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert args.fn(args) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / report.REPORT}" in printed
    rows = list(csv.DictReader((out / report.RESULTS_CSV).open()))
    assert [r["variant"] for r in rows] == ["fedbuff", "alignfed"]


def test_cli_partition_choices_match_the_partition_module() -> None:
    from simulator.cli import PARTITIONS
    from simulator.partition import KINDS

    assert PARTITIONS == KINDS


def test_cli_help_lists_every_variant(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="alignfed")
    add_simulate_parser(parser.add_subparsers(dest="command"))
    with pytest.raises(SystemExit):
        parser.parse_args(["simulate", "--help"])
    text = capsys.readouterr().out
    for name in VARIANT_NAMES:
        assert name in text
    for flag in ("--bundle", "--data", "--devices", "--classes", "--horizon", "--max-versions", "--eval-examples"):
        assert flag in text


def test_each_finished_variant_is_handed_out_before_the_next_runs(testbed: Testbed) -> None:
    variants = select_variants(["fedavg,fedbuff,fedasync"], devices=len(testbed.devices), k=2)
    config = ExperimentConfig(variants=tuple(variants), simulation=make_sim_config(horizon_s=6.0, max_versions=2))
    seen: list[list[str]] = []
    final = run_experiment(testbed, config, on_variant=lambda r: seen.append([x.variant for x in r.runs]))
    assert seen == [["fedavg"], ["fedavg", "fedbuff"]]  # the reference (fedavg) runs first
    assert [r.variant for r in final.runs] == ["fedavg", "fedbuff", "fedasync"]
    assert final.target is not None
