"""F32 GGUF base for the families of the traced graph (Qwen3, Gemma 3 text, Phi-3).

Tensor names come from gguf-py's own name maps (`gguf.TensorNameMap` for the family's
`gguf.MODEL_ARCH`), not from a table here, and the hyper-parameter keys are the ones llama.cpp's
loader reads for that architecture. Layout rules, as convert_hf_to_gguf.py applies them:
- all three use NEOX (rotate-half) RoPE in llama.cpp, so no q/k row permutation;
- Gemma's RMSNorm scales by (1 + w): llama.cpp multiplies by w, so every `*norm.weight` gets + 1;
- Phi-3 keeps its fused qkv_proj / gate_up_proj as attn_qkv / ffn_up (same row order);
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
from export.gguf_base import add_vocab, read_vocab, read_weights, write_base_gguf

GGUF_ARCH = {"qwen3": "QWEN3", "gemma3_text": "GEMMA3", "phi3": "PHI3"}  # family -> gguf.MODEL_ARCH member
GEMMA_SWA_PERIOD = 6  # llama.cpp's gemma3 loader: every 6th layer is global, the others sliding
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _check_llama_cpp_can_run(arch: Architecture, cfg: dict[str, Any], source: Path) -> None:
    def refuse(field: str, got: Any, want: str) -> None:
        raise ExportError(f"{source}: {field} is {got!r}; llama.cpp's {arch.family} graph needs {want}")

    if arch.family == "gemma3_text":
        want = [
            "full_attention" if (i + 1) % GEMMA_SWA_PERIOD == 0 else "sliding_attention" for i in range(arch.n_layers)
        ]
        if cfg.get("layer_types", want) != want:
            refuse("layer_types", cfg["layer_types"], f"every {GEMMA_SWA_PERIOD}th layer full, the others sliding")
        scalar = cfg.get("query_pre_attn_scalar", arch.head_dim)
        if scalar != arch.head_dim:
            refuse("query_pre_attn_scalar", scalar, f"head_dim ({arch.head_dim})")
    if arch.family == "phi3":
        if cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {}).get("rope_type", "default") != "default":
            refuse("rope scaling", cfg.get("rope_scaling") or cfg.get("rope_parameters"), "plain RoPE")
        if cfg.get("sliding_window") is not None:
            refuse("sliding_window", cfg["sliding_window"], "None")


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
            w.add_type(gguf.GGUFType.MODEL)
            w.add_name(model_dir.name)
            w.add_file_type(gguf.LlamaFileType.ALL_F32)
            w.add_vocab_size(arch.vocab)
            w.add_context_length(arch.max_seq)
            w.add_embedding_length(arch.hidden)
            w.add_block_count(arch.n_layers)
            w.add_feed_forward_length(arch.intermediate)
            w.add_head_count(arch.n_heads)
            w.add_head_count_kv(arch.n_kv_heads)
            w.add_key_length(arch.head_dim)
            w.add_value_length(arch.head_dim)
            w.add_rope_dimension_count(arch.head_dim)
            w.add_rope_freq_base(arch.rope_theta)
            w.add_layer_norm_rms_eps(arch.rms_eps)
            if arch.family == "gemma3_text":
                w.add_sliding_window(int(cfg.get("sliding_window") or arch.max_seq))
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
