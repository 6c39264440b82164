"""The Hugging Face tensor layout of a supported decoder: every weight's name and shape.

The readers check a model against it, and the ONNX builder and the GGUF writer name tensors by it.
"""

from __future__ import annotations

from alignfed import lora
from alignfed.manifest import Architecture

QKV_BIAS_MODULES = ("q", "k", "v")  # projections with a bias when Architecture.qkv_bias


def bias_name(layer: int, module: str) -> str:
    """HF name of the bias of projection `module` in decoder layer `layer`."""
    return f"model.layers.{layer}.{lora.MODULES[module].hf}.bias"


def expected_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape of every tensor the forward pass uses (nn.Linear weights (out, in))."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (arch.vocab, arch.hidden)}
    for i in range(arch.n_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (arch.hidden,)
        for module in lora.MODULES:
            d_in, d_out = arch.in_out(module)
            shapes[lora.hf_weight_name(i, module)] = (d_out, d_in)
            if arch.qkv_bias and module in QKV_BIAS_MODULES:
                shapes[bias_name(i, module)] = (d_out,)
        shapes[p + "post_attention_layernorm.weight"] = (arch.hidden,)
    shapes["model.norm.weight"] = (arch.hidden,)
    if not arch.tie_embeddings:
        shapes["lm_head.weight"] = (arch.vocab, arch.hidden)
    return shapes
