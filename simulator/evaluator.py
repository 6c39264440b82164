"""Held-out evaluation of a global adapter: eval loss per domain, mean, worst domain, per device.

Each domain's held-out examples are tokenized once into fixed batches (at most `chunk` rows each);
a domain's loss is the token-weighted mean over its batches. A device's loss is the mix of domain
losses in the proportions of its own training data (Σ_d p_{i,d} · loss_d), so the worst-device
loss needs no forward pass beyond the per-domain ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignfed.text import Batch, Batcher
from simulator.domains import Domain
from simulator.training import RoundTrainer

EVAL_CHUNK = 16  # rows per eval batch: bounds activation memory on real models


@dataclass(frozen=True, slots=True)
class Evaluation:
    per_domain: dict[str, float]  # domain -> eval loss
    per_device: dict[str, float]  # device -> mix of domain losses

    @property
    def mean(self) -> float:
        """Mean over domains (each domain counts the same)."""
        return float(np.mean(list(self.per_domain.values())))

    @property
    def worst_domain(self) -> float:
        return max(self.per_domain.values())

    @property
    def worst_device(self) -> float:
        return max(self.per_device.values()) if self.per_device else self.worst_domain


class Evaluator:
    def __init__(
        self,
        trainer: RoundTrainer,
        domains: Sequence[Domain],
        mixes: Mapping[str, np.ndarray],
        *,
        tokenizer: Path,
        eos_id: int,
        seq_len: int,
        chunk: int = EVAL_CHUNK,
    ) -> None:
        """`mixes[device]` (L,): the device's fraction of training examples from each domain."""
        self.trainer = trainer
        self.domains = [d.name for d in domains]
        self.mixes = {dev: np.asarray(m, dtype=np.float64) for dev, m in mixes.items()}
        self._batches: dict[str, list[Batch]] = {}
        for d in domains:
            batcher = Batcher(list(d.eval), tokenizer, batch=chunk, seq_len=seq_len, eos_id=eos_id, seed=0)
            rows = batcher.rows
            self._batches[d.name] = [batcher.make(rows[i : i + chunk]) for i in range(0, len(rows), chunk)]

    def evaluate(self, tensors: Mapping[str, np.ndarray]) -> Evaluation:
        flat = [b for name in self.domains for b in self._batches[name]]
        losses = iter(self.trainer.eval_losses(tensors, flat))  # the adapter is loaded once
        per_domain: dict[str, float] = {}
        for name in self.domains:
            batches = self._batches[name]
            got = np.array([next(losses) for _ in batches])
            tokens = np.array([b.tokens for b in batches], dtype=np.float64)
            per_domain[name] = float(np.dot(got, tokens) / tokens.sum())
        vec = np.array([per_domain[n] for n in self.domains])  # (L,)
        per_device = {dev: float(mix @ vec) for dev, mix in self.mixes.items()}
        return Evaluation(per_domain=per_domain, per_device=per_device)
