"""Everything the variants of one experiment share: bundle, fleet, data partition, trainer, evaluator.

Built once per experiment, so every strategy runs over the same devices, the same examples on
each device, the same held-out sets and the same seed. Tokenization happens here, once; each run
draws its own batches from per-device random streams (see `engine`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alignfed import manifest as mf
from alignfed.errors import ConfigError
from alignfed.text import Batcher
from coordinator.calibration import CalibrationRunner
from coordinator.strategies.base import AdapterState
from simulator.domains import Domain, builtin_domains, load_domains
from simulator.evaluator import Evaluator
from simulator.fleet import FleetConfig, SimDevice, build_fleet
from simulator.partition import PartitionConfig, label_mix, partition
from simulator.training import RoundTrainer, SharedTrainer

# SharedTrainer (ONNX Runtime, one device at a time) | BatchedTrainer (float32) | BatchedTrainer, bf16 base
TRAINERS = ("ort", "batched", "batched-bf16")


@dataclass(frozen=True, slots=True)
class TestbedConfig:
    bundle: Path
    fleet: FleetConfig = field(default_factory=FleetConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    data: tuple[tuple[str, Path], ...] = ()  # (domain name, file); () = the built-in corpora
    eval_examples: int = 16  # held out per domain
    train_examples: int = 256  # training examples per domain (at most; 0 = all)
    eval_seq_len: int = 64
    calibration_tokens: int = 256
    calibration_data: Path | None = None  # None: the bundle's calibration set (built-in corpora if none)
    threads: int = 1  # ORT intra-op threads for training, evaluation and calibration
    seed: int = 0
    trainer: str = "ort"  # one of TRAINERS

    __test__ = False  # not a pytest test class, despite the name

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ConfigError(f"testbed: threads must be ≥ 1, got {self.threads}")
        if self.eval_seq_len < 2:
            raise ConfigError(f"testbed: eval_seq_len must be ≥ 2, got {self.eval_seq_len}")
        if self.trainer not in TRAINERS:
            raise ConfigError(f"testbed: trainer must be one of {', '.join(TRAINERS)}, got {self.trainer!r}")


@dataclass(frozen=True, slots=True)
class DeviceData:
    """One device's training data: tokenized rows (a Batcher at its profile's batch/seq_len)."""

    batcher: Batcher
    mix: np.ndarray  # (L,) fraction of its examples from each domain
    examples: int


@dataclass(slots=True)
class Testbed:
    config: TestbedConfig
    manifest: mf.Manifest
    bundle_digest: str
    initial: AdapterState
    devices: list[SimDevice]
    domains: list[Domain]
    data: dict[str, DeviceData]  # device id -> data
    trainer: RoundTrainer
    evaluator: Evaluator
    _calibration: CalibrationRunner | None = field(default=None, repr=False)

    __test__ = False  # not a pytest test class, despite the name

    @classmethod
    def build(cls, cfg: TestbedConfig) -> Testbed:
        from alignfed.adapter import initial_adapter

        bundle = Path(cfg.bundle)
        manifest = mf.load(bundle)
        mf.verify(bundle, manifest)
        devices = build_fleet(cfg.fleet)
        too_long = sorted({d.profile.name for d in devices if d.profile.seq_len > manifest.architecture.max_seq})
        if too_long:
            raise ConfigError(
                f"profile(s) {too_long} train at seq_len above the model's {manifest.architecture.max_seq}; "
                "override seq_len"
            )
        domains = (
            load_domains(cfg.data, eval_examples=cfg.eval_examples, train_examples=cfg.train_examples, seed=cfg.seed)
            if cfg.data
            else builtin_domains(eval_examples=cfg.eval_examples, train_examples=cfg.train_examples, seed=cfg.seed)
        )
        texts = [t for d in domains for t in d.train]
        labels = np.array([i for i, d in enumerate(domains) for _ in d.train], dtype=np.int64)  # (m,)
        shards = partition(labels, len(devices), cfg.partition, cfg.seed)
        tokenizer = bundle / mf.TOKENIZER
        eos = int(manifest.tokenizer.get("eos_id", 0))
        data: dict[str, DeviceData] = {}
        for dev, shard in zip(devices, shards, strict=True):
            p = dev.profile
            batcher = Batcher(
                [texts[int(i)] for i in shard], tokenizer, batch=p.batch, seq_len=p.seq_len, eos_id=eos, seed=cfg.seed
            )
            data[dev.device_id] = DeviceData(batcher, label_mix(labels, shard, len(domains)), int(shard.size))
        trainer: RoundTrainer
        if cfg.trainer.startswith("batched"):
            from simulator.batched import BatchedTrainer

            precision = "bf16" if cfg.trainer == "batched-bf16" else "fp32"
            trainer = BatchedTrainer(bundle, manifest, threads=cfg.threads, precision=precision)
        else:
            trainer = SharedTrainer(bundle, manifest, threads=cfg.threads)
        evaluator = Evaluator(
            trainer,
            domains,
            {d: v.mix for d, v in data.items()},
            tokenizer=tokenizer,
            eos_id=eos,
            seq_len=min(cfg.eval_seq_len, manifest.architecture.max_seq),
        )
        initial = AdapterState(
            version=0,
            tensors=initial_adapter(bundle, manifest),
            scale=manifest.lora.scale,
            rank=manifest.lora.rank,
        )
        return cls(
            config=cfg,
            manifest=manifest,
            bundle_digest=mf.bundle_digest(manifest),
            initial=initial,
            devices=devices,
            domains=domains,
            data=data,
            trainer=trainer,
            evaluator=evaluator,
        )

    def calibration(self) -> CalibrationRunner:
        """The coordinator's calibration runner for AlignFed (built on first use, then shared)."""
        if self._calibration is None:
            self._calibration = CalibrationRunner.from_bundle(
                self.config.bundle,
                self.manifest,
                self.config.calibration_data,
                self.config.calibration_tokens,
                seed=self.config.seed,
                threads=self.config.threads,
            )
        return self._calibration

    def domain_names(self) -> Sequence[str]:
        return [d.name for d in self.domains]
