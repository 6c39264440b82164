"""The import contracts in pyproject.toml hold, and would catch each layer break they exist for.

Each break is injected into a copy of the source tree; `lint-imports` must then fail naming the
contract it breaks. A module-level import cycle (which the contracts cannot see) is checked here too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("alignfed", "coordinator", "dashboard", "demo", "edge", "export", "runtime", "simulator")
LINT = Path(sys.executable).with_name("lint-imports")

# (module file, import injected, contract that must break) - the breaks a read of the tree once found
BREAKS = [
    (
        "export/check.py",
        "from alignfed.text import Batcher\nfrom edge.trainer import OrtTrainer",
        "edge, coordinator and export import none of each other",
    ),
    (
        "coordinator/calibration.py",
        "from edge.config import DeviceConfig",
        "edge, coordinator and export import none of each other",
    ),
    (
        "coordinator/calibration.py",
        "from simulator.domains import split",
        "production code imports neither the simulator nor the demo",
    ),
    (
        "simulator/engine.py",
        "from edge.daemon import EdgeDaemon",
        "the simulator drives the programs' cores, not their MQTT services",
    ),
    (
        "simulator/testbed.py",
        "from coordinator.service import Coordinator",
        "the simulator drives the programs' cores, not their MQTT services",
    ),
    (
        "alignfed/lowrank.py",
        "from coordinator.strategies.base import AdapterState",
        "the core and the runtimes import no program",
    ),
    ("runtime/llama.py", "from edge.config import DeviceConfig", "the core and the runtimes import no program"),
    (
        "edge/daemon.py",
        "from demo.local import DeviceSpec",
        "production code imports neither the simulator nor the demo",
    ),
    ("dashboard/board.py", "from coordinator.fairness import jain_index", "the dashboard imports only the core"),
]


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_contracts_hold() -> None:
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.fixture(scope="module")
def tree_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("tree")
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


@pytest.mark.parametrize(("rel", "line", "contract"), BREAKS, ids=[f"{b[0]}:{b[2][:24]}" for b in BREAKS])
def test_contracts_catch_break(tree_copy: Path, rel: str, line: str, contract: str) -> None:
    path = tree_copy / rel
    original = path.read_text()
    path.write_text(original + "\n" + line + "\n")
    try:
        result = lint(tree_copy)
    finally:
        path.write_text(original)
    assert result.returncode != 0, f"injecting {line!r} into {rel} broke no contract"
    assert f"{contract} BROKEN" in result.stdout, result.stdout


def module_cycles(root: Path) -> list[list[str]]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    script = Path(__file__).with_name("cycles.py")
    result = subprocess.run(
        [sys.executable, str(script)], cwd=root, env=env, capture_output=True, text=True, timeout=120, check=True
    )
    cycles: list[list[str]] = json.loads(result.stdout)
    return cycles


def test_no_module_import_cycle() -> None:
    assert module_cycles(ROOT) == []


def test_cycle_check_catches_a_cycle(tree_copy: Path) -> None:
    path = tree_copy / "export" / "source.py"
    original = path.read_text()
    path.write_text(original + "\n\ndef _reader() -> None:\n    from export.reader import open_source  # noqa\n")
    try:
        cycles = module_cycles(tree_copy)
    finally:
        path.write_text(original)
    assert any({"export.reader", "export.source"} <= set(c) for c in cycles), cycles
