"""Helpers to run coordinator and edge daemons as real processes against a real broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from alignfed import tomlfile
from alignfed.corpora import DOMAINS, write_domain
from demo.local import DeviceSpec

REPO = Path(__file__).resolve().parents[2]


def fast_profile(path: Path, **overrides: object) -> Path:
    """A profile for tests: tiny batches, a few steps per round, a high learning rate."""
    doc: dict[str, object] = {
        "name": "test-fast",
        "description": "test profile",
        "arch": "x86_64",
        "trainer": "ort",
        "threads": 1,
        "memory_mb": 2048,
        "batch": 2,
        "seq_len": 32,
        "local_steps": 3,
        "lr": 0.02,
        "duty_cycle": 1.0,
        "step_speed": 1.0,
        "uplink_kbps": 1000.0,
        "downlink_kbps": 1000.0,
        "latency_ms": 1.0,
        "availability": 1.0,
        "quantization": "fp32",
        **overrides,
    }
    return tomlfile.write(path, doc)


def spawn(*args: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    out = open(log, "wb")  # noqa: SIM115 - handed to the child, closed with it
    return subprocess.Popen(
        [sys.executable, "-m", "alignfed.cli", *args], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO
    )


def wait_for(predicate: Callable[..., object], timeout: float, what: str, poll: float = 0.2) -> None:
    # `...`: called with no arguments, but loops pass lambdas that bind their loop variable as a default
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def stop(procs: list[subprocess.Popen[bytes]], timeout: float = 20) -> None:
    """SIGTERM every process still running (a clean shutdown), then wait; kill what does not exit."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()


def domain_devices(
    root: Path,
    profiles: Sequence[Path],
    rounds: int,
    *,
    examples: int = 40,
    extras: Sequence[Mapping[str, object]] = (),
) -> list[DeviceSpec]:
    """Device i (`dev-i`) on profile i, `examples` of built-in domain i (seed i), stopping after
    `rounds` rounds; `extras[i]` adds to its config (wire settings, resend timers)."""
    return [
        DeviceSpec(
            f"dev-{i}",
            str(profile),
            write_domain(root / f"data-{i}.jsonl", DOMAINS[i], examples, seed=i),
            extra={"max_rounds": rounds, "seed": i, **(extras[i] if extras else {})},
        )
        for i, profile in enumerate(profiles)
    ]


def read_logs(root: Path, tail: int = 3000) -> str:
    """The last `tail` characters of every *.log under `root`: what a failed assertion shows."""
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-tail:]}" for p in sorted(root.glob("*.log")))
