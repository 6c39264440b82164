"""Hugging Face Llama / Qwen2 folder -> F32 GGUF that llama.cpp serves as the inference base.

What llama.cpp's `llama` and `qwen2` architectures need, and nothing else: the hyper-parameters
they read (`{arch}.context_length`, `embedding_length`, `block_count`, `feed_forward_length`,
`attention.head_count[_kv]`, `rope.freq_base`, `rope.dimension_count`,
`attention.layer_norm_rms_epsilon`, `vocab_size`), their tensor names, the family's Q/K row order
(`alignfed.gguf_adapter.GGUF_FAMILIES`: llama permutes for its interleaved RoPE, qwen2 does not),
and the tokenizer as a GPT-2 style byte-level BPE. The config is read by `export.hf_source`, so
both exports agree on the architecture; nothing here needs torch.

The name tables below are the one mapping between HF and GGUF tensor names; `export.gguf_source`
reads GGUF files back through `hf_name`, and the pre-tokenizer table serves both directions.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alignfed import atomic, lora
from alignfed.errors import ExportError
from alignfed.gguf_adapter import GGUF_FAMILIES, family_spec, to_gguf_rows
from alignfed.manifest import Architecture
from export import hf_layout, hf_source

# HF name -> GGUF name outside the decoder blocks.
GLOBAL_TENSORS: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
# HF name inside `model.layers.{i}.` -> GGUF name inside `blk.{i}.`; projections come from the one
# LoRA name table so base and adapter names cannot drift apart.
BLOCK_TENSORS: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"{spec.hf}.weight": f"{spec.gguf}.weight" for spec in lora.MODULES.values()},
    **{f"{lora.MODULES[m].hf}.bias": f"{lora.MODULES[m].gguf}.bias" for m in hf_layout.QKV_BIAS_MODULES},
}
_GLOBAL_BY_GGUF = {v: k for k, v in GLOBAL_TENSORS.items()}
_BLOCK_BY_GGUF = {v: k for k, v in BLOCK_TENSORS.items()}
_MODULE_BY_STEM = {spec.gguf: m for m, spec in lora.MODULES.items()}  # "attn_q" -> "q"
# Buffers some checkpoints carry that llama.cpp recomputes.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# llama.cpp `tokenizer.ggml.pre` -> the tokenizer.json `pre_tokenizer` with the same split rules.
# gpt-2: ByteLevel's own regex; smollm (SmolLM2): each digit alone, then gpt-2; qwen2: Qwen2's
# split regex (single digits, case-insensitive contractions), then bytes without a second regex.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "gpt-2": _BYTE_LEVEL,
    "smollm": {
        "type": "Sequence",
        "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL],
    },
    "qwen2": {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": QWEN2_REGEX}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        ],
    },
}
_OFFSET_ONLY = ("trim_offsets",)  # fields that change offsets, never token ids


@dataclass(frozen=True, slots=True)
class BpeVocab:
    """A byte-level BPE vocabulary in the form llama.cpp's `gpt2` tokenizer model reads."""

    tokens: list[str]  # index = token id; byte-level strings as in tokenizer.json
    types: list[int]  # gguf.TokenType per token
    merges: list[str]  # "left right", highest priority first
    pre: str  # llama.cpp pre-tokenizer name
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    chat_template: str | None


def _same_rules(spec: Any, want: Any) -> bool:
    """Whether a tokenizer.json pre-tokenizer splits like `want` (offset-only fields ignored)."""
    if isinstance(want, dict):
        return isinstance(spec, dict) and all(k in _OFFSET_ONLY or _same_rules(spec.get(k), v) for k, v in want.items())
    if isinstance(want, list):
        return (
            isinstance(spec, list)
            and len(spec) == len(want)
            and all(_same_rules(a, b) for a, b in zip(spec, want, strict=True))
        )
    return bool(spec == want)


def pre_tokenizer_name(pre: dict[str, Any] | None, source: Path) -> str:
    """Map tokenizer.json's `pre_tokenizer` to a name llama.cpp accepts for the same regex."""
    for name, want in PRE_TOKENIZERS.items():
        if _same_rules(pre, want):
            return name
    raise ExportError(
        f"{source}: pre_tokenizer expected ByteLevel (gpt-2), Digits+ByteLevel (smollm) or Split+ByteLevel "
        f"(qwen2), got {json.dumps(pre)[:200]}"
    )


def read_vocab(model_dir: Path, arch: Architecture, cfg: Mapping[str, Any]) -> BpeVocab:
    """tokenizer.json (+ tokenizer_config.json) -> BpeVocab padded to the model's vocab size."""
    import gguf

    path = model_dir / "tokenizer.json"
    try:
        tok: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: cannot read tokenizer ({exc})") from exc
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"{path}: model.type expected 'BPE', got {model.get('type')!r}")
    pre = pre_tokenizer_name(tok.get("pre_tokenizer"), path)

    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    special: set[int] = set()
    user: set[int] = set()
    for added in tok.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
        (special if added.get("special") else user).add(int(added["id"]))
    n = max(by_id) + 1
    if n > arch.vocab:
        raise ExportError(f"{path}: tokenizer has {n} tokens, expected at most vocab_size={arch.vocab}")

    tokens: list[str] = []
    types: list[int] = []
    for i in range(arch.vocab):  # ids the tokenizer never produces become unused pads
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(
                gguf.TokenType.CONTROL
                if i in special
                else gguf.TokenType.USER_DEFINED
                if i in user
                else gguf.TokenType.NORMAL
            )
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    tok_cfg: dict[str, Any] = {}
    cfg_path = model_dir / hf_source.TOKENIZER_CONFIG
    if cfg_path.is_file():
        try:
            tok_cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ExportError(f"{cfg_path}: malformed JSON ({exc})") from exc
    ids = {t: i for i, t in by_id.items()}
    info = hf_source.tokenizer_info(model_dir, cfg)

    def token_id(config_id: int | None, field: str) -> int | None:
        if config_id is not None:
            return config_id
        value = tok_cfg.get(field)
        if isinstance(value, dict):
            value = value.get("content")
        return ids.get(value) if isinstance(value, str) else None

    template = tok_cfg.get("chat_template")
    return BpeVocab(
        tokens=tokens,
        types=[int(t) for t in types],
        merges=merges,
        pre=pre,
        bos_id=token_id(info.get("bos_id"), "bos_token"),
        eos_id=token_id(info.get("eos_id"), "eos_token"),
        add_bos=bool(tok_cfg.get("add_bos_token", False)),
        chat_template=template if isinstance(template, str) else None,
    )


def gguf_name(hf_name: str) -> str | None:
    """HF tensor name -> GGUF name; None for buffers llama.cpp does not need."""
    if hf_name.endswith(IGNORED_SUFFIXES):
        return None
    if hf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, i, rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in BLOCK_TENSORS:
        return f"blk.{int(parts[2])}.{BLOCK_TENSORS[parts[3]]}"
    raise ExportError(f"unsupported tensor {hf_name!r} for a llama GGUF (no llama.cpp name)")


def hf_name(name: str) -> str | None:
    """GGUF tensor name -> HF name (inverse of `gguf_name`); None for names with no HF tensor."""
    if name in _GLOBAL_BY_GGUF:
        return _GLOBAL_BY_GGUF[name]
    parts = name.split(".", 2)  # blk, i, rest
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_BY_GGUF:
        return f"model.layers.{int(parts[1])}.{_BLOCK_BY_GGUF[parts[2]]}"
    return None


def projection_of(name: str) -> str | None:
    """The LoRA module ("q", ...) a GGUF weight or bias belongs to, e.g. blk.0.attn_q.bias -> "q"."""
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk":
        return _MODULE_BY_STEM.get(parts[2])
    return None


def convert_tensor(name: str, t: np.ndarray, arch: Architecture) -> np.ndarray:
    """Apply llama.cpp's layout rules for this family: q/k rows (weights and biases) to its RoPE order."""
    module = projection_of(name)
    return t if module is None else to_gguf_rows(t, arch, module)


def _read_hparams(model_dir: Path) -> tuple[Architecture, dict[str, Any]]:
    path = model_dir / hf_source.CONFIG_NAME
    cfg = hf_source.read_config(model_dir)
    model_type = cfg.get("model_type")
    if model_type not in hf_source.SUPPORTED_MODEL_TYPES or family_spec(str(model_type)) is None:
        supported = [t for t in hf_source.SUPPORTED_MODEL_TYPES if t in GGUF_FAMILIES]
        raise ExportError(f"{path}: model_type expected one of {supported}, got {model_type!r}")
    return hf_source.architecture_from_config(cfg, path), cfg


def read_weights(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, float32 array) for every floating tensor of every safetensors file."""
    for path in hf_source.weight_files(model_dir):
        yield from hf_source.read_safetensors(path).items()


def add_shape(w: Any, name: str, arch: Architecture) -> None:
    """The keys every base GGUF written here carries: a float32 model named `name`, and its shape
    (vocabulary, context, width, layers, feed-forward width, query and key/value heads)."""
    import gguf

    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_vocab_size(arch.vocab)
    w.add_context_length(arch.max_seq)
    w.add_embedding_length(arch.hidden)
    w.add_block_count(arch.n_layers)
    w.add_feed_forward_length(arch.intermediate)
    w.add_head_count(arch.n_heads)
    w.add_head_count_kv(arch.n_kv_heads)


def add_vocab(w: Any, vocab: BpeVocab) -> None:
    """The tokenizer's keys of a base GGUF (llama.cpp's BPE "gpt2" model): tokens, types, merges, ids."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    if vocab.bos_id is not None:
        w.add_bos_token_id(vocab.bos_id)
    if vocab.eos_id is not None:
        w.add_eos_token_id(vocab.eos_id)
    w.add_add_bos_token(vocab.add_bos)


def write_base_gguf(model_dir: Path, out_path: Path, *, progress: bool = False) -> Path:
    """Write an F32 GGUF (weights + tokenizer) from a HF Llama / Qwen2 folder, atomically."""
    import gguf

    model_dir = Path(model_dir)
    out_path = Path(out_path)
    arch, cfg = _read_hparams(model_dir)
    spec = GGUF_FAMILIES[arch.family]
    vocab = read_vocab(model_dir, arch, cfg)
    expected: dict[str, tuple[int, ...]] = {}
    for hf, shape in hf_layout.expected_shapes(arch).items():
        target = gguf_name(hf)
        assert target is not None  # expected_shapes lists no ignored buffers
        expected[target] = shape

    tensors: dict[str, np.ndarray] = {}
    for name_hf, t in _iter_progress(read_weights(model_dir), progress):
        found = gguf_name(name_hf)
        if found is None or (found == "output.weight" and arch.tie_embeddings):
            continue
        name = found
        if name not in expected:
            raise ExportError(f"{model_dir}: tensor {name_hf} ({name}) not expected for this config")
        if t.shape != expected[name]:
            raise ExportError(f"{model_dir}: {name_hf} expected shape {expected[name]}, got {t.shape}")
        tensors[name] = convert_tensor(name, t, arch)
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise ExportError(f"{model_dir}: missing tensor(s) {missing[:4]} (expected {len(expected)} in all)")

    with atomic.replacing(out_path) as tmp:
        w = gguf.GGUFWriter(tmp, spec.arch)
        try:
            add_shape(w, model_dir.name, arch)
            w.add_rope_dimension_count(arch.head_dim)
            w.add_rope_freq_base(arch.rope_theta)
            w.add_layer_norm_rms_eps(arch.rms_eps)

            add_vocab(w, vocab)
            if vocab.chat_template is not None:
                w.add_chat_template(vocab.chat_template)

            for key in expected:  # token_embd, then blocks in order, output_norm, output
                w.add_tensor(key, tensors.pop(key))
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file(progress=progress)
        finally:
            w.close()
    return out_path


def _iter_progress(items: Iterator[tuple[str, np.ndarray]], progress: bool) -> Iterator[tuple[str, np.ndarray]]:
    if not progress:
        return items
    from tqdm import tqdm

    return iter(tqdm(items, desc="Reading weights", unit="tensor"))
