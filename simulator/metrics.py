"""What one simulated run measured, and the summary row an experiment table shows for it.

- time-to-target: the first virtual time at which the mean held-out eval loss is ≤ the target.
- final / worst-device loss: of the last global version (worst device = the largest mix of domain
  losses in the proportions of a device's own data).
- late mean loss: the mean eval loss over the evaluations of the run's second half (t ≥ T/2, T the
  last evaluation's time). Asynchronous curves move by a few percent between evaluations once
  they flatten; one point is a noisy measure of where a run ended, the second half's mean less so.
- Jain's index of contributions: over every device of the fleet (those that never contributed
  count as 0) of the summed aggregation weights their updates received.
- staleness: τ = version aggregated on − base version, for every update folded in.
- bytes up/down: real encoded sizes of every update sent and every global version delivered.
- coordinator CPU: process time spent inside the strategy's add / ready / aggregate (with
  AlignFed's calibration forward passes), the only host-dependent number here.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from alignfed.sizes import format_bytes
from coordinator.fairness import jain_index
from coordinator.strategies.base import AdapterState
from simulator.events import Event


@dataclass(frozen=True, slots=True)
class EvalPoint:
    time: float
    version: int
    mean: float
    worst_domain: float
    worst_device: float
    per_domain: Mapping[str, float]
    per_device: Mapping[str, float]


@dataclass(frozen=True, slots=True)
class AccuracyPoint:
    time: float
    version: int
    accuracy: float


@dataclass(slots=True)
class RunResult:
    variant: str
    strategy: str
    devices: list[str]
    events: list[Event] = field(default_factory=list)
    curve: list[EvalPoint] = field(default_factory=list)
    accuracy: list[AccuracyPoint] = field(default_factory=list)
    accepted: Counter[str] = field(default_factory=Counter)  # device -> accepted updates
    rejected: Counter[str] = field(default_factory=Counter)  # device -> rejected updates
    folded: Counter[str] = field(default_factory=Counter)  # device -> updates folded into a version
    weight: dict[str, float] = field(default_factory=dict)  # device -> Σ aggregation weights
    staleness: Counter[int] = field(default_factory=Counter)  # τ at aggregation -> count
    alignment: list[Mapping[str, float]] = field(default_factory=list)  # per aggregation: layer -> ρ
    bytes_up: int = 0
    bytes_down: int = 0
    cpu_s: float = 0.0
    rounds: int = 0
    end_time: float = 0.0  # virtual time of the last event processed
    wall_limited: bool = False  # stopped by the wall-clock limit before the horizon
    final: AdapterState | None = None

    def add_weight(self, device: str, w: float) -> None:
        self.weight[device] = self.weight.get(device, 0.0) + float(w)

    @property
    def versions(self) -> int:
        return self.final.version if self.final is not None else 0


def time_to_target(curve: Sequence[EvalPoint], target: float | None) -> float | None:
    if target is None:
        return None
    for p in curve:
        if p.mean <= target:
            return p.time
    return None


def contributions(run: RunResult) -> dict[str, float]:
    """device -> Σ aggregation weights, every device of the fleet (0 when it never counted)."""
    return {d: run.weight.get(d, 0.0) for d in run.devices}


def mean_alignment_residual(run: RunResult) -> float | None:
    values = [r for m in run.alignment for r in m.values()]
    return float(np.mean(values)) if values else None


@dataclass(frozen=True, slots=True)
class Summary:
    """One row of the experiment table."""

    variant: str
    time_to_target_s: float | None
    final_loss: float
    late_loss: float
    worst_device_loss: float
    accuracy: float | None
    jain: float
    bytes_up: int
    bytes_down: int
    cpu_s: float
    versions: int
    accepted: int
    rejected: int
    mean_staleness: float
    alignment_residual: float | None

    def cells(self) -> dict[str, str]:
        def num(x: float | None, fmt: str) -> str:
            return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

        return {
            "variant": self.variant,
            "time-to-target (s)": num(self.time_to_target_s, ".0f"),
            "final eval loss": num(self.final_loss, ".4f"),
            "late mean loss": num(self.late_loss, ".4f"),
            "worst-device loss": num(self.worst_device_loss, ".4f"),
            "accuracy": num(self.accuracy, ".3f"),
            "Jain's index": num(self.jain, ".3f"),
            "bytes up": format_bytes(self.bytes_up),
            "bytes down": format_bytes(self.bytes_down),
            "coordinator CPU (s)": num(self.cpu_s, ".3f"),
            "versions": str(self.versions),
            "accepted / rejected": f"{self.accepted} / {self.rejected}",
            "mean staleness": num(self.mean_staleness, ".2f"),
            "alignment residual": num(self.alignment_residual, ".3f"),
        }


def late_mean(curve: Sequence[EvalPoint]) -> float:
    """Mean eval loss over the evaluations at t ≥ T/2, T the last evaluation's time (nan if none)."""
    if not curve:
        return math.nan
    half = curve[-1].time / 2
    return float(np.mean([p.mean for p in curve if p.time >= half]))


def summarize(run: RunResult, target: float | None) -> Summary:
    last = run.curve[-1] if run.curve else None
    taus = run.staleness
    n = sum(taus.values())
    return Summary(
        variant=run.variant,
        time_to_target_s=time_to_target(run.curve, target),
        final_loss=last.mean if last else math.nan,
        late_loss=late_mean(run.curve),
        worst_device_loss=last.worst_device if last else math.nan,
        accuracy=run.accuracy[-1].accuracy if run.accuracy else None,
        jain=jain_index(contributions(run).values()),
        bytes_up=run.bytes_up,
        bytes_down=run.bytes_down,
        cpu_s=run.cpu_s,
        versions=run.versions,
        accepted=sum(run.accepted.values()),
        rejected=sum(run.rejected.values()),
        mean_staleness=sum(t * c for t, c in taus.items()) / n if n else 0.0,
        alignment_residual=mean_alignment_residual(run),
    )
