"""Cross-version semantic alignment of stale deltas (AlignFed stage 2, arXiv 2606.08197).

A device trained on global version v; its delta D (out, in) of layer ℓ changed that layer's
outputs on the calibration batch by X_v Dᵀ, where X_v (n, in) are the layer's inputs under
adapter v. Upstream layers have moved since, so on the current version t the same D acts on
X_t instead. Alignment finds D′ that makes the intended change on version t, ridge-regularised
towards D:

    D′ = argmin ‖X_t D′ᵀ − X_v Dᵀ‖²_F + λ‖D′ − D‖²_F = D · P,
    P  = (X_vᵀ X_t + λI)(X_tᵀ X_t + λI)⁻¹                                  (in, in)

In factor form D = U V (U: (out, k), V: (k, in)) only V changes, V′ = V P, so the rank is kept.
P is never formed: V′ᵀ = (X_tᵀX_t + λI)⁻¹ (X_tᵀ (X_v Vᵀ) + λVᵀ) is one Cholesky solve with k
right-hand sides, and the Cholesky factor is shared by every group aligned onto t. With fewer
calibration tokens than input features (n < in) the factor is of the (n, n) X_tX_tᵀ + λI and the
solve goes through Woodbury's identity (`TargetSolve`).

λ is unit-free: `lam` is relative to the mean eigenvalue of X_tᵀX_t, λ = lam · tr(X_tᵀX_t) / in,
so rescaling the activations (or changing the calibration batch size n) leaves P unchanged.
Directions of D that the calibration inputs never excite are kept as they are (P acts as the
identity on the null space of X_t), so a small calibration batch cannot erase them.

The relative residual ρ = ‖X_t D′ᵀ − X_v Dᵀ‖_F / ‖X_v Dᵀ‖_F says how well version t can
reproduce the intended change; it becomes the confidence c = exp(−ρ/ρ₀). When X_v == X_t
(nothing upstream drifted; layer 0 always) P = I exactly and no solve runs.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import scipy.linalg

from alignfed.lowrank import Factors
from coordinator.strategies.base import AdapterState


@runtime_checkable
class ActivationSource(Protocol):
    """Runs the calibration mini-batch through the base model with `state`'s adapter.

    Returns layer id -> the inputs X (n, in) entering that adapted layer (the same n calibration
    tokens for every call). The live coordinator runs the bundle's ONNX calibration model.
    """

    def activations(self, state: AdapterState) -> Mapping[str, np.ndarray]: ...


class ActivationCache:
    """Activations per global version, least recently used evicted beyond `capacity` versions.

    Stored as float16 by default (the design's memory budget: n × in × layers per version);
    a layer whose values do not fit float16 is kept in float32.

    `prefetch(state)` starts the forward pass of a version on one background thread, so the
    calibration run of a version just published overlaps the ingest of the next updates instead of
    sitting on the next aggregation's path (ONNX Runtime releases the GIL while it runs). Only the
    calling thread touches the cache: a prefetched result is stored when `get` collects it.
    """

    def __init__(self, source: ActivationSource, capacity: int = 10, dtype: type[np.floating] = np.float16) -> None:
        if capacity < 2:
            raise ValueError(f"alignment: the activation cache must hold ≥ 2 versions (v and t), got {capacity}")
        self.source = source
        self.capacity = capacity
        self.dtype = dtype
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._pending: dict[int, Future[dict[str, np.ndarray]]] = {}
        self._worker: ThreadPoolExecutor | None = None
        self.forward_passes = 0  # calls into the source, for metrics and tests
        self.wait_s = 0.0  # time `get` spent computing or waiting for activations

    def prefetch(self, state: AdapterState) -> None:
        """Compute `state`'s activations in the background (no-op if cached or under way)."""
        if state.version in self._cache or state.version in self._pending:
            return
        self._pending[state.version] = self.worker().submit(self._compute, state)
        for v in [v for v in self._pending if v < state.version - self.capacity]:
            self._pending.pop(v).cancel()  # never collected: too old to be needed

    def pending(self, version: int) -> Future[dict[str, np.ndarray]] | None:
        """The prefetch under way for `version`, if any."""
        return self._pending.get(version)

    def worker(self) -> ThreadPoolExecutor:
        """The one background thread (created on first use)."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="calibration")
        return self._worker

    def get(self, state: AdapterState) -> Mapping[str, np.ndarray]:
        hit = self._cache.get(state.version)
        if hit is not None:
            self._cache.move_to_end(state.version)
            return hit
        start = time.perf_counter()
        pending = self._pending.pop(state.version, None)
        stored = pending.result() if pending is not None else self._compute(state)
        self.wait_s += time.perf_counter() - start
        self.forward_passes += 1
        self._cache[state.version] = stored
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return stored

    def close(self) -> None:
        """Stop the background thread (pending prefetches are dropped)."""
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()
        if self._worker is not None:
            self._worker.shutdown(wait=True, cancel_futures=True)
            self._worker = None

    def _compute(self, state: AdapterState) -> dict[str, np.ndarray]:
        acts = self.source.activations(state)
        return {lid: self._compact(np.asarray(x)) for lid, x in acts.items()}

    def cached(self, version: int) -> Mapping[str, np.ndarray] | None:
        return self._cache.get(version)

    def versions(self) -> list[int]:
        return list(self._cache)

    def _compact(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 2:
            raise ValueError(f"alignment: activations must be (n, in), got shape {x.shape}")
        with np.errstate(over="ignore"):
            small = x.astype(self.dtype)
        return small if np.all(np.isfinite(small)) else x.astype(np.float32)


def ridge(trace: float, in_dim: int, lam: float) -> float:
    """λ = lam · tr(X_tᵀX_t) / in (tr(X_tX_tᵀ) is the same); a tiny floor keeps an all-zero X solvable."""
    mean_eig = trace / in_dim
    return lam * mean_eig if mean_eig > 0 else max(lam, 1e-12)


@dataclass(frozen=True, slots=True)
class TargetSolve:
    """The part of the solve that depends only on X_t (n, in): a Cholesky factor, in the smaller space.

    With n ≥ in, the factor is that of G = X_tᵀX_t + λI (in, in). With n < in — 256 calibration
    tokens against 576–1536 input features on a 0.1–1 B model — it is that of S = X_tX_tᵀ + λI
    (n, n), and G⁻¹R follows from Woodbury's identity, G⁻¹ = (I − X_tᵀS⁻¹X_t)/λ: forming S costs
    n²·in instead of n·in², factoring it n³/3 instead of in³/3 (7× and 200× less at n = 256,
    in = 1536). Both have the same condition number on X_t's row space, (μ_max + λ)/λ.
    """

    x_t: np.ndarray  # (n, in), float64
    lam: float  # absolute λ
    chol: tuple[np.ndarray, bool]  # scipy cho_factor of G (in, in), or of S (n, n) when `dual`
    dual: bool = False  # True: `chol` factors S = X_tX_tᵀ + λI and the solve goes through Woodbury

    @classmethod
    def of(cls, x_t: np.ndarray, lam: float) -> TargetSolve:
        x = np.asarray(x_t, dtype=np.float64)  # (n, in)
        n, in_dim = x.shape
        dual = n < in_dim
        gram = x @ x.T if dual else x.T @ x  # (n, n) or (in, in); same trace, same non-zero spectrum
        # λ is relative to the mean eigenvalue of X_tᵀX_t (in, in): tr / in, whichever gram was formed
        absolute = ridge(float(np.trace(gram)), in_dim, lam)
        gram[np.diag_indices_from(gram)] += absolute
        chol = scipy.linalg.cho_factor(gram, lower=True, check_finite=False)
        return cls(x_t=x, lam=absolute, chol=chol, dual=dual)

    def align(self, v: np.ndarray, x_v: np.ndarray) -> np.ndarray:
        """V′ = V P for V (k, in), without forming P."""
        v64 = np.asarray(v, dtype=np.float64)  # (k, in)
        return self.align_intended(v64, np.asarray(x_v, dtype=np.float64) @ v64.T)

    def align_intended(self, v64: np.ndarray, intended: np.ndarray) -> np.ndarray:
        """V′ = V P given X_v Vᵀ (n, k) already computed; V (k, in) float64."""
        rhs = self.x_t.T @ intended + self.lam * v64.T  # R (in, k)
        if not self.dual:
            return np.asarray(scipy.linalg.cho_solve(self.chol, rhs, check_finite=False)).T  # (k, in)
        inner = scipy.linalg.cho_solve(self.chol, self.x_t @ rhs, check_finite=False)  # S⁻¹X_tR (n, k)
        aligned: np.ndarray = ((rhs - self.x_t.T @ inner) / self.lam).T  # G⁻¹R = (R − X_tᵀS⁻¹X_tR)/λ, (k, in)
        return aligned


def transfer(x_v: np.ndarray, x_t: np.ndarray, lam: float) -> np.ndarray:
    """The explicit P (in, in) — for inspection and tests; alignment itself never forms it."""
    solve = TargetSolve.of(x_t, lam)
    in_dim = solve.x_t.shape[1]
    return solve.align(np.eye(in_dim), x_v)


def residual(u: np.ndarray, v: np.ndarray, v_aligned: np.ndarray, x_v: np.ndarray, x_t: np.ndarray) -> float | None:
    """ρ = ‖X_t (U V′)ᵀ − X_v (U V)ᵀ‖_F / ‖X_v (U V)ᵀ‖_F via (n, k) products only.

    None when D has no effect on the calibration batch (X_v Dᵀ = 0): there is nothing to measure.
    """
    intended = np.asarray(x_v, dtype=np.float64) @ np.asarray(v, dtype=np.float64).T  # (n, k)
    achieved = np.asarray(x_t, dtype=np.float64) @ np.asarray(v_aligned, dtype=np.float64).T  # (n, k)
    return residual_of(u, intended, achieved)


def residual_of(u: np.ndarray, intended: np.ndarray, achieved: np.ndarray) -> float | None:
    """`residual` from X_v Vᵀ and X_t V′ᵀ (n, k), already computed."""
    u64 = np.asarray(u, dtype=np.float64)  # (out, k)
    gram_u = u64.T @ u64  # (k, k): ‖E Uᵀ‖²_F = Σ (E UᵀU) ∘ E
    err = achieved - intended  # (n, k)
    den = float(np.sum((intended @ gram_u) * intended))
    if den <= 0:
        return None
    num = max(float(np.sum((err @ gram_u) * err)), 0.0)
    return math.sqrt(num / den)


def confidence(rho: float, rho0: float) -> float:
    """c = exp(−ρ/ρ₀)."""
    return math.exp(-rho / rho0)


@dataclass(frozen=True, slots=True)
class GroupAlignment:
    """One version group aligned onto the current version."""

    deltas: list[dict[str, Factors]]  # the group's deltas with V′ = V P, same order as given
    rho: dict[str, float]  # layer id -> ρ of the group's summed delta (layers it affects)
    identity: list[str] = field(default_factory=list)  # layers where X_v == X_t (P = I, skipped)
    missing: list[str] = field(default_factory=list)  # layers without activations (left as is)

    def mean_rho(self) -> float:
        """Mean ρ over the layers the group's delta affects (0 when none)."""
        return float(np.mean(list(self.rho.values()))) if self.rho else 0.0


class Aligner:
    """Aligns version groups onto the current version; caches activations and Cholesky factors."""

    def __init__(
        self,
        source: ActivationSource,
        *,
        lam: float = 1e-2,
        cache_versions: int = 10,
        cache_dtype: type[np.floating] = np.float16,
    ) -> None:
        if not (np.isfinite(lam) and lam > 0):
            raise ValueError(f"alignment: lam (relative ridge λ) must be > 0, got {lam}")
        self.lam = lam
        self.cache = ActivationCache(source, capacity=cache_versions, dtype=cache_dtype)
        self._solves: dict[str, TargetSolve] = {}  # layer id -> solve for version `_solve_version`
        self._solve_version: int | None = None
        self._pending_solves: dict[int, Future[dict[str, TargetSolve]]] = {}

    def prefetch(self, state: AdapterState) -> None:
        """Calibrate `state` and factor its X_tᵀX_t + λI in the background: everything aligning a
        group onto it needs, except the per-group products (see `ActivationCache.prefetch`)."""
        self.cache.prefetch(state)
        pending = self.cache.pending(state.version)
        if pending is None or state.version in self._pending_solves:
            return
        worker = self.cache.worker()
        self._pending_solves = {state.version: worker.submit(self._factor_all, pending)}

    def _factor_all(self, acts: Future[dict[str, np.ndarray]]) -> dict[str, TargetSolve]:
        return {lid: TargetSolve.of(x, self.lam) for lid, x in acts.result().items()}

    def _target(self, version: int) -> None:
        """Make `_solves` those of `version` (collecting a prefetched set when there is one)."""
        if self._solve_version == version:
            return
        pending = self._pending_solves.pop(version, None)
        self._solves = pending.result() if pending is not None else {}
        self._solve_version = version

    def close(self) -> None:
        """Stop the background thread."""
        for f in self._pending_solves.values():
            f.cancel()
        self._pending_solves.clear()
        self.cache.close()

    def align_group(
        self, deltas: Sequence[Mapping[str, Factors]], old: AdapterState | int, new: AdapterState
    ) -> GroupAlignment:
        """Align every delta of the group trained on `old` onto `new` (V′ = V P per layer).

        `old` may be just a version number when its activations are already cached.
        """
        if isinstance(old, AdapterState):
            acts_v = self.cache.get(old)
            old_version = old.version
        else:
            cached = self.cache.cached(old)
            if cached is None:
                raise KeyError(f"alignment: no cached activations for version {old} and no adapter given")
            acts_v, old_version = cached, old
        acts_t = self.cache.get(new)
        self._target(new.version)
        layer_ids = sorted({lid for d in deltas for lid in d})
        aligned: list[dict[str, Factors]] = [dict(d) for d in deltas]
        rho: dict[str, float] = {}
        identity: list[str] = []
        missing: list[str] = []
        for lid in layer_ids:
            x_v, x_t = acts_v.get(lid), acts_t.get(lid)  # (n, in) each
            if x_v is None or x_t is None:
                missing.append(lid)
                continue
            if x_v.shape != x_t.shape:
                raise ValueError(
                    f"alignment: layer {lid} activations {x_v.shape} on v{old_version}, {x_t.shape} on v{new.version}"
                )
            if np.array_equal(x_v, x_t):
                identity.append(lid)  # nothing upstream drifted: P = I, ρ = 0
                rho[lid] = 0.0
                continue
            solve = self._solves.get(lid)
            if solve is None:
                solve = self._solves[lid] = TargetSolve.of(x_t, self.lam)
            members = [(i, f) for i, d in enumerate(deltas) if (f := d.get(lid)) is not None]
            if not members:
                continue
            # every member at once: V stacked (Σk, in), one product with X_v, one solve
            v_all = np.concatenate([np.asarray(f.v, dtype=np.float64) for _, f in members], axis=0)
            intended = np.asarray(x_v, dtype=np.float64) @ v_all.T  # (n, Σk)
            v_aligned = solve.align_intended(v_all, intended)  # (Σk, in)
            start = 0
            for i, f in members:
                k = f.v.shape[0]
                aligned[i][lid] = Factors(u=f.u, v=v_aligned[start : start + k].astype(np.float32))
                start += k
            # ρ of the group's (unweighted) summed delta [U_1 … U_m] @ [V_1; …; V_m]: c_v is needed
            # before the weights that would scale the members exist.
            u_all = np.concatenate([f.u for _, f in members], axis=1)  # (out, Σk)
            r = residual_of(u_all, intended, solve.x_t @ v_aligned.T)
            if r is not None:
                rho[lid] = r
        return GroupAlignment(deltas=aligned, rho=rho, identity=identity, missing=missing)
