"""A two-tier fleet against the flat one, on the same virtual-clock fleet and data.

    python benchmarks/bench_tiers.py [--bundle DIR] [--devices 24] [--sites 4] [--horizon 1800]

For FedBuff and AlignFed: the flat run (every update goes to the root strategy) and the two-tier
run (devices split round-robin into `--sites` sites; each site buffers `--site-k` updates, or
`--site-wait` virtual seconds, combines each base-version group into one site update with the
strategy's within-site split — uniform for FedBuff, AlignFed's fairness factors for AlignFed — and
the root takes it as its member devices; `simulator/tiers.py`). Same seed, fleet, partition and
root K. Without `--bundle` the tiny test model is exported to a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulator.config import SimulationConfig
from simulator.engine import Simulation
from simulator.experiment import make_strategy
from simulator.fleet import FleetConfig
from simulator.metrics import summarize
from simulator.testbed import Testbed, TestbedConfig
from simulator.tiers import SiteTier
from simulator.variants import standard_variant
from simulator.versions import VersionHistory

SPLIT = {"fedbuff": "uniform", "alignfed": "fairness"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--devices", type=int, default=24)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument("--k", type=int, default=6, help="root buffer K (device updates)")
    ap.add_argument("--site-k", type=int, default=3)
    ap.add_argument("--site-wait", type=float, default=60.0)
    ap.add_argument("--horizon", type=float, default=1800.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as td:
        bundle = args.bundle
        if bundle is None:
            from export.bundle import export_bundle
            from export.synthetic import write_tiny_llama

            bundle = Path(td) / "bundle"
            export_bundle(write_tiny_llama(Path(td) / "model"), bundle, targets=("q", "v"), rank=4, alpha=8.0,
                          quantization="fp32", seed=0)  # fmt: skip
        tb = Testbed.build(
            TestbedConfig(bundle=bundle, fleet=FleetConfig(devices=args.devices, classes=args.classes), seed=args.seed)
        )
        cfg = SimulationConfig(horizon_s=args.horizon, seed=args.seed)
        site_of = {d.device_id: f"site-{i % args.sites}" for i, d in enumerate(tb.devices)}
        print(f"# bench_tiers {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {args.devices} devices "
              f"({args.classes} classes), {args.sites} sites, root K = {args.k}, site k = {args.site_k} "
              f"(or {args.site_wait:.0f} s), horizon {args.horizon:.0f} virtual s, seed {args.seed}")  # fmt: skip
        rows = []
        for name in ("fedbuff", "alignfed"):
            for tiers in (1, 2):
                variant = standard_variant(name, devices=args.devices, k=args.k)
                history = VersionHistory(tb.initial)
                strategy = make_strategy(variant, tb, history)
                label = name
                if tiers == 2:
                    label = f"{name}, 2 tiers ({SPLIT[name]} split)"
                    strategy = SiteTier(strategy, site_of, k=args.site_k, max_wait_s=args.site_wait,
                                        weighting=SPLIT[name], max_rank=2 * tb.manifest.lora.rank)  # fmt: skip
                t0 = time.perf_counter()
                run = Simulation(label, strategy, tb, cfg, history=history).run()
                s = summarize(run, None)
                extra = (f"{strategy.site_updates} site updates" if isinstance(strategy, SiteTier) else "")  # fmt: skip
                rows.append((s, extra, time.perf_counter() - t0))
    print("\n| run | final loss | late loss | worst device | Jain | mean τ | versions | accepted | site updates |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s, extra, _ in rows:
        print(f"| {s.variant} | {s.final_loss:.4f} | {s.late_loss:.4f} | {s.worst_device_loss:.4f} | {s.jain:.3f} | "
              f"{s.mean_staleness:.2f} | {s.versions} | {s.accepted} | {extra or '—'} |")  # fmt: skip
    print(f"\nwall time per run: {', '.join(f'{w:.0f} s' for _, _, w in rows)}")


if __name__ == "__main__":
    main()
