"""Will a bundle train on a device? Peak-memory estimates per backend, from the architecture alone.

The one estimate of training memory: `alignfed flash` refuses a bundle that does not fit the
profile's `memory_mb`, with the numbers, and the daemon checks the same before it trains.

PyTorch (the lean trainer the daemon runs, decision 23): the terms are those of the floor in
benchmarks/bench_lean.py, with coefficients fitted to what that benchmark measured (BENCHMARKS.md,
"Lean training"):

- weights: int8 projections (1 byte per parameter + a float32 scale per output channel) or float32
  ones, plus the float32 embeddings, LM head and norms — what the lean trainer holds;
- LoRA: the adapter, its gradient and two AdamW moments (4 copies);
- activations kept for backward, per token and decoder layer ≈ 8·hidden + 4·intermediate + heads·T
  floats (the autograd-saved bytes of a lean SmolLM2 step, counted by storage, were 10.6 k floats
  per token and layer at T = 64 where this gives 11.3 k); with per-layer checkpointing only each
  layer's input (hidden floats) is kept, plus one layer's activations while it is recomputed;
- the chunked LM head: `LOSS_CHUNK` rows of logits, log-probabilities and their product with the
  head (3 × chunk × vocab floats), and dh (tokens × hidden);
- the dequantized weight of the largest projection and its int8 → float32 temporary (2 copies);
- a fixed runtime overhead (the interpreter, torch, numpy, tokenizers) measured as RSS after load
  minus the weights.

ONNX Runtime (benchmarks/bench_train_memory.py, growth of a fresh process): the base as the bundle
stores it, and for an int8 bundle the float32 copies of the dequantized projections, which its
gradient graph keeps from forward to backward; the LoRA tensors and their optimizer state; the
activations ≈ B·T·(L·(8·hidden + 3·intermediate) + 3·vocab) floats (no checkpointing, whole logits);
and the runtime. SmolLM2-135M int8 at 2×64 grew 1111 MB (estimate 1119).
"""

from __future__ import annotations

from alignfed import manifest as mf
from alignfed.errors import ConfigError
from alignfed.profiles import DeviceProfile

LOSS_CHUNK = 128  # edge.chunked_loss.DEFAULT_CHUNK (not imported: that module needs torch)
# Interpreter, torch, numpy, tokenizers and what the allocator keeps: fitted so the estimate is at or
# above the measured peak of the lean trainer with checkpointing at 2 × 64 (SmolLM2 706 MB, Qwen2.5-0.5B
# shape 1652 MB, Llama-3.2-1B shape 2804 MB measured; 811, 1654, 2811 MB estimated).
TORCH_OVERHEAD_MB = 500.0
# What importing and starting ONNX Runtime training adds: the tiny model's growth, which varied between
# runs on the same machine from 269 to 326 MB, plus a margin.
ORT_OVERHEAD_MB = 340.0


def _projections(a: mf.Architecture) -> list[tuple[int, int]]:
    """(in, out) of each of one decoder layer's seven projections."""
    hd = a.head_dim
    return [
        (a.hidden, a.n_heads * hd),
        (a.hidden, a.n_kv_heads * hd),
        (a.hidden, a.n_kv_heads * hd),
        (a.n_heads * hd, a.hidden),
        (a.hidden, a.intermediate),
        (a.hidden, a.intermediate),
        (a.intermediate, a.hidden),
    ]


def weight_bytes(a: mf.Architecture, quantization: str, *, embedding: str = "fp32") -> int:
    """Bytes of the frozen base as the lean trainer holds it (and an int8 bundle stores it);
    `embedding`: the profile's table type ("int8": 1 byte an entry and a scale per row)."""
    hd = a.head_dim
    per_param = 1 if quantization == "int8" else 4
    layer = sum(i * o * per_param + (4 * o if quantization == "int8" else 0) for i, o in _projections(a))
    layer += 2 * 4 * a.hidden  # norms
    if a.qkv_bias:
        layer += 4 * (a.n_heads + 2 * a.n_kv_heads) * hd
    heads = 1 if a.tie_embeddings else 2
    table = a.vocab * a.hidden + 4 * a.vocab if embedding == "int8" else 4 * a.vocab * a.hidden  # per table
    return a.n_layers * layer + heads * table + 4 * a.hidden


def activation_bytes(
    a: mf.Architecture, batch: int, seq_len: int, *, checkpoint: bool, loss_chunk: int = LOSS_CHUNK
) -> int:
    """Bytes autograd keeps for one step, plus the chunked head's working set."""
    tokens = batch * seq_len
    per_layer = 4 * tokens * (8 * a.hidden + 4 * a.intermediate + a.n_heads * seq_len)
    kept = a.n_layers * 4 * tokens * a.hidden + per_layer if checkpoint else a.n_layers * per_layer
    head = 3 * 4 * min(tokens, loss_chunk) * a.vocab + 4 * tokens * a.hidden
    dequantized = 2 * 4 * a.hidden * a.intermediate
    return kept + head + dequantized


def ort_activation_bytes(a: mf.Architecture, batch: int, seq_len: int) -> int:
    """Bytes ONNX Runtime's training graph keeps for one step: every layer's, and the whole logits.

    The count of kept tensors (8·H + 3·I per token and layer, 3·V for the logits) times 1.4, the ratio
    of measured to counted growth on SmolLM2 int8 at 4×64 and 4×128 (peaks 1506 and 2094 MB,
    BENCHMARKS.md: ORT's arena rounds allocations up and keeps intermediate buffers of its own), so
    that the estimate stays above what was measured."""
    counted = 4 * batch * seq_len * (a.n_layers * (8 * a.hidden + 3 * a.intermediate) + 3 * a.vocab)
    return counted * 7 // 5


def training_memory_mb(m: mf.Manifest, profile: DeviceProfile) -> float:
    """Estimated peak memory (MB) of training `m`'s bundle with `profile`'s backend, batch and seq_len."""
    a, b, t = m.architecture, profile.batch, profile.seq_len
    lora = 4 * 4 * sum(r * c for r, c in m.lora_shapes().values())  # the adapter, its gradient, 2 moments
    if profile.trainer == "torch":
        need = weight_bytes(a, m.train_quantization, embedding=profile.embedding) + lora
        need += activation_bytes(a, b, t, checkpoint=profile.checkpointing == "layers", loss_chunk=profile.loss_chunk)
        return need / 2**20 + TORCH_OVERHEAD_MB
    dequantized = 4 * a.n_layers * sum(i * o for i, o in _projections(a)) if m.train_quantization == "int8" else 0
    need = weight_bytes(a, m.train_quantization) + dequantized + lora + ort_activation_bytes(a, b, t)
    return need / 2**20 + ORT_OVERHEAD_MB


def shortfall(m: mf.Manifest, profile: DeviceProfile, bundle: object) -> str | None:
    """Why the bundle would not train within the profile's memory_mb, with the numbers; None if it fits."""
    need = training_memory_mb(m, profile)
    if need <= profile.memory_mb:
        return None
    a = m.architecture
    hint = "".join(
        f" or {option}"
        for option, applies in (
            ('checkpointing = "layers"', profile.checkpointing == "none"),
            ('embedding = "int8"', profile.embedding == "fp32"),
        )
        if profile.trainer == "torch" and applies
    )
    return (
        f"bundle {bundle} ({a.family}, {a.n_layers} layers, hidden {a.hidden}, vocab {a.vocab}, "
        f"{m.train_quantization} base) needs about {need:.0f} MB to train with the {profile.trainer} backend "
        f"at batch {profile.batch} × {profile.seq_len}; profile {profile.name!r} allows {profile.memory_mb} MB"
        f"{f' (largest it trains: {profile.largest_model})' if profile.largest_model else ''}: "
        f"use a smaller base, batch or seq_len{hint}"
    )


def check_fits(m: mf.Manifest, profile: DeviceProfile, bundle: object) -> None:
    """Raise ConfigError naming the numbers when the bundle would not train within memory_mb."""
    why = shortfall(m, profile, bundle)
    if why is not None:
        raise ConfigError(why)
