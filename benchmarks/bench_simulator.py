"""Simulated device-steps per wall second: today's ORT trainer vs the batched PyTorch trainer.

    python benchmarks/bench_simulator.py [--bundle DIR] [--data NAME=PATH ...] [--devices 8] [--classes 4] [--batch 2]
        [--seq-len 64] [--local-steps 1] [--horizon 6] [--repeats 2] [--parts train,simulate]
        [--trainers ort,batched,batched-bf16]

Side by side in one process, the same bundle, fleet, data, batch and thread count (1), the
trainers alternating (ort, batched, batched-bf16, ort, ...) so a change in the machine's load hits
all of them (batched-bf16: the frozen base in bfloat16, `simulator.batched`):

- train: every device of the fleet steps at the same virtual moment (each its own start adapter,
  batches and moments) — `SharedTrainer.train_many` (one ORT step per device) vs
  `BatchedTrainer.train_many` (one pass for all); device-steps / wall seconds of that call.
- simulate: one FedBuff run of `--horizon` virtual seconds over the whole engine (strategy, uplink
  encoding, evaluation every --eval-interval virtual s included) — trained device-steps / wall
  seconds of the run. Here only the devices whose rounds overlap in virtual time share a pass.

With no --bundle, the tiny test model is exported to a temporary folder first (seconds).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np

from simulator.config import SimulationConfig
from simulator.domains import parse_spec
from simulator.experiment import run_variant
from simulator.fleet import FleetConfig
from simulator.testbed import Testbed, TestbedConfig
from simulator.training import TrainJob
from simulator.variants import standard_variant


def tiny_bundle(work: Path) -> Path:
    from export.bundle import export_bundle
    from export.synthetic import write_tiny_llama

    model = write_tiny_llama(work / "model")
    export_bundle(model, work / "bundle", targets=("q", "v"), rank=4, alpha=8.0, quantization="fp32", seed=0)
    return work / "bundle"


def train_rate(bed: Testbed, steps: int, seed: int) -> float:
    """Device-steps per wall second when every device steps at once."""
    rng = np.random.default_rng(seed)
    start = {n: rng.normal(0, 0.02, s).astype(np.float32) for n, s in bed.trainer.shapes.items()}
    jobs = []
    for d in bed.devices:
        batcher = bed.data[d.device_id].batcher
        rows = batcher.rows
        batches = [
            batcher.make([rows[int(i)] for i in rng.choice(len(rows), size=batcher.batch)]) for _ in range(steps)
        ]
        jobs.append(TrainJob(start, batches, d.profile.lr))
    t0 = time.perf_counter()
    bed.trainer.train_many(jobs)
    return len(jobs) * steps / (time.perf_counter() - t0)


def simulate_rate(bed: Testbed, cfg: SimulationConfig, k: int) -> tuple[float, int, float]:
    """(trained device-steps per wall second, steps, wall s) of one FedBuff run."""
    before = bed.trainer.steps
    t0 = time.perf_counter()
    run_variant(standard_variant("fedbuff", devices=len(bed.devices), k=k), bed, cfg)
    wall = time.perf_counter() - t0
    steps = bed.trainer.steps - before
    return steps / wall, steps, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle folder (default: the tiny test model)")
    ap.add_argument("--data", action="append", default=[], metavar="NAME=PATH", help="as `alignfed simulate --data`")
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--local-steps", type=int, default=1)
    ap.add_argument("--train-steps", type=int, default=2, help="steps per device in the train part")
    ap.add_argument("--horizon", type=float, default=6.0, help="virtual seconds of the simulate part")
    ap.add_argument("--eval-interval", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--parts", default="train,simulate")
    ap.add_argument(
        "--trainers",
        default="ort,batched,batched-bf16",
        help="trainers to compare, the first is the baseline (as `alignfed simulate --trainer`)",
    )
    args = ap.parse_args()
    parts = {p.strip() for p in args.parts.split(",")}
    kinds = [k.strip() for k in args.trainers.split(",") if k.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or tiny_bundle(Path(tmp))
        overrides = {"local_steps": args.local_steps, "batch": args.batch, "seq_len": args.seq_len, "lr": 0.003}
        beds = {}
        for kind in kinds:
            cfg = TestbedConfig(
                bundle=bundle,
                fleet=FleetConfig(devices=args.devices, classes=args.classes, overrides=overrides),
                data=tuple(parse_spec(spec) for spec in args.data),
                eval_examples=8,
                train_examples=64,
                trainer=kind,
            )
            beds[kind] = Testbed.build(cfg)
        sim = SimulationConfig(horizon_s=args.horizon, eval_interval_s=args.eval_interval)
        k = max(2, args.devices // 3)
        train: dict[str, list[float]] = {kind: [] for kind in kinds}
        simulate: dict[str, list[float]] = {kind: [] for kind in kinds}
        for kind in kinds:  # warm-up: first-call allocations, lazy imports
            train_rate(beds[kind], 1, seed=99)
        for r in range(args.repeats):
            for kind in kinds:
                if "train" in parts:
                    train[kind].append(train_rate(beds[kind], args.train_steps, seed=r))
                    print(f"train    {kind:12} repeat {r}: {train[kind][-1]:8.2f} device-steps/s", flush=True)
                if "simulate" in parts:
                    rate, steps, wall = simulate_rate(beds[kind], sim, k)
                    simulate[kind].append(rate)
                    print(
                        f"simulate {kind:12} repeat {r}: {rate:8.2f} device-steps/s ({steps} steps in {wall:.1f} s)",
                        flush=True,
                    )
        base = kinds[0]
        name = beds[base].manifest.base_model if hasattr(beds[base].manifest, "base_model") else bundle
        devices = {k: getattr(beds[k].trainer, "device", "cpu (ONNX Runtime)") for k in kinds}
        print(
            f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
            f"{datetime.now(UTC):%Y-%m-%d}; bundle {name}; {args.devices} devices, {args.classes} classes, "
            f"batch {args.batch}×{args.seq_len}, 1 thread; devices {devices}"
        )
        for label, got in (("train (all devices step at once)", train), ("simulate (FedBuff run)", simulate)):
            if got[base]:
                rates = {k: statistics.median(v) for k, v in got.items()}
                cells = "  ".join(f"{k} {r:8.2f}" for k, r in rates.items())
                ratios = "  ".join(f"{k}/{base} {rates[k] / rates[base]:5.2f}×" for k in kinds[1:])
                print(f"{label:34} {cells} device-steps/s  {ratios}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
