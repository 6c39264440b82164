"""CI-sized runs of the experiments' commands (docs/results.md) on the tiny model.

Each test runs `alignfed simulate` with the options its experiment uses at full scale — only the
fleet, horizon and data are shrunk — so a change that breaks an experiment's command fails here,
not hours into a run. The quality measure (perplexity of saved adapters through llama.cpp) is
tests/simulator/test_saved_adapters.py.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pytest

from alignfed.profiles import PROFILE_DIR
from simulator import report
from simulator.cli import add_simulate_parser
from simulator.variants import VARIANT_NAMES

SMALL = (
    *("--devices", "4", "--local-steps", "1", "--batch", "2", "--seq-len", "16", "--eval-examples", "3"),
    *("--train-examples", "12", "--eval-seq-len", "24", "--calibration-tokens", "24", "--no-progress"),
)


@pytest.fixture(autouse=True)
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """The PNG plots are tested with the report (test_experiment.py); drawn after every variant,
    they would cost most of these runs' time, so here they are not drawn."""
    monkeypatch.setattr(report, "write_plots", lambda *_: [])


def simulate(argv: list[str]) -> list[dict[str, str]]:
    parser = argparse.ArgumentParser(prog="alignfed")
    add_simulate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["simulate", *argv, *SMALL])
    assert args.fn(args) == 0
    return list(csv.DictReader((Path(args.out) / report.RESULTS_CSV).open()))


def test_long_horizon_every_variant(tiny_bundle: Path, tmp_path: Path) -> None:
    """Experiment 1: all variants (there: ≥ 3 seeds by --seed, a horizon with ≥ 20 FedAvg rounds)."""
    rows = simulate(
        [
            *("--bundle", str(tiny_bundle), "--classes", "2", "--strategies", "all", "--seed", "1"),
            *("--horizon", "6", "--max-versions", "2", "--trainer", "batched", "--out", str(tmp_path / "long")),
        ]
    )
    assert [r["variant"] for r in rows] == list(VARIANT_NAMES)
    assert all(int(r["versions"]) == 2 for r in rows)


def test_strong_drift_alignment_on_and_off(tiny_model: Path, tmp_path: Path) -> None:
    """Experiment 2: LoRA on all seven projections, larger rank, a class 20× slower, τ up to 32."""
    from export.bundle import export_bundle

    bundle = tmp_path / "bundle"  # `alignfed export --targets q,k,v,o,gate,up,down --rank 8` (no GGUF: not served)
    targets = ("q", "k", "v", "o", "gate", "up", "down")
    export_bundle(tiny_model, bundle, targets=targets, rank=8, alpha=16.0, seed=0, write_gguf=False)
    slow = tmp_path / "slow.toml"
    laptop = PROFILE_DIR / "x86-laptop.toml"
    slow.write_text(
        laptop.read_text()
        .replace('name = "x86-laptop"', 'name = "slow"')
        .replace("step_speed = 1.0", "step_speed = 0.05")
    )
    assert "step_speed = 0.05" in slow.read_text()
    rows = simulate(
        [
            *("--bundle", str(bundle), "--profiles", f"{slow},{laptop}", "--classes", "2", "--lr", "0.02"),
            *("--strategies", "alignfed,alignfed-no-alignment", "--set", "alignfed.tau_max=32"),
            *("--horizon", "4", "--max-versions", "3", "--trainer", "batched", "--out", str(tmp_path / "drift")),
        ]
    )
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"alignfed", "alignfed-no-alignment"}
    assert by["alignfed"]["alignment_residual"] not in ("", "—")  # ρ is reported where alignment ran


def test_refactorizations_version_by_version(tiny_bundle: Path, tmp_path: Path) -> None:
    """Experiment 3: PCA vs QRCP vs CUR, every version evaluated."""
    rows = simulate(
        [
            *("--bundle", str(tiny_bundle), "--classes", "2", "--strategies", "alignfed,alignfed-qrcp,alignfed-cur"),
            *("--horizon", "6", "--max-versions", "3", "--eval-every", "1", "--trainer", "batched"),
            *("--out", str(tmp_path / "refac")),
        ]
    )
    assert [r["variant"] for r in rows] == ["alignfed", "alignfed-qrcp", "alignfed-cur"]
    curves = list(csv.DictReader((tmp_path / "refac" / report.CURVES_CSV).open()))
    for variant in ("alignfed", "alignfed-qrcp", "alignfed-cur"):
        versions = [int(c["version"]) for c in curves if c["variant"] == variant]
        assert versions == list(range(len(versions))) and len(versions) >= 3


def test_byzantine_with_the_ingest_norm_bound_set_from_the_command_line(tiny_bundle: Path, tmp_path: Path) -> None:
    """Experiment 6: --byzantine, --attack and --max-delta-norm reach the run; the simulated coordinator
    validates like the live one, so a bound below every delta refuses every update."""
    common = ["--bundle", str(tiny_bundle), "--classes", "1", "--strategies", "fedbuff", "--horizon", "6"]
    attack = ["--byzantine", "0.25", "--attack", "scale", "--max-versions", "2"]
    (open_run,) = simulate([*common, *attack, "--max-delta-norm", "inf", "--out", str(tmp_path / "inf")])
    assert int(open_run["versions"]) == 2 and int(open_run["rejected"]) == 0
    (shut,) = simulate([*common, *attack, "--max-delta-norm", "1e-9", "--out", str(tmp_path / "shut")])
    assert int(shut["versions"]) == 0 and int(shut["rejected"]) > 0


def test_uplink_and_downlink_codecs(tiny_bundle: Path, tmp_path: Path) -> None:
    """The codec experiment (docs/results.md §9): 4-bit updates of rank r/2 with a 2r carry and a
    4-bit delta downlink against today's wire, the same seed and versions."""
    common = ("--bundle", str(tiny_bundle), "--classes", "2", "--strategies", "fedbuff", "--horizon", "6")
    today = simulate([*common, "--max-versions", "3", "--out", str(tmp_path / "today")])
    small = simulate(
        [
            *common,
            *("--max-versions", "3", "--wire", "int4c", "--delta-rank", "2", "--carry-rank", "8"),
            *("--downlink", "int4c", "--out", str(tmp_path / "small")),
        ]
    )
    assert int(small[0]["versions"]) == int(today[0]["versions"]) == 3
    per_update = [int(r[0]["bytes_up"]) / int(r[0]["accepted"]) for r in (today, small)]
    assert per_update[1] < per_update[0]
    assert int(small[0]["bytes_down"]) < 0.5 * int(today[0]["bytes_down"])
