"""Uplink and downlink sizes on SmolLM2-135M's adapter shapes (LoRA q,v, r = 8, 30 layers).

    python benchmarks/bench_codec.py

Part 1 encodes one device update in each candidate wire format (quantization × sent rank k ×
envelope) and prints its size relative to the raw fp32 LoRA A, B, with the error of what the
coordinator decodes against the exact delta. The delta is rank 2r with a decaying spectrum
(σ_i ∝ 0.7^i), closer to trained deltas than a flat one.
Part 2 publishes one new global version as a snapshot and as a delta of the one before (every
downlink quantization), the new factors re-factorized with flipped and swapped components as an SVD
may return them, and prints each message's size and how far the published adapter's products are
from the target's.
Sizes depend only on the shapes and the codes' entropy (deflate); the data is synthetic.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np

from alignfed import lora, protocol
from alignfed.downlink import Broadcaster
from alignfed.lowrank import Factors, reduce

LAYERS, HIDDEN, KV, RANK, ALPHA = 30, 576, 192, 8, 16.0
RAW = sum(4 * (RANK * HIDDEN + out_dim * RANK) for _ in range(LAYERS) for out_dim in (HIDDEN, KV))


def delta(rng: np.random.Generator) -> dict[str, Factors]:
    out = {}
    k = 2 * RANK
    sigma = 0.7 ** np.arange(k)
    for i in range(LAYERS):
        for module, out_dim in (("q", HIDDEN), ("v", KV)):
            qu, _ = np.linalg.qr(rng.standard_normal((out_dim, k)))
            qv, _ = np.linalg.qr(rng.standard_normal((HIDDEN, k)))
            f = Factors(u=(qu * sigma).astype(np.float32), v=qv.T.astype(np.float32))
            out[lora.layer_id(i, module)] = reduce(f, k)  # SVD-balanced, as devices send them
    return out


def update_of(deltas: dict[str, Factors]) -> protocol.AdapterUpdate:
    return protocol.AdapterUpdate(
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
        deltas=deltas,
    )


def uplink(rng: np.random.Generator) -> None:
    print(f"1. one update on the wire (raw fp32 LoRA A, B: {RAW / 1e6:.3f} MB)")
    exact = delta(rng)
    norm = np.sqrt(sum(np.sum(f.dense() ** 2) for f in exact.values()))
    rows = [
        ("int8c", RANK, "deflate"),  # the default before this benchmark
        ("int4c", RANK, "deflate"),
        ("int8c", 2, "deflate"),
        ("int4c", 4, "deflate"),
        ("int4c", 3, "deflate"),
        ("int4c", 2, "deflate"),
        ("int4c", 1, "deflate"),
    ]
    for quant, k, codec in rows:
        sent = {lid: reduce(f, k) for lid, f in exact.items()}
        payload = protocol.encode_update(update_of(sent), b"k" * 32, quant, codec)
        got = protocol.decode_update(payload, 1 << 26).update.deltas
        err = np.sqrt(sum(np.sum((got[lid].dense() - exact[lid].dense()) ** 2) for lid in exact)) / norm
        q_err = np.sqrt(sum(np.sum((got[lid].dense() - sent[lid].dense()) ** 2) for lid in exact)) / norm
        print(
            f"   {quant} k={k} {codec}: {len(payload) / 1e3:7.1f} kB = {len(payload) / RAW:.4f}x raw; "
            f"error vs exact {err:.3f} (of it quantization {q_err:.4f})"
        )


def adapter(rng: np.random.Generator) -> dict[str, np.ndarray]:
    t = {}
    for i in range(LAYERS):
        for module, out_dim in (("q", HIDDEN), ("v", KV)):
            t[lora.key(i, module, "A")] = rng.normal(0, 0.02, (RANK, HIDDEN)).astype(np.float32)
            t[lora.key(i, module, "B")] = rng.normal(0, 0.02, (out_dim, RANK)).astype(np.float32)
    return t


def products(t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {n: t[n[:-1] + "B"].astype(np.float64) @ t[n] for n in t if n.endswith(".A")}


def downlink(rng: np.random.Generator) -> None:
    prev = adapter(rng)
    # the next version: a step of 5 % of the adapter's size, then the factors as an SVD may return
    # them (signs flipped, two components swapped): the same products
    moved = {n: a + 0.05 * rng.normal(0, 0.02, a.shape).astype(np.float32) for n, a in prev.items()}
    flip = np.diag(np.where(rng.random(RANK) < 0.5, -1.0, 1.0))[np.r_[1, 0, 2:RANK]]
    new = {n: (flip @ a if n.endswith(".A") else a @ flip.T).astype(np.float32) for n, a in moved.items()}
    snapshot = protocol.encode_global(protocol.GlobalAdapter(1, 0, "b" * 64, "fedbuff", 0.0, RANK, ALPHA, new))
    print(f"\n2. one new version on the wire (snapshot {len(snapshot) / 1e6:.3f} MB)")
    target = products(new)
    step_norm = np.sqrt(sum(np.sum((target[n] - p) ** 2) for n, p in products(prev).items()))
    for quant in protocol.DOWNLINK_QUANTIZATIONS:
        step = Broadcaster(quant).step(prev, new)
        d = protocol.GlobalDelta(1, 0, "b" * 64, "fedbuff", 0.0, RANK, ALPHA, quant, step.digest, step.wire)
        payload = protocol.encode_global_delta(d)
        got = products(step.published)
        err = np.sqrt(sum(np.sum((got[n] - p) ** 2) for n, p in target.items())) / step_norm
        print(
            f"   delta {quant}: {len(payload) / 1e3:7.1f} kB = {len(payload) / len(snapshot):.4f}x the snapshot; "
            f"published products off the target by {err:.4f} of the version's step"
        )


def main() -> None:
    rng = np.random.default_rng(0)
    uplink(rng)
    downlink(rng)


if __name__ == "__main__":
    main()
