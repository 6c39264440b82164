"""Read a Hugging Face model folder (config.json + *.safetensors + tokenizer.json) into numpy.

The result is an `Architecture` plus a float32 state dict in HF naming
(`model.layers.{i}.self_attn.q_proj.weight`, ...), packaged as an `export.source.ModelSource` by
`open_hf`. Nothing here imports torch: safetensors files are read through `safetensors.numpy`,
except bfloat16 tensors, which numpy has no dtype for and which are widened from their raw bytes
(bf16 is the upper half of an IEEE float32).

Supported `model_type`s: "llama" (no biases) and "qwen2" (Llama's layout plus biases on the q, k
and v projections, full attention only), read tensor by tensor against `export.hf_layout`; and the
families of the traced graph (`export.families`), whose every floating tensor is returned for
transformers' own `load_state_dict` to check.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from alignfed import manifest as mf
from alignfed.errors import ExportError
from alignfed.manifest import Architecture
from export import families
from export.hf_layout import expected_shapes
from export.source import ModelSource

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def read_config(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        raise ExportError(f"{model_dir}: no {CONFIG_NAME}; expected a Hugging Face model folder")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(cfg, dict):
        raise ExportError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _field(cfg: Mapping[str, Any], name: str, source: Path, default: Any = None) -> Any:
    value = cfg.get(name, default)
    if value is None:
        raise ExportError(f"{source}: missing field {name!r}")
    return value


def rope_theta(cfg: Mapping[str, Any], source: Path) -> float:
    """rope_theta from a transformers-4 (`rope_theta`) or -5 (`rope_parameters`) config."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ExportError(
            f"{source}: rope type {rope_type!r} is not supported; supported: 'default' (plain RoPE without scaling)"
        )
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return float(theta)


def architecture_from_config(cfg: Mapping[str, Any], source: Path) -> Architecture:
    """Validate a HF config and turn it into an `Architecture`; errors name the field at fault."""
    model_type = cfg.get("model_type")
    if families.family(model_type, source).graph == "traced":
        return traced_architecture(cfg, source)
    # Llama's attention_bias would add a bias to o_proj too; Qwen2 has q/k/v biases by design.
    expected: dict[str, Any] = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
    if model_type == "qwen2":
        expected = {"hidden_act": "silu", "use_sliding_window": False}
        layer_types = cfg.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise ExportError(
                f"{source}: layer_types {sorted(set(layer_types))} include sliding-window attention; "
                "only 'full_attention' is supported"
            )
    for name, want in expected.items():
        got = cfg.get(name, want)
        if got != want:
            raise ExportError(f"{source}: {name} is {got!r}, only {want!r} is supported")

    hidden = int(_field(cfg, "hidden_size", source))
    n_heads = int(_field(cfg, "num_attention_heads", source))
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    if hidden % n_heads != 0:
        raise ExportError(f"{source}: hidden_size {hidden} is not divisible by num_attention_heads {n_heads}")
    head_dim = cfg.get("head_dim") or hidden // n_heads
    if head_dim != hidden // n_heads:
        # Architecture derives head_dim from hidden / heads; a decoupled head_dim needs a new field.
        raise ExportError(
            f"{source}: head_dim {head_dim} differs from hidden_size / num_attention_heads "
            f"= {hidden // n_heads}; only head_dim = hidden_size / num_attention_heads is supported"
        )
    if head_dim % 2 != 0:
        raise ExportError(f"{source}: head_dim {head_dim} must be even for rotary embeddings")
    if n_heads % n_kv != 0:
        raise ExportError(f"{source}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
    return Architecture(
        family=str(model_type),
        n_layers=int(_field(cfg, "num_hidden_layers", source)),
        hidden=hidden,
        intermediate=int(_field(cfg, "intermediate_size", source)),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        vocab=int(_field(cfg, "vocab_size", source)),
        max_seq=int(_field(cfg, "max_position_embeddings", source)),
        rope_theta=rope_theta(cfg, source),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        # LlamaConfig and Qwen2Config both default to untied embeddings.
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
    )


def _rope_base(cfg: Mapping[str, Any]) -> float:
    """RoPE base of the full-attention layers, for the manifest (the traced graph runs the
    family's own rotary code, so scaling variants need no support here)."""
    params = cfg.get("rope_parameters") or {}
    if isinstance(params.get("full_attention"), Mapping):  # per layer type (Gemma 3)
        params = params["full_attention"]
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def traced_architecture(cfg: Mapping[str, Any], source: Path) -> Architecture:
    """The `Architecture` of a family the traced graph builds; its forward pass is transformers'."""
    fam = families.family(cfg.get("model_type"), source)
    hidden = int(_field(cfg, "hidden_size", source))
    n_heads = int(_field(cfg, "num_attention_heads", source))
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    head_dim = int(cfg.get("head_dim") or hidden // n_heads)
    if n_heads % n_kv != 0:
        raise ExportError(f"{source}: num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
    return Architecture(
        family=fam.model_type,
        n_layers=int(_field(cfg, "num_hidden_layers", source)),
        hidden=hidden,
        intermediate=int(_field(cfg, "intermediate_size", source)),
        n_heads=n_heads,
        n_kv_heads=n_kv,
        vocab=int(_field(cfg, "vocab_size", source)),
        max_seq=int(_field(cfg, "max_position_embeddings", source)),
        rope_theta=_rope_base(cfg),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", fam.tie_default)),
        attn_head_dim=head_dim if head_dim != hidden // n_heads else 0,
    )


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model, in shard order (from the index when there is one)."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ExportError(f"{index}: malformed safetensors index ({exc!r})") from exc
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ExportError(f"{index}: lists missing shard(s) {missing}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(
            f"{model_dir}: no *.safetensors weights (PyTorch .bin checkpoints are not supported; "
            "re-save the model with safe_serialization=True)"
        )
    return files


def _read_bf16(path: Path) -> dict[str, np.ndarray]:
    """bfloat16 tensors of a safetensors file widened to float32 (others are skipped).

    File layout (safetensors spec): u64 little-endian header length N, N bytes of JSON header,
    then the data buffer; `data_offsets` are relative to the start of that buffer.
    """
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__" or info["dtype"] != "BF16":
                continue
            start, end = info["data_offsets"]
            f.seek(base + start)
            raw = np.frombuffer(f.read(end - start), dtype="<u2")
            out[name] = (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
    return out


def _has_bf16(path: Path) -> bool:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return any(v["dtype"] == "BF16" for k, v in header.items() if k != "__metadata__")


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every floating tensor of one file as float32 (bf16/fp16/fp64 converted)."""
    try:
        if _has_bf16(path):
            tensors = _read_bf16(path)
            # The remaining (non-bf16) tensors go through the library reader one by one.
            from safetensors import safe_open

            with safe_open(str(path), framework="np") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    if name not in tensors:
                        tensors[name] = f.get_tensor(name)
        else:
            tensors = load_file(str(path))
    except (OSError, ValueError, KeyError, struct.error) as exc:
        raise ExportError(f"{path}: cannot read safetensors file ({exc})") from exc
    out: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        if np.issubdtype(arr.dtype, np.floating):
            out[name] = np.ascontiguousarray(arr, dtype=np.float32)
    return out


def read_architecture(model_dir: Path) -> Architecture:
    model_dir = Path(model_dir)
    return architecture_from_config(read_config(model_dir), model_dir / CONFIG_NAME)


def read_hf_model(model_dir: Path) -> tuple[Architecture, dict[str, np.ndarray]]:
    """Architecture and float32 weights (HF names) of a HF Llama / Qwen2 folder."""
    arch = read_architecture(model_dir)
    return arch, read_weights(model_dir, arch)


def read_weights(model_dir: Path, arch: Architecture) -> dict[str, np.ndarray]:
    """The float32 weights (HF names) `arch` needs, checked against their expected shapes.

    Only the tensors the forward pass uses are returned; buffers such as `rotary_emb.inv_freq`
    are dropped, a tied `lm_head.weight` copy is ignored.
    """
    model_dir = Path(model_dir)
    loaded: dict[str, np.ndarray] = {}
    for path in weight_files(model_dir):
        loaded.update(read_safetensors(path))
    if families.family(arch.family, model_dir).graph == "traced":
        return loaded
    shapes = expected_shapes(arch)
    weights: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if name not in loaded:
            hint = (
                " (set tie_word_embeddings in config.json if lm_head shares the embedding)"
                if (name == "lm_head.weight")
                else ""
            )
            raise ExportError(f"{model_dir}: weight {name!r} not found in the safetensors files{hint}")
        if tuple(loaded[name].shape) != shape:
            raise ExportError(
                f"{model_dir}: weight {name!r} has shape {tuple(loaded[name].shape)}, "
                f"expected {shape} from {CONFIG_NAME}"
            )
        weights[name] = loaded[name]
    return weights


def base_digest(files: Sequence[Path]) -> str:
    """sha256 of a single weights file; for shards, sha256 over their hex digests in order."""
    digests = [mf.sha256_file(f) for f in files]
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def _token_id(value: Any) -> int | None:
    """A config's token id field: an int, a list of ints (first wins) or null."""
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def tokenizer_info(model_dir: Path, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Special token ids from config.json and the chat template from tokenizer_config.json.

    Keys: `bos_id`, `eos_id`, `pad_id` (only those the config sets) and `chat_template`.
    """
    info: dict[str, Any] = {}
    for key, field in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "pad_token_id")):
        value = _token_id(cfg.get(field))
        if value is not None:
            info[key] = value
    tc_path = Path(model_dir) / TOKENIZER_CONFIG
    if tc_path.is_file():
        try:
            tc = json.loads(tc_path.read_text())
        except json.JSONDecodeError as exc:
            raise ExportError(f"{tc_path}: not valid JSON ({exc})") from exc
        if isinstance(tc.get("chat_template"), str):
            info["chat_template"] = tc["chat_template"]
    return info


def open_hf(model_dir: Path) -> ModelSource:
    """A HF folder as a `ModelSource`; config and tokenizer are checked now, weights read later."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    arch = architecture_from_config(cfg, model_dir / CONFIG_NAME)
    tokenizer = model_dir / mf.TOKENIZER
    if not tokenizer.is_file():
        raise ExportError(f"{model_dir}: no {mf.TOKENIZER} (the edge tokenizes with the `tokenizers` package)")
    files = weight_files(model_dir)

    def load(progress: bool) -> dict[str, np.ndarray]:
        del progress  # safetensors reads are memory maps; nothing worth a bar
        return read_weights(model_dir, arch)

    return ModelSource(
        kind="hf",
        path=model_dir,
        base_id=model_dir.resolve().name,
        base_sha256=base_digest(files),
        architecture=arch,
        tokenizer_json=tokenizer.read_bytes().decode("utf-8"),
        tokenizer_info=tokenizer_info(model_dir, cfg),
        gguf_quantization=None,
        load_weights=load,
    )
