"""Server step and uplink size on SmolLM2-135M's adapter shapes (LoRA q,v, r = 8, 30 layers).

    python benchmarks/bench_server.py [--updates 4] [--repeats 3]

Part 1 times one buffered aggregation (FedBuff's server step, PCA, error feedback) two ways side by
side: the factored step the coordinator runs (`server_update.apply`: QR + SVD of the stacked
factors) and the dense reference it replaced (form each (out, in) product, full SVD, dense
residual). Part 2 encodes one update of real SVD-balanced delta factors in every wire format and
prints its size relative to the raw fp32 LoRA A, B and the error of what the coordinator decodes.
Synthetic random factors; the timing depends only on shapes.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the coordinator CLI runs
import numpy as np

from alignfed import lora, protocol
from alignfed.lowrank import Factors, reduce
from coordinator.strategies import server_update
from coordinator.strategies.base import AdapterState

LAYERS, HIDDEN, KV, RANK, ALPHA = 30, 576, 192, 8, 16.0


def adapter(rng: np.random.Generator) -> AdapterState:
    tensors = {}
    for i in range(LAYERS):
        for module, out_dim in (("q", HIDDEN), ("v", KV)):
            tensors[lora.key(i, module, "A")] = rng.normal(0, 0.02, (RANK, HIDDEN)).astype(np.float32)
            tensors[lora.key(i, module, "B")] = rng.normal(0, 0.02, (out_dim, RANK)).astype(np.float32)
    return AdapterState(version=0, tensors=tensors, scale=ALPHA / RANK, rank=RANK)


def delta(rng: np.random.Generator, k: int) -> dict[str, Factors]:
    out = {}
    for i in range(LAYERS):
        for module, out_dim in (("q", HIDDEN), ("v", KV)):
            f = Factors(u=rng.normal(0, 0.01, (out_dim, k)), v=rng.normal(0, 0.01, (k, HIDDEN)))
            out[lora.layer_id(i, module)] = reduce(f, k)  # SVD-balanced, as devices send them
    return out


def dense_step(state: AdapterState, deltas: list[dict[str, Factors]], residual: dict[str, np.ndarray]) -> float:
    """The replaced algorithm: dense M = s·BA + Σ w Δ + R, full SVD, rank-r head, dense residual."""
    t0 = time.perf_counter()
    w = 1.0 / len(deltas)
    for lid in server_update.layer_ids(state):
        m = lora.product(state.tensors, lid, state.scale)  # (out, in)
        for d in deltas:
            m = m + w * d[lid].dense()
        m = m + residual.get(lid, 0.0)
        u, s, vt = np.linalg.svd(m, full_matrices=False)
        residual[lid] = m - (u[:, :RANK] * s[:RANK]) @ vt[:RANK]
    return time.perf_counter() - t0


def factored_step(state: AdapterState, deltas: list[dict[str, Factors]]) -> tuple[AdapterState, float]:
    t0 = time.perf_counter()
    combined = server_update.combine(deltas, [1.0 / len(deltas)] * len(deltas))
    new = server_update.apply(state, combined, server_lr=1.0, method="pca", error_feedback=True)
    return new, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--updates", type=int, default=4, help="updates per aggregation (FedBuff/AlignFed K)")
    ap.add_argument("--repeats", type=int, default=3, help="aggregations in a row (residuals build up)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    threads = os.environ["OPENBLAS_NUM_THREADS"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, OpenBLAS threads {threads}")

    print(f"\n1. one aggregation of {args.updates} rank-{2 * RANK} updates, {2 * LAYERS} layers, error feedback on")
    state = adapter(rng)
    dense_res: dict[str, np.ndarray] = {}
    for rep in range(args.repeats):
        deltas = [delta(rng, 2 * RANK) for _ in range(args.updates)]
        t_dense = dense_step(state, deltas, dense_res)
        state, t_fact = factored_step(state, deltas)
        print(
            f"   aggregation {rep + 1}: dense SVD {t_dense:.2f} s, factored {t_fact:.3f} s "
            f"-> {t_dense / t_fact:.1f}x; residual dropped by the 4r cap {state.dropped:.2e} "
            f"(kept {server_update.residual_norm(state):.2e})"
        )

    print("\n2. one update's size on the wire (SmolLM2 q,v) and the decoding error")
    raw = sum(4 * (RANK * HIDDEN + out_dim * RANK) for _ in range(LAYERS) for out_dim in (HIDDEN, KV))
    exact = delta(rng, 2 * RANK)
    exact_norm = np.sqrt(sum(np.sum(f.dense() ** 2) for f in exact.values()))
    print(f"   raw fp32 LoRA A,B: {raw / 1e6:.3f} MB")
    rows = [
        ("fp32", 2 * RANK, "none"),
        ("int8", 2 * RANK, "none"),
        ("int8c", 2 * RANK, "none"),
        ("int8", RANK, "none"),
        ("int8c", RANK, "none"),
        ("int8c", RANK, "deflate"),
    ]
    for quant, k, codec in rows:
        sent = {lid: reduce(f, k) for lid, f in exact.items()}
        update = protocol.AdapterUpdate(
            device_id="d",
            update_id="u" * 32,
            seq=1,
            base_version=0,
            bundle="b" * 64,
            samples=1,
            local_steps=1,
            train_loss=0.0,
            wall_time=0.0,
            profile="p",
            created_at=0.0,
            deltas=sent,
        )
        t0 = time.perf_counter()
        payload = protocol.encode_update(update, b"k" * 32, quant, codec)
        t_encode = time.perf_counter() - t0
        got = protocol.decode_update(payload, 1 << 26).update.deltas
        err = np.sqrt(sum(np.sum((got[lid].dense() - exact[lid].dense()) ** 2) for lid in exact)) / exact_norm
        print(
            f"   {quant:5s} k={k:2d} {codec:7s}: {len(payload) / 1e6:.3f} MB = {len(payload) / raw:.3f}x raw; "
            f"relative error of one update {err:.2e}; encoding {t_encode * 1e3:.0f} ms"
        )


if __name__ == "__main__":
    main()
