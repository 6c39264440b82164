"""llama.cpp on the traced graph's families: the base GGUF's tensor names are gguf-py's own
(`gguf.TensorNameMap`), llama.cpp's logits on it equal transformers', and with the exported GGUF
LoRA they equal transformers' with the adapter merged — for Phi-3 with its fused qkv / gate_up
adapters and with partial RoPE, for Gemma 3 also with final logit soft-capping, with attention
soft-capping set (which neither transformers nor llama.cpp applies), and with its own layer layout
and sliding-layer RoPE base. Phi-3's fused adapter is also checked as math.

Tolerance, relative to max |logit|: F32 base and F32 KV cache, so for Qwen3 and Phi-3 llama.cpp and
PyTorch differ only in summation order (measured 2e-6); 1e-4 leaves room for other CPUs. Gemma's
GELU is evaluated by ggml through an fp16 lookup table (measured 7e-5), so it gets 5e-4. An adapter
row in the wrong place (wrong block, missing permutation) moves logits by ~1, far above both, and a
soft-cap of 30 left out moves them by ~9 (measured)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alignfed import lora
from alignfed.gguf_adapter import gguf_tensors, write_lora_gguf
from alignfed.manifest import LoraLayout
from export.gguf_generic import write_generic_gguf as write_base_gguf
from export.hf_source import read_architecture
from export.onnx_graph import lora_shapes
from export.synthetic import (
    GEMMA3_CONFIG,
    GEMMA3_LLAMA_CPP_CONFIG,
    PHI3_CONFIG,
    QWEN3_CONFIG,
    TinyConfig,
    write_tiny_model,
)
from runtime.llama import Generator
from tests.support.hf_reference import hf_model, merged_model, random_adapter

TOL = {"qwen3": 1e-4, "gemma3_text": 5e-4, "phi3": 1e-4}  # relative to max |logit|; see the module docstring
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
LAYOUT = LoraLayout(ALL_TARGETS, 4, 8.0)
# case -> (family, tiny config, config.json fields set on top)
CASES: dict[str, tuple[str, TinyConfig, dict[str, float]]] = {
    "qwen3": ("qwen3", QWEN3_CONFIG, {}),
    "gemma3_text": ("gemma3_text", GEMMA3_LLAMA_CPP_CONFIG, {}),
    "gemma3_text-softcap": (
        "gemma3_text",
        GEMMA3_LLAMA_CPP_CONFIG,
        {"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    ),
    # its own layer layout (last layer global, not every 6th) and sliding layers' RoPE base, both
    # only right in llama.cpp through the keys written for them; soft-capping on
    "gemma3_text-layout": ("gemma3_text", GEMMA3_CONFIG, {"rope_theta": 1e6, "rope_local_base_freq": 1e5}),
    "phi3": ("phi3", PHI3_CONFIG, {}),  # partial RoPE: 3/4 of each head
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_cpp_logits_equal_transformers_with_the_adapter(case: str, tmp_path: Path) -> None:
    import gguf

    family, config, fields = CASES[case]
    model_dir = write_tiny_model(tmp_path / "model", config)
    if fields:
        path = model_dir / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | fields))
    arch = read_architecture(model_dir)
    base = write_base_gguf(model_dir, tmp_path / "base.gguf")
    names = {t.name for t in gguf.GGUFReader(base).tensors}
    arch_enum = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == {"gemma3_text": "gemma3"}.get(family, family))
    known = {gguf.TENSOR_NAMES[t].format(bid=i) + ".weight" for t in gguf.MODEL_TENSORS[arch_enum] for i in range(2)}
    assert names <= known, sorted(names - known)  # every tensor is one llama.cpp's arch declares

    adapter = random_adapter(lora_shapes(arch, LAYOUT), seed=3)
    lora_path = write_lora_gguf(tmp_path / "lora.gguf", adapter, arch, LAYOUT)
    ids = [int(x) for x in np.random.default_rng(0).integers(0, arch.vocab, 12)]
    with torch.no_grad():
        plain = hf_model(model_dir)(input_ids=torch.tensor([ids])).logits[0].numpy()
        merged = merged_model(model_dir, arch, adapter, LAYOUT)(input_ids=torch.tensor([ids])).logits[0].numpy()
    with Generator(base, n_ctx=64, n_threads=2, kv_f32=True) as gen:
        got_plain = gen.logits(ids)
        gen.set_adapter(lora_path)
        got_merged = gen.logits(ids)
    err_plain = float(np.abs(got_plain - plain).max() / np.abs(plain).max())
    err = float(np.abs(got_merged - merged).max() / np.abs(merged).max())
    effect = float(np.abs(merged - plain).max())
    print(
        f"[{case}] llama.cpp vs transformers: base {err_plain:.2e}, with adapter {err:.2e} (adapter moves {effect:.2f})"
    )
    assert effect > 0.5  # the comparison can see a misplaced adapter
    assert err_plain < TOL[family] and err < TOL[family]


def test_gemma_variants_llama_cpp_cannot_run_are_refused(tmp_path: Path) -> None:
    from alignfed.errors import ExportError

    model_dir = write_tiny_model(tmp_path / "model", GEMMA3_CONFIG)
    path = model_dir / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"query_pre_attn_scalar": 256}))
    with pytest.raises(
        ExportError, match=r"query_pre_attn_scalar is 256; llama.cpp's gemma3_text graph needs head_dim"
    ):
        write_base_gguf(model_dir, tmp_path / "base.gguf")


def test_phi3_fused_adapter_is_the_row_blocks_of_each_projection(tmp_path: Path) -> None:
    import gguf

    model_dir = write_tiny_model(tmp_path / "model", PHI3_CONFIG)
    arch = read_architecture(model_dir)
    layout = LoraLayout(("q", "v", "up"), 4, 8.0)
    adapter = random_adapter(lora_shapes(arch, layout), seed=4)
    named = gguf_tensors(adapter, arch, layout)
    name_map = gguf.TensorNameMap(gguf.MODEL_ARCH.PHI3, arch.n_layers)
    outs = {m: arch.in_out(m)[1] for m in lora.MODULES}
    for i in range(arch.n_layers):
        for spec in lora.FUSED["phi3"]:
            stem = name_map.get_name(f"model.layers.{i}.{spec.hf}.weight", try_suffixes=(".weight",))
            a, b = named[f"{stem}.lora_a"], named[f"{stem}.lora_b"]
            parts = [m for m in spec.parts if m in layout.targets]
            # llama.cpp adds alpha / rank(A) * B @ A with rank(A) = rows of A
            delta = layout.alpha / a.shape[0] * (b.astype(np.float64) @ a)
            want = np.zeros_like(delta)
            for m in parts:
                start, stop = lora.row_block(spec, m, outs)
                want[start:stop] = lora.product(adapter, lora.layer_id(i, m), layout.scale)
            np.testing.assert_allclose(delta, want, rtol=1e-5, atol=1e-6)
    assert set(named) == {
        f"blk.{i}.{stem}.weight.lora_{f}" for i in range(2) for stem in ("attn_qkv", "ffn_up") for f in "ab"
    }


def test_gemma_rope_bases_from_a_transformers5_config(tmp_path: Path) -> None:
    """transformers 5 saves Gemma 3's two RoPE bases as `rope_parameters` per layer type: the
    architecture, the GGUF and the PyTorch trainer's switches all read the right one per layer."""
    import gguf

    from alignfed.errors import ExportError, TrainingError
    from edge.torch_families import from_config

    model_dir = write_tiny_model(tmp_path / "model", GEMMA3_CONFIG)  # layers: sliding, full
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    for flat in ("rope_theta", "rope_local_base_freq"):
        del cfg[flat]
    nested = {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e5},
    }
    path.write_text(json.dumps(cfg | {"rope_parameters": nested}))
    arch = read_architecture(model_dir)
    assert arch.rope_theta == 1e6
    fields = {
        f.name: f.contents() for f in gguf.GGUFReader(write_base_gguf(model_dir, tmp_path / "b.gguf")).fields.values()
    }
    assert (fields["gemma3.rope.freq_base"], fields["gemma3.rope.freq_base_swa"]) == (1e6, 1e5)
    assert fields["gemma3.attention.sliding_window_pattern"] == [True, False]
    assert from_config(arch, json.loads(path.read_text()), path).rope_thetas == (1e5, 1e6)

    nested["full_attention"] = {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}  # Gemma 3 4B's
    path.write_text(json.dumps(cfg | {"rope_parameters": nested}))
    with pytest.raises(ExportError, match=r"rope scaling is .*'linear'.*; llama.cpp's gemma3_text graph needs plain"):
        write_base_gguf(model_dir, tmp_path / "c.gguf")
    with pytest.raises(TrainingError, match=r"rope type 'linear' \(full_attention\) is not supported"):
        from_config(arch, json.loads(path.read_text()), path)
