"""Many devices' local steps in one PyTorch pass: the simulator's fast trainer.

Devices whose rounds the engine trains together (see `engine`: every round started before the
earliest of them must end) take their i-th steps in one pass of `edge.torch_network.TorchNetwork`:
their batches are concatenated row-wise, the frozen base runs once over all rows, each device's
LoRA applies to its own rows by a batched matmul over devices, and the loss of each device is its
own token mean. The devices' adapters share no parameter, so the gradient each receives from the
summed loss is its own loss's gradient; each keeps its own `edge.adamw.Moments` and learning rate,
and the update is `edge.adamw.AdamW` with the bundle's hyper-parameters (the ORT kernel's). A
device's round therefore equals its round on the ORT `SharedTrainer` up to float32 rounding
(tested in tests/simulator/test_batched.py).

Devices whose batches differ in shape (profiles with other batch sizes or sequence lengths) go in
separate passes, one per shape; a device with fewer local steps drops out after its last. The pass
runs on a CUDA GPU when PyTorch sees one, otherwise on the CPU.

`precision="bf16"` keeps the frozen base and its products in bfloat16 (the adapters, AdamW, norms
and the loss stay float32, as on a Jetson's GPU): CPUs with AMX or AVX-512 BF16 run those matmuls
4–6× faster than float32. Rounds then track ORT's within bfloat16's rounding instead of equalling
them (tests/simulator/test_batched.py states the tolerances); float32 stays the default.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alignfed import manifest as mf
from alignfed.errors import TrainingError
from alignfed.text import Batch
from edge.accelerator import choose
from edge.adamw import AdamW, Moments
from edge.torch_network import TorchNetwork, import_torch
from simulator.training import TrainJob, TrainResult

EVAL_ROWS = 64  # rows per evaluation pass: bounds activation memory on real models
PRECISIONS = ("fp32", "bf16")  # dtype of the frozen base and its products


class BatchedTrainer:
    """The engine's trainer interface (`simulator.training.RoundTrainer`) on batched PyTorch passes."""

    def __init__(
        self, bundle: Path, manifest: mf.Manifest, *, threads: int = 1, device: str = "auto", precision: str = "fp32"
    ) -> None:
        if precision not in PRECISIONS:
            raise TrainingError(f"batched trainer: precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self._torch = torch = import_torch()
        torch.set_num_threads(max(1, threads))
        # float32 on a GPU too unless asked: the simulated rounds then match ORT's (tests/simulator/test_batched.py)
        self.device = choose(torch, device, half=False, strict=True).device
        self.precision = precision
        compute = torch.bfloat16 if precision == "bf16" else torch.float32
        self.net = TorchNetwork(Path(bundle), manifest, device=self.device, compute=compute)
        self.shapes: dict[str, tuple[int, ...]] = {n: tuple(s) for n, s in manifest.lora_shapes().items()}
        self.names: list[str] = sorted(self.shapes)
        self.adamw = AdamW.from_model(Path(bundle) / mf.OPTIMIZER_MODEL)
        self.steps = 0  # device-steps run, for cost accounting
        self.passes = 0  # batched forward + backward passes run

    def fresh_moments(self) -> Moments:
        return Moments.zeros(self.shapes)

    def train(
        self, start: Mapping[str, np.ndarray], batches: Iterable[Batch], *, lr: float, moments: Moments | None = None
    ) -> TrainResult:
        return self.train_many([TrainJob(start, list(batches), lr, moments)])[0]

    def train_many(self, jobs: Sequence[TrainJob]) -> list[TrainResult]:
        """Every job's round, the i-th steps of all jobs with at least i steps batched together."""
        for j in jobs:
            self._check(j.start)
        params = [{n: np.asarray(j.start[n], dtype=np.float32) for n in self.names} for j in jobs]
        states = [j.moments if j.moments is not None else self.fresh_moments() for j in jobs]
        losses: list[list[float]] = [[] for _ in jobs]
        for i in range(max((len(j.batches) for j in jobs), default=0)):
            groups: dict[tuple[int, ...], list[int]] = defaultdict(list)  # batch shape -> jobs
            for k, j in enumerate(jobs):
                if i < len(j.batches):
                    groups[tuple(j.batches[i].input_ids.shape)].append(k)
            for members in groups.values():
                got, grads = self._pass([jobs[k].batches[i] for k in members], [params[k] for k in members])
                for row, k in enumerate(members):
                    params[k] = self.adamw.update(params[k], grads[row], states[k], jobs[k].lr)
                    losses[k].append(got[row])
                self.steps += len(members)
                self.passes += 1
        return [
            TrainResult(tensors={n: p[n].copy() for n in self.names}, losses=ls)
            for p, ls in zip(params, losses, strict=True)
        ]

    def _pass(
        self, batches: Sequence[Batch], params: Sequence[Mapping[str, np.ndarray]]
    ) -> tuple[list[float], list[dict[str, np.ndarray]]]:
        """Forward + backward of D devices' batches: (each loss, each gradient)."""
        torch = self._torch
        stacked = {  # A: (D, r, in), B: (D, out, r)
            n: torch.tensor(np.stack([p[n] for p in params]), device=self.device, requires_grad=True)
            for n in self.names
        }
        ids = np.concatenate([b.input_ids for b in batches])  # (D·B, T)
        labels = np.concatenate([b.labels for b in batches])
        loss = self.net.losses(ids, labels, stacked)  # (D,)
        loss.sum().backward()  # adapters are disjoint: d's gradient is that of loss d alone
        grads = {n: t.grad.detach().cpu().numpy() for n, t in stacked.items()}  # (D, ...)
        each = [float(x) for x in loss.detach().cpu().numpy()]
        return each, [{n: grads[n][d] for n in self.names} for d in range(len(batches))]

    def eval_loss(self, tensors: Mapping[str, np.ndarray], batch: Batch) -> float:
        return self.eval_losses(tensors, [batch])[0]

    def eval_losses(self, tensors: Mapping[str, np.ndarray], batches: Iterable[Batch]) -> list[float]:
        """Eval loss of each batch under one adapter; batches of one shape share a pass (the adapter
        repeated once per batch, so each batch's loss is its own mean)."""
        torch = self._torch
        self._check(tensors)
        todo = list(batches)
        out: list[float] = [0.0] * len(todo)
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for k, b in enumerate(todo):
            by_shape[tuple(b.input_ids.shape)].append(k)
        one = {n: torch.tensor(np.asarray(tensors[n], dtype=np.float32), device=self.device) for n in self.names}
        with torch.no_grad():
            for shape, members in by_shape.items():
                per = max(1, EVAL_ROWS // max(1, shape[0]))  # batches per pass
                for s in range(0, len(members), per):
                    chunk = members[s : s + per]
                    rep = {n: t.unsqueeze(0).expand(len(chunk), *t.shape) for n, t in one.items()}  # (D, ...)
                    ids = np.concatenate([todo[k].input_ids for k in chunk])
                    labels = np.concatenate([todo[k].labels for k in chunk])
                    got = self.net.losses(ids, labels, rep).cpu().numpy()  # (D,)
                    for k, v in zip(chunk, got, strict=True):
                        out[k] = float(v)
        return out

    def _check(self, tensors: Mapping[str, Any]) -> None:
        for name in self.names:
            if name not in tensors:
                raise TrainingError(f"adapter has no tensor {name}")
            if tuple(np.shape(tensors[name])) != self.shapes[name]:
                raise TrainingError(
                    f"adapter tensor {name} has shape {np.shape(tensors[name])}, expected {self.shapes[name]}"
                )
