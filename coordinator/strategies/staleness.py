"""Staleness weights s(τ): how much an update trained on an old global version still counts.

τ = t − v is a difference of version numbers (current global t, the update's base v), never of
clocks. Each weight is a tiny frozen class with `__call__(tau) -> float`, s(0) = 1 and s
non-increasing, in the style of FLSim's `AsyncWeight` classes.

- `Constant`: s(τ) = c (staleness ignored).
- `Polynomial`: s(τ) = (1 + τ)^(−a) (FedAsync, Xie et al. 2019, "polynomial" with exponent a);
  a = 0.5 is FedBuff's 1/√(1 + τ) (Nguyen et al. 2022, Sec. 5), `FEDBUFF`, config name `sqrt`.
- `Hinge`: s(τ) = 1 if τ ≤ b else 1 / (a(τ − b) + 1) (FedAsync's hinge function).

`polynomial(taus, a)` is the vectorised (1 + τ)^(−a) that AlignFed's fairness weights use, so the
freshness factor of every strategy is written once, here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, runtime_checkable

import numpy as np

# The staleness bound in versions, one default for ingest (coordinator.ingest.IngestLimits) and for
# AlignFed's grouping (AlignFedConfig): at 8 the slowest class's updates were all refused
# (docs/decisions.md §14).
TAU_MAX = 32


@runtime_checkable
class StalenessWeight(Protocol):
    def __call__(self, tau: int) -> float: ...


def _check_tau(tau: int) -> int:
    if tau < 0:
        raise ValueError(f"staleness must be ≥ 0, got {tau} (an update based on a future version?)")
    return tau


@dataclass(frozen=True, slots=True)
class Constant:
    """s(τ) = value."""

    value: float = 1.0

    def __post_init__(self) -> None:
        if not self.value > 0:
            raise ValueError(f"constant staleness weight must be > 0, got {self.value}")

    def __call__(self, tau: int) -> float:
        _check_tau(tau)
        return self.value


@dataclass(frozen=True, slots=True)
class Polynomial:
    """s(τ) = (1 + τ)^(−exponent); exponent 0.5 is FedBuff's weight."""

    exponent: float = 0.5

    def __post_init__(self) -> None:
        if self.exponent < 0:
            raise ValueError(f"polynomial staleness exponent must be ≥ 0, got {self.exponent}")

    def __call__(self, tau: int) -> float:
        return float(polynomial([_check_tau(tau)], self.exponent)[0])


def polynomial(taus: Sequence[int] | np.ndarray, exponent: float) -> np.ndarray:
    """(1 + τ)^(−exponent) for every τ (m,) → (m,) float64; τ must be ≥ 0."""
    tau = np.asarray(taus, dtype=np.float64)  # (m,)
    if np.any(tau < 0):
        raise ValueError(f"staleness must be ≥ 0, got {tau.min():g} (an update based on a future version?)")
    return np.power(1.0 + tau, -exponent)


@dataclass(frozen=True, slots=True)
class Hinge:
    """s(τ) = 1 if τ ≤ b else 1 / (a(τ − b) + 1) (FedAsync, Xie et al. 2019); defaults a=10, b=4."""

    a: float = 10.0
    b: int = 4

    def __post_init__(self) -> None:
        if self.a < 0 or self.b < 0:
            raise ValueError(f"hinge staleness needs a ≥ 0 and b ≥ 0, got a={self.a}, b={self.b}")

    def __call__(self, tau: int) -> float:
        if _check_tau(tau) <= self.b:
            return 1.0
        return 1.0 / (self.a * (tau - self.b) + 1.0)


FEDBUFF = Polynomial(0.5)  # 1/√(1 + τ): the default of FedBuff and FedAsync

KINDS: dict[str, Callable[..., StalenessWeight]] = {
    "constant": Constant,
    "polynomial": Polynomial,
    "hinge": Hinge,
    "sqrt": partial(Polynomial, 0.5),
}


def make(spec: str | StalenessWeight, **params: Any) -> StalenessWeight:
    """A weight from a config name (`constant`, `polynomial`, `hinge`, `sqrt`) and its parameters.

    An object that already is a weight is returned as is (then `params` must be empty).
    """
    if not isinstance(spec, str):
        if params:
            raise ValueError(f"staleness parameters {sorted(params)} given with a ready-made weight {spec!r}")
        return spec
    kind = KINDS.get(spec)
    if kind is None:
        raise ValueError(f"unknown staleness weight {spec!r}; expected one of {', '.join(KINDS)}")
    try:
        return kind(**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters {params} for staleness weight {spec!r}: {exc}") from None
