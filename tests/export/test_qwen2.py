"""Qwen2 (Llama plus q/k/v biases, RoPE base 1e6) end to end on tiny random models:
ORT losses equal transformers' Qwen2ForCausalLM with LoRA, llama.cpp's qwen2 graph with an
exported adapter equals the merged torch model, and llama.cpp's layout rules for qwen2 (no Q/K
row permutation, "qwen2" pre-tokenizer) are the ones the exporter applies."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch

from alignfed import lora
from alignfed import manifest as mf
from alignfed.errors import ExportError
from alignfed.gguf_adapter import permute_qk_rows, write_lora_gguf
from alignfed.manifest import Architecture, LoraLayout
from export.bundle import export_bundle
from export.hf_source import read_hf_model
from export.onnx_graph import INPUT_IDS, LABELS, lora_shapes
from export.synthetic import QWEN2_CONFIG, TinyConfig, write_tiny_qwen2
from runtime.ort import open_session, set_params

if TYPE_CHECKING:
    from transformers import Qwen2ForCausalLM

    from runtime.llama import Generator

TOL = 1e-4  # ORT vs torch loss, as tests/export/test_onnx_parity.py
EXACT_TOL = 1e-5  # llama.cpp (F32 base, F32 KV cache) vs torch, relative to max |logit|
RANK, ALPHA = 4, 8.0
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
UNTIED = TinyConfig(family="qwen2", rope_theta=1e6, rms_eps=1e-6, tie_embeddings=False, seed=5)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("qwen2") / "tiny-qwen2", QWEN2_CONFIG)


@pytest.fixture(scope="module")
def qwen_untied_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("qwen2") / "tiny-qwen2-untied", UNTIED)


def random_adapter(shapes: Mapping[str, tuple[int, int]], seed: int, std: float = 0.2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (std * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def torch_model(model_dir: Path) -> Qwen2ForCausalLM:
    from transformers import Qwen2ForCausalLM

    torch.set_num_threads(2)
    model: Qwen2ForCausalLM = Qwen2ForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager", dtype=torch.float32
    ).eval()
    return model


def merged_logits(model_dir: Path, ids: list[int], tensors: Mapping[str, np.ndarray], layout: LoraLayout) -> np.ndarray:
    """(T, vocab) logits of Qwen2ForCausalLM with W + s * B @ A on every adapted projection."""
    model = torch_model(model_dir)
    with torch.no_grad():
        for lid in lora.layer_ids(model.config.num_hidden_layers, layout.targets):
            layer, module = lora.split_layer_id(lid)
            w = model.get_parameter(lora.hf_weight_name(layer, module))  # (out, in)
            w.add_(torch.from_numpy(lora.product(tensors, lid, layout.scale)).to(w.dtype))
        logits: np.ndarray = model(input_ids=torch.tensor([ids])).logits[0].numpy()  # (T, vocab)
    return logits


def test_architecture_has_qkv_bias(qwen_dir: Path) -> None:
    arch, weights = read_hf_model(qwen_dir)
    assert arch.family == "qwen2" and arch.qkv_bias and arch.tie_embeddings and arch.rope_theta == 1e6
    assert weights["model.layers.1.self_attn.k_proj.bias"].shape == (arch.n_kv_heads * arch.head_dim,)
    assert "model.layers.0.self_attn.o_proj.bias" not in weights  # Qwen2's o_proj has no bias


@pytest.mark.parametrize(
    ("model_fixture", "targets", "quantization"),
    [("qwen_dir", ALL_TARGETS, "fp32"), ("qwen_untied_dir", ("q", "k", "v"), "fp32")],
    ids=["tied-all-targets", "untied-qkv"],
)
def test_ort_losses_match_transformers(
    model_fixture: str, targets: tuple[str, ...], quantization: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    import onnxruntime as ort

    model_dir: Path = request.getfixturevalue(model_fixture)
    manifest = export_bundle(model_dir, tmp_path, targets=targets, rank=RANK, alpha=ALPHA, write_gguf=False)
    assert manifest.architecture.qkv_bias
    adapter = random_adapter(manifest.lora_shapes(), seed=11)

    model = torch_model(model_dir)
    scale = manifest.lora.scale
    for lid in manifest.layer_ids:  # the LoRA branch as a forward hook: base(x) + s * (x A^T) B^T
        layer, module = lora.split_layer_id(lid)
        a = torch.from_numpy(adapter[lora.key(layer, module, "A")])  # (r, in)
        b = torch.from_numpy(adapter[lora.key(layer, module, "B")])  # (out, r)
        proj = model.model.layers[layer].get_submodule(lora.MODULES[module].hf)
        proj.register_forward_hook(lambda _m, inp, out, a=a, b=b: out + scale * (inp[0] @ a.T) @ b.T)

    session = open_session(tmp_path / mf.TRAIN_DIR)
    set_params(session.state, adapter)
    calib = ort.InferenceSession(str(tmp_path / mf.CALIB_MODEL), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    ids = rng.integers(0, manifest.architecture.vocab, size=(2, 14)).astype(np.int64)
    labels = ids.copy()
    labels[0, :4] = -100
    with torch.no_grad():
        want = float(model(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels)).loss)
    session.module.eval()
    got_eval = float(session.module(ids, labels))
    got_calib = float(calib.run(["loss"], {INPUT_IDS: ids, LABELS: labels, **adapter})[0])
    print(f"torch {want:.6f} |eval-torch| {abs(got_eval - want):.2e} |calib-torch| {abs(got_calib - want):.2e}")
    assert abs(got_eval - want) < TOL
    assert abs(got_calib - want) < TOL


def test_unsupported_qwen2_variants_name_the_field(qwen_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "m"
    shutil.copytree(qwen_dir, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(cfg | {"use_sliding_window": True}))
    with pytest.raises(ExportError, match=r"use_sliding_window is True, only False is supported"):
        read_hf_model(model)
    (model / "config.json").write_text(json.dumps(cfg | {"model_type": "qwen2_moe"}))
    with pytest.raises(ExportError, match=r"model_type 'qwen2_moe' is not supported; supported: llama, qwen2"):
        read_hf_model(model)


# --- llama.cpp ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_gguf(qwen_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.gguf_base import write_base_gguf

    return write_base_gguf(qwen_dir, tmp_path_factory.mktemp("qwen2-gguf") / "base.gguf")


@pytest.fixture(scope="module")
def generator(qwen_gguf: Path) -> Iterator[Generator]:
    from runtime.llama import Generator

    gen = Generator(qwen_gguf, n_ctx=QWEN2_CONFIG.max_seq, n_threads=2, kv_f32=True)
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def qwen_arch(qwen_dir: Path) -> Architecture:
    return read_hf_model(qwen_dir)[0]


def test_gguf_keeps_hf_row_order_and_qwen2_tokenizer(qwen_dir: Path, qwen_gguf: Path, generator: Generator) -> None:
    import gguf
    from tokenizers import Tokenizer

    reader = gguf.GGUFReader(qwen_gguf)
    fields = {name: f.contents() for name, f in reader.fields.items() if name.startswith(("general.", "tok"))}
    assert fields["general.architecture"] == "qwen2"
    assert fields["tokenizer.ggml.pre"] == "qwen2"
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    _, hf = read_hf_model(qwen_dir)
    # convert_hf_to_gguf.py's Qwen2Model does not permute: llama.cpp's qwen2 uses NEOX RoPE (halves).
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"], hf["model.layers.0.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(tensors["blk.1.attn_k.bias"], hf["model.layers.1.self_attn.k_proj.bias"])
    assert "output.weight" not in tensors  # tied

    tok = Tokenizer.from_file(str(qwen_dir / mf.TOKENIZER))
    for text in ["The quick brown fox 12345", "I'LL say it's   fine\n\n x", "<|im_start|>user\nhi<|im_end|>"]:
        assert generator.tokenize(text) == tok.encode(text).ids, text


def test_qwen2_gguf_reads_back_as_the_hf_model(qwen_dir: Path, qwen_gguf: Path) -> None:
    from export.gguf_source import read_gguf_model

    arch, weights = read_gguf_model(qwen_gguf)
    want_arch, want = read_hf_model(qwen_dir)
    assert arch == want_arch
    assert sorted(weights) == sorted(want)
    for name, w in want.items():  # biases included, q/k rows untouched both ways
        np.testing.assert_array_equal(weights[name], w, err_msg=name)


def test_base_and_adapter_logits_match_transformers(
    qwen_dir: Path, qwen_arch: Architecture, generator: Generator, tmp_path: Path
) -> None:
    ids = list(range(3, 45))
    model = torch_model(qwen_dir)
    with torch.no_grad():
        want_base = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    generator.set_adapter(None)
    err = float(np.max(np.abs(generator.logits(ids) - want_base)) / np.max(np.abs(want_base)))
    print(f"\nbase: relative logit error {err:.2e}")
    assert err < EXACT_TOL

    layout = LoraLayout(targets=ALL_TARGETS, rank=RANK, alpha=ALPHA)
    tensors = random_adapter(lora_shapes(qwen_arch, layout), seed=9, std=0.1)
    want = merged_logits(qwen_dir, ids, tensors, layout)
    generator.set_adapter(write_lora_gguf(tmp_path / "a.gguf", tensors, qwen_arch, layout))
    got = generator.logits(ids)
    moved = float(np.max(np.abs(want - want_base)) / np.max(np.abs(want_base)))
    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    print(f"lora all targets (moves logits by {moved:.2e}): relative logit error {err:.2e}")
    assert moved > 1e-2
    assert err < EXACT_TOL

    # Control: the llama layout (permuted q/k lora_b) on a qwen2 base lands on the wrong channels.
    raw = dict(tensors)
    for layer in range(qwen_arch.n_layers):
        raw[lora.key(layer, "q", "B")] = permute_qk_rows(tensors[lora.key(layer, "q", "B")], qwen_arch.n_heads)
    generator.set_adapter(write_lora_gguf(tmp_path / "wrong.gguf", raw, qwen_arch, layout))
    wrong = float(np.max(np.abs(generator.logits(ids) - want)) / np.max(np.abs(want)))
    generator.set_adapter(None)
    assert wrong > 1e-2, f"expected a permuted q lora_b to be clearly wrong on qwen2, got {wrong:.2e}"
