"""`alignfed demo`: a whole federation on this machine, then a report of what happened.

An embedded broker (or the one given), a coordinator, and N edge daemons as separate processes,
each with its own non-IID data (arithmetic, code, prose), training a small base model and
exchanging signed updates; at the end the per-version and per-device history from the
coordinator's database, the eval loss of the first and last global adapter on every device's data,
and an answer from llama.cpp with the final adapter.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignfed import manifest as mf
from alignfed import protocol, tomlfile
from alignfed.corpora import DOMAINS, write_domain
from coordinator import config as ccfg
from coordinator.service import Coordinator
from coordinator.store import Store
from demo.local import DeviceSpec, lay_out


@dataclass(frozen=True, slots=True)
class DemoOptions:
    devices: int = 3
    rounds: int = 4
    workdir: Path | None = None
    broker: str | None = None
    strategy: str = "fedbuff"
    model: str = "smollm2"  # "smollm2" (the real reference model), "tiny" (random, seconds) or a path


def _say(text: str) -> None:
    print(text, flush=True)


def _demo_profile(path: Path, speed: int, real: bool) -> Path:
    """Heterogeneous devices: `speed` sets local steps per round (1 = slowest class)."""
    return tomlfile.write(
        path,
        {
            "name": f"demo-class-{speed}",
            "description": "demo device class",
            "arch": "x86_64",
            "trainer": "ort",
            "threads": 1,
            "memory_mb": 4096 if real else 2048,
            "batch": 2 if real else 4,
            "seq_len": 64 if real else 48,
            "local_steps": speed if real else 2 + 2 * speed,
            "lr": 0.003 if real else 0.01,
            "duty_cycle": 1.0,
            "step_speed": float(speed),
            "uplink_kbps": 1000.0,
            "downlink_kbps": 1000.0,
            "latency_ms": 5.0,
            "availability": 1.0,
        },
    )


def run_demo(opts: DemoOptions) -> None:
    work = opts.workdir or Path(tempfile.mkdtemp(prefix="alignfed-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    _say(f"AlignFed demo in {work}")

    from export.bundle import export_bundle

    bundle = work / "bundle"
    real = opts.model != "tiny"
    if real:
        if opts.model == "smollm2":
            from export.reference_model import smollm2_gguf

            model = smollm2_gguf()
        else:
            model = Path(opts.model)
        _say(f"1/5 base model: {model.name} exported to an int8 training bundle (LoRA q,v r=8)")
        export_bundle(model, bundle, targets=("q", "v"), rank=8, alpha=16.0, quantization="int8", seed=0)
    else:
        from export.synthetic import write_tiny_llama

        _say("1/5 base model: a small random Llama (2 layers, hidden 64) exported to a bundle (LoRA q,v r=4)")
        model = write_tiny_llama(work / "base-model")
        export_bundle(model, bundle, targets=("q", "v"), rank=4, alpha=8.0, quantization="fp32", seed=0)

    broker = None
    url = opts.broker
    if url is None:
        from demo.broker import EmbeddedBroker

        broker = EmbeddedBroker().start()
        url = broker.url
    _say(f"2/5 broker: {url}{' (embedded amqtt)' if broker else ''}")

    specs = []
    for i in range(opts.devices):
        domain = DOMAINS[i % len(DOMAINS)]
        data = write_domain(work / "data" / f"dev-{i}-{domain}.jsonl", domain, 64, seed=i)
        profile = _demo_profile(work / "profiles" / f"class-{i % 3 + 1}.toml", i % 3 + 1, real)
        specs.append(
            DeviceSpec(
                f"dev-{i}",
                str(profile),
                data,
                extra={"max_rounds": opts.rounds, "seed": i, "wire_quantization": "int8c"},
            )
        )
    k = max(1, min(3, opts.devices))
    fed = lay_out(
        work / "federation",
        bundle=bundle,
        broker_url=url,
        devices=specs,
        strategy={"name": opts.strategy, "k": k}
        if opts.strategy != "fedavg"
        else {"name": "fedavg", "n": opts.devices},
    )
    _say(f"3/5 coordinator ({opts.strategy}, K={k}) and {opts.devices} edge daemons, {opts.rounds} updates each")

    cfg = ccfg.load(fed.coordinator_config)
    log_file = logging.FileHandler(work / "federation" / "coordinator.log")
    logging.getLogger("coordinator").addHandler(log_file)
    logging.getLogger("coordinator").propagate = False
    stop = threading.Event()
    coordinator = Coordinator(cfg)
    thread = threading.Thread(target=coordinator.run, args=(stop,), name="coordinator", daemon=True)
    thread.start()
    procs = {}
    for d, path in fed.device_configs.items():
        log = open(work / "federation" / f"{d}.log", "wb")  # noqa: SIM115 - owned by the child
        procs[d] = subprocess.Popen(
            [sys.executable, "-m", "alignfed.cli", "edge", "--config", str(path)], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        for d, p in procs.items():
            if p.wait(timeout=900) != 0:
                _say(f"   {d} exited with {p.returncode}; see {work / 'federation' / (d + '.log')}")
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(timeout=30)
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        if broker is not None:
            broker.stop()

    _say("4/5 what happened")
    store = Store(Path(cfg.database))  # the demo lays out an SQLite store
    _report(store, fed.device_configs, bundle, specs)
    _say(f"5/5 llama.cpp with the final global adapter ({time.monotonic() - started:.0f} s so far)")
    _sample(store, bundle, real)
    store.close()
    _say(f"done in {time.monotonic() - started:.0f} s; files kept in {work}")


def _report(store: Store, devices: dict[str, Path], bundle: Path, specs: list[DeviceSpec]) -> None:
    rows = store._db.execute(  # read-only reporting queries against the coordinator's database
        "SELECT v.version, v.parent, COUNT(u.update_id), GROUP_CONCAT(u.device_id), "
        "AVG(v.version - 1 - u.base_version) FROM versions v LEFT JOIN updates u ON u.version = v.version "
        "GROUP BY v.version ORDER BY v.version"
    ).fetchall()
    _say("   version  parent  updates  mean staleness  from devices")
    for version, parent, n, devs, tau in rows:
        names = ",".join(sorted(set(devs.split(",")))) if devs else "(initial adapter)"
        _say(f"   {version:7d}  {parent:6d}  {n:7d}  {tau if tau is not None else 0:14.2f}  {names}")
    _say("   device  accepted  rejected  pending  bytes up")
    for d, s in sorted(store.stats().items()):
        _say(f"   {d:6}  {s['aggregated']:8d}  {s['rejected']:8d}  {s['pending']:7d}  {s['bytes']:8d}")

    from alignfed.text import Batcher, load_texts
    from edge.trainer import OrtTrainer

    m = mf.load(bundle)
    latest = store.latest_version() or 0
    first = protocol.decode_global(store.version(0)[0], 1 << 30)
    last = protocol.decode_global(store.version(latest)[0], 1 << 30)
    trainer = OrtTrainer(bundle, m, lr=0.0, threads=1)
    _say(f"   eval loss on each device's data: v0 -> v{latest}")
    before, after = [], []
    for spec in specs:
        batcher = Batcher(
            load_texts(spec.data),
            bundle / mf.TOKENIZER,
            batch=8,
            seq_len=64 if m.architecture.n_layers > 2 else 48,
            eos_id=int(m.tokenizer.get("eos_id", 0)),
            seed=0,
        )
        batch = batcher.fixed(8)
        trainer.load_adapter(first.tensors)
        b = trainer.eval_loss(batch)
        trainer.load_adapter(last.tensors)
        a = trainer.eval_loss(batch)
        before.append(b)
        after.append(a)
        _say(f"   {spec.device_id:6} ({spec.data.stem.split('-', 2)[-1]:10}) {b:.4f} -> {a:.4f}")
    _say(
        f"   mean {np.mean(before):.4f} -> {np.mean(after):.4f}; worst device {max(after):.4f}; "
        f"Jain's index of contributions {last.metrics.get('jain_index', float('nan')):.3f}"
    )


def _sample(store: Store, bundle: Path, real: bool) -> None:
    from alignfed.gguf_adapter import write_lora_gguf
    from runtime.llama import Generator

    m = mf.load(bundle)
    latest = store.latest_version() or 0
    g = protocol.decode_global(store.version(latest)[0], 1 << 30)
    path = write_lora_gguf(bundle.parent / "final-adapter.gguf", g.tensors, m.architecture, m.lora)
    with Generator(bundle / mf.BASE_GGUF, n_ctx=m.architecture.max_seq, n_threads=2) as gen:
        gen.set_adapter(path)
        prompt = "Question: What is 12 plus 7?\nAnswer:"
        _say(f"   prompt: {prompt!r}")
        answer = gen.generate(prompt, max_tokens=32)
        note = "" if real else "  (a tiny random base: the text shows the path works, not quality)"
        _say(f"   answer: {answer!r}{note}")
