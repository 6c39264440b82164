"""Memory a training backend adds to the daemon, measured, next to what `edge.memory_fit` predicts.

    python benchmarks/bench_train_memory.py BUNDLE [--backends torch,ort] [--shapes 2x64,4x64]

Each (backend, B×T) runs in a fresh process: RSS once the daemon's own imports are loaded, then the
peak (VmHWM) after building the trainer and 4 training steps; growth = peak − that baseline. This is
the figure the profiles' `memory_mb` bounds; edge/memory_fit.py's ONNX Runtime estimate is calibrated on it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import json, sys
sys.path.insert(0, {root!r})
import numpy as np
from alignfed import manifest as mf
from alignfed.text import Batch
def kb(key):
    return int([ln.split()[1] for ln in open('/proc/self/status') if ln.startswith(key)][0])
bundle, backend, b, t = {bundle!r}, {backend!r}, {b}, {t}
m = mf.load(bundle)
base = kb('VmRSS')
if backend == 'torch':
    from edge.torch_trainer import TorchTrainer as T
else:
    from edge.trainer import OrtTrainer as T
tr = T(bundle, m, lr=1e-3, threads=2)
ids = np.random.default_rng(0).integers(0, m.architecture.vocab, size=(b, t)).astype(np.int64)
for _ in range(4):
    tr.step(Batch(input_ids=ids, labels=ids.copy()))
print(json.dumps({{'growth_mb': (kb('VmHWM') - base) / 1024}}))
"""


def measure(bundle: Path, backend: str, b: int, t: int) -> float:
    code = _CHILD.format(root=str(ROOT), bundle=str(bundle), backend=backend, b=b, t=t)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["growth_mb"])


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from dataclasses import replace

    from alignfed import manifest as mf
    from alignfed.profiles import load_profile
    from edge.memory_fit import training_memory_mb

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--backends", default="torch,ort")
    ap.add_argument("--shapes", default="2x64,4x64")
    args = ap.parse_args()
    m = mf.load(args.bundle)
    print(f"{'backend':8} {'B×T':6} {'measured MB':>12} {'estimated MB':>13}")
    for backend in args.backends.split(","):
        for shape in args.shapes.split(","):
            b, t = (int(v) for v in shape.split("x"))
            got = measure(args.bundle, backend, b, t)
            profile = replace(load_profile("x86-laptop"), trainer=backend, batch=b, seq_len=t, checkpointing="none")
            est = training_memory_mb(m, profile)
            print(f"{backend:8} {shape:6} {got:12.0f} {est:13.0f}", flush=True)


if __name__ == "__main__":
    main()
