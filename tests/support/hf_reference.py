"""transformers' own model with an adapter merged into its weights: the reference the exported
graphs and llama.cpp are compared against. Independent of the exporter's LoRA layers: it adds
`s * B @ A` to the base weight (to its row block for a fused projection, `alignfed.lora.FUSED`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from alignfed import lora
from alignfed.manifest import Architecture, LoraLayout


def hf_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager", dtype=torch.float32
    ).eval()
    return model


def merged_model(
    model_dir: Path, arch: Architecture, tensors: Mapping[str, np.ndarray], layout: LoraLayout
) -> torch.nn.Module:
    model = hf_model(model_dir)
    outs = {m: arch.in_out(m)[1] for m in lora.MODULES}
    with torch.no_grad():
        for lid in lora.layer_ids(arch.n_layers, layout.targets):
            layer, module = lora.split_layer_id(lid)
            spec = lora.fused_spec(arch.family, module)
            start, stop = lora.row_block(spec, module, outs) if spec is not None else (0, outs[module])
            w = model.get_parameter(f"model.layers.{layer}.{lora.hf_projection(arch.family, module)}.weight")
            w[start:stop] += torch.from_numpy(lora.product(tensors, lid, layout.scale)).to(w.dtype)  # (out, in)
    return model


def projection_inputs(
    model: torch.nn.Module, arch: Architecture, layout: LoraLayout, ids: np.ndarray
) -> dict[str, np.ndarray]:
    """Forward-hook captures: the input (B, T, in) of every adapted projection, by layer id."""
    captured: dict[str, np.ndarray] = {}
    handles = []
    for lid in lora.layer_ids(arch.n_layers, layout.targets):
        layer, module = lora.split_layer_id(lid)
        proj = model.get_submodule(f"model.layers.{layer}.{lora.hf_projection(arch.family, module)}")
        handles.append(
            proj.register_forward_pre_hook(lambda _m, inp, lid=lid: captured.__setitem__(lid, inp[0].numpy().copy()))
        )
    try:
        with torch.no_grad():
            model(input_ids=torch.from_numpy(ids))
    finally:
        for h in handles:
            h.remove()
    return captured


def random_adapter(shapes: Mapping[str, tuple[int, int]], seed: int, std: float = 0.2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (std * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
