"""Which memory allocator a training process runs on, and the one a device's unit should preload.

glibc's malloc keeps freed blocks of a training step in its heap, fragmented by the step's mix of
sizes (activations of 0.1–2 MB, dequantized weights, loss chunks), so a process's peak grows past
what the step holds live: measured on SmolLM2 int8 at 4×64 with checkpointing, 882 MB peak RSS on
glibc against 738 MB under jemalloc at the same step time (BENCHMARKS.md, "allocator"). Setting
glibc's mmap threshold low instead gives the same peak but 1.8× the step's CPU time (every block
mmapped and its pages zeroed again), so the device's systemd unit preloads jemalloc where the
board has it (Debian/Ubuntu package `libjemalloc2`, which scripts/setup-device.sh installs).
"""

from __future__ import annotations

from pathlib import Path

# Debian's multiarch locations (Raspberry Pi OS, Ubuntu on JetPack, this project's x86 machines).
JEMALLOC_PATHS = (
    Path("/usr/lib/aarch64-linux-gnu/libjemalloc.so.2"),
    Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"),
    Path("/usr/lib/libjemalloc.so.2"),
)


def find_jemalloc(candidates: tuple[Path, ...] = JEMALLOC_PATHS) -> Path | None:
    """The first jemalloc shared library present, or None."""
    return next((p for p in candidates if p.is_file()), None)


def unit_environment(candidates: tuple[Path, ...] = JEMALLOC_PATHS) -> str:
    """The systemd `Environment=` line that preloads jemalloc ("" when the board has none)."""
    lib = find_jemalloc(candidates)
    return f"Environment=LD_PRELOAD={lib}\n" if lib is not None else ""


def current(maps: Path = Path("/proc/self/maps")) -> str:
    """'jemalloc' or 'tcmalloc' when this process has one mapped, else 'glibc malloc'."""
    try:
        text = maps.read_text()
    except OSError:
        return "unknown (no /proc/self/maps)"
    for name in ("jemalloc", "tcmalloc"):
        if f"lib{name}" in text:
            return name
    return "glibc malloc"
