"""`alignfed demo`: a whole federation on this machine, watched live, then a report of what happened.

An embedded broker (or the one given), a coordinator with its dashboard, and N edge daemons as
separate processes with heterogeneous profiles, each holding a different real task (`demo.tasks`)
in the model's chat format (`demo.chat`). The devices train for a bounded time; the report gives the
version history, each device's contributions, the held-out eval loss of every task before and after,
and the same prompts answered through llama.cpp by the base alone and with the final adapter.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignfed import manifest as mf
from alignfed import protocol, tomlfile
from alignfed.errors import ConfigError
from coordinator import config as ccfg
from coordinator.live import Watching, watch
from coordinator.service import Coordinator
from coordinator.store import Store
from demo.chat import ChatFormat
from demo.local import DeviceSpec, lay_out
from demo.tasks import Task, tasks

HELD_OUT = 8  # held-out examples per task: the before/after eval loss
SEQ_LEN = 128  # training row length on the real model (a GSM8K example in the chat format fits)
ANSWER_TOKENS = 96


@dataclass(frozen=True, slots=True)
class DemoOptions:
    devices: int = 3
    minutes: float = 7.0  # how long the devices train; the whole demo adds export, eval and answers
    rounds: int = 0  # > 0: each device stops after this many updates (short runs, tests)
    workdir: Path | None = None
    broker: str | None = None
    strategy: str = "alignfed"
    compare: str | None = None  # a second strategy run after the first on the same devices and data
    model: str = "smollm2"  # "smollm2" (the real reference model), "tiny" (random, seconds) or a path
    dashboard: str = "127.0.0.1:8080"  # HOST:PORT, or "off"
    examples: int = 0  # training examples per task; 0 = the default for the model


@dataclass(frozen=True, slots=True)
class Setup:
    work: Path
    bundle: Path
    real: bool
    chat: ChatFormat
    tasks: tuple[Task, ...]
    specs: tuple[DeviceSpec, ...]
    calibration: Path
    broker_url: str


@dataclass(frozen=True, slots=True)
class Outcome:
    strategy: str
    database: Path
    seconds: float
    device_tasks: dict[str, str]
    device_profiles: dict[str, str]


def _say(text: str = "") -> None:
    print(text, flush=True)


@contextmanager
def _quiet_logging(path: Path) -> Iterator[None]:
    """Every log record of this process (ours and the libraries') goes to `path`, none to the report."""
    root = logging.getLogger()
    kept, level = list(root.handlers), root.level
    for h in kept:
        root.removeHandler(h)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        for h in kept:
            root.addHandler(h)
        root.setLevel(level)


# -- profiles: three device classes ---------------------------------------------------------------

# (name, local steps, duty cycle, link kbps): a fast laptop-class device, a Pi 5-class and a Pi 4-class
CLASSES = (("fast", 6, 1.0, 4000.0), ("medium", 4, 0.7, 1000.0), ("slow", 2, 0.5, 250.0))


def _profile(path: Path, cls: tuple[str, int, float, float], real: bool) -> Path:
    name, steps, duty, kbps = cls
    return tomlfile.write(
        path,
        {
            "name": f"demo-{name}",
            "description": f"demo device class {name!r}",
            "arch": "x86_64",
            "trainer": "ort",
            "threads": 1,
            "memory_mb": 4096 if real else 2048,
            "batch": 2 if real else 4,
            "seq_len": SEQ_LEN if real else 48,
            "local_steps": steps if real else steps + 2,
            "lr": 0.004 if real else 0.01,
            "duty_cycle": duty,
            "step_speed": float(steps),
            "uplink_kbps": kbps,
            "downlink_kbps": kbps * 4,
            "latency_ms": 5.0,
            "availability": 1.0,
        },
    )


# -- set-up ---------------------------------------------------------------------------------------


def _bundle(opts: DemoOptions, work: Path) -> tuple[Path, bool]:
    from export.bundle import export_bundle

    if opts.model == "tiny":
        from export.synthetic import write_tiny_llama

        _say("1/6 base model: a small random Llama (2 layers, hidden 64), LoRA q,v r=4")
        bundle = work / "bundle"
        export_bundle(write_tiny_llama(work / "base-model"), bundle, targets=("q", "v"), rank=4, alpha=8.0,
                      quantization="fp32", seed=0)  # fmt: skip
        return bundle, False
    if opts.model == "smollm2":
        from export.reference_model import smollm2_gguf

        model = smollm2_gguf()
    else:
        model = Path(opts.model)
    # the export is deterministic: keep one per model, beside the model cache
    bundle = Path.home() / ".cache" / "alignfed" / "demo-bundles" / f"{model.stem}-qv-r8-int8"
    try:
        mf.verify(bundle, mf.load(bundle))
        _say(f"1/6 base model: {model.name}, training bundle from the cache ({bundle})")
    except Exception:
        _say(f"1/6 base model: {model.name} exported to an int8 training bundle, LoRA q,v r=8 (once; cached)")
        export_bundle(model, bundle, targets=("q", "v"), rank=8, alpha=16.0, quantization="int8", seed=0)
    return bundle, True


def _chat(bundle: Path) -> ChatFormat:
    from tokenizers import Tokenizer

    m = mf.load(bundle)
    eos = m.tokenizer.get("eos_id")
    token = Tokenizer.from_file(str(bundle / mf.TOKENIZER)).id_to_token(int(eos)) if eos is not None else None
    return ChatFormat(m.tokenizer.get("chat_template"), token)


def _fitting(task: Task, chat: ChatFormat, bundle: Path, tokens: int) -> Task:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle / mf.TOKENIZER))

    def fits(pairs: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        texts = [chat.example(u, a) for u, a in pairs]
        lengths = [len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)]
        return tuple(p for p, n in zip(pairs, lengths, strict=True) if n <= tokens)

    return Task(task.name, task.description, fits(task.train), fits(task.held_out), task.prompt)


def _write_texts(path: Path, texts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _set_up(opts: DemoOptions, work: Path, bundle: Path, real: bool, broker_url: str) -> Setup:
    chat = _chat(bundle)
    n = opts.examples or (240 if real else 48)
    all_tasks = tasks(n, HELD_OUT, seed=0)
    if real:  # only whole examples: a truncated one would teach no end of turn
        all_tasks = tuple(_fitting(t, chat, bundle, SEQ_LEN - 1) for t in all_tasks)
    specs = []
    for i in range(opts.devices):
        task = all_tasks[i % len(all_tasks)]
        share = task.train[i // len(all_tasks) :: max(1, (opts.devices + len(all_tasks) - 1) // len(all_tasks))]
        data = _write_texts(work / "data" / f"dev-{i}-{task.name}.jsonl", [chat.example(u, a) for u, a in share])
        cls = CLASSES[i % len(CLASSES)]
        profile = _profile(work / "profiles" / f"{cls[0]}.toml", cls, real)
        extra = {"max_rounds": opts.rounds, "seed": i, "wire_quantization": "int8c", "eval_examples": 4}
        specs.append(DeviceSpec(f"dev-{i}", str(profile), data, extra=extra))
    for task in all_tasks:
        _write_texts(work / "data" / f"eval-{task.name}.jsonl", [chat.example(u, a) for u, a in task.held_out])
    # the coordinator's alignment mini-batch: a few examples of every task
    calibration = _write_texts(
        work / "data" / "calibration.jsonl", [chat.example(u, a) for t in all_tasks for u, a in t.train[-4:]]
    )
    return Setup(work, bundle, real, chat, all_tasks, tuple(specs), calibration, broker_url)


def _dashboard_table(address: str) -> dict[str, Any]:
    if address == "off":
        return {"enabled": False}
    from dashboard.config import parse_address

    cfg = parse_address(address)
    with socket.socket() as s:  # the default port may be taken on a shared machine: then any free one
        try:
            s.bind((cfg.host, cfg.port))
        except OSError:
            return {"host": cfg.host, "port": 0}
    return {"host": cfg.host, "port": cfg.port}


# -- one federation -------------------------------------------------------------------------------


def _strategy(name: str, devices: int) -> dict[str, Any]:
    k = max(1, min(3, devices))
    if name == "fedavg":
        return {"name": "fedavg", "n": devices}
    if name == "alignfed":
        return {"name": "alignfed", "k": k, "max_wait_s": 60.0, "tau_max": 8}
    return {"name": name, "k": k}


def _federate(s: Setup, opts: DemoOptions, strategy: str, step: str) -> Outcome:
    root = s.work / f"federation-{strategy}"
    fed = lay_out(
        root,
        bundle=s.bundle,
        broker_url=s.broker_url,
        devices=list(s.specs),
        federation=f"demo-{strategy}",
        strategy=_strategy(strategy, opts.devices),
        dashboard=_dashboard_table(opts.dashboard),
        calibration={"data": str(s.calibration), "tokens": 256 if s.real else 64},
    )
    cfg = ccfg.load(fed.coordinator_config)
    coordinator = Coordinator(cfg)
    watching = watch(coordinator)
    bound = f"{opts.minutes:g} min" + (f" or {opts.rounds} updates each" if opts.rounds else "")
    _say(f"{step} {strategy}: coordinator (K={_strategy(strategy, opts.devices).get('k', opts.devices)}) and "
         f"{opts.devices} edge daemons, training for {bound}")  # fmt: skip
    if watching is not None:
        _say(f"    dashboard: {watching.url}   (Prometheus metrics: {watching.url}metrics)")
    for spec in s.specs:
        _say(f"    {spec.device_id}: {Path(spec.profile).stem:6} device, task {spec.data.stem.split('-', 2)[-1]}")
    stop = threading.Event()
    thread = threading.Thread(target=coordinator.run, args=(stop,), name="coordinator", daemon=True)
    thread.start()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    started = time.monotonic()
    for d, path in fed.device_configs.items():
        log = open(root / f"{d}.log", "wb")  # noqa: SIM115 - owned by the child
        procs[d] = subprocess.Popen(
            [sys.executable, "-m", "alignfed.cli", "edge", "--config", str(path)], stdout=log, stderr=subprocess.STDOUT
        )
    try:
        _run_until(procs, started, opts, watching, root)
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(timeout=30)
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        if watching is not None:
            watching.stop()
    return Outcome(
        strategy,
        Path(cfg.database),  # the demo lays out an SQLite store
        time.monotonic() - started,
        {sp.device_id: sp.data.stem.split("-", 2)[-1] for sp in s.specs},
        {sp.device_id: Path(sp.profile).stem for sp in s.specs},
    )


def _run_until(
    procs: dict[str, subprocess.Popen[bytes]], started: float, opts: DemoOptions, watching: Watching | None, root: Path
) -> None:
    """Wait for the devices; stop them (SIGTERM: they finish the round's send) when the time is up."""
    budget = opts.minutes * 60.0
    every = 30.0 if budget > 120 else 5.0
    next_report = every
    stopping = False
    while any(p.poll() is None for p in procs.values()):
        elapsed = time.monotonic() - started
        if elapsed >= budget and not stopping:
            stopping = True
            _say(f"    time is up ({elapsed:.0f} s): stopping the devices")
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
        if stopping and elapsed >= budget + 120:
            break
        if elapsed >= next_report and watching is not None:
            next_report += every
            _say("    " + _progress(watching.dashboard.board.snapshot(), elapsed))
        time.sleep(0.5)
    for d, p in procs.items():
        code = p.wait(timeout=30) if p.poll() is None else p.returncode
        if code not in (0, None):
            _say(f"    {d} exited with {code}; see {root / (d + '.log')}")


def _progress(snap: dict[str, Any], elapsed: float) -> str:
    t = snap["totals"]
    held = snap["held_out_loss"]
    per = " · " + " ".join(f"{d['id']} {d['accepted']}" for d in snap["devices"]) if snap["devices"] else ""
    loss = f" · held-out loss {held[-1][1]:.3f}" if held else ""
    return (
        f"[{int(elapsed) // 60:2d}:{int(elapsed) % 60:02d}] v{snap['version']} · {t['accepted']} updates accepted, "
        f"{t['rejected']} rejected{loss}{per}"
    )


# -- the report -----------------------------------------------------------------------------------


def _history(store: Store) -> None:
    rows = store._db.execute(  # read-only reporting queries against the coordinator's database
        "SELECT v.version, v.parent, COUNT(u.update_id), GROUP_CONCAT(u.device_id), "
        "AVG(v.version - 1 - u.base_version) FROM versions v LEFT JOIN updates u ON u.version = v.version "
        "GROUP BY v.version ORDER BY v.version"
    ).fetchall()
    _say("    version  parent  updates  mean staleness  from devices")
    shown = rows if len(rows) <= 14 else [*rows[:4], None, *rows[-8:]]
    for row in shown:
        if row is None:
            _say(f"    {'…':>7}  ({len(rows) - 12} more)")
            continue
        version, parent, n, devs, tau = row
        names = ",".join(sorted(set(devs.split(",")))) if devs else "(initial adapter)"
        _say(f"    {version:7d}  {parent:6d}  {n:7d}  {tau if tau is not None else 0:14.2f}  {names}")


def _contributions(store: Store, out: Outcome) -> None:
    stats = store.stats()
    weights: dict[str, float] = {}
    taus: dict[str, list[int]] = {}
    for device, base, version in store.aggregated():
        taus.setdefault(device, []).append(version - 1 - base)
    for device, w in store._db.execute(
        "SELECT device_id, SUM(weight) FROM updates WHERE status = 'aggregated' GROUP BY device_id"
    ):
        weights[device] = float(w or 0.0)
    total = sum(s["aggregated"] for s in stats.values()) or 1
    _say("    device  class   task       aggregated  pending  rejected  share  mean τ  sum of weights  bytes up")
    for d in sorted(out.device_tasks):
        st = stats.get(d, {"aggregated": 0, "pending": 0, "rejected": 0, "bytes": 0})
        tau = sum(taus.get(d, [])) / len(taus[d]) if taus.get(d) else 0.0
        _say(
            f"    {d:6}  {out.device_profiles[d].removeprefix('demo-'):6}  {out.device_tasks[d]:9}  "
            f"{st['aggregated']:10d}  {st['pending']:7d}  {st['rejected']:8d}  {st['aggregated'] / total:5.0%}  "
            f"{tau:6.2f}  {weights.get(d, 0.0):14.2f}  {st['bytes']:8d}"
        )


def _finals(outcomes: list[Outcome]) -> dict[str, protocol.GlobalAdapter]:
    finals: dict[str, protocol.GlobalAdapter] = {}
    for out in outcomes:
        store = Store(out.database)
        latest = store.latest_version() or 0
        finals[out.strategy] = protocol.decode_global(store.version(latest)[0], 1 << 34)
        if "v0" not in finals:
            finals["v0"] = protocol.decode_global(store.version(0)[0], 1 << 34)
        store.close()
    return finals


def _eval(s: Setup, finals: dict[str, protocol.GlobalAdapter], strategies: list[str]) -> None:
    from alignfed.text import Batcher, load_texts
    from edge.trainer import OrtTrainer

    m = mf.load(s.bundle)
    trainer = OrtTrainer(s.bundle, m, lr=0.0, threads=2)
    head = "".join(f"  {st + ' v' + str(finals[st].version):>16}" for st in strategies)
    _say(f"    task       base (v0){head}   (held-out eval loss, {HELD_OUT} examples per task)")
    for task in s.tasks:
        batch = Batcher(
            load_texts(s.work / "data" / f"eval-{task.name}.jsonl"),
            s.bundle / mf.TOKENIZER,
            batch=HELD_OUT,
            seq_len=SEQ_LEN if s.real else 48,
            eos_id=int(m.tokenizer.get("eos_id", 0)),
            seed=0,
        ).fixed(HELD_OUT)
        losses = []
        for key in ["v0", *strategies]:
            trainer.load_adapter(finals[key].tensors)
            losses.append(trainer.eval_loss(batch))
        cells = "".join(f"  {x:16.4f}" for x in losses[1:])
        _say(f"    {task.name:9}  {losses[0]:9.4f}{cells}")


def _answers(s: Setup, final: protocol.GlobalAdapter, label: str) -> list[tuple[str, str, str]]:
    from alignfed.gguf_adapter import write_lora_gguf
    from runtime.llama import Generator

    m = mf.load(s.bundle)
    path = write_lora_gguf(s.work / f"final-adapter-{label}.gguf", final.tensors, m.architecture, m.lora)
    out = []
    # one thread: on a busy machine llama.cpp's spinning worker threads slow it down many times over
    with Generator(s.bundle / mf.BASE_GGUF, n_ctx=512, n_threads=1) as gen:
        for task in s.tasks:
            prompt = s.chat.prompt(task.prompt)
            gen.set_adapter(None)
            base = gen.generate(prompt, max_tokens=ANSWER_TOKENS).strip()
            gen.set_adapter(path)
            tuned = gen.generate(prompt, max_tokens=ANSWER_TOKENS).strip()
            out.append((task.name, base, tuned))
            _say(
                f"    [{task.name}] {task.prompt}" + ("" if s.real else "  (a tiny random base: the path, not quality)")
            )
            _say("      base alone:")
            _say(_block(base))
            _say(
                f"      with the federated adapter ({label} v{final.version}):"
                + ("  (same as base)" if base == tuned else "")
            )
            _say(_block(tuned))
    return out


def _block(text: str, limit: int = 400) -> str:
    shown = text if len(text) <= limit else text[:limit] + " …"
    return textwrap.indent(shown or "(empty)", "        | ", lambda line: True)


# -- entry point ----------------------------------------------------------------------------------


def run_demo(opts: DemoOptions) -> None:
    if opts.devices < 1:
        raise ConfigError(f"--devices {opts.devices}: expected at least 1")
    if opts.minutes <= 0:
        raise ConfigError(f"--minutes {opts.minutes}: expected a positive number of minutes")
    work = opts.workdir or Path(tempfile.mkdtemp(prefix="alignfed-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    _say(f"AlignFed demo in {work} (logs: {work / 'demo.log'} and federation-*/dev-*.log)")
    with _quiet_logging(work / "demo.log"):
        bundle, real = _bundle(opts, work)
        broker = None
        url = opts.broker
        if url is None:
            from demo.broker import EmbeddedBroker

            broker = EmbeddedBroker().start()
            url = broker.url
        _say(f"2/6 broker: {url}{' (embedded amqtt)' if broker else ''}")
        s = _set_up(opts, work, bundle, real, url)
        _say(f"3/6 {opts.devices} devices, each with its own task in the model's chat format:")
        for t in s.tasks:
            _say(f"    {t.name:9} {t.description}: {len(t.train)} examples, {len(t.held_out)} held out")
        strategies = [opts.strategy] + ([opts.compare] if opts.compare and opts.compare != opts.strategy else [])
        outcomes = []
        try:
            for i, strategy in enumerate(strategies):
                outcomes.append(_federate(s, opts, strategy, f"4/6{'abc'[i] if len(strategies) > 1 else ''}"))
        finally:
            if broker is not None:
                broker.stop()
        _say(f"5/6 what happened ({time.monotonic() - started:.0f} s so far)")
        for out in outcomes:
            store = Store(out.database)
            _say(f"  {out.strategy}: {out.seconds:.0f} s of federation")
            _say("  version history")
            _history(store)
            _say("  contributions per device")
            _contributions(store, out)
            store.close()
        finals = _finals(outcomes)
        _say("  eval loss before / after")
        _eval(s, finals, strategies)
        _say(
            f"6/6 the same prompts through llama.cpp, in the model's chat format "
            f"({time.monotonic() - started:.0f} s so far)"
        )
        _answers(s, finals[strategies[0]], strategies[0])
    _say(f"done in {time.monotonic() - started:.0f} s; files kept in {work}")
