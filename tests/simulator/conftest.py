"""A test-sized simulation: the tiny bundle, 4 devices in 2 classes (10× apart), short horizon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from simulator.config import SimulationConfig
from simulator.fleet import FleetConfig
from simulator.testbed import Testbed, TestbedConfig

# Cheap rounds: 2 steps of 2 × 16 tokens.
OVERRIDES = {"local_steps": 2, "batch": 2, "seq_len": 16, "lr": 0.01}


def make_testbed_config(bundle: Path, **changes: object) -> TestbedConfig:
    base: dict[str, Any] = {  # field -> value, checked by the config itself
        "bundle": bundle,
        "fleet": FleetConfig(devices=4, classes=2, overrides=OVERRIDES),
        "eval_examples": 4,
        "train_examples": 24,
        "eval_seq_len": 32,
        "calibration_tokens": 32,
    }
    base.update(changes)
    return TestbedConfig(**base)


def make_sim_config(**changes: object) -> SimulationConfig:
    base: dict[str, Any] = {"horizon_s": 12.0, "max_versions": 6}  # field -> value
    base.update(changes)
    return SimulationConfig(**base)


@pytest.fixture(scope="session")
def testbed(tiny_bundle: Path) -> Testbed:
    return Testbed.build(make_testbed_config(tiny_bundle))
