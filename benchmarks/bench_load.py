"""Load: hundreds of light devices publishing SmolLM2-layout updates at one coordinator via Mosquitto.

    python benchmarks/bench_load.py --bundle DIR [--devices 200] [--rate 1200] [--duration 180]
        [--variants fedbuff,alignfed,alignfed:prefetch=false] [--k 20]

Per variant, on this machine: a fresh Mosquitto (persistence on), a fresh coordinator store with
`--devices` registered devices, the coordinator (`coordinator.service.Coordinator.run`, the code
`alignfed coordinator` runs) in this process, and one load-generator process that connects one MQTT
client per device (client id = device id) and publishes, open loop at `--rate` updates/min spread
round-robin over the devices that have no update in flight, real updates of the bundle's LoRA layout
(k = r directions per layer, int8c, deflated: what a device sends by default, ≈ 0.44 MB for SmolLM2
q,v r = 8), each based on the newest version announced on `global/status` and signed with that
device's own key. It measures publish-to-ack latency from the acks each device receives.

Reported per variant: updates/min acknowledged as accepted and updates/min aggregated (over the
publishing window), p50/p95 publish-to-ack latency, the coordinator's peak RSS and CPU, and the
share of aggregation wall time spent in `prepare` (AlignFed: grouping, alignment and waiting for
calibration activations; FedBuff: nothing). Strategy methods are timed by wrapping them here, so the
production code reads no clock. Devices do not download the global adapter (light devices): the
coordinator still publishes every version, retained.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the coordinator CLI runs
import numpy as np

HERE = Path(__file__).resolve()


# -- broker ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mosquitto(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        "\n".join(
            [
                f"listener {port} 127.0.0.1",
                "allow_anonymous true",
                "persistence true",
                f"persistence_location {workdir}/",
                f"log_dest file {workdir}/mosquitto.log",
                "max_queued_messages 100000",
                "user root",
            ]
        )
        + "\n"
    )
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


# -- load generator (a separate process) ------------------------------------------------------------


def generate(args: argparse.Namespace) -> int:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from alignfed import manifest as mf
    from alignfed import protocol
    from alignfed.lowrank import Factors, reduce
    from alignfed.topics import Topics

    m = mf.load(Path(args.bundle))
    topics = Topics(args.federation)
    keys: dict[str, str] = json.loads(Path(args.keys).read_text())
    devices = sorted(keys)
    rng = np.random.default_rng(0)
    k = m.lora.rank
    pool = [
        {
            lid: reduce(Factors(u=rng.normal(0, 0.01, (out, k)), v=rng.normal(0, 0.01, (k, inp))), k)
            for lid, (out, inp) in m.delta_shapes().items()
        }
        for _ in range(8)
    ]
    bundle = mf.bundle_digest(m)
    lock = threading.Lock()
    sent: dict[str, float] = {}  # update id -> publish time
    busy: set[str] = set()
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    version = [-1]

    def on_ack(client: Any, device: str, msg: Any) -> None:
        now = time.monotonic()
        ack = protocol.decode_ack(msg.payload)
        with lock:
            t0 = sent.pop(ack.update_id, None)
            busy.discard(device)
            if t0 is not None:
                latencies.append(now - t0)
                outcomes["accepted" if ack.accepted else ack.reason.split(":")[0]] += 1

    def on_status(client: Any, userdata: Any, msg: Any) -> None:
        try:
            v = int(json.loads(msg.payload).get("version", -1))
        except (ValueError, TypeError):
            return
        with lock:
            version[0] = max(version[0], v)

    clients: dict[str, Any] = {}
    for d in devices:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=d, clean_session=True)
        c.max_inflight_messages_set(2)
        c.on_message = lambda cl, ud, msg, d=d: on_ack(cl, d, msg)
        c.connect("127.0.0.1", args.port, keepalive=60)
        c.subscribe(topics.ack(d), qos=1)
        c.loop_start()
        clients[d] = c
    watcher = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="load-watcher")
    watcher.on_message = on_status
    watcher.connect("127.0.0.1", args.port)
    watcher.subscribe(topics.global_status, qos=1)
    watcher.loop_start()
    deadline = time.monotonic() + 60
    while version[0] < 0 or not all(c.is_connected() for c in clients.values()):
        if time.monotonic() > deadline:
            raise RuntimeError("devices did not connect or no global status within 60 s")
        time.sleep(0.1)
    time.sleep(1.0)  # subscriptions settle

    interval = 60.0 / args.rate
    start = time.monotonic()
    encode_cpu = 0.0
    skipped = 0
    published = 0
    seq: Counter[str] = Counter()
    nxt = 0
    tick = start
    while tick - start < args.duration:
        delay = tick - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        with lock:
            free = [devices[(nxt + i) % len(devices)] for i in range(len(devices))]
            device = next((d for d in free if d not in busy), None)
            base = version[0]
        if device is None:
            skipped += 1  # every device has an update in flight: the coordinator is behind
        else:
            nxt = (devices.index(device) + 1) % len(devices)
            seq[device] += 1
            uid = f"{device}-{seq[device]:06d}"
            update = protocol.AdapterUpdate(
                device_id=device,
                update_id=uid,
                seq=seq[device],
                base_version=base,
                bundle=bundle,
                samples=32,
                local_steps=8,
                train_loss=2.0,
                wall_time=10.0,
                profile="x86-laptop",
                created_at=time.time(),
                deltas=pool[published % len(pool)],
            )
            c0 = time.process_time()
            payload = protocol.encode_update(update, bytes.fromhex(keys[device]), "int8c", "deflate")
            encode_cpu += time.process_time() - c0
            with lock:
                sent[uid] = time.monotonic()
                busy.add(device)
            clients[device].publish(topics.update(device), payload, qos=1)
            published += 1
        tick += interval
    window = time.monotonic() - start
    drain = time.monotonic() + args.drain
    while time.monotonic() < drain:
        with lock:
            if not sent:
                break
        time.sleep(0.2)
    for c in [*clients.values(), watcher]:
        c.loop_stop()
        c.disconnect()
    lat = sorted(latencies)
    result = {
        "published": published,
        "acked": len(lat),
        "outcomes": dict(outcomes),
        "unanswered": len(sent),
        "skipped_all_busy": skipped,
        "window_s": window,
        "p50_s": lat[len(lat) // 2] if lat else None,
        "p95_s": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None,
        "mean_s": statistics.fmean(lat) if lat else None,
        "payload_bytes": len(payload) if published else 0,
        "encode_cpu_s": encode_cpu,
        "final_version": version[0],
    }
    Path(args.out).write_text(json.dumps(result))
    return 0


# -- coordinator side (this process) ------------------------------------------------------------------


class Timed:
    """Wraps strategy methods to sum their wall time (the strategies themselves read no clock)."""

    def __init__(self, strategy: Any) -> None:
        self.seconds: dict[str, float] = {"aggregate": 0.0, "prepare": 0.0}
        self.cpu: dict[str, float] = {"aggregate": 0.0, "prepare": 0.0}  # CPU of the calling thread
        self.calls: Counter[str] = Counter()
        for name in ("aggregate", "prepare"):
            if hasattr(strategy, name):
                setattr(strategy, name, self._wrap(name, getattr(strategy, name)))

    def _wrap(self, name: str, fn: Any) -> Any:
        def timed(*a: Any, **kw: Any) -> Any:
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.cpu[name] += time.thread_time() - c0
                self.calls[name] += 1

        return timed


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_variant(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    from coordinator import config as ccfg
    from coordinator.devices import add_device
    from coordinator.service import Coordinator
    from coordinator.store import Store

    name, _, opts = spec.partition(":")
    options: dict[str, Any] = {"k": args.k}
    for part in filter(None, opts.split(";")):
        key, _, raw = part.partition("=")
        options[key.strip()] = tomllib.loads(f"v = {raw.strip()}")["v"]
    with tempfile.TemporaryDirectory(prefix="alignfed-load-") as tmp:
        work = Path(tmp)
        broker, port = start_mosquitto(work)
        try:
            strategy_lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
            conf = work / "coordinator.toml"
            conf.write_text(
                f'federation = "load"\nbundle = "{Path(args.bundle).resolve()}"\ndatabase = "{work}/coord.sqlite"\n'
                f'[broker]\nurl = "mqtt://127.0.0.1:{port}"\n[strategy]\nname = "{name}"\n{strategy_lines}\n'
                f"[calibration]\ntokens = {args.calibration_tokens}\n"
            )
            cfg = ccfg.load(conf)
            keys = {}
            for i in range(args.devices):
                creds = json.loads(add_device(cfg, f"dev-{i:03d}", "x86-laptop"))
                keys[creds["device_id"]] = creds["key"]
            (work / "keys.json").write_text(json.dumps(keys))
            rss_before = rss_mb()
            coord = Coordinator(cfg)
            timed = Timed(coord.strategy)
            stop = threading.Event()
            cpu0 = time.process_time()
            server = threading.Thread(target=coord.run, args=(stop,), daemon=True)
            server.start()
            gen = subprocess.Popen(
                [
                    sys.executable,
                    str(HERE),
                    "--generate",
                    "--bundle",
                    str(args.bundle),
                    "--port",
                    str(port),
                    "--federation",
                    "load",
                    "--keys",
                    str(work / "keys.json"),
                    "--rate",
                    str(args.rate),
                    "--duration",
                    str(args.duration),
                    "--drain",
                    str(args.drain),
                    "--out",
                    str(work / "gen.json"),
                ],
                env={**os.environ, "PYTHONPATH": str(HERE.parent.parent)},
            )
            peak = rss_mb()
            while gen.poll() is None:
                peak = max(peak, rss_mb())
                time.sleep(1.0)
            stop.set()
            server.join(timeout=60)
            aligner = getattr(coord.strategy, "_aligner", None)
            calibration_wait = aligner.cache.wait_s if aligner is not None else 0.0
            cpu = time.process_time() - cpu0
            if gen.returncode != 0:
                raise RuntimeError(f"load generator failed with exit code {gen.returncode}")
            gen_result = json.loads((work / "gen.json").read_text())
            store = Store(cfg.database)
            aggregated = len(store.aggregated())
            versions = store.latest_version() or 0
            store.close()
        finally:
            broker.terminate()
            broker.wait(timeout=10)
    minutes = gen_result["window_s"] / 60
    agg_s, prep_s = timed.seconds["aggregate"], timed.seconds["prepare"]
    return {
        "variant": spec,
        **gen_result,
        "accepted_per_min": gen_result["outcomes"].get("accepted", 0) / minutes,
        "aggregated_per_min": aggregated / minutes,
        "versions": versions,
        "aggregate_s": agg_s,
        "prepare_s": prep_s,
        "alignment_share": prep_s / agg_s if agg_s > 0 else 0.0,
        "calibration_wait_s": calibration_wait,
        "aggregate_cpu_s": timed.cpu["aggregate"],
        "prepare_cpu_s": timed.cpu["prepare"],
        "alignment_cpu_share": timed.cpu["prepare"] / timed.cpu["aggregate"] if timed.cpu["aggregate"] else 0.0,
        "load_average": os.getloadavg()[0],
        "aggregate_ms_each": 1000 * agg_s / max(timed.calls["aggregate"], 1),
        "coordinator_cpu_s": cpu,
        "rss_peak_mb": peak,
        "rss_before_mb": rss_before,
        "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", required=True, help="a bundle (SmolLM2 for the figures in BENCHMARKS.md)")
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--rate", type=float, default=1200.0, help="offered updates per minute (default 1200)")
    p.add_argument("--duration", type=float, default=180.0, help="publishing seconds per variant (default 180)")
    p.add_argument("--drain", type=float, default=60.0, help="seconds to wait for the last acks (default 60)")
    p.add_argument("--k", type=int, default=20, help="buffer size K (default 20)")
    p.add_argument("--calibration-tokens", type=int, default=256)
    p.add_argument(
        "--variants",
        default="fedbuff,alignfed,alignfed:prefetch=false",
        help="comma-separated STRATEGY[:KEY=VALUE;...] (default fedbuff,alignfed,alignfed:prefetch=false)",
    )
    p.add_argument("--json", help="write the results here too")
    # the load generator's own arguments (it runs as a child process)
    p.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--federation", help=argparse.SUPPRESS)
    p.add_argument("--keys", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--one", help=argparse.SUPPRESS)  # run one variant in this process, results to --out
    args = p.parse_args()
    if args.generate:
        return generate(args)
    import logging

    logging.basicConfig(level=logging.WARNING)
    if args.one:
        Path(args.out).write_text(json.dumps(run_variant(args.one, args)))
        return 0
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')}; "
        f"{args.devices} devices, {args.rate:g} updates/min offered for {args.duration:g} s, K = {args.k}",
        flush=True,
    )
    print(
        "| variant | accepted/min | aggregated/min | p50 ack | p95 ack | versions | aggregation (ms each) "
        "| prepare share | coordinator CPU | peak RSS | rejected | unanswered | all busy |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for spec in filter(None, (s.strip() for s in args.variants.split(","))):
        # each variant in a fresh process, so its RSS is its own
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            argv = sys.argv[1:]
            child = [a for i, a in enumerate(argv) if a != "--json" and (i == 0 or argv[i - 1] != "--json")]
            subprocess.run([sys.executable, str(HERE), *child, "--one", spec, "--out", out.name], check=True)
            r = json.loads(Path(out.name).read_text())
        results.append(r)
        rejected = {k: v for k, v in r["outcomes"].items() if k != "accepted"}
        print(
            f"| {spec} | {r['accepted_per_min']:.0f} | {r['aggregated_per_min']:.0f} | {r['p50_s']:.2f} s "
            f"| {r['p95_s']:.2f} s | {r['versions']} | {r['aggregate_ms_each']:.0f} "
            f"| {100 * r['alignment_share']:.1f} % "
            f"| {r['coordinator_cpu_s']:.1f} s | {r['rss_peak_mb']:.0f} MB | {rejected or 0} | {r['unanswered']} "
            f"| {r['skipped_all_busy']} |",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
