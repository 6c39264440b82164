"""Byzantine-robust aggregation: norm clipping, an update-norm outlier filter, and coordinate-wise
median / trimmed mean, all off by default (DESIGN.md section 8, "robust options").

A buffered strategy hands this module the deltas it would combine, Δ_i (per layer (out, in), kept
as factors U_i V_i), with their weights w_i, and gets back the combined delta per layer. In order:

1. *Outlier filter* (`outlier_factor` f > 0): an update whose norm ‖Δ_i‖_F (over all layers) exceeds
   f × the reference norm is dropped; the kept weights are rescaled so Σw stays what it was
   (FedBuff's (1/K)Σ becomes (1/K′)Σ over the kept). The reference is the smaller of two medians:
   of the buffer's norms, and of the last `norm_window` kept updates' norms. The buffer's alone
   fails when hostile updates are half of a small buffer (K = 3 with 30 % of updates hostile: one
   buffer in five); the history's alone fails while honest norms shrink as training converges (an
   old, larger median lets a tenfold update through); the smaller of the two fails only when both do.
2. *Norm clipping*: Δ_i ← Δ_i · min(1, C/‖Δ_i‖_F), with C = `clip_norm` (absolute) or, when
   `clip_relative` ρ > 0, ρ × that same median norm (the tighter of the two when both are set).
   Exact on factors: only U_i is scaled.
3. *Aggregator*: `mean` is the strategy's own Σ w_i Δ_i (kept factored). `median` and
   `trimmed_mean` take the coordinate-wise median / β-trimmed mean (Yin et al., ICML 2018) of the
   reconstructed dense deltas D_i = U_i V_i over the kept updates and scale it by Σ w_i, so the step
   size the strategy chose (staleness shrinkage, server lr) is kept; per-update weights then only
   decide the step, not the direction. These need the dense (m, out, in) stack, so they cost
   m·out·in floats per layer: robustness, not speed, is the point of them.

Norms are of the (possibly aligned) deltas the strategy is about to combine.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from alignfed.lowrank import Factors
from coordinator.strategies.server_update import combine  # the plain weighted sum Σ w_i Δ_i

Aggregator = Literal["mean", "median", "trimmed_mean"]
AGGREGATORS: tuple[str, ...] = ("mean", "median", "trimmed_mean")


@dataclass(frozen=True, slots=True)
class RobustConfig:
    """The robust options of every buffered strategy (each one a constructor argument there)."""

    aggregator: Aggregator = "mean"  # mean | median | trimmed_mean (coordinate-wise, on dense deltas)
    trim: float = 0.2  # trimmed_mean: fraction cut at each end, in [0, 0.5)
    clip_norm: float = 0.0  # clip each ‖Δ_i‖_F to this bound; 0 = off
    clip_relative: float = 0.0  # clip to this multiple of the reference norm; 0 = off
    outlier_factor: float = 0.0  # drop updates above this multiple of the reference norm; 0 = off
    norm_window: int = 64  # kept-update norms remembered for the median (besides the buffer)

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"robust options: {name} must be {expected}, got {getattr(self, name)!r}")

        if self.aggregator not in AGGREGATORS:
            raise bad("aggregator", f"one of {', '.join(AGGREGATORS)}")
        if not (isinstance(self.trim, int | float) and 0 <= self.trim < 0.5):
            raise bad("trim", "in [0, 0.5)")
        for name in ("clip_norm", "clip_relative"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise bad(name, "a finite number ≥ 0 (0 = off)")
        if not (isinstance(self.outlier_factor, int | float) and math.isfinite(self.outlier_factor)):
            raise bad("outlier_factor", "0 (off) or a finite number > 1")
        if self.outlier_factor != 0 and not self.outlier_factor > 1:
            raise bad("outlier_factor", "0 (off) or a finite number > 1")
        if not (isinstance(self.norm_window, int) and self.norm_window >= 0):
            raise bad("norm_window", "an integer ≥ 0")

    @property
    def enabled(self) -> bool:
        return self.aggregator != "mean" or self.clip_norm > 0 or self.clip_relative > 0 or self.outlier_factor > 0


def update_norm(deltas: Mapping[str, Factors]) -> float:
    """‖Δ‖_F over every layer of one update: √Σ_ℓ ‖U_ℓ V_ℓ‖²_F."""
    return math.sqrt(sum(f.squared_norm() for f in deltas.values()))


def scaled(deltas: Mapping[str, Factors], factor: float) -> dict[str, Factors]:
    """factor · Δ, scaling only U (exact)."""
    return {lid: Factors(u=(factor * f.u.astype(np.float64)).astype(f.u.dtype), v=f.v) for lid, f in deltas.items()}


def coordinate_median(stacked: np.ndarray) -> np.ndarray:
    """Coordinate-wise median over axis 0: (m, out, in) → (out, in)."""
    return np.asarray(np.median(stacked, axis=0))


def trimmed_mean(stacked: np.ndarray, trim: float) -> np.ndarray:
    """Coordinate-wise mean over axis 0 after cutting ⌊trim·m⌋ smallest and largest values of each
    coordinate: (m, out, in) → (out, in). With too few updates to cut any, the plain mean."""
    m = stacked.shape[0]
    cut = math.floor(trim * m)
    if cut == 0:
        return np.asarray(stacked.mean(axis=0))
    ordered = np.sort(stacked, axis=0)
    return np.asarray(ordered[cut : m - cut].mean(axis=0))


def dense_factors(matrix: np.ndarray) -> Factors:
    """A dense (out, in) matrix as exact factors, the identity on the smaller side."""
    out_dim, in_dim = matrix.shape
    if in_dim <= out_dim:
        return Factors(u=matrix, v=np.eye(in_dim))  # (out, in) @ (in, in)
    return Factors(u=np.eye(out_dim), v=matrix)  # (out, out) @ (out, in)


@dataclass(frozen=True, slots=True)
class RobustResult:
    combined: dict[str, Factors]  # layer id -> combined delta
    weights: list[float]  # effective weight per update (0 for dropped; nominal under median/trimmed mean)
    dropped: list[int]  # positions of updates the outlier filter removed
    metrics: dict[str, Any]


class RobustCombiner:
    """Applies a `RobustConfig`; remembers the norms of recently kept updates for the median."""

    def __init__(self, config: RobustConfig | None = None) -> None:
        self.config = config or RobustConfig()
        self._norms: deque[float] = deque(maxlen=max(self.config.norm_window, 1))

    def reference_norm(self, norms: Sequence[float]) -> float:
        """min(median of the buffer's norms, median of the recently kept ones)."""
        medians = [float(np.median(pool)) for pool in (list(norms), list(self._norms)) if pool]
        if self.config.norm_window == 0:
            medians = medians[:1] if norms else []
        return min(medians) if medians else 0.0

    def combine(self, deltas: Sequence[Mapping[str, Factors]], weights: Sequence[float]) -> RobustResult:
        cfg = self.config
        if len(deltas) != len(weights):
            raise ValueError(f"robust: {len(deltas)} deltas but {len(weights)} weights")
        w = [float(x) for x in weights]
        if not cfg.enabled:
            return RobustResult(combined=combine(deltas, w), weights=w, dropped=[], metrics={})
        norms = [update_norm(d) for d in deltas]
        ref = self.reference_norm(norms)
        keep = list(range(len(deltas)))
        if cfg.outlier_factor > 0 and ref > 0:
            # may drop the whole buffer (K = 1, or all hostile against a clean history): the new
            # version then only re-factorizes, and every update is still answered
            keep = [i for i in keep if norms[i] <= cfg.outlier_factor * ref]
        dropped = [i for i in range(len(deltas)) if i not in keep]
        total, kept_total = sum(w), sum(w[i] for i in keep)
        eff = [0.0] * len(w)
        for i in keep:
            eff[i] = w[i] * total / kept_total if kept_total > 0 else total / len(keep)
        bounds = [b for b in (cfg.clip_norm, cfg.clip_relative * ref) if b > 0]
        bound = min(bounds) if bounds else math.inf
        work: list[Mapping[str, Factors]] = []
        clipped = 0
        for i in keep:
            if norms[i] > bound:
                work.append(scaled(deltas[i], bound / norms[i]))
                clipped += 1
            else:
                work.append(deltas[i])
        combined = combine(work, [eff[i] for i in keep]) if cfg.aggregator == "mean" else self._center(work, sum(eff))
        self._norms.extend(norms[i] for i in keep)
        metrics: dict[str, Any] = {
            "robust": cfg.aggregator,
            "update_norms": norms,
            "reference_norm": ref,
            "dropped": len(dropped),
            "clipped": clipped,
        }
        return RobustResult(combined=combined, weights=eff, dropped=dropped, metrics=metrics)

    def _center(self, deltas: Sequence[Mapping[str, Factors]], scale: float) -> dict[str, Factors]:
        """scale · median (or trimmed mean) of the dense deltas, per layer; a layer an update lacks is
        a zero delta of that update."""
        layer_shapes: dict[str, tuple[int, int]] = {}
        for d in deltas:
            for lid, f in d.items():
                layer_shapes.setdefault(lid, f.shape)
        out: dict[str, Factors] = {}
        for lid, shape in layer_shapes.items():
            stacked = np.stack([d[lid].dense() if lid in d else np.zeros(shape) for d in deltas]).astype(
                np.float64
            )  # (m, out, in)
            if self.config.aggregator == "median":
                center = coordinate_median(stacked)
            else:
                center = trimmed_mean(stacked, self.config.trim)
            out[lid] = dense_factors(scale * center)
        return out

    def norms(self) -> list[float]:
        """Norms of recently kept updates, oldest first (to persist and restore)."""
        return list(self._norms)

    def restore_norms(self, norms: Sequence[float]) -> None:
        self._norms.clear()
        self._norms.extend(float(x) for x in norms)
