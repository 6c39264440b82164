"""The one LoRA name table: canonical keys and their ONNX, GGUF and PEFT spellings.

A LoRA adapter on a linear layer W (out, in) adds `s * B @ A` with A: (r, in), B: (out, r) and
s = alpha / r, so `y = x @ W.T + s * (x @ A.T) @ B.T` (Hu et al., 2021). Every artifact of a
bundle uses the canonical keys `lora.{layer}.{module}.A|B`; other spellings are derived here and
nowhere else.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from alignfed.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ModuleSpec:
    """How one adaptable projection is spelled in each vocabulary."""

    hf: str  # attribute path inside a HF decoder layer
    gguf: str  # llama.cpp tensor stem inside `blk.{i}.`


# Supported LoRA target modules, in a fixed order (the order of canonical keys everywhere).
MODULES: dict[str, ModuleSpec] = {
    "q": ModuleSpec(hf="self_attn.q_proj", gguf="attn_q"),
    "k": ModuleSpec(hf="self_attn.k_proj", gguf="attn_k"),
    "v": ModuleSpec(hf="self_attn.v_proj", gguf="attn_v"),
    "o": ModuleSpec(hf="self_attn.o_proj", gguf="attn_output"),
    "gate": ModuleSpec(hf="mlp.gate_proj", gguf="ffn_gate"),
    "up": ModuleSpec(hf="mlp.up_proj", gguf="ffn_up"),
    "down": ModuleSpec(hf="mlp.down_proj", gguf="ffn_down"),
}


@dataclass(frozen=True, slots=True)
class FusedSpec:
    """One weight that stacks several logical projections along its output rows."""

    hf: str  # attribute path of the fused nn.Linear inside a HF decoder layer
    gguf: str  # llama.cpp tensor stem of the fused weight inside `blk.{i}.`
    parts: tuple[str, ...]  # the logical projections it stacks, top rows first


# Families whose Hugging Face modeling code fuses projections. Users still name the logical
# projections (`--targets q,v`) and canonical keys stay `lora.{i}.q.A|B`: the LoRA of a logical
# projection is the LoRA of its row block of the fused weight (Phi-3's qkv_proj = [q; k; v] and
# gate_up_proj = [gate; up], split in that order by Phi3Attention / Phi3MLP; llama.cpp's phi3 graph
# reads them as attn_qkv and ffn_up, with the same row order).
FUSED: dict[str, tuple[FusedSpec, ...]] = {
    "phi3": (
        FusedSpec(hf="self_attn.qkv_proj", gguf="attn_qkv", parts=("q", "k", "v")),
        FusedSpec(hf="mlp.gate_up_proj", gguf="ffn_up", parts=("gate", "up")),
    ),
}


def fused_spec(family: str, module: str) -> FusedSpec | None:
    """The fused weight holding logical projection `module` in `family`, or None if it has its own."""
    return next((f for f in FUSED.get(family, ()) if module in f.parts), None)


def row_block(spec: FusedSpec, module: str, out_features: Mapping[str, int]) -> tuple[int, int]:
    """[start, stop) rows of `module` inside the fused weight, from each part's output width."""
    start = 0
    for part in spec.parts:
        stop = start + out_features[part]
        if part == module:
            return start, stop
        start = stop
    raise ConfigError(f"projection {module!r} is not part of {spec.hf} ({', '.join(spec.parts)})")


def hf_projection(family: str, module: str) -> str:
    """Attribute path inside a HF decoder layer of the nn.Linear that computes `module`."""
    spec = fused_spec(family, module)
    return spec.hf if spec is not None else MODULES[module].hf


_CANONICAL = re.compile(r"^lora\.(\d+)\.([a-z]+)\.(A|B)$")


def check_targets(targets: Iterable[str]) -> tuple[str, ...]:
    """Validate LoRA target names and return them in canonical order."""
    wanted = list(targets)
    unknown = [t for t in wanted if t not in MODULES]
    if unknown or not wanted:
        raise ConfigError(f"unsupported LoRA target(s) {unknown or '[]'}; supported: {', '.join(MODULES)}")
    return tuple(m for m in MODULES if m in wanted)


def key(layer: int, module: str, factor: str) -> str:
    """Canonical tensor name, e.g. `lora.3.q.A`."""
    return f"lora.{layer}.{module}.{factor}"


def layer_id(layer: int, module: str) -> str:
    """Name of an adapted layer without the factor, e.g. `3.q`; keys deltas and activations."""
    return f"{layer}.{module}"


def parse_key(name: str) -> tuple[int, str, str]:
    """Inverse of `key`: `lora.3.q.A` -> (3, "q", "A")."""
    m = _CANONICAL.match(name)
    if m is None or m.group(2) not in MODULES:
        raise ConfigError(f"not a canonical LoRA key: {name!r} (expected lora.<layer>.<module>.A|B)")
    return int(m.group(1)), m.group(2), m.group(3)


def gguf_name(layer: int, module: str, factor: str) -> str:
    """llama.cpp GGUF LoRA spelling: `blk.{i}.attn_q.weight.lora_a` (A) / `.lora_b` (B)."""
    return f"blk.{layer}.{MODULES[module].gguf}.weight.lora_{factor.lower()}"


def peft_name(layer: int, module: str, factor: str) -> str:
    """PEFT spelling: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`."""
    return f"base_model.model.model.layers.{layer}.{MODULES[module].hf}.lora_{factor}.weight"


def hf_weight_name(layer: int, module: str) -> str:
    """Name of the frozen base weight the adapter attaches to in a HF state dict."""
    return f"model.layers.{layer}.{MODULES[module].hf}.weight"


def layer_ids(n_layers: int, targets: Iterable[str]) -> list[str]:
    """Every adapted layer, layer-major then module order: ['0.q', '0.v', '1.q', ...]."""
    ordered = check_targets(targets)
    return [layer_id(i, m) for i in range(n_layers) for m in ordered]


def split_layer_id(lid: str) -> tuple[int, str]:
    layer, module = lid.split(".", 1)
    return int(layer), module


def product(tensors: Mapping[str, np.ndarray], lid: str, scale: float) -> np.ndarray:
    """The adapter's weight change `s * B @ A` (out, in) for layer id `lid`."""
    layer, module = split_layer_id(lid)
    a = tensors[key(layer, module, "A")]  # (r, in)
    b = tensors[key(layer, module, "B")]  # (out, r)
    return scale * (b.astype(np.float64) @ a.astype(np.float64))
