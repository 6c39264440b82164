"""Random-weight bases shaped like published small LLMs, for memory and speed benchmarks.

The configs are those published with the models (Hugging Face `config.json`), except:
- `max_position_embeddings` is 4096: it only sizes the RoPE tables, not the weights or a step;
- Llama-3.2's `rope_scaling` (type "llama3") is left out: the exporter supports default RoPE
  only, and scaling changes the angles, not the memory or the time of a step.
Weights are float32 safetensors written one tensor at a time, and the export reads them as
memory maps (`mapped_safetensors`): the exporter's own reader holds every weight in anonymous
memory, which for the 1 B shape (5 GB float32, plus the graphs it builds) exceeds a shared 24 GB box.
The tokenizer is a small BPE (ids < vocab): the benchmark feeds random token ids anyway.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np

# name -> (family, HF config fields)
SHAPES: dict[str, tuple[str, dict[str, object]]] = {
    # Qwen/Qwen2.5-0.5B config.json
    "qwen2.5-0.5b": (
        "qwen2",
        {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "vocab_size": 151936,
            "rope_theta": 1000000.0,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True,
            "use_sliding_window": False,
        },
    ),
    # meta-llama/Llama-3.2-1B config.json
    "llama-3.2-1b": (
        "llama",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 2048,
            "intermediate_size": 8192,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "vocab_size": 128256,
            "rope_theta": 500000.0,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": True,
            "attention_bias": False,
            "mlp_bias": False,
        },
    ),
}


def write_shaped_model(name: str, out: Path, seed: int = 0) -> Path:
    """config.json, model.safetensors (float16, random) and tokenizer.json of shape `name`."""
    from export.synthetic import build_tokenizer

    family, cfg = SHAPES[name]
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(512, family)
    tok.save(str(out / "tokenizer.json"))  # type: ignore[attr-defined]
    eos = tok.token_to_id("<|endoftext|>")  # type: ignore[attr-defined]
    h, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])  # type: ignore[call-overload]
    nh, nkv = int(cfg["num_attention_heads"]), int(cfg["num_key_value_heads"])  # type: ignore[call-overload]
    hd = h // nh
    vocab = int(cfg["vocab_size"])  # type: ignore[call-overload]
    rng = np.random.default_rng(seed)

    def rand(*shape: int, std: float = 0.02) -> tuple[tuple[int, ...], float]:
        return shape, std

    w: dict[str, tuple[tuple[int, ...], float]] = {"model.embed_tokens.weight": rand(vocab, h, std=0.5)}
    for i in range(int(cfg["num_hidden_layers"])):  # type: ignore[call-overload]
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = rand(h, std=0.0)
        w[p + "post_attention_layernorm.weight"] = rand(h, std=0.0)
        w[p + "self_attn.q_proj.weight"] = rand(nh * hd, h)
        w[p + "self_attn.k_proj.weight"] = rand(nkv * hd, h)
        w[p + "self_attn.v_proj.weight"] = rand(nkv * hd, h)
        if family == "qwen2":
            w[p + "self_attn.q_proj.bias"] = rand(nh * hd)
            w[p + "self_attn.k_proj.bias"] = rand(nkv * hd)
            w[p + "self_attn.v_proj.bias"] = rand(nkv * hd)
        w[p + "self_attn.o_proj.weight"] = rand(h, nh * hd)
        w[p + "mlp.gate_proj.weight"] = rand(inter, h)
        w[p + "mlp.up_proj.weight"] = rand(inter, h)
        w[p + "mlp.down_proj.weight"] = rand(h, inter)
    w["model.norm.weight"] = rand(h, std=0.0)
    _write_random_safetensors(out / "model.safetensors", w, rng)
    config = {
        **cfg,
        "head_dim": hd,
        "max_position_embeddings": 4096,
        "hidden_act": "silu",
        "bos_token_id": eos,
        "eos_token_id": eos,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "model_max_length": 4096})
    )
    return out


def _write_random_safetensors(
    path: Path, specs: dict[str, tuple[tuple[int, ...], float]], rng: np.random.Generator
) -> None:
    """float32 safetensors of N(0, std²) tensors (std 0: ones, for norms), one tensor in memory at a time."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (shape, _) in specs.items():
        n = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for shape, std in specs.values():
            arr = np.ones(shape, np.float32) if std == 0.0 else rng.standard_normal(shape, dtype=np.float32) * std
            f.write(arr.tobytes())


def mapped_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Read-only float32 memory maps of an F32 safetensors file (pages stay evictable file cache)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise ValueError(f"{path}: {name} expected F32, got {info['dtype']}")
        start = info["data_offsets"][0]
        out[name] = np.memmap(path, np.float32, "r", 8 + n + start, tuple(info["shape"]) or (1,))
    return out


def prepare(name: str, work: Path, *, ort_artifacts: bool = True) -> Path:
    """The int8 bundle of shape `name` under `work` (built once; no GGUF: training only).

    `ort_artifacts=False` skips onnxruntime's `generate_artifacts` (for the 1 B shape it peaked past
    12 GB here, more than the shared machine had free) and writes only the optimizer model's
    hyper-parameters, which the PyTorch trainer reads: such a bundle trains with the torch backend only.
    """
    from export import artifacts
    from export.bundle import export_bundle

    if not ort_artifacts:
        reference = next(work.glob("*-bundle/train/optimizer_model.onnx"))  # AdamW of any exported bundle

        def optimizer_only(model: object, lora_names: object, out_dir: Path) -> None:
            del model, lora_names
            out_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(reference, out_dir / reference.name)

        artifacts.write_training_artifacts = optimizer_only  # type: ignore[assignment]

    bundle = work / f"{name}-bundle"
    if (bundle / "manifest.json").is_file():
        return bundle
    model = work / f"{name}-hf"
    if not (model / "model.safetensors").is_file():
        write_shaped_model(name, model)
    from export import hf_source

    hf_source.read_safetensors = mapped_safetensors  # type: ignore[assignment]
    export_bundle(model, bundle, targets=("q", "v"), rank=8, alpha=16.0, quantization="int8", write_gguf=False)
    return bundle


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(prepare(sys.argv[1], Path(sys.argv[2]), ort_artifacts="--no-ort" not in sys.argv))
