"""Real local training for every simulated device on ONE shared ONNX Runtime trainer.

All devices share one `edge.trainer.OrtTrainer` (one copy of the base weights in memory): a round
loads the device's start adapter, runs forward + backward in ORT for each batch, and updates the
LoRA tensors with AdamW.

Optimizer state. In onnxruntime-training 1.19 the AdamW moments and step count live in the
`CheckpointState`, not in the `Optimizer` object: a new `Optimizer` finds them there and reuses
them (`Optimizer::LoadStateDict`; measured here: after earlier steps, a fresh Optimizer object
does not reproduce a fresh trainer's first round, max |Δw| ≈ 3e-2), and the Python API offers no
way to clear them. So the simulator keeps the moments itself: ORT computes the gradients
(`Parameter.grad`), and `edge.adamw.AdamW` applies the exact update of ORT's `AdamWOptimizer` kernel
with the hyper-parameters read from the bundle's `optimizer_model.onnx` (`edge.adamw`). The
moments belong to a `Moments` object the caller owns:
- a fresh `Moments` per round (the default, `optimizer="round"` in the engine): a round's result
  depends only on its start adapter and the device's batches;
- one `Moments` per device (`optimizer="device"`): the moments carry over between a device's
  rounds, as in the edge daemon, whose trainer lives as long as the process.
A round from fresh moments matches a fresh OrtTrainer to float32 rounding (tested).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from alignfed import manifest as mf
from alignfed.text import Batch
from edge.adamw import AdamW, Moments


@dataclass(frozen=True, slots=True)
class TrainResult:
    tensors: dict[str, np.ndarray]  # the adapter after training, canonical keys
    losses: list[float]  # training loss of every step (before its update)


@dataclass(frozen=True, slots=True)
class TrainJob:
    """One device's round: start adapter, its batches, its learning rate, its moments (None: fresh)."""

    start: Mapping[str, np.ndarray]
    batches: Sequence[Batch]
    lr: float
    moments: Moments | None = None


class RoundTrainer(Protocol):
    """What the engine and the evaluator need of a trainer (ORT `SharedTrainer`, `BatchedTrainer`)."""

    names: list[str]
    shapes: dict[str, tuple[int, ...]]
    steps: int

    def fresh_moments(self) -> Moments: ...

    def train_many(self, jobs: Sequence[TrainJob]) -> list[TrainResult]: ...

    def eval_losses(self, tensors: Mapping[str, np.ndarray], batches: Iterable[Batch]) -> list[float]: ...


class SharedTrainer:
    """One ORT training session used by every simulated device, one round at a time."""

    def __init__(self, bundle: Path, manifest: mf.Manifest, *, threads: int = 1) -> None:
        from edge.trainer import OrtTrainer

        self._ort = OrtTrainer(Path(bundle), manifest, lr=0.0, threads=threads)
        self.names: list[str] = list(self._ort.names)
        self.shapes: dict[str, tuple[int, ...]] = {n: tuple(s) for n, s in self._ort.shapes.items()}
        self.adamw = AdamW.from_model(Path(bundle) / mf.OPTIMIZER_MODEL)
        self.steps = 0  # optimizer steps run, for cost accounting

    def fresh_moments(self) -> Moments:
        return Moments.zeros(self.shapes)

    def train(
        self, start: Mapping[str, np.ndarray], batches: Iterable[Batch], *, lr: float, moments: Moments | None = None
    ) -> TrainResult:
        """Train from `start` on `batches`; `moments=None` starts from zero moments."""
        from runtime.ort import set_params

        state = moments if moments is not None else self.fresh_moments()
        self._ort.load_adapter(start)
        module, ckpt = self._ort.module, self._ort.state
        params = {n: np.asarray(start[n], dtype=np.float32) for n in self.names}
        losses: list[float] = []
        for batch in batches:
            module.train()
            losses.append(float(np.asarray(module(batch.input_ids, batch.labels))))  # forward + backward
            grads = {n: np.array(ckpt.parameters[n].grad, dtype=np.float32, copy=True) for n in self.names}
            params = self.adamw.update(params, grads, state, lr)
            set_params(ckpt, params)
            module.lazy_reset_grad()
            self.steps += 1
        return TrainResult(tensors={n: np.array(params[n], copy=True) for n in self.names}, losses=losses)

    def train_many(self, jobs: Sequence[TrainJob]) -> list[TrainResult]:
        """Each job in turn (ORT trains one adapter at a time)."""
        return [self.train(j.start, j.batches, lr=j.lr, moments=j.moments) for j in jobs]

    def eval_loss(self, tensors: Mapping[str, np.ndarray], batch: Batch) -> float:
        self._ort.load_adapter(tensors)
        return self._ort.eval_loss(batch)

    def eval_losses(self, tensors: Mapping[str, np.ndarray], batches: Iterable[Batch]) -> list[float]:
        """Eval loss of each batch under one adapter (loaded once)."""
        self._ort.load_adapter(tensors)
        return [self._ort.eval_loss(b) for b in batches]
