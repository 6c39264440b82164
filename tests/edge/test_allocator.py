"""The allocator a device's daemon runs on: found, preloaded by its unit, and reported at start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edge.allocator import JEMALLOC_PATHS, current, find_jemalloc, unit_environment


def test_the_first_present_library_is_chosen(tmp_path: Path) -> None:
    missing, there = tmp_path / "a" / "libjemalloc.so.2", tmp_path / "libjemalloc.so.2"
    there.write_bytes(b"\x7fELF")
    assert find_jemalloc((missing, there)) == there
    assert unit_environment((missing, there)) == f"Environment=LD_PRELOAD={there}\n"
    assert find_jemalloc((missing,)) is None
    assert unit_environment((missing,)) == ""  # a board without it keeps glibc's malloc


def test_the_running_allocator_is_read_from_the_process_maps(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f10 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert current(maps) == "glibc malloc"
    maps.write_text(maps.read_text() + "7f20-7f30 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n")
    assert current(maps) == "jemalloc"
    assert current(tmp_path / "absent").startswith("unknown")


def test_a_preloaded_jemalloc_is_what_the_process_runs_on() -> None:
    """The real library (scripts/setup.sh installs libjemalloc2): preloaded, a torch step runs on it."""
    lib = find_jemalloc(JEMALLOC_PATHS)
    assert lib is not None, "libjemalloc2 is not installed: run scripts/setup.sh"
    code = (
        "import torch; from edge.allocator import current; "
        "x = torch.randn(64, 64, requires_grad=True); (x @ x).sum().backward(); print(current())"
    )
    env = {"LD_PRELOAD": str(lib), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "jemalloc"
    plain = subprocess.run(
        [sys.executable, "-c", "from edge.allocator import current; print(current())"],
        env={"PYTHONPATH": env["PYTHONPATH"]},
        capture_output=True,
        text=True,
        check=True,
    )
    assert plain.stdout.strip() == "glibc malloc"
