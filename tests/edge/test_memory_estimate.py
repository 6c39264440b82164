"""The daemon's memory estimate per training backend, against growth measured in fresh processes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from alignfed import manifest as mf
from alignfed.profiles import base_parameters, estimate_memory_mb
from benchmarks.bench_train_memory import measure


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_estimate_covers_measured_growth_without_wasting_the_board(tiny_bundle: Path, backend: str) -> None:
    m = mf.load(tiny_bundle)
    got = measure(tiny_bundle, backend, 2, 32)
    est = estimate_memory_mb(tiny_bundle, m, 2, 32, backend)
    assert got <= est <= 1.6 * got + 50, (backend, got, est)


def test_torch_sizes_the_dequantized_base_whatever_the_bundle(tmp_path: Path, tiny_bundle: Path) -> None:
    """torch keeps the whole base in fp32 (4 bytes a parameter) for int8 and fp32 bundles alike; ORT's
    int8 bundle adds the fp32 copies of its dequantized projections to what its files hold."""
    m = mf.load(tiny_bundle)
    grown = replace(m.architecture, n_layers=30, hidden=576, intermediate=1536, vocab=49152)  # SmolLM2-135M
    fp32, int8 = replace(m, architecture=grown, train_quantization="fp32"), replace(m, train_quantization="int8")
    int8 = replace(int8, architecture=grown)
    fp32_base_mb = 4 * base_parameters(grown) / 2**20
    torch_fp32, torch_int8 = (estimate_memory_mb(tmp_path, x, 2, 64, "torch") for x in (fp32, int8))
    ort_fp32, ort_int8 = (estimate_memory_mb(tmp_path, x, 2, 64, "ort") for x in (fp32, int8))
    assert torch_fp32 == torch_int8 > fp32_base_mb
    assert 0.5 * fp32_base_mb < ort_int8 - ort_fp32 < fp32_base_mb  # the projections: most, not all, of the base
