"""A device capped at LoRA rank k trains a rank-k adapter in the bundle's rank-r graph, on both backends.

The bundle's training artifacts are exported at one rank r. A capped device loads the global
adapter truncated to rank k (components k..r zero, `alignfed.adapter.truncate`) into that graph:
the zero rows of A and columns of B get exactly zero gradients (each is a product with the other
factor's zero) and AdamW leaves a zero parameter with zero moments at zero, so the rank-r graph
trains exactly the rank-k adapter. Checked here against a bundle exported at rank k (same base,
alpha scaled so s = alpha/r is the same) for ONNX Runtime and PyTorch alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from alignfed import lora
from alignfed import manifest as mf
from alignfed.adapter import compute_deltas, initial_adapter, truncate
from alignfed.text import Batch

K = 2  # the cap; the tiny bundle's rank is 4 (alpha 8, s = 2)
LR = 0.02
STEPS = 4


@pytest.fixture(scope="module")
def rank_k_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """The tiny bundle's base with LoRA rank K and alpha 4, so s = alpha/r = 2 as in `tiny_bundle`."""
    from export.bundle import export_bundle

    out = tmp_path_factory.mktemp("tiny-bundle-rank2")
    export_bundle(tiny_model, out, targets=("q", "v"), rank=K, alpha=4.0, quantization="fp32", seed=0, write_gguf=False)
    return out


def _trainer(backend: str, bundle: Path, m: mf.Manifest) -> Any:
    if backend == "ort":
        from edge.trainer import OrtTrainer

        return OrtTrainer(bundle, m, lr=LR, threads=1)
    from edge.torch_trainer import TorchTrainer

    return TorchTrainer(bundle, m, lr=LR, threads=1)


def _batches(vocab: int) -> list[Batch]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(STEPS):
        ids = rng.integers(0, vocab, size=(2, 16)).astype(np.int64)
        out.append(Batch(input_ids=ids, labels=ids.copy()))
    return out


def _first(tensors: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """The first k components: A's rows, B's columns."""
    return {n: np.ascontiguousarray(t[:k] if n.endswith(".A") else t[:, :k]) for n, t in tensors.items()}


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_the_rank_r_graph_trains_a_rank_k_adapter(
    backend: str, tiny_bundle: Path, rank_k_bundle: Path, tmp_path: Path
) -> None:
    m, m_k = mf.load(tiny_bundle), mf.load(rank_k_bundle)
    assert (m.lora.rank, m_k.lora.rank, m.lora.scale) == (4, K, m_k.lora.scale)
    rng = np.random.default_rng(3)
    # a global whose product has full rank 4, as after a few aggregations
    glob = {n: t + rng.normal(0, 0.05, t.shape).astype(np.float32) for n, t in initial_adapter(tiny_bundle, m).items()}
    start = truncate(glob, m, K)
    batches = _batches(m.architecture.vocab)

    capped = _trainer(backend, tiny_bundle, m)
    capped.load_adapter(start)
    losses = [capped.step(b) for b in batches]
    trained = capped.adapter()

    native = _trainer(backend, rank_k_bundle, m_k)
    native.load_adapter(_first(start, K))
    native_losses = [native.step(b) for b in batches]

    for n, t in trained.items():  # components beyond K never moved off zero: not even by rounding
        assert not (t[K:] if n.endswith(".A") else t[:, K:]).any(), n
    assert any(not np.array_equal(trained[n], start[n]) for n in trained)  # ... the first K did
    np.testing.assert_allclose(losses, native_losses, rtol=1e-5)
    for n, t in _first(trained, K).items():
        np.testing.assert_allclose(t, native.adapter()[n], atol=2e-6, rtol=1e-5)

    deltas = compute_deltas(trained, start, m, rank=K)
    for lid, f in deltas.items():  # what the device sends: rank ≤ 2k, the change from its start
        assert f.rank == 2 * K
        want = lora.product(trained, lid, m.lora.scale) - lora.product(start, lid, m.lora.scale)
        np.testing.assert_allclose(f.dense(), want, atol=1e-6)
