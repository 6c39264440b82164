"""The coordinator's and a device's low-rank math, each way side by side in one process.

    python benchmarks/bench_lowrank.py [--rank 16] [--repeats 3]

On SmolLM2-135M's shapes with LoRA on all seven projections (30 layers; q, o 576×576, k, v
192×576, gate, up 1536×576, down 576×1536), synthetic factors:

- uplink: one device update through `edge.uplink.Uplink.compress` (int8c, every direction of the
  rank-2r delta, a carry of the same rank): the SVDs of factor products take their thin QRs by
  CholeskyQR2 (`alignfed.lowrank.thin_qr`, the default) or by Householder QR (numpy's qr).
- alignment: factor the calibration activations of every adapted layer (n = 256 tokens) and align
  one group's 4 deltas: the (n, n) Woodbury solve (the default when n < in) vs the (in, in) one.

Prints the median wall time of each and the ratio; OPENBLAS_NUM_THREADS=1 as the CLI runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np
import scipy.linalg

from alignfed import lowrank
from alignfed.lowrank import Factors
from coordinator.alignment import TargetSolve, ridge
from edge.uplink import Uplink

LAYERS = 30
SHAPES = {  # module -> (out, in)
    "q": (576, 576),
    "k": (192, 576),
    "v": (192, 576),
    "o": (576, 576),
    "gate": (1536, 576),
    "up": (1536, 576),
    "down": (576, 1536),
}


def _deltas(rank: int, rng: np.random.Generator) -> dict[str, Factors]:
    """Each layer's exact delta s·(B_new A_new − B_old A_old) as rank-2r factors, a small step apart."""
    out: dict[str, Factors] = {}
    for layer in range(LAYERS):
        for module, (o, i) in SHAPES.items():
            b_old = rng.normal(0, 0.01, (o, rank))
            a_old = rng.normal(0, 0.05, (rank, i))
            b_new = b_old + rng.normal(0, 1e-3, (o, rank))
            a_new = a_old + rng.normal(0, 1e-3, (rank, i))
            out[f"{layer}.{module}"] = lowrank.difference(b_new, a_new, b_old, a_old, 2.0)
    return out


def _primal(x_t: np.ndarray, lam: float) -> TargetSolve:
    """The (in, in) factorization whatever n is: what alignment did before the Woodbury form."""
    x = np.asarray(x_t, dtype=np.float64)
    gram = x.T @ x
    absolute = ridge(float(np.trace(gram)), gram.shape[0], lam)
    gram[np.diag_indices_from(gram)] += absolute
    return TargetSolve(x_t=x, lam=absolute, chol=scipy.linalg.cho_factor(gram, lower=True), dual=False)


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank r (default 16)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    first, second = _deltas(args.rank, rng), _deltas(args.rank, rng)

    def compress() -> None:
        up = Uplink("int8c")
        up.compress(first)  # leaves a carry: the second update stacks delta and carry, as in a run
        up.compress(second)

    fast = _median_time(compress, args.repeats)
    cholqr = lowrank.thin_qr
    lowrank.thin_qr = lowrank._householder  # type: ignore[assignment]
    try:
        slow = _median_time(compress, args.repeats)
    finally:
        lowrank.thin_qr = cholqr
    print(f"uplink, two updates of {LAYERS * len(SHAPES)} layers: CholeskyQR2 {fast:.2f} s, Householder {slow:.2f} s")

    acts = {  # layer -> (X_v, X_t), n = 256 calibration tokens
        f"{layer}.{m}": (x := rng.normal(size=(256, i)), x + 0.05 * rng.normal(size=(256, i)))
        for layer in range(LAYERS)
        for m, (_, i) in SHAPES.items()
    }
    group = {lid: [second[lid]] * 4 for lid in acts}

    def align(make: Callable[[np.ndarray, float], TargetSolve]) -> None:
        for lid, (x_v, x_t) in acts.items():
            solve = make(x_t, 1e-2)
            v = np.concatenate([np.asarray(f.v, dtype=np.float64) for f in group[lid]])  # (Σk, in)
            solve.align(v, x_v)

    dual = _median_time(lambda: align(TargetSolve.of), args.repeats)
    primal = _median_time(lambda: align(_primal), args.repeats)
    print(f"alignment, one version's factors + one group of 4: Woodbury (n×n) {dual:.2f} s, (in×in) {primal:.2f} s")
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
        f"{datetime.now(UTC):%Y-%m-%d}; r = {args.rank}, median of {args.repeats}\n"
        f"uplink  Householder / CholeskyQR2 {slow / fast:.2f}×\nalignment (in×in) / Woodbury {primal / dual:.2f}×"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
