"""Local LoRA training with PyTorch: the backend for devices without ONNX Runtime training (aarch64).

onnxruntime-training has no aarch64 wheels, so Raspberry Pis and Jetsons train with this class. The
network is `edge.torch_network.TorchNetwork` (the bundle's ONNX graph in PyTorch, on the same
frozen base weights) with one adapter; gradients come from autograd; the update is
`edge.adamw.AdamW` with the bundle's optimizer hyper-parameters, i.e. the ORT kernel's, so a
device's result does not depend on which backend it runs.

Where it trains is `edge.accelerator`'s choice (a Jetson's GPU when the profile allows it, else the
CPU, the reason logged); before training, `edge.selfcheck` proves this torch multiplies correctly
on that device (torch's SVE kernels were seen to compute wrong products).

`lean=True` (what the daemon runs on the CPU) keeps the int8 base int8 in memory
(edge/lean_linear.py), reads it from the bundle one tensor at a time (edge/onnx_weights.py) and
computes the LM head and loss in chunks of tokens (edge/chunked_loss.py); `checkpoint=True` also
recomputes each decoder layer in backward instead of keeping its activations (the profile's
`checkpointing = "layers"`). `lean=False` is the plain fp32 path, the reference the lean one is
measured against.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from alignfed import manifest as mf
from alignfed import protocol
from alignfed.errors import TrainingError
from alignfed.text import Batch
from edge import selfcheck
from edge.accelerator import Placement, choose
from edge.adamw import AdamW, Moments
from edge.torch_network import TorchNetwork, base_weights, import_torch

__all__ = ["TorchTrainer", "base_weights"]


class TorchTrainer:
    """The `edge.trainer.Trainer` protocol on PyTorch (CPU, or CUDA when `accelerator` = "cuda")."""

    def __init__(
        self,
        bundle: Path,
        manifest: mf.Manifest,
        *,
        lr: float,
        threads: int,
        accelerator: str = "cpu",
        placement: Placement | None = None,
        lean: bool = True,
        checkpoint: bool = False,
        loss_chunk: int = 128,
        embedding: str = "fp32",
    ) -> None:
        torch = self._torch = import_torch()
        torch.set_num_threads(max(1, threads))
        self.placement = placement or choose(torch, accelerator)
        self.device, self.compute = self.placement.device, self.placement.dtype(torch)
        selfcheck.check_matmul(torch)  # the CPU path always runs (embedding, norms, a CUDA fallback)
        if self.device != "cpu" or self.compute != torch.float32:
            selfcheck.check_matmul(torch, device=self.device, dtype=self.compute)
        self.lr = lr
        self.shapes = manifest.lora_shapes()
        self.names = sorted(self.shapes)
        self.optimizer = AdamW.from_model(Path(bundle) / mf.OPTIMIZER_MODEL)
        self.moments = Moments.zeros(self.shapes)
        self.net = TorchNetwork(
            bundle,
            manifest,
            device=self.device,
            compute=self.compute,
            # lean is the CPU's fp32 path; mixed precision (a Jetson's GPU) holds its base in half instead
            lean=lean and self.device == "cpu" and self.compute == torch.float32,
            checkpoint=checkpoint,
            loss_chunk=loss_chunk,
            embedding=embedding,
        )
        self.w = self.net.w
        self.params: dict[str, Any] = {}
        init = Path(bundle) / mf.ADAPTER_INIT
        if init.is_file():
            tensors, _ = protocol.unpack(init.read_bytes(), max_bytes=init.stat().st_size)
            self.load_adapter(tensors)
        else:
            self.load_adapter({n: np.zeros(s, np.float32) for n, s in self.shapes.items()})

    # -- adapter in and out -------------------------------------------------------------------

    def load_adapter(self, tensors: Mapping[str, np.ndarray]) -> None:
        torch = self._torch
        for name in self.names:
            if name not in tensors:
                raise TrainingError(f"adapter has no tensor {name}")
            if tuple(tensors[name].shape) != self.shapes[name]:
                raise TrainingError(
                    f"adapter tensor {name} has shape {tensors[name].shape}, expected {self.shapes[name]}"
                )
        self.params = {
            n: torch.tensor(np.asarray(tensors[n], dtype=np.float32), device=self.device, requires_grad=True)
            for n in self.names
        }

    def adapter(self) -> dict[str, np.ndarray]:
        return {n: p.detach().cpu().numpy().copy() for n, p in self.params.items()}

    # -- training -----------------------------------------------------------------------------

    def step(self, batch: Batch) -> float:
        loss = self._loss(batch)
        for p in self.params.values():
            p.grad = None
        loss.backward()
        grads = {n: p.grad.cpu().numpy() for n, p in self.params.items()}
        new = self.optimizer.update(self.adapter(), grads, self.moments, self.lr)
        self.load_adapter(new)
        return float(loss.detach())

    def eval_loss(self, batch: Batch) -> float:
        with self._torch.no_grad():
            return float(self._loss(batch))

    def _loss(self, batch: Batch) -> Any:
        one = {n: p.unsqueeze(0) for n, p in self.params.items()}  # (1, r, in) / (1, out, r): one adapter
        return self.net.losses(batch.input_ids, batch.labels, one)[0]
