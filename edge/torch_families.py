"""What each model family changes in the PyTorch trainer's forward pass, read from the bundle.

The trainer's network (edge/torch_network.py) is Llama's: RMSNorm, rotate-half RoPE, grouped-query
causal attention, a gated MLP. Every family the export supports is that network with a few
switches, which this module reads from the transformers config the bundle was exported from
(`calib/model_config.json`; devices do not install transformers, so its modeling code cannot run
here). Each switch is what the family's transformers modeling code does:

- Qwen3: an RMSNorm over each query and key head before RoPE (`q_norm`, `k_norm`); optional
  sliding-window layers (`layer_types`).
- Gemma 3 (text): RMSNorms scale by (1 + w); embeddings × √hidden (rounded to float32); q/k norms;
  a norm on the attention output and around the MLP (post_attention, pre_ / post_feedforward);
  scores scaled by query_pre_attn_scalar^-½; logits soft-capped (c·tanh(z/c)) when
  `final_logit_softcapping` is set; GELU (tanh form); sliding-window layers with their own RoPE
  base (`rope_local_base_freq`). `attn_logit_softcapping` is not applied: transformers' Gemma 3
  attention does not pass it to its attention function (the loss is the same to the last bit with
  it on or off), so neither the traced ONNX graph nor this network caps scores.
- Phi-3: fused qkv_proj and gate_up_proj (`alignfed.lora.FUSED`: the LoRA of q, k, v, gate, up
  adds to its row block); RoPE over the first `partial_rotary_factor` of each head; a sliding
  window on every layer when `sliding_window` is set.
Llama and Qwen2 have none of these and need no config file (bundles from before it load).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from alignfed import manifest as mf
from alignfed.errors import BundleError, TrainingError
from alignfed.manifest import Architecture

TORCH_FAMILIES = ("llama", "qwen2", "qwen3", "gemma3_text", "phi3")  # model_types this trainer runs
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


@dataclass(frozen=True, slots=True)
class Traits:
    """The family switches of one bundle's network (module docstring)."""

    activation: str  # of the MLP's gate: "silu", "gelu_tanh" or "gelu"
    norm_offset: float  # RMSNorm multiplies by (norm_offset + w): Gemma 1.0, others 0.0
    embed_scale: float  # embeddings × this (Gemma √hidden)
    qk_norm: bool  # RMSNorm over each q and k head (head_dim) before RoPE
    sandwich_norms: bool  # Gemma 3's norms on the attention output and before / after the MLP
    query_scale: float  # attention scores × this
    final_softcap: float | None  # logits -> c·tanh(logits / c)
    windows: tuple[int, ...]  # per layer: a query sees keys less than this many positions back; 0 = all
    rope_thetas: tuple[float, ...]  # per layer: the RoPE base
    rotary_dim: int  # the leading channels of each head that RoPE rotates (the rest pass through)


def plain(arch: Architecture) -> Traits:
    """Llama / Qwen2: none of the switches."""
    return Traits(
        activation="silu",
        norm_offset=0.0,
        embed_scale=1.0,
        qk_norm=False,
        sandwich_norms=False,
        query_scale=float(arch.head_dim) ** -0.5,
        final_softcap=None,
        windows=(0,) * arch.n_layers,
        rope_thetas=(arch.rope_theta,) * arch.n_layers,
        rotary_dim=arch.head_dim,
    )


def load(bundle: Path, arch: Architecture) -> Traits:
    """The traits of a bundle: from its model config for the families that need one."""
    if arch.family not in TORCH_FAMILIES:
        raise TrainingError(
            f"the torch trainer backend runs {', '.join(TORCH_FAMILIES)}, not {arch.family!r}; "
            "train this bundle with the ort backend"
        )
    if arch.family in ("llama", "qwen2"):
        return plain(arch)
    path = Path(bundle) / mf.MODEL_CONFIG
    if not path.is_file():
        raise BundleError(f"{path}: missing; a {arch.family} bundle needs it for the torch trainer, re-export it")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc
    return from_config(arch, cfg, path)


def _activation(cfg: Mapping[str, Any], source: Path, default: str) -> str:
    name = cfg.get("hidden_activation") or cfg.get("hidden_act") or default
    if name not in ACTIVATIONS:
        raise TrainingError(f"{source}: activation {name!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def _rope_theta(cfg: Mapping[str, Any], layer_type: str, default: float, source: Path) -> float:
    """The RoPE base of a layer type; a transformers-5 config nests them in `rope_parameters`."""
    params = cfg.get("rope_parameters") or {}
    nested = params.get(layer_type) if isinstance(params.get(layer_type), dict) else None
    scaling = nested or cfg.get("rope_scaling") or params
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise TrainingError(f"{source}: rope type {rope_type!r} ({layer_type}) is not supported; supported: 'default'")
    return float((nested or {}).get("rope_theta", default))


def _layer_types(cfg: Mapping[str, Any], arch: Architecture, fallback: list[str], source: Path) -> list[str]:
    types = cfg.get("layer_types") or fallback
    if len(types) != arch.n_layers or set(types) - {"full_attention", "sliding_attention"}:
        raise TrainingError(
            f"{source}: layer_types {types!r} expected {arch.n_layers} of 'full_attention' / 'sliding_attention'"
        )
    return list(types)


def _window(cfg: Mapping[str, Any], source: Path) -> int:
    window = cfg.get("sliding_window")
    if not isinstance(window, int) or window < 1:
        raise TrainingError(f"{source}: sliding_window is {window!r}; sliding layers need a positive window")
    return window


def from_config(arch: Architecture, cfg: Mapping[str, Any], source: Path) -> Traits:
    """The traits of a qwen3, gemma3_text or phi3 config (defaults as its transformers config class)."""
    base = plain(arch)
    n = arch.n_layers
    if arch.family == "qwen3":
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
        first = int(cfg.get("max_window_layers", n))
        types = _layer_types(
            cfg, arch, ["sliding_attention" if window and i >= first else "full_attention" for i in range(n)], source
        )
        sliding = "sliding_attention" in types and cfg.get("use_sliding_window")
        return replace(
            base,
            activation=_activation(cfg, source, "silu"),
            qk_norm=True,
            windows=tuple(_window(cfg, source) if sliding and t == "sliding_attention" else 0 for t in types),
            rope_thetas=(_rope_theta(cfg, "full_attention", arch.rope_theta, source),) * n,
        )
    if arch.family == "gemma3_text":
        pattern = int(cfg.get("sliding_window_pattern", 6))
        types = _layer_types(
            cfg, arch, ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)], source
        )
        window = _window(cfg, source) if "sliding_attention" in types else 0
        thetas = {
            "full_attention": _rope_theta(cfg, "full_attention", arch.rope_theta, source),
            "sliding_attention": _rope_theta(
                cfg, "sliding_attention", float(cfg.get("rope_local_base_freq", 10000.0)), source
            ),
        }
        return Traits(
            activation=_activation(cfg, source, "gelu_pytorch_tanh"),
            norm_offset=1.0,
            embed_scale=float(np.float32(math.sqrt(arch.hidden))),  # HF: torch.tensor(√hidden), float32
            qk_norm=True,
            sandwich_norms=True,
            query_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5,
            final_softcap=_cap(cfg.get("final_logit_softcapping")),
            windows=tuple(window if t == "sliding_attention" else 0 for t in types),
            rope_thetas=tuple(thetas[t] for t in types),
            rotary_dim=arch.head_dim,
        )
    if arch.family == "phi3":
        window = cfg.get("sliding_window")
        rotary = int(arch.head_dim * float(cfg.get("partial_rotary_factor", 1.0)))
        if rotary % 2 or not 0 < rotary <= arch.head_dim:
            raise TrainingError(f"{source}: partial_rotary_factor gives {rotary} rotated channels of {arch.head_dim}")
        return replace(
            base,
            activation=_activation(cfg, source, "silu"),
            windows=(_window(cfg, source) if window is not None else 0,) * n,
            rope_thetas=(_rope_theta(cfg, "full_attention", arch.rope_theta, source),) * n,
            rotary_dim=rotary,
        )
    raise TrainingError(f"{source}: no torch forward pass for family {arch.family!r}")  # pragma: no cover


def _cap(value: Any) -> float | None:
    return float(value) if value else None
