"""Byte counts for people: one spelling of sizes in every report and summary."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """`512 B`, `4.0 KiB`, `3.2 MiB`, `1.5 GiB` (binary units, one decimal)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
