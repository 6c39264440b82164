"""Differential test: llama.cpp logits on the exported GGUFs vs transformers' LlamaForCausalLM.

With an F32 base and an F32 KV cache both sides compute in float32 from the same weights and
differ only in summation order: measured max |diff| is ~1e-6 at a logit scale (max |logit|) of
~2.6, so `EXACT_TOL` = 1e-5 relative leaves a 10x margin yet is far below any layout mistake.
llama.cpp's default F16 KV cache rounds K and V to 11 significant bits (~5e-4 relative); through
the attention that gives ~2e-4 relative, hence `F16_KV_TOL` = 1e-3 for the serving setting.
A wrong row order in any projection (e.g. q's lora_b without the RoPE permutation) moves logits
by >1e-1 relative.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from alignfed import lora
from alignfed.gguf_adapter import permute_qk_rows, write_lora_gguf
from alignfed.manifest import Architecture, LoraLayout
from runtime.llama import Generator

from .conftest import TorchReference, random_lora

EXACT_TOL = 1e-5  # max |llama.cpp - torch| / max |torch logit|, F32 KV cache
F16_KV_TOL = 1e-3  # same, llama.cpp's default F16 KV cache
RANK, ALPHA = 4, 8.0
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def unpermute_qk_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `permute_qk_rows`: GGML interleaved rows -> HF rotate_half rows."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, f"expected logits of shape {want.shape}, got {got.shape}"
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def report(label: str, got: np.ndarray, want: np.ndarray) -> float:
    err = rel_error(got, want)
    print(f"\n{label}: max abs err {np.max(np.abs(got - want)):.3e}, relative {err:.3e}", end="")
    return err


def test_permutation_is_a_bijection_per_head() -> None:
    w = np.arange(4 * 16 * 3, dtype=np.float32).reshape(64, 3)
    p = permute_qk_rows(w, 4)
    np.testing.assert_array_equal(unpermute_qk_rows(p, 4), w)
    # Within head 0 (16 rows), HF rows j and j+8 rotate together; GGML puts them at 2j and 2j+1.
    np.testing.assert_array_equal(p[0:2, 0], [w[0, 0], w[8, 0]])
    np.testing.assert_array_equal(p[14:16, 0], [w[7, 0], w[15, 0]])


@pytest.mark.parametrize("kv", ["f32", "f16"])
def test_base_logits_match_transformers(
    kv: str,
    generator: Generator,
    exact_generator: Generator,
    torch_ref: TorchReference,
    token_ids: list[int],
) -> None:
    gen, tol = (exact_generator, EXACT_TOL) if kv == "f32" else (generator, F16_KV_TOL)
    gen.set_adapter(None)
    err = report(f"base, {kv} KV cache", gen.logits(token_ids), torch_ref.logits(token_ids))
    assert err < tol, f"expected relative logit error < {tol}, got {err:.3e}"


@pytest.mark.parametrize("targets", [("q",), ("k",), ("v",), ALL_TARGETS], ids="+".join)
def test_adapter_logits_match_merged_transformers(
    targets: tuple[str, ...],
    exact_generator: Generator,
    torch_ref: TorchReference,
    arch: Architecture,
    token_ids: list[int],
    tmp_path: Path,
) -> None:
    layout = LoraLayout(targets=targets, rank=RANK, alpha=ALPHA)
    tensors = random_lora(arch, layout, seed=len(targets) * 7 + ord(targets[0][0]))
    path = write_lora_gguf(tmp_path / "adapter.gguf", tensors, arch, layout)

    exact_generator.set_adapter(path)
    got = exact_generator.logits(token_ids)
    exact_generator.set_adapter(None)
    want = torch_ref.logits(token_ids, tensors, layout)
    moved = rel_error(torch_ref.logits(token_ids), want)
    err = report(f"lora {'+'.join(targets)} (moves logits by {moved:.3e})", got, want)
    assert moved > 1e-2, f"expected the adapter to move logits visibly, got {moved:.3e}"
    assert err < EXACT_TOL, f"expected relative logit error < {EXACT_TOL}, got {err:.3e}"


def test_adapter_logits_with_f16_kv_cache(
    generator: Generator,
    torch_ref: TorchReference,
    arch: Architecture,
    token_ids: list[int],
    tmp_path: Path,
) -> None:
    layout = LoraLayout(targets=ALL_TARGETS, rank=RANK, alpha=ALPHA)
    tensors = random_lora(arch, layout, seed=5)
    generator.set_adapter(write_lora_gguf(tmp_path / "adapter.gguf", tensors, arch, layout))
    got = generator.logits(token_ids)
    generator.set_adapter(None)
    err = report("lora all targets, f16 KV cache", got, torch_ref.logits(token_ids, tensors, layout))
    assert err < F16_KV_TOL, f"expected relative logit error < {F16_KV_TOL}, got {err:.3e}"


def test_unpermuted_q_lora_b_is_clearly_wrong(
    exact_generator: Generator,
    torch_ref: TorchReference,
    arch: Architecture,
    token_ids: list[int],
    tmp_path: Path,
) -> None:
    """Control: undo the permutation the writer applies, so the file holds HF-order lora_b."""
    layout = LoraLayout(targets=("q",), rank=RANK, alpha=ALPHA)
    tensors = random_lora(arch, layout, seed=99)
    right = write_lora_gguf(tmp_path / "right.gguf", tensors, arch, layout)
    raw = dict(tensors)
    for layer in range(arch.n_layers):
        b = lora.key(layer, "q", "B")
        raw[b] = unpermute_qk_rows(tensors[b], arch.n_heads)
    wrong = write_lora_gguf(tmp_path / "wrong.gguf", raw, arch, layout)

    want = torch_ref.logits(token_ids, tensors, layout)
    exact_generator.set_adapter(right)
    err_right = report("lora q, permuted lora_b", exact_generator.logits(token_ids), want)
    exact_generator.set_adapter(wrong)
    err_wrong = report("lora q, unpermuted lora_b", exact_generator.logits(token_ids), want)
    exact_generator.set_adapter(None)
    assert err_right < EXACT_TOL
    assert err_wrong > 1e-2, f"expected the unpermuted lora_b to be clearly wrong, got {err_wrong:.3e}"
