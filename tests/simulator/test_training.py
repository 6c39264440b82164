"""The shared trainer: ORT gradients + AdamW moments the simulator owns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from alignfed import manifest as mf
from alignfed.adapter import initial_adapter
from alignfed.text import Batch, Batcher
from edge.adamw import AdamW
from edge.trainer import OrtTrainer
from simulator.training import SharedTrainer

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "def add(a, b):\n    return a + b\n",
    "Question: what is two plus three? Answer: five.",
    "A coordinator on the gateway aggregates stale updates after aligning them.",
] * 3
LR = 0.01

Setup = tuple[mf.Manifest, dict[str, np.ndarray], list[Batch]]  # manifest, start adapter, batches


@pytest.fixture(scope="module")
def setup(tiny_bundle: Path) -> Setup:
    m = mf.load(tiny_bundle)
    b = Batcher(TEXTS, tiny_bundle / mf.TOKENIZER, batch=2, seq_len=24, eos_id=0, seed=0)
    batches = [b.make(b.rows[i : i + 2]) for i in range(0, 8, 2)]
    rng = np.random.default_rng(0)
    start = {
        k: (v + 0.05 * rng.normal(size=v.shape)).astype(np.float32) for k, v in initial_adapter(tiny_bundle, m).items()
    }
    return m, start, batches


def _ort_round(trainer: OrtTrainer, start: dict[str, np.ndarray], batches: list[Batch]) -> dict[str, np.ndarray]:
    trainer.load_adapter(start)
    for batch in batches:
        trainer.step(batch)
    return trainer.adapter()


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


def test_adamw_hyperparameters_come_from_the_bundle(tiny_bundle: Path) -> None:
    opt = AdamW.from_model(tiny_bundle / mf.OPTIMIZER_MODEL)
    assert opt.adam_mode == 1 and opt.correct_bias
    assert opt.alpha == pytest.approx(0.9) and opt.beta == pytest.approx(0.999)


def test_a_round_from_fresh_moments_matches_a_fresh_ort_trainer(tiny_bundle: Path, setup: Setup) -> None:
    m, start, batches = setup
    reference = _ort_round(OrtTrainer(tiny_bundle, m, lr=LR, threads=1), start, batches)
    shared = SharedTrainer(tiny_bundle, m)
    shared.train(start, batches[::-1], lr=LR)  # an earlier round of another device
    got = shared.train(start, batches, lr=LR)
    assert _max_diff(reference, got.tensors) < 1e-6
    assert len(got.losses) == len(batches) and all(np.isfinite(got.losses))


def test_a_fresh_ort_optimizer_keeps_the_old_moments(tiny_bundle: Path, setup: Setup) -> None:
    """Why the simulator owns the moments: ORT 1.19 keeps them in the CheckpointState."""
    from onnxruntime.training.api import Optimizer

    m, start, batches = setup
    reference = _ort_round(OrtTrainer(tiny_bundle, m, lr=LR, threads=1), start, batches)
    used = OrtTrainer(tiny_bundle, m, lr=LR, threads=1)
    _ort_round(used, start, batches)
    used.optimizer = Optimizer(str(tiny_bundle / mf.OPTIMIZER_MODEL), used.module)
    used.optimizer.set_learning_rate(LR)
    assert _max_diff(reference, _ort_round(used, start, batches)) > 1e-4


def test_moments_per_device_carry_over_and_per_round_do_not(tiny_bundle: Path, setup: Setup) -> None:
    m, start, batches = setup
    shared = SharedTrainer(tiny_bundle, m)
    fresh_a = shared.train(start, batches, lr=LR).tensors
    fresh_b = shared.train(start, batches, lr=LR).tensors
    assert _max_diff(fresh_a, fresh_b) == 0.0
    moments = shared.fresh_moments()
    first = shared.train(start, batches, lr=LR, moments=moments).tensors
    second = shared.train(start, batches, lr=LR, moments=moments).tensors
    assert _max_diff(first, fresh_a) == 0.0
    assert moments.step == 2 * len(batches)
    assert _max_diff(second, fresh_a) > 1e-5


def test_eval_loss_uses_the_given_adapter(tiny_bundle: Path, setup: Setup) -> None:
    m, start, batches = setup
    shared = SharedTrainer(tiny_bundle, m)
    trained = shared.train(start, batches * 3, lr=LR).tensors
    before = shared.eval_loss(start, batches[0])
    after = shared.eval_loss(trained, batches[0])
    assert after < before
    assert shared.eval_losses(start, batches[:1]) == [before]
