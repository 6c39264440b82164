"""Ingest throughput of 1, 2 and 4 workers on one PostgreSQL store, side by side in one run; and the
per-update costs of validating and storing one update.

    python benchmarks/bench_ingest.py [--updates 300] [--workers 1,2,4] [--limit-s 60]

Updates have SmolLM2-135M's adapter shapes (LoRA q,v, r = 8, 30 layers) and travel as devices send
them by default (int8 per component, k = r, deflated: ≈ 0.44 MB). For every worker count: a fresh
database, a real Mosquitto, N `alignfed coordinator ingest-worker` processes on the shared
subscription; a fake fleet publishes `--updates` pre-signed updates as fast as the broker takes
them; throughput = updates acked / (last ack − first publish). No aggregator runs (version 0 is
written directly): this measures ingest alone. Each setting is bounded by `--limit-s`.
Uses the machine's PostgreSQL at 127.0.0.1:5432, or starts one (tests/support/postgres.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from alignfed import protocol, tomlfile  # noqa: E402
from alignfed.manifest import MANIFEST_NAME, Manifest, bundle_digest  # noqa: E402
from coordinator.ingest import IngestLimits, validate  # noqa: E402
from coordinator.pgstore import PgStore  # noqa: E402
from tests.support.broker import Mosquitto  # noqa: E402
from tests.support.federation import spawn, wait_for  # noqa: E402
from tests.support.postgres import fresh_database, postgres_server  # noqa: E402
from tests.support.publisher import UpdatePublisher  # noqa: E402

DEVICES = [f"dev-{i:03d}" for i in range(50)]


def smollm2_bundle(out: Path) -> Manifest:
    """A bundle folder holding only a manifest with SmolLM2-135M's architecture and LoRA q,v r = 8
    (workers read nothing else), derived from the tiny model's exported manifest."""
    from export.bundle import export_bundle
    from export.synthetic import write_tiny_llama

    tiny = out / "tiny"
    export_bundle(write_tiny_llama(out / "tiny-model"), tiny, targets=("q", "v"), rank=4, alpha=8.0,
                  quantization="fp32", seed=0)  # fmt: skip
    doc = json.loads((tiny / MANIFEST_NAME).read_text())
    doc["architecture"].update(hidden=576, intermediate=1536, n_heads=9, n_kv_heads=3, n_layers=30, vocab=49152)
    doc["lora"].update(rank=8, alpha=16.0)
    doc["lora"].pop("shapes", None)
    manifest = Manifest.from_json(json.dumps(doc), source="bench")
    (out / "bundle").mkdir()
    (out / "bundle" / MANIFEST_NAME).write_text(manifest.to_json())
    return manifest


def version_zero(store: PgStore, manifest: Manifest) -> None:
    g = protocol.GlobalAdapter(0, -1, bundle_digest(manifest), "fedbuff", time.time(), 8, 16.0, {})
    store.save_version(g, protocol.encode_global(g), {}, {})


def per_update_costs(
    manifest: Manifest, keys: dict[str, bytes], payloads: list[tuple[str, str, bytes]], url: str
) -> dict[str, float]:
    """Median ms of validating one update and of committing it to PostgreSQL, in this process."""
    store = PgStore(url, worker="bench")
    version_zero(store, manifest)
    t_val, t_rec = [], []
    for device, _, payload in payloads[:40]:
        t0 = time.perf_counter()
        update = validate(device, payload, manifest=manifest, bundle=bundle_digest(manifest), key_of=keys.get,
                          has_version=store.has_version, current_version=0, limits=IngestLimits())  # fmt: skip
        t1 = time.perf_counter()
        store.record(update, payload, time.time(), status="pending")
        t2 = time.perf_counter()
        t_val.append(t1 - t0)
        t_rec.append(t2 - t1)
    store.close()
    return {"validate_ms": 1e3 * statistics.median(t_val), "store_ms": 1e3 * statistics.median(t_rec)}


def run_setting(workers: int, args: argparse.Namespace, tmp: Path, admin: str, manifest: Manifest,
                keys: dict[str, bytes], payloads: list[tuple[str, str, bytes]]) -> dict[str, float]:  # fmt: skip
    root = tmp / f"w{workers}"
    broker = Mosquitto(root / "broker").start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with fresh_database(admin) as url:
            store = PgStore(url)
            for d, key in keys.items():
                store.add_device(d, key.hex(), "x86-laptop")
            version_zero(store, manifest)
            cfg = tomlfile.write(root / "coordinator.toml", {
                "federation": "bench", "bundle": str(tmp / "bundle"), "database": url, "broker": {"url": broker.url},
            })  # fmt: skip
            for i in range(workers):
                log = root / f"w{i}.log"
                procs.append(spawn("coordinator", "ingest-worker", "--config", str(cfg), "--name", f"w{i}", log=log))

            def serving() -> bool:
                logs = [root / f"w{i}.log" for i in range(workers)]
                return all(p.exists() and "serving federation" in p.read_text(errors="replace") for p in logs)

            wait_for(serving, 60, "workers subscribed")
            pub = UpdatePublisher(broker.url, "bench", manifest, keys, lambda: 0).start()
            t0 = time.perf_counter()
            for device, uid, payload in payloads:
                pub.publish(device, (uid, payload))
            t_pub = time.perf_counter() - t0
            deadline = time.monotonic() + args.limit_s
            last = t0
            while time.monotonic() < deadline and len(pub.acked()) < len(payloads):
                before = len(pub.acked())
                pub.drain_acks(timeout=0.2)
                if len(pub.acked()) > before:
                    last = time.perf_counter()
            n = len(pub.acked())
            pub.stop()
            stored = store.audit()["pending"]
            per_worker = store._db.execute("SELECT worker, COUNT(*) FROM updates GROUP BY worker ORDER BY 1").fetchall()
            store.close()
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                p.wait(timeout=30)
            procs.clear()
            return {"workers": workers, "acked": n, "stored": stored, "seconds": last - t0,
                    "per_s": n / (last - t0), "publish_s": t_pub, "split": [int(c) for _, c in per_worker]}  # fmt: skip
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--updates", type=int, default=300)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--limit-s", type=float, default=60.0)
    ap.add_argument("--quantization", default="int8c")
    ap.add_argument("--codec", default="deflate")
    args = ap.parse_args()
    print(f"# bench_ingest {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()}, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}")  # fmt: skip
    with tempfile.TemporaryDirectory() as td, postgres_server() as admin:
        tmp = Path(td)
        manifest = smollm2_bundle(tmp)
        keys = {d: secrets.token_bytes(32) for d in DEVICES}
        maker = UpdatePublisher("mqtt://127.0.0.1:1", "bench", manifest, keys, lambda: 0, rank=8, seed=1,
                                quantization=args.quantization, codec=args.codec)  # fmt: skip
        t0 = time.perf_counter()
        payloads = [(d, *maker.make(d, 0)) for d in (DEVICES[i % len(DEVICES)] for i in range(args.updates))]
        encode_ms = 1e3 * (time.perf_counter() - t0) / len(payloads)
        size = float(np.mean([len(p) for _, _, p in payloads]))
        with fresh_database(admin) as url:
            costs = per_update_costs(manifest, keys, payloads, url)
        print(f"update: {size / 1e6:.3f} MB ({args.quantization}, {args.codec}); "
              f"device-side encode {encode_ms:.1f} ms; validate {costs['validate_ms']:.1f} ms; "
              f"store (PostgreSQL commit) {costs['store_ms']:.1f} ms")  # fmt: skip
        rows = [run_setting(int(w), args, tmp, admin, manifest, keys, payloads) for w in args.workers.split(",")]
    base = rows[0]["per_s"]
    print("\n| workers | acked | time | updates/s | × 1 worker | split across workers | publishing took |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['acked']}/{args.updates} | {r['seconds']:.1f} s | {r['per_s']:.1f} | "
              f"{r['per_s'] / base:.2f}× | {r['split']} | {r['publish_s']:.1f} s |")  # fmt: skip


if __name__ == "__main__":
    main()
