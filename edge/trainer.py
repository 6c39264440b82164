"""Local LoRA training with ONNX Runtime on-device training (the default backend).

The bundle's training artifacts hold the frozen base and the LoRA tensors as the only trainable
parameters; this class moves adapter tensors in and out by canonical name and runs optimizer steps.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from alignfed import manifest as mf
from alignfed.errors import TrainingError
from alignfed.text import Batch


class Trainer(Protocol):
    """What the daemon and the simulator need from a training backend."""

    def load_adapter(self, tensors: Mapping[str, np.ndarray]) -> None: ...
    def adapter(self) -> dict[str, np.ndarray]: ...
    def step(self, batch: Batch) -> float: ...
    def eval_loss(self, batch: Batch) -> float: ...


class OrtTrainer:
    def __init__(self, bundle: Path, manifest: mf.Manifest, *, lr: float, threads: int) -> None:
        try:
            import onnxruntime.training.api  # noqa: F401 - only to name the missing extra
        except ImportError as exc:
            raise TrainingError(
                "onnxruntime-training is not installed; install the edge extra on x86_64, "
                "or use a profile with trainer = 'torch' on aarch64"
            ) from exc
        from runtime.ort import open_session, session_options

        self.names = sorted(manifest.lora_shapes())
        self.shapes = manifest.lora_shapes()
        # Without the arena ORT frees activations between steps: peak RSS of SmolLM2 int8 training
        # at 4×64 drops from 1.47 GB to 1.22 GB at the same step time (benchmarks/bench_export.py).
        # Spinning stays on: steps run back to back and nothing else on the board wants the cores.
        opts = session_options(threads=threads, spinning=True, arena=False)
        session = open_session(Path(bundle) / mf.TRAIN_DIR, learning_rate=lr, session_options=opts)
        self.state, self.module, self.optimizer = session.state, session.module, session.optimizer

    def load_adapter(self, tensors: Mapping[str, np.ndarray]) -> None:
        from runtime.ort import set_params

        for name in self.names:
            if tuple(tensors[name].shape) != self.shapes[name]:
                raise TrainingError(
                    f"adapter tensor {name} has shape {tensors[name].shape}, expected {self.shapes[name]}"
                )
        set_params(self.state, {n: np.ascontiguousarray(tensors[n], dtype=np.float32) for n in self.names})

    def adapter(self) -> dict[str, np.ndarray]:
        from runtime.ort import get_params

        return get_params(self.state, self.names)

    def step(self, batch: Batch) -> float:
        self.module.train()
        loss = self.module(batch.input_ids, batch.labels)
        self.optimizer.step()
        self.module.lazy_reset_grad()
        return float(np.asarray(loss))

    def eval_loss(self, batch: Batch) -> float:
        self.module.eval()
        return float(np.asarray(self.module(batch.input_ids, batch.labels)))
