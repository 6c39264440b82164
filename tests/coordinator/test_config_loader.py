"""Issue 10, defect 4: one typed loader reads every config file, naming file, field, expected and
actual value, and refuses unknown keys; strategy options come from the strategy's own signature."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import pytest

from alignfed import tomlfile
from alignfed.errors import ConfigError
from alignfed.profiles import load_profile
from coordinator import config as ccfg
from coordinator import strategies
from coordinator.strategies.fedbuff import FedBuff
from edge import config as ecfg
from tests.edge.test_config import write as device_toml
from tests.support.federation import fast_profile


def coordinator_toml(tmp_path: Path, **tables: object) -> Path:
    doc: dict[str, object] = {"federation": "f", "bundle": "b", "broker": {"url": "mqtt://h:1"}, **tables}
    return tomlfile.write(tmp_path / "coordinator.toml", doc)


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ({"name": "fedbuff", "k": "three"}, r"coordinator.toml: \[strategy\].k = 'three'; expected an integer$"),
        ({"name": "fedbuff", "k": True}, r"\[strategy\].k = True; expected an integer$"),
        (
            {"name": "fedbuff", "kk": 3},
            r"coordinator.toml: unknown field \[strategy\].kk; expected one of aggregator, clip_norm, clip_relative, "
            r"error_feedback, k, method, norm_window, outlier_factor, server_lr, "
            r"staleness, trim$",
        ),
        ({"name": "fedbuff", "k": 2, "method": "svd"}, r"\[strategy\].method = 'svd'; expected one of 'pca', 'qrcp'"),
        ({"name": "fedbuff", "k": 2, "server_lr": "1"}, r"\[strategy\].server_lr = '1'; expected a number$"),
        ({"name": "alignfed", "rho0": [1]}, r"\[strategy\].rho0 = \[1\]; expected a number$"),
        ({"name": "alignfed", "alignment": "no"}, r"\[strategy\].alignment = 'no'; expected true or false$"),
        ({"name": "fedbufff"}, r"\[strategy\].name = 'fedbufff'; expected one of fedavg, fedasync, fedbuff"),
    ],
)
def test_strategy_options_are_typed_from_the_strategy_signature(
    tmp_path: Path, strategy: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        ccfg.load(coordinator_toml(tmp_path, strategy=strategy))


def test_good_strategy_options_are_converted(tmp_path: Path) -> None:
    cfg = ccfg.load(coordinator_toml(tmp_path, strategy={"name": "alignfed", "k": 4, "rho0": 1, "alignment": False}))
    assert cfg.strategy_options == {"k": 4, "rho0": 1.0, "alignment": False}
    assert isinstance(cfg.strategy_options["rho0"], float)


def test_an_option_a_strategy_gains_later_is_accepted_without_touching_the_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Clipped(FedBuff):
        name: ClassVar[str] = "clipped"

        def __init__(self, k: int, clip_norm: float | None = None, robust: Literal["none", "median"] = "none") -> None:
            super().__init__(k)
            # FedBuff's own `robust` is its combiner: this option is kept under another name.
            self.clip_norm, self.robust_method = clip_norm, robust

    import sys
    import types

    module = types.ModuleType("clipped_strategy")
    monkeypatch.setattr(module, "Clipped", Clipped, raising=False)
    monkeypatch.setitem(sys.modules, "clipped_strategy", module)
    monkeypatch.setitem(strategies.REGISTRY, "clipped", ("clipped_strategy", "Clipped"))
    monkeypatch.setattr(strategies, "NAMES", (*strategies.NAMES, "clipped"))
    cfg = ccfg.load(
        coordinator_toml(tmp_path, strategy={"name": "clipped", "k": 2, "clip_norm": 5, "robust": "median"})
    )
    assert cfg.strategy_options == {"k": 2, "clip_norm": 5.0, "robust": "median"}
    with pytest.raises(ConfigError, match=r"\[strategy\].robust = 'mean'; expected one of 'none', 'median'$"):
        ccfg.load(coordinator_toml(tmp_path, strategy={"name": "clipped", "k": 2, "robust": "mean"}))


def test_a_required_strategy_option_is_demanded_when_the_coordinator_starts(tmp_path: Path, tiny_bundle: Path) -> None:
    from coordinator.service import Coordinator

    path = tomlfile.write(
        tmp_path / "coordinator.toml",
        {"federation": "f", "bundle": str(tiny_bundle), "database": str(tmp_path / "c.sqlite"),
         "broker": {"url": "mqtt://h:1"}, "strategy": {"name": "fedbuff"}},
    )  # fmt: skip
    cfg = ccfg.load(path)  # add-device reads the same file and needs no strategy options
    with pytest.raises(ConfigError, match=r"coordinator.toml: missing field \[strategy\].k \(an integer\)"):
        Coordinator(cfg)


@pytest.mark.parametrize(
    ("tables", "message"),
    [
        ({"federaton": "f"}, r"coordinator.toml: unknown field federaton; expected one of broker, bundle, calibration"),
        ({"broker": {"url": "mqtt://h:1", "pasword": "x"}}, r"unknown field \[broker\].pasword; expected one of"),
        ({"broker": {"url": 1883}}, r"\[broker\].url = 1883; expected a string$"),
        ({"broker": "mqtt://h:1"}, r"broker = 'mqtt://h:1'; expected a table \[broker\]"),
        ({"ingest": {"tau_max": 1.5}}, r"\[ingest\].tau_max = 1.5; expected an integer$"),
        ({"ingest": {"max_delta_norm": -1}}, r"\[ingest\].max_delta_norm = -1.0; expected a value ≥ 0"),
        ({"calibration": {"tokens": "many"}}, r"\[calibration\].tokens = 'many'; expected an integer$"),
        ({"calibration": {"file": "c.jsonl"}}, r"unknown field \[calibration\].file; expected one of data, tokens$"),
        ({"downlink": "int3"}, r"coordinator.toml: downlink = 'int3'; expected one of snapshot, fp32, int8c, int4c$"),
    ],
)
def test_coordinator_toml_fields_are_typed(tmp_path: Path, tables: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ccfg.load(coordinator_toml(tmp_path, **tables))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"max_round": 3},
            r"device.toml: unknown field max_round; expected one of broker, bundle, carry_rank, data, delta_feedback",
        ),
        ({"delta_feedback": "yes"}, r"device.toml: delta_feedback = 'yes'; expected true or false$"),
        ({"max_rounds": 2.5}, r"device.toml: max_rounds = 2.5; expected an integer$"),
        ({"seed": -1}, r"device.toml: seed = -1; expected a value ≥ 0$"),
        ({"carry_rank": -1}, r"device.toml: carry_rank = -1; expected a value ≥ 0$"),
        ({"downlink": "deltas"}, r"device.toml: downlink = 'deltas'; expected 'delta' or 'snapshot'$"),
    ],
)
def test_device_toml_fields_are_typed(tmp_path: Path, extra: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ecfg.load(device_toml(tmp_path, **extra))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"threads": "four"}, r"p.toml: threads = 'four'; expected an integer$"),
        ({"lr": True}, r"p.toml: lr = True; expected a number$"),
        ({"threds": 4}, r"p.toml: unknown field threds; expected one of accelerator, arch, availability, batch"),
        ({"threads": 0}, r"p.toml: threads = 0; expected 1 ≤ value ≤ 256"),
        ({"max_rank": "4"}, r"p.toml: max_rank = '4'; expected an integer$"),
        ({"max_rank": -1}, r"p.toml: max_rank = -1; expected 0 ≤ value ≤ 4096"),
    ],
)
def test_profile_fields_are_typed(tmp_path: Path, override: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_profile(fast_profile(tmp_path / "p.toml", **override))


@dataclass(frozen=True)
class Robust:
    clip_norm: float = 0.0
    method: Literal["none", "median", "trimmed_mean"] = "none"


def test_a_dataclass_option_is_a_sub_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An option group a strategy takes as a dataclass parameter is written [strategy.robust]."""

    class WithRobust(FedBuff):
        def __init__(self, k: int, robust: Robust | None = None) -> None:
            super().__init__(k)
            self.robust_options = robust  # FedBuff's own `robust` is its combiner

    import sys
    import types

    module = types.ModuleType("robust_strategy")
    monkeypatch.setattr(module, "WithRobust", WithRobust, raising=False)
    monkeypatch.setitem(sys.modules, "robust_strategy", module)
    monkeypatch.setitem(strategies.REGISTRY, "robust", ("robust_strategy", "WithRobust"))
    monkeypatch.setattr(strategies, "NAMES", (*strategies.NAMES, "robust"))
    good = {"name": "robust", "k": 2, "robust": {"clip_norm": 3, "method": "median"}}
    cfg = ccfg.load(coordinator_toml(tmp_path, strategy=good))
    assert cfg.strategy_options == {"k": 2, "robust": Robust(clip_norm=3.0, method="median")}
    built = strategies.build("robust", **cfg.strategy_options)
    assert isinstance(built, WithRobust) and built.robust_options == Robust(3.0, "median")
    bad = {"name": "robust", "k": 2, "robust": {"clip_norm": "x"}}
    with pytest.raises(ConfigError, match=r"\[strategy\].robust = \{'clip_norm': 'x'\}; expected a table of clip_norm "
                       r"\(a number\), method \(one of 'none', 'median', 'trimmed_mean'\)"):  # fmt: skip
        ccfg.load(coordinator_toml(tmp_path, strategy=bad))


def test_a_profile_caps_the_lora_rank(tmp_path: Path) -> None:
    from alignfed.profiles import capped_delta_rank, lora_rank

    assert load_profile(fast_profile(tmp_path / "p.toml")).max_rank == 0  # no cap unless asked
    capped = load_profile(fast_profile(tmp_path / "c.toml", max_rank=2))
    assert [lora_rank(capped, r) for r in (8, 2, 1)] == [2, 2, 1]  # never above the bundle's rank
    assert lora_rank(load_profile(fast_profile(tmp_path / "p.toml")), 8) == 8
    # the uplink of a rank-k device sends at most 2k directions; an uncapped one what it was told
    assert [capped_delta_rank(d, 2, 8) for d in (0, 2, 8)] == [4, 2, 4]
    assert [capped_delta_rank(d, 8, 8) for d in (0, 2, 8)] == [0, 2, 8]
