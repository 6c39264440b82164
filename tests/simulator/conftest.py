"""A test-sized simulation: the tiny bundle, 4 devices in 2 classes (10× apart), short horizon."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.config import SimulationConfig
from simulator.fleet import FleetConfig
from simulator.testbed import Testbed, TestbedConfig

# Cheap rounds: 2 steps of 2 × 16 tokens.
OVERRIDES = {"local_steps": 2, "batch": 2, "seq_len": 16, "lr": 0.01}


def make_testbed_config(bundle: Path, **changes: object) -> TestbedConfig:
    base: dict[str, object] = {
        "bundle": bundle,
        "fleet": FleetConfig(devices=4, classes=2, overrides=OVERRIDES),
        "eval_examples": 4,
        "train_examples": 24,
        "eval_seq_len": 32,
        "calibration_tokens": 32,
    }
    base.update(changes)
    return TestbedConfig(**base)  # type: ignore[arg-type]


def make_sim_config(**changes: object) -> SimulationConfig:
    base: dict[str, object] = {"horizon_s": 12.0, "max_versions": 6}
    base.update(changes)
    return SimulationConfig(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def testbed(tiny_bundle: Path) -> Testbed:
    return Testbed.build(make_testbed_config(tiny_bundle))
