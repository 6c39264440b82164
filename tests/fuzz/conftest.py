"""Fuzz tallies: every fuzz test records what it sent and how each case was answered; the counts
and reject reasons are printed at the end of the run (and written to $ALIGNFED_FUZZ_REPORT if set)."""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict

import pytest

TALLIES: dict[str, Counter[str]] = defaultdict(Counter)


@pytest.fixture
def tally() -> dict[str, Counter[str]]:
    return TALLIES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TALLIES:
        return
    tr = terminalreporter
    tr.section("fuzz: cases and how they were answered")
    for target, counts in sorted(TALLIES.items()):
        if "cases" in counts:
            tr.write_line(f"{target}: {counts['cases']} cases, {counts.get('crashes', 0)} crashes")
        else:
            tr.write_line(f"{target}:")
        for reason, n in counts.most_common():
            if reason not in ("cases", "crashes"):
                tr.write_line(f"    {n:6d}  {reason}")
    path = os.environ.get("ALIGNFED_FUZZ_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump({t: dict(c) for t, c in TALLIES.items()}, f, indent=1, sort_keys=True)
