"""F32 GGUF base for the families of the traced graph (Qwen3, Gemma 3 text, Phi-3).

Tensor names come from gguf-py's own name maps (`gguf.TensorNameMap` for the family's
`gguf.MODEL_ARCH`), not from a table here, and the hyper-parameter keys are the ones llama.cpp's
loader reads for that architecture. Layout rules, as convert_hf_to_gguf.py applies them:
- all three use NEOX (rotate-half) RoPE in llama.cpp, so no q/k row permutation;
- Gemma's RMSNorm scales by (1 + w): llama.cpp multiplies by w, so every `*norm.weight` gets + 1;
- Phi-3 keeps its fused qkv_proj / gate_up_proj as attn_qkv / ffn_up (same row order);
- Gemma 3's layer layout goes to `gemma3.attention.sliding_window_pattern` (one flag per layer) and
  its sliding layers' RoPE base to `gemma3.rope.freq_base_swa`: llama.cpp assumes every 6th layer
  global and a base of 10 000 without them (measured: 15 % and 1.6 % logit errors);
- Gemma 3's `final_logit_softcapping` goes to `gemma3.final_logit_softcapping`, which llama.cpp's
  gemma3 graph applies; `attn_logit_softcapping` is written nowhere: transformers' Gemma 3 does not
  apply it and neither does llama.cpp (both measured in tests/export/test_families_gguf.py).
What llama.cpp cannot run the same way is refused with the field at fault.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from alignfed import atomic
from alignfed.errors import ExportError
from alignfed.manifest import Architecture
from export import hf_source
from export.gguf_base import add_shape, add_vocab, read_vocab, read_weights, write_base_gguf

GGUF_ARCH = {"qwen3": "QWEN3", "gemma3_text": "GEMMA3", "phi3": "PHI3"}  # family -> gguf.MODEL_ARCH member
GEMMA_SWA_PERIOD = 6  # Gemma3TextConfig's default sliding_window_pattern: every 6th layer global
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _check_llama_cpp_can_run(arch: Architecture, cfg: dict[str, Any], source: Path) -> None:
    def refuse(field: str, got: Any, want: str) -> None:
        raise ExportError(f"{source}: {field} is {got!r}; llama.cpp's {arch.family} graph needs {want}")

    params = cfg.get("rope_parameters") or {}
    for rope in (cfg.get("rope_scaling") or {}, params, *(v for v in params.values() if isinstance(v, dict))):
        if (rope.get("rope_type") or rope.get("type") or "default") != "default":  # not written to the GGUF yet
            refuse("rope scaling", cfg.get("rope_scaling") or params, "plain RoPE ('default')")
    if arch.family == "gemma3_text":
        types = gemma_layer_types(arch, cfg)
        if len(types) != arch.n_layers or set(types) - {"full_attention", "sliding_attention"}:
            refuse("layer_types", types, f"{arch.n_layers} of 'full_attention' / 'sliding_attention'")
        scalar = cfg.get("query_pre_attn_scalar", arch.head_dim)
        if scalar != arch.head_dim:
            refuse("query_pre_attn_scalar", scalar, f"head_dim ({arch.head_dim})")
    if arch.family == "phi3" and cfg.get("sliding_window") is not None:
        refuse("sliding_window", cfg["sliding_window"], "None")


def gemma_layer_types(arch: Architecture, cfg: dict[str, Any]) -> list[str]:
    """Gemma 3's attention type per layer: `layer_types`, else every `sliding_window_pattern`-th global."""
    period = int(cfg.get("sliding_window_pattern") or GEMMA_SWA_PERIOD)
    default = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(arch.n_layers)]
    return list(cfg.get("layer_types") or default)


def _rope_bases(cfg: dict[str, Any], arch: Architecture) -> tuple[float, float]:
    """Gemma 3's RoPE base of its global and of its sliding layers (flat transformers-4 keys, or
    transformers-5's `rope_parameters` per layer type)."""
    params = cfg.get("rope_parameters") or {}
    full = (params.get("full_attention") or {}).get("rope_theta", arch.rope_theta)
    local = (params.get("sliding_attention") or {}).get("rope_theta", cfg.get("rope_local_base_freq", 10000.0))
    return float(full), float(local)


def write_hf_gguf(model_dir: Path, out_path: Path) -> Path:
    """The F32 GGUF base of any HF folder: this module's writer for its families, else `export.gguf_base`'s."""
    if hf_source.read_config(Path(model_dir)).get("model_type") in GGUF_ARCH:
        return write_generic_gguf(model_dir, out_path)
    return write_base_gguf(model_dir, out_path)


def write_generic_gguf(model_dir: Path, out_path: Path) -> Path:
    """Write an F32 GGUF (weights + tokenizer) of a Qwen3 / Gemma 3 text / Phi-3 folder, atomically."""
    import gguf

    model_dir, out_path = Path(model_dir), Path(out_path)
    cfg = hf_source.read_config(model_dir)
    arch = hf_source.read_architecture(model_dir)
    if arch.family not in GGUF_ARCH:
        raise ExportError(f"{model_dir}: no GGUF writer for {arch.family!r}; it covers {', '.join(GGUF_ARCH)}")
    _check_llama_cpp_can_run(arch, cfg, model_dir / hf_source.CONFIG_NAME)
    model_arch = gguf.MODEL_ARCH[GGUF_ARCH[arch.family]]
    names = gguf.TensorNameMap(model_arch, arch.n_layers)
    vocab = read_vocab(model_dir, arch, cfg)

    tensors: dict[str, np.ndarray] = {}
    for hf, t in read_weights(model_dir):
        if hf.endswith(IGNORED_SUFFIXES) or (hf == "lm_head.weight" and arch.tie_embeddings):
            continue
        name = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(
                f"{model_dir}: tensor {hf!r} has no llama.cpp name for {gguf.MODEL_ARCH_NAMES[model_arch]}"
            )
        if arch.family == "gemma3_text" and hf.endswith("norm.weight"):
            t = t + 1.0  # Gemma RMSNorm: x * (1 + w)
        tensors[name] = np.ascontiguousarray(t, dtype=np.float32)

    with atomic.replacing(out_path) as tmp:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[model_arch])
        try:
            add_shape(w, model_dir.name, arch)
            w.add_key_length(arch.head_dim)
            w.add_value_length(arch.head_dim)
            # Phi-3 / Phi-4-mini rotate the first partial_rotary_factor of each head; llama.cpp's n_rot
            w.add_rope_dimension_count(int(arch.head_dim * float(cfg.get("partial_rotary_factor") or 1.0)))
            w.add_layer_norm_rms_eps(arch.rms_eps)
            if arch.family != "gemma3_text":
                w.add_rope_freq_base(arch.rope_theta)
            if arch.family == "gemma3_text":
                full, local = _rope_bases(cfg, arch)
                w.add_rope_freq_base(full)
                w.add_rope_freq_base_swa(local)  # llama.cpp assumes 10 000 without it
                w.add_sliding_window(int(cfg.get("sliding_window") or arch.max_seq))
                # per layer, True = sliding; without it llama.cpp assumes every 6th layer global
                w.add_sliding_window_pattern([t == "sliding_attention" for t in gemma_layer_types(arch, cfg)])
                if cfg.get("final_logit_softcapping"):
                    w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
            add_vocab(w, vocab)
            for name, t in tensors.items():
                w.add_tensor(name, t)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return out_path
