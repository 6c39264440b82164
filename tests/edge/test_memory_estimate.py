"""The training-memory estimate per backend (`edge.memory_fit`), against growth measured in fresh processes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from alignfed import manifest as mf
from alignfed.profiles import DeviceProfile, load_profile
from benchmarks.bench_train_memory import measure
from edge.memory_fit import training_memory_mb

# How far above the measured growth the estimate may sit on the tiny model. PyTorch's fixed overhead
# also covers the allocator retention the lean trainer showed on the larger bases (edge/memory_fit.py),
# which the tiny model does not have; ORT's is the tiny model's runtime growth plus a margin.
SLACK_MB = {"torch": 300.0, "ort": 100.0}

# SmolLM2-135M's published shape: 30 layers, hidden 576, 9 heads of 64 (3 KV), intermediate 1536.
SMOLLM2: dict[str, Any] = dict(
    n_layers=30, hidden=576, intermediate=1536, n_heads=9, n_kv_heads=3, vocab=49152, attn_head_dim=64
)
SMOLLM2_PROJECTION_PARAMS = 30 * (2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536)  # q, o; k, v; gate, up, down


def _profile(trainer: str, batch: int, seq_len: int) -> DeviceProfile:
    return replace(load_profile("x86-laptop"), trainer=trainer, batch=batch, seq_len=seq_len, checkpointing="none")


@pytest.mark.parametrize("backend", ["torch", "ort"])
def test_estimate_covers_measured_growth_without_wasting_the_board(tiny_bundle: Path, backend: str) -> None:
    m = mf.load(tiny_bundle)
    got = measure(tiny_bundle, backend, 2, 32)
    est = training_memory_mb(m, _profile(backend, 2, 32))
    print(f"\n{backend}: measured growth {got:.0f} MB, estimate {est:.0f} MB")
    assert got <= est <= got + SLACK_MB[backend], (backend, got, est)


def test_each_backend_sizes_an_int8_base_as_it_holds_it(tiny_bundle: Path) -> None:
    """The lean PyTorch trainer keeps an int8 base int8 (1 byte a projection parameter, not 4); ONNX
    Runtime holds the int8 base and the float32 copies of the projections it dequantizes, so an int8
    bundle costs it one byte a projection parameter more than an fp32 one."""
    m = mf.load(tiny_bundle)
    arch = replace(m.architecture, **SMOLLM2)
    fp32 = replace(m, architecture=arch, train_quantization="fp32")
    int8 = replace(m, architecture=arch, train_quantization="int8")
    mb = SMOLLM2_PROJECTION_PARAMS / 2**20
    torch_fp32, torch_int8 = (training_memory_mb(x, _profile("torch", 2, 64)) for x in (fp32, int8))
    ort_fp32, ort_int8 = (training_memory_mb(x, _profile("ort", 2, 64)) for x in (fp32, int8))
    assert torch_fp32 - torch_int8 == pytest.approx(3 * mb, rel=0.01)  # less the int8 scales (0.6 MB)
    assert ort_int8 - ort_fp32 == pytest.approx(mb, rel=0.01)  # plus the int8 scales
