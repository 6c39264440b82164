"""The PyTorch trainer backend trains exactly like the ORT one on the same bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

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


# The fp32 reference path; the lean one (int8 kept int8, chunked loss); lean with every decoder layer
# recomputed in backward and a loss chunk (7 rows) that splits the 30 scored tokens unevenly.
MODES = {"fp32": {"lean": False}, "lean": {"lean": True}, "lean-ckpt": {"checkpoint": True, "loss_chunk": 7}}


# Tolerances: both backends run float32 with the same weights (dequantized by the same formula),
# so they differ only in summation order (matmul blocking, chunked vs one-pass log-softmax):
# ~1e-7 relative per op, amplified through 2 layers and 4 AdamW steps. Loss to rel 1e-5 (eval)
# and 1e-4 (training, after the adapter has moved); adapters to 2e-5 absolute, 10x below the
# smallest movement the last assert demands, so a wrong gradient cannot pass.
@pytest.mark.parametrize("mode", sorted(MODES))
def test_same_losses_and_adapter_as_ort(bundle: Path, mode: str) -> None:
    m = mf.load(bundle)
    ort = OrtTrainer(bundle, m, lr=LR, threads=1)
    torch_ = TorchTrainer(bundle, m, lr=LR, threads=1, **MODES[mode])  # type: ignore[arg-type]
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


def test_lean_trainer_keeps_the_int8_base_int8(bundle: Path) -> None:
    """The int8 bundle's projections stay int8 (a quarter of fp32) and no fp32 copy is held."""
    from edge.lean_linear import Int8Weight

    m = mf.load(bundle)
    lean = TorchTrainer(bundle, m, lr=LR, threads=1)
    int8 = {n: w for n, w in lean.w.items() if isinstance(w, Int8Weight)}
    if m.train_quantization != "int8":
        assert not int8
        return
    projections = [n for n in lean.w if n.endswith("_proj.weight")]
    assert projections and sorted(int8) == sorted(projections)
    for w in int8.values():
        assert w.q_t.dtype == torch.int8


def _saved_bytes(trainer: TorchTrainer, batch: Batch) -> int:
    """Bytes autograd keeps for backward during one forward (what a training step holds)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.dtype != torch.int8:  # int8 weights are the base itself, not a new allocation
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer._loss(batch)
    return total


def test_lean_and_checkpointing_keep_less_for_backward(bundle: Path) -> None:
    m = mf.load(bundle)
    batch = _batches(m.architecture.vocab, 1)[0]
    plain, lean, ckpt = (TorchTrainer(bundle, m, lr=LR, threads=1, **MODES[k]) for k in ("fp32", "lean", "lean-ckpt"))  # type: ignore[arg-type]
    saved = [_saved_bytes(t, batch) for t in (plain, lean, ckpt)]
    assert saved[0] > saved[1] > saved[2], saved
    # what the fp32 path keeps and the lean one does not: the (N, V) logits and their softmax
    n = batch.input_ids.shape[0] * (batch.input_ids.shape[1] - 1)
    assert saved[0] - saved[1] >= 4 * n * m.architecture.vocab
