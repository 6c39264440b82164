"""One emulated aarch64 device joins a tiny federation whose broker and coordinator run natively.

    python -m tests.aarch64.federation --root ROOTFS --work /opt/alignfed-work --cpu cortex-a72

The device does what a board owner does (docs/devices.md): `alignfed flash` with an aarch64 torch
profile (refused on the wrong architecture, so it must run on the device), then `alignfed edge`.
It passes when the device trained and published its rounds without a rejection, the coordinator made
global version 1 from them, and the device received v1 back. Exit status 0 = pass.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from alignfed import tomlfile
from coordinator import config as ccfg
from coordinator.devices import add_device
from coordinator.store import Store
from tests.support.broker import Mosquitto
from tests.support.federation import spawn, wait_for

ROUNDS = 2
# A Pi 4's profile shrunk for a tiny model: 4 threads, where the multithreaded sgemm of the old wheel
# needed ARMv8.1 atomics.
PROFILE = {
    "name": "lane-pi", "description": "emulated board", "arch": "aarch64", "trainer": "torch", "threads": 4,
    "memory_mb": 2048, "batch": 2, "seq_len": 32, "local_steps": 3, "lr": 0.02, "duty_cycle": 1.0,
    "step_speed": 0.1, "uplink_kbps": 1000.0, "downlink_kbps": 1000.0, "latency_ms": 1.0, "availability": 1.0,
    "quantization": "fp32",
}  # fmt: skip

FLASH = f"""
import sys
from pathlib import Path
from edge.flash import flash
flash(profile=sys.argv[1], device_id="pi-0", federation="lane", broker=sys.argv[2], bundle=Path(sys.argv[3]),
      data=Path(sys.argv[4]), target=Path(sys.argv[5]), key=sys.argv[6], extra={{"max_rounds": {ROUNDS}, "seed": 0}})
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, required=True, help="the arm64 root on this machine")
    ap.add_argument("--work", default="/opt/alignfed-work", help="the prepared folder, as the device sees it")
    ap.add_argument("--python", default="/opt/alignfed/venv/bin/python", help="the device's python")
    ap.add_argument("--cpu", default="", help="QEMU_CPU for the device ('' = qemu's default)")
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()
    host_work = args.root / args.work.lstrip("/")
    run = host_work / "federation" / f"run-{args.cpu or 'default'}"
    subprocess.run(["rm", "-rf", str(run)], check=True)
    run.mkdir(parents=True)
    broker = Mosquitto(run / "broker").start()
    coord: subprocess.Popen[bytes] | None = None
    try:
        doc = {
            "federation": "lane",
            "bundle": str(host_work / "federation" / "bundle"),
            "database": str(run / "coordinator.sqlite"),
            "broker": {"url": broker.url},
            "strategy": {"name": "fedbuff", "k": 1, "server_lr": 1.0},
        }
        cfg = ccfg.load(tomlfile.write(run / "coordinator.toml", doc))
        tomlfile.write(run / "lane-pi.toml", PROFILE)
        key = json.loads(add_device(cfg, "pi-0", str(run / "lane-pi.toml")))["key"]
        coord = spawn("coordinator", "--config", str(run / "coordinator.toml"), log=run / "coordinator.log")
        dev = f"{args.work}/federation/{run.name}"  # the same folder, as the device sees it
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "PYTHONUNBUFFERED": "1"}
        if args.cpu:
            env["QEMU_CPU"] = args.cpu
        device = (
            f"cd / && {args.python} -c '{FLASH}' {dev}/lane-pi.toml {broker.url} {args.work}/federation/bundle "
            f"{args.work}/federation/data.jsonl {dev}/pi-0 {key} "
            f"&& {args.python} -m alignfed.cli edge --config {dev}/pi-0/device.toml"
        )
        t0 = time.monotonic()
        with open(run / "device.log", "wb") as log:
            rc = subprocess.run(
                ["chroot", str(args.root), "/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()),
                 "/bin/sh", "-c", device],
                stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout, check=False,
            ).returncode  # fmt: skip
        print(f"== device ({args.cpu or 'qemu default'}) finished in {time.monotonic() - t0:.0f} s, exit {rc}")
        text = (run / "device.log").read_text(errors="replace")
        if rc != 0:
            print(text[-4000:], file=sys.stderr)
            return 1
        store = Store(run / "coordinator.sqlite")
        wait_for(lambda: (store.latest_version() or 0) >= 1, 30, "global version 1")
        stats = store.stats()["pi-0"]
        ok = stats["rejected"] == 0 and stats["aggregated"] + stats["pending"] >= 1 and "global adapter v1" in text
        print(f"== coordinator: version {store.latest_version()}, device stats {stats}; device saw v1: "
              f"{'global adapter v1' in text}")  # fmt: skip
        store.close()
        if not ok:
            print(text[-4000:], file=sys.stderr)
        return 0 if ok else 1
    finally:
        if coord is not None and coord.poll() is None:
            coord.send_signal(signal.SIGTERM)
            coord.wait(timeout=20)
        broker.stop()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
