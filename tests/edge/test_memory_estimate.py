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


def test_torch_sizes_the_dequantized_base_not_the_ort_files(tmp_path: Path, tiny_bundle: Path) -> None:
    """An int8 bundle's ORT files hold 1 byte a weight; the torch backend keeps 4 (fp32) whatever the files."""
    m = mf.load(tiny_bundle)
    a = m.architecture
    grown = replace(a, n_layers=30, hidden=576, intermediate=1536, vocab=49152)  # SmolLM2-135M's shape
    big = replace(m, architecture=grown)
    fp32_base_mb = 4 * base_parameters(grown) / 2**20
    assert estimate_memory_mb(tmp_path, big, 2, 64, "torch") > fp32_base_mb  # no files: still the base
    assert estimate_memory_mb(tmp_path, big, 2, 64, "ort") < fp32_base_mb / 2  # ORT: only what its files hold
