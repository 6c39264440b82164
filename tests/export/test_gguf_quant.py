"""Quantized GGUF bases made by llama.cpp's own quantizer from the exporter's F32 GGUF.

Q8_0 logits vs F32 logits (both F32 KV cache, relative to max |logit| ~2.6): measured 1.3e-2 on
the tiny model. Q8_0 rounds every weight to int8 times an f16 block scale (up to ~0.4 % of the
block's largest weight) and llama.cpp also rounds the activations to Q8_0 before each quantized
matmul; through two random layers and the output projection that compounds to ~1 %. `Q8_TOL`
keeps a 2x margin; a wrong layout (q/k rows, names) moves logits by tens of percent.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from alignfed.errors import ExportError
from export.gguf_base import write_base_gguf
from export.gguf_quant import check_quant, quantize_gguf
from runtime.llama import Generator

Q8_TOL = 3e-2
IDS = list(range(3, 60))


@pytest.fixture(scope="module")
def f32_gguf(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_base_gguf(tiny_dir, tmp_path_factory.mktemp("quant") / "f32.gguf")


def _logits(path: Path) -> np.ndarray:
    """(T, vocab) logits of IDS, all-float32 pipeline apart from the weights' quantization."""
    with Generator(path, n_ctx=128, n_threads=2, kv_f32=True) as gen:
        return gen.logits(IDS)


def _types(path: Path) -> tuple[int, dict[str, str]]:
    reader = gguf.GGUFReader(path)
    return int(reader.fields["general.file_type"].contents()), {t.name: t.tensor_type.name for t in reader.tensors}


def test_q8_0_loads_and_is_close_to_f32(f32_gguf: Path, tmp_path: Path) -> None:
    out = quantize_gguf(f32_gguf, tmp_path / "q8.gguf", "Q8_0")
    file_type, types = _types(out)
    assert file_type == gguf.LlamaFileType.MOSTLY_Q8_0
    assert {t for n, t in types.items() if not n.endswith("_norm.weight")} == {"Q8_0"}
    assert {types[n] for n in types if n.endswith("_norm.weight")} == {"F32"}  # norms stay F32
    assert out.stat().st_size < 0.4 * f32_gguf.stat().st_size

    got, want = _logits(out), _logits(f32_gguf)
    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    print(f"\nQ8_0 vs F32: relative logit error {err:.2e}")
    assert 0 < err < Q8_TOL


def test_q4_k_m_falls_back_on_rows_not_divisible_by_256(f32_gguf: Path, tmp_path: Path) -> None:
    """K-quants pack 256 values per block; hidden 64 is not a multiple, so llama.cpp picks its
    fallback types per tensor (Q4_K -> Q5_0, Q6_K -> Q8_0) while the file says Q4_K_M."""
    out = quantize_gguf(f32_gguf, tmp_path / "q4km.gguf", "Q4_K_M")
    file_type, types = _types(out)
    assert file_type == gguf.LlamaFileType.MOSTLY_Q4_K_M
    matrices = {t for n, t in types.items() if not n.endswith("_norm.weight")}
    assert not matrices & {"Q4_K", "Q5_K", "Q6_K"}, matrices
    assert matrices <= {"Q5_0", "Q5_1", "Q8_0", "Q4_0", "Q4_1"}, matrices
    got = _logits(out)
    assert np.isfinite(got).all()


def test_bad_requests_are_refused(f32_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"GGUF quantization 'Q3_XL' is not supported; supported: F32, F16, Q8_0"):
        check_quant("Q3_XL")
    with pytest.raises(ExportError, match=r"GGUF to quantize not found"):
        quantize_gguf(tmp_path / "missing.gguf", tmp_path / "out.gguf", "Q8_0")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ExportError, match=r"llama.cpp could not quantize to Q8_0"):
        quantize_gguf(tmp_path / "junk.gguf", tmp_path / "out.gguf", "Q8_0")
    assert not (tmp_path / "out.gguf").exists()
