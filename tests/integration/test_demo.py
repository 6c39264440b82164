"""The README's demo command, on the tiny model: a whole federation on one machine, reported."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.federation import REPO

pytestmark = pytest.mark.integration

TASKS = ("math", "telemetry", "code")


def test_demo_runs_and_reports(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "alignfed.cli", "demo", "--model", "tiny", "--devices", "3", "--rounds", "2",
         "--minutes", "4", "--dashboard", "127.0.0.1:0", "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )  # fmt: skip
    out = done.stdout
    assert done.returncode == 0, out + done.stderr[-3000:]
    # the steps in order, the broker, the dashboard's address printed before the devices start
    steps = [out.index(f"{n}/6 ") for n in range(1, 7)]
    assert steps == sorted(steps), out
    assert "embedded amqtt" in out
    dashboard = re.search(r"dashboard: (http://127\.0\.0\.1:\d+/)", out)
    assert dashboard is not None and out.index(dashboard.group(0)) < out.index("5/6 "), out
    assert "alignfed: coordinator" in out  # AlignFed is the default strategy
    # no library log lines in the report (they go to demo.log)
    assert not re.search(r"\b(INFO|WARNING|DEBUG)\b|gguf_writer|llama_", out), out
    assert (tmp_path / "demo" / "demo.log").is_file()

    # version history: version 0 and at least one aggregation (3 devices x 2 updates, K = 3)
    history = out[out.index("version history") : out.index("contributions per device")]
    versions = [int(m.group(1)) for m in re.finditer(r"^\s+(\d+)\s+-?\d+\s+\d+\s+[\d.]+\s", history, re.M)]
    assert versions[0] == 0 and max(versions) >= 1, out
    # contributions: every device's two updates arrived, none rejected, each with its task and class
    for d, cls, task in (("dev-0", "fast", "math"), ("dev-1", "medium", "telemetry"), ("dev-2", "slow", "code")):
        row = re.search(
            rf"^\s+{d}\s+{cls}\s+{task}\s+(\d+)\s+(\d+)\s+(\d+)\s+\d+%\s+[\d.]+\s+[\d.]+\s+(\d+)$", out, re.M
        )
        assert row is not None, out
        aggregated, pending, rejected, nbytes = (int(x) for x in row.groups())
        assert aggregated + pending == 2 and rejected == 0 and nbytes > 0
    # eval loss per task before / after on held-out examples; the federation learned on average
    before, after = [], []
    for task in TASKS:
        row = re.search(rf"^\s+{task}\s+([\d.]+)\s+([\d.]+)$", out, re.M)
        assert row is not None, out
        before.append(float(row.group(1)))
        after.append(float(row.group(2)))
    assert sum(after) < sum(before), out
    # the same three prompts, base alone and with the adapter: six non-empty answers
    answers = out[out.index("6/6 ") : out.index("done in")]
    for task in TASKS:
        assert f"[{task}] " in answers
    assert answers.count("base alone:") == 3 and answers.count("with the federated adapter (alignfed v") == 3
    blocks = re.findall(r":(?:  \(same as base\))?\n((?:\s+\| .*\n)+)", answers)
    assert len(blocks) == 6, answers
    assert all(b.replace("|", "").strip() and "(empty)" not in b for b in blocks), answers
