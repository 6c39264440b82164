"""Read a llama.cpp GGUF (llama or qwen2 architecture) as an export source.

Everything the export needs comes back in Hugging Face terms, so the ONNX builder cannot tell a
GGUF from a HF folder:
- the architecture, from the `{arch}.*` hyper-parameter keys, validated by the same function that
  validates a HF config.json (`hf_source.architecture_from_config`);
- float32 weights in HF naming and HF row order: every tensor is dequantized with gguf-py
  (`gguf.quants.dequantize`: Q4_0/Q4_1/Q8_0/K-quants/...), renamed through the one name table in
  `export.gguf_base`, and q/k rows go back from llama.cpp's interleaved RoPE order where the
  family permutes them (`alignfed.gguf_adapter`);
- tokenizer.json rebuilt from `tokenizer.ggml.*`: byte-level BPE with the merges, the
  pre-tokenizer that matches `tokenizer.ggml.pre`, control tokens (type 3) as special added tokens
  and user-defined ones (type 4) as plain added tokens;
- special token ids and the chat template for the manifest.

The training base is thus the dequantized GGUF weights: the very function llama.cpp serves (up to
its activation rounding), which is why the bundle keeps the original GGUF as its inference base.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from alignfed import manifest as mf
from alignfed.errors import ExportError
from alignfed.gguf_adapter import GGUF_FAMILIES, from_gguf_rows
from alignfed.manifest import Architecture
from export import gguf_base, hf_layout, hf_source
from export.source import ModelSource

GGUF_SOURCE_FAMILIES = ("llama", "qwen2")  # GGUF files this reader turns into a bundle

# GGUF key (after `{arch}.`) -> HF config field; read into a config dict that hf_source validates.
HPARAMS: dict[str, str] = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "context_length": "max_position_embeddings",
    "rope.freq_base": "rope_theta",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.dimension_count": "head_dim",
    "vocab_size": "vocab_size",
}
REQUIRED = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count", "context_length")
DEFAULT_ROPE_THETA = 10000.0  # what llama.cpp assumes when rope.freq_base is absent
TOKENIZER_MODEL = "gpt2"  # llama.cpp's name for byte-level BPE
CONTROL, USER_DEFINED = 3, 4  # gguf.TokenType values that become added tokens
# Pre-tokenizers whose HF tokenizer.json also normalizes text to NFC first (Qwen2's does).
NFC_PRE = ("qwen2",)


def _fields(reader: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, field in reader.fields.items():
        try:
            out[name] = field.contents()
        except (ValueError, IndexError, TypeError):  # a field type gguf-py cannot decode: never ours
            continue
    return out


def quantization_name(fields: Mapping[str, Any], type_names: list[str]) -> str:
    """The file's quantization as llama.cpp names it: "Q4_1", "Q8_0", "Q4_K_M", "F32", ...

    From `general.file_type` (a llama_ftype) when present, else the most common tensor type.
    """
    import gguf

    ftype = fields.get("general.file_type")
    if isinstance(ftype, int):
        try:
            name = gguf.LlamaFileType(ftype).name
        except ValueError:
            name = ""
        if name:
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
    if not type_names:
        return "unknown"
    return max(set(type_names), key=type_names.count)


def architecture(fields: Mapping[str, Any], tensor_names: set[str], path: Path) -> Architecture:
    """`Architecture` from the GGUF's keys; errors name the file and the key."""
    if fields.get("general.type", "model") != "model":
        raise ExportError(f"{path}: general.type is {fields.get('general.type')!r}, expected 'model' (a base model)")
    arch_name = fields.get("general.architecture")
    # Read as Llama's layout: only the families of the hand-written graph (the traced ones need
    # their HF config.json and tensor layout, which a GGUF does not carry in that form).
    by_arch = {spec.arch: family for family, spec in GGUF_FAMILIES.items() if family in GGUF_SOURCE_FAMILIES}
    if arch_name not in by_arch:
        raise ExportError(
            f"{path}: general.architecture {arch_name!r} is not supported; supported: {', '.join(sorted(by_arch))}"
        )
    family = by_arch[str(arch_name)]
    for key in REQUIRED:
        if f"{arch_name}.{key}" not in fields:
            raise ExportError(f"{path}: missing key {arch_name}.{key}")
    cfg: dict[str, Any] = {"model_type": family, "hidden_act": "silu"}
    for key, field in HPARAMS.items():
        value = fields.get(f"{arch_name}.{key}")
        if value is None:
            continue
        if isinstance(value, list):  # per-layer head counts (e.g. OpenELM): not this architecture
            raise ExportError(f"{path}: {arch_name}.{key} is a per-layer list, expected a single number")
        # GGUF stores floats as float32: take the shortest decimal that rounds to it (1e-05, not
        # 9.999999747378752e-06), so an exported config reads back equal.
        cfg[field] = float(str(np.float32(value))) if isinstance(value, float) else value
    cfg.setdefault("rope_theta", DEFAULT_ROPE_THETA)
    if "rms_norm_eps" not in cfg:
        raise ExportError(f"{path}: missing key {arch_name}.attention.layer_norm_rms_epsilon")
    if "vocab_size" not in cfg:
        cfg["vocab_size"] = len(fields.get("tokenizer.ggml.tokens", []))
    scaling = fields.get(f"{arch_name}.rope.scaling.type", "none")
    if scaling not in ("none", "linear") or (
        scaling == "linear" and float(fields.get(f"{arch_name}.rope.scaling.factor", 1.0)) != 1.0
    ):
        raise ExportError(f"{path}: {arch_name}.rope.scaling.type is {scaling!r}; only plain RoPE is supported")
    key_length = fields.get(f"{arch_name}.attention.key_length")
    if key_length is not None and "head_dim" in cfg and key_length != cfg["head_dim"]:
        raise ExportError(
            f"{path}: {arch_name}.attention.key_length {key_length} differs from rope.dimension_count "
            f"{cfg['head_dim']}; partial rotary embeddings are not supported"
        )
    # llama.cpp ties the output projection to the embedding when the file has no output.weight.
    cfg["tie_word_embeddings"] = "output.weight" not in tensor_names
    return hf_source.architecture_from_config(cfg, path)


def _pairs(merges: list[str], path: Path) -> list[list[str]]:
    out: list[list[str]] = []
    for i, m in enumerate(merges):
        parts = m.split(" ")
        if len(parts) != 2:
            raise ExportError(f"{path}: tokenizer.ggml.merges[{i}] is {m!r}, expected 'left right'")
        out.append(parts)
    return out


def tokenizer_json(fields: Mapping[str, Any], path: Path) -> str:
    """tokenizer.json (HF `tokenizers` format) equivalent to the GGUF's BPE tokenizer."""
    from tokenizers import Tokenizer

    model = fields.get("tokenizer.ggml.model")
    if model != TOKENIZER_MODEL:
        raise ExportError(f"{path}: tokenizer.ggml.model is {model!r}; supported: {TOKENIZER_MODEL!r} (byte-level BPE)")
    pre = fields.get("tokenizer.ggml.pre")
    if pre not in gguf_base.PRE_TOKENIZERS:
        raise ExportError(f"{path}: tokenizer.ggml.pre is {pre!r}; supported: {', '.join(gguf_base.PRE_TOKENIZERS)}")
    tokens: list[str] = list(fields.get("tokenizer.ggml.tokens", []))
    types: list[int] = list(fields.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    if not tokens or len(types) != len(tokens):
        raise ExportError(
            f"{path}: tokenizer.ggml.tokens ({len(tokens)}) and token_type ({len(types)}) expected non-empty "
            "and of equal length"
        )
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            raise ExportError(f"{path}: tokenizer.ggml.tokens has {t!r} twice (ids {vocab[t]} and {i})")
        vocab[t] = i
    added = [
        {
            "id": i,
            "content": tokens[i],
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": kind == CONTROL,
        }
        for i, kind in enumerate(types)
        if kind in (CONTROL, USER_DEFINED)
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    post: dict[str, Any] = byte_level
    bos = fields.get("tokenizer.ggml.bos_token_id")
    if fields.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        # llama.cpp prepends BOS to every text; HF does the same with a template.
        post = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": tokens[bos], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": tokens[bos], "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": tokens[bos], "type_id": 1}},
                {"Sequence": {"id": "B", "type_id": 1}},
            ],
            "special_tokens": {tokens[bos]: {"id": tokens[bos], "ids": [int(bos)], "tokens": [tokens[bos]]}},
        }
    body = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"} if pre in NFC_PRE else None,
        "pre_tokenizer": gguf_base.PRE_TOKENIZERS[str(pre)],
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": _pairs(list(fields.get("tokenizer.ggml.merges", [])), path),
        },
    }
    text = json.dumps(body, ensure_ascii=False)
    try:
        Tokenizer.from_str(text)  # the edge loads it this way; fail here, not on a device
    except Exception as exc:
        raise ExportError(f"{path}: the rebuilt tokenizer.json does not load ({exc})") from exc
    return text


def tokenizer_info(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Special token ids and the chat template (manifest `tokenizer`, same keys as a HF source)."""
    info: dict[str, Any] = {}
    for key, name in (("bos_id", "bos_token_id"), ("eos_id", "eos_token_id"), ("pad_id", "padding_token_id")):
        value = fields.get(f"tokenizer.ggml.{name}")
        if value is not None:
            info[key] = int(value)
    template = fields.get("tokenizer.chat_template")
    if isinstance(template, str):
        info["chat_template"] = template
    return info


def read_weights(path: Path, arch: Architecture, *, progress: bool = False) -> dict[str, np.ndarray]:
    """Every tensor dequantized to float32, in HF naming and HF row order, shapes checked."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(path)
    expected = hf_layout.expected_shapes(arch)
    unknown = sorted(t.name for t in reader.tensors if gguf_base.hf_name(t.name) not in expected)
    if unknown:
        raise ExportError(
            f"{path}: tensor(s) {unknown[:4]} have no place in a {arch.family} model with this configuration"
        )
    tensors: Iterable[Any] = reader.tensors
    if progress and sys.stderr.isatty():
        from tqdm import tqdm

        tensors = tqdm(reader.tensors, desc="dequantize", unit="tensor", leave=False)
    weights: dict[str, np.ndarray] = {}
    for t in tensors:
        name = gguf_base.hf_name(t.name)
        assert name is not None  # checked above
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)  # numpy order: (out, in)
        except (NotImplementedError, ValueError) as exc:
            raise ExportError(f"{path}: cannot dequantize {t.name} of type {t.tensor_type.name} ({exc})") from exc
        if w.shape != expected[name]:
            raise ExportError(f"{path}: {t.name} has shape {w.shape}, expected {expected[name]}")
        module = gguf_base.projection_of(t.name)
        weights[name] = np.ascontiguousarray(w if module is None else from_gguf_rows(w, arch, module))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ExportError(f"{path}: missing tensor(s) {[gguf_base.gguf_name(n) for n in missing[:4]]}")
    return weights


def read_gguf_model(path: Path) -> tuple[Architecture, dict[str, np.ndarray]]:
    """Architecture and float32 weights (HF names, HF row order) of a GGUF; cf. `hf_source.read_hf_model`."""
    source = open_gguf(path)
    return source.architecture, source.load_weights(False)


def open_gguf(path: Path) -> ModelSource:
    """A GGUF file as a `ModelSource`; metadata and tokenizer are read now, weights later."""
    import gguf

    path = Path(path)
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: not a readable GGUF file ({exc})") from exc
    fields = _fields(reader)
    names = {t.name for t in reader.tensors}
    type_names = [t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2]
    arch = architecture(fields, names, path)
    text = tokenizer_json(fields, path)
    if len(fields.get("tokenizer.ggml.tokens", [])) != arch.vocab:
        raise ExportError(
            f"{path}: tokenizer.ggml.tokens has {len(fields['tokenizer.ggml.tokens'])} entries, "
            f"expected vocab_size {arch.vocab}"
        )
    quant = quantization_name(fields, type_names)
    del reader  # its memory map; the weights are read again on demand

    def load(progress: bool) -> dict[str, np.ndarray]:
        return read_weights(path, arch, progress=progress)

    return ModelSource(
        kind="gguf",
        path=path,
        base_id=path.stem,
        base_sha256=mf.sha256_file(path),
        architecture=arch,
        tokenizer_json=text,
        tokenizer_info=tokenizer_info(fields),
        gguf_quantization=quant,
        load_weights=load,
    )
