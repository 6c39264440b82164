"""Small random Llama / Qwen2 / Qwen3 / Gemma 3 (text) / Phi-3 checkpoints in Hugging Face layout,
built from a config.

Used by the test-suite and the quick demo: a 2-layer, hidden-64 model exports, trains and serves
in seconds, and exercises exactly the code paths of a real base model. Weights are numpy, so no
torch is needed to make one. A Qwen2 model differs by its q/k/v biases, its RoPE base and its
tokenizer, which splits text with Qwen2's regex (llama.cpp pre-tokenizer "qwen2"). Qwen3 adds
q/k RMSNorms (and here a head_dim decoupled from hidden / heads); Gemma 3 adds its four norms per
layer, logit soft-capping and a sliding-window layer; Phi-3 fuses qkv and gate_up (and here rotates
3/4 of each head, as Phi-4-mini does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# A small English corpus for the byte-level BPE; any text works, this keeps merges meaningful.
_CORPUS = [
    "The device trains its adapter on local notes and publishes a compressed delta.",
    "A coordinator on the gateway aggregates stale updates after aligning them.",
    "Question: what is two plus three? Answer: two plus three is five.",
    "Write a function that returns the sum of a list of numbers in Python.",
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Federated learning keeps data on the device and moves only model updates.",
    "Low rank adapters change a few parameters of a frozen base model.",
]


@dataclass(frozen=True, slots=True)
class TinyConfig:
    n_layers: int = 2
    hidden: int = 64
    intermediate: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    vocab: int = 320
    max_seq: int = 128
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    seed: int = 0
    family: str = "llama"  # a key of FAMILIES
    head_dim: int = 0  # 0: hidden // n_heads
    sliding_window: int = 0  # Gemma 3: window of its sliding layers
    # Gemma 3: logit soft-capping on, and the last layer global (not every 6th, llama.cpp's rule)
    gemma_variant: bool = False
    partial_rotary: float = 1.0  # Phi-3 family: RoPE on this leading fraction of each head (Phi-4-mini: 0.75)


QWEN2_CONFIG = TinyConfig(family="qwen2", rope_theta=1e6, rms_eps=1e-6, tie_embeddings=True, seed=4)
QWEN3_CONFIG = TinyConfig(family="qwen3", rope_theta=1e6, rms_eps=1e-6, tie_embeddings=True, head_dim=32, seed=6)
GEMMA3_CONFIG = TinyConfig(
    family="gemma3_text", rms_eps=1e-6, tie_embeddings=True, sliding_window=4, gemma_variant=True, seed=7
)
# What llama.cpp's gemma3 graph runs: no soft-capping, every 6th layer global (both layers sliding here)
GEMMA3_LLAMA_CPP_CONFIG = TinyConfig(family="gemma3_text", rms_eps=1e-6, tie_embeddings=True, sliding_window=4, seed=9)
PHI3_CONFIG = TinyConfig(family="phi3", seed=8, partial_rotary=0.75)
FAMILIES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "gemma3_text": ("Gemma3ForCausalLM", "gemma3_text"),
    "phi3": ("Phi3ForCausalLM", "phi3"),
}
TINY_CONFIGS = {
    "llama": TinyConfig(),
    "qwen2": QWEN2_CONFIG,
    "qwen3": QWEN3_CONFIG,
    "gemma3_text": GEMMA3_CONFIG,
    "phi3": PHI3_CONFIG,
}


# Phi-3's chat tokens: llama.cpp's phi3 vocabulary loader looks them up by text.
PHI3_SPECIAL_TOKENS = ("<|end|>", "<|assistant|>", "<|user|>", "<|system|>")


def build_tokenizer(vocab: int, family: str = "llama", extra_special: tuple[str, ...] = ()) -> object:
    """Train a byte-level BPE with exactly `vocab` entries (GPT-2 style as SmolLM2 uses, or
    Qwen2's split regex followed by bytes)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from export.gguf_base import QWEN2_REGEX

    tok = Tokenizer(models.BPE())
    if family == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[*SPECIAL_TOKENS, *extra_special],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def write_tiny_llama(out: Path, cfg: TinyConfig = TinyConfig()) -> Path:
    """Write config.json, model.safetensors and tokenizer.json of a random Llama to `out`."""
    return write_tiny_model(out, cfg)


def write_tiny_qwen2(out: Path, cfg: TinyConfig = QWEN2_CONFIG) -> Path:
    """Write a random Qwen2 (q/k/v biases, RoPE base 1e6, tied embeddings by default) to `out`."""
    return write_tiny_model(out, cfg)


def write_tiny_model(out: Path, cfg: TinyConfig) -> Path:
    """Write config.json, model.safetensors and tokenizer.json of a random `cfg.family` model."""
    if cfg.family not in FAMILIES:
        raise ValueError(f"family expected one of {sorted(FAMILIES)}, got {cfg.family!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    extra = PHI3_SPECIAL_TOKENS if cfg.family == "phi3" else ()
    tok = build_tokenizer(cfg.vocab, "qwen2" if cfg.family.startswith("qwen") else "llama", extra)
    vocab = tok.get_vocab_size()  # type: ignore[attr-defined]
    tok.save(str(out / "tokenizer.json"))  # type: ignore[attr-defined]

    rng = np.random.default_rng(cfg.seed)
    head_dim = cfg.head_dim or cfg.hidden // cfg.n_heads
    q_out, kv_out = cfg.n_heads * head_dim, cfg.n_kv_heads * head_dim

    def lin(d_out: int, d_in: int) -> np.ndarray:
        return (rng.standard_normal((d_out, d_in)) * 0.02 * 4).astype(np.float32)

    def norm(d: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(d)).astype(np.float32)

    w: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": (rng.standard_normal((vocab, cfg.hidden)) * 0.5).astype(np.float32)
    }
    if cfg.family == "gemma3_text":  # Gemma norms scale by (1 + w): keep w near 0
        base_norm = norm

        def norm(d: int) -> np.ndarray:
            return base_norm(d) - 1.0

    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(cfg.hidden)
        if cfg.family in ("qwen3", "gemma3_text"):
            w[p + "self_attn.q_norm.weight"] = norm(head_dim)
            w[p + "self_attn.k_norm.weight"] = norm(head_dim)
        if cfg.family == "gemma3_text":
            w[p + "pre_feedforward_layernorm.weight"] = norm(cfg.hidden)
            w[p + "post_feedforward_layernorm.weight"] = norm(cfg.hidden)
        w[p + "self_attn.q_proj.weight"] = lin(q_out, cfg.hidden)
        w[p + "self_attn.k_proj.weight"] = lin(kv_out, cfg.hidden)
        w[p + "self_attn.v_proj.weight"] = lin(kv_out, cfg.hidden)
        if cfg.family == "qwen2":  # large enough to matter: a dropped bias moves the loss visibly
            w[p + "self_attn.q_proj.bias"] = (0.5 * rng.standard_normal(q_out)).astype(np.float32)
            w[p + "self_attn.k_proj.bias"] = (0.5 * rng.standard_normal(kv_out)).astype(np.float32)
            w[p + "self_attn.v_proj.bias"] = (0.5 * rng.standard_normal(kv_out)).astype(np.float32)
        w[p + "self_attn.o_proj.weight"] = lin(cfg.hidden, q_out)
        w[p + "post_attention_layernorm.weight"] = norm(cfg.hidden)
        w[p + "mlp.gate_proj.weight"] = lin(cfg.intermediate, cfg.hidden)
        w[p + "mlp.up_proj.weight"] = lin(cfg.intermediate, cfg.hidden)
        w[p + "mlp.down_proj.weight"] = lin(cfg.hidden, cfg.intermediate)
    if cfg.family == "phi3":  # Phi3Attention / Phi3MLP split these rows as [q; k; v] and [gate; up]
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}."
            parts = [w.pop(p + f"self_attn.{m}_proj.weight") for m in "qkv"]
            w[p + "self_attn.qkv_proj.weight"] = np.concatenate(parts)
            gate, up = w.pop(p + "mlp.gate_proj.weight"), w.pop(p + "mlp.up_proj.weight")
            w[p + "mlp.gate_up_proj.weight"] = np.concatenate([gate, up])
    w["model.norm.weight"] = norm(cfg.hidden)
    if not cfg.tie_embeddings:
        w["lm_head.weight"] = lin(vocab, cfg.hidden)
    save_file(w, str(out / "model.safetensors"), metadata={"format": "pt"})

    eos = tok.token_to_id("<|endoftext|>")  # type: ignore[attr-defined]
    architecture, model_type = FAMILIES[cfg.family]
    config: dict[str, object] = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.intermediate,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": cfg.max_seq,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }
    if cfg.family == "qwen2":  # Qwen2Config has no bias switches; its q/k/v biases are built in
        del config["attention_bias"], config["mlp_bias"]
        config["use_sliding_window"] = False
    if cfg.family == "gemma3_text":
        del config["hidden_act"], config["mlp_bias"]
        window = cfg.sliding_window or cfg.max_seq
        config |= {
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": head_dim,
            "sliding_window": window,
            "layer_types": ["sliding_attention"] * (cfg.n_layers - 1) + ["full_attention"]
            if cfg.gemma_variant
            else ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(cfg.n_layers)],
            "rope_local_base_freq": 10000.0,
            "final_logit_softcapping": 30.0 if cfg.gemma_variant else None,
            "attn_logit_softcapping": 50.0 if cfg.gemma_variant else None,
        }
    if cfg.family == "phi3":
        del config["attention_bias"], config["mlp_bias"]
        config |= {
            "original_max_position_embeddings": cfg.max_seq,
            "pad_token_id": eos,
            "partial_rotary_factor": cfg.partial_rotary,
        }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "model_max_length": cfg.max_seq})
    )
    return out
