"""Figures the integration tests measure (chaos counts and audit), printed at the end of the run."""

from __future__ import annotations

import pytest

FIGURES: list[str] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("integration figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
