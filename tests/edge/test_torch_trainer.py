"""The PyTorch trainer backend trains exactly like the ORT one on the same bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from alignfed import manifest as mf
from alignfed.text import Batch
from edge.torch_trainer import TorchTrainer
from edge.trainer import OrtTrainer

LR = 0.01


def _batches(vocab: int, n: int, seed: int = 0) -> list[Batch]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, vocab, size=(2, 16)).astype(np.int64)
        labels = ids.copy()
        labels[1, 12:] = -100  # padding is ignored by both
        out.append(Batch(input_ids=ids, labels=labels))
    return out


@pytest.fixture(scope="module", params=[("llama", "fp32"), ("llama", "int8"), ("qwen2", "fp32")])
def bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.bundle import export_bundle
    from export.synthetic import write_tiny_llama, write_tiny_qwen2

    family, quant = request.param
    work = tmp_path_factory.mktemp(f"{family}-{quant}")
    model = (write_tiny_llama if family == "llama" else write_tiny_qwen2)(work / "model")
    targets = ("q", "k", "v", "o", "gate", "up", "down")
    export_bundle(
        model, work / "bundle", targets=targets, rank=4, alpha=8.0, quantization=quant, seed=0, write_gguf=False
    )
    return work / "bundle"


def test_same_losses_and_adapter_as_ort(bundle: Path) -> None:
    m = mf.load(bundle)
    ort, torch_ = OrtTrainer(bundle, m, lr=LR, threads=1), TorchTrainer(bundle, m, lr=LR, threads=1)
    start = ort.adapter()
    for name, t in torch_.adapter().items():  # both start from the bundle's initial adapter
        np.testing.assert_array_equal(t, start[name])
    rng = np.random.default_rng(1)
    nonzero = {
        n: (rng.normal(0, 0.05, t.shape) if n.endswith(".B") else t).astype(np.float32) for n, t in start.items()
    }
    ort.load_adapter(nonzero)
    torch_.load_adapter(nonzero)
    batches = _batches(m.architecture.vocab, 4)
    assert torch_.eval_loss(batches[0]) == pytest.approx(ort.eval_loss(batches[0]), rel=1e-5)
    for b in batches:
        assert torch_.step(b) == pytest.approx(ort.step(b), rel=1e-4)
    got, want = torch_.adapter(), ort.adapter()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=2e-5, err_msg=name)
    moved = max(float(np.abs(want[n] - nonzero[n]).max()) for n in want)
    assert moved > 10 * 2e-5  # the comparison is not between two unchanged adapters


def test_wrong_adapter_shape_is_refused(bundle: Path) -> None:
    from alignfed.errors import TrainingError

    m = mf.load(bundle)
    t = TorchTrainer(bundle, m, lr=LR, threads=1)
    bad = t.adapter()
    name = sorted(bad)[0]
    bad[name] = np.zeros((1, 1), np.float32)
    with pytest.raises(TrainingError, match=f"{name} has shape"):
        t.load_adapter(bad)
