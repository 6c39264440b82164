"""AlignFed: version-aware grouping, cross-version alignment and fairness-aware weights
(arXiv 2606.08197), with the low-rank re-factorization and error feedback of "Fully asynchronous
FL for LLMs" (ICLR 2026 workshop). DESIGN.md section 6.

On `aggregate` with current version t and buffered updates i (delta D_i = U_i V_i, base v_i):

1. grouping: group by base version v (τ = t − v); `add` refuses τ > tau_max and v > t.
2. alignment (`coordinator.alignment`): for each group v < t and layer ℓ, V_i′ = V_i P_{v,ℓ}
   with confidence c_v = exp(−ρ̄_v/ρ₀), ρ̄_v the mean per-layer residual of the group.
3. fairness (`coordinator.fairness`): w_i ∝ n_i^γ (1+τ_i)^(−a) clip((p̄/p_d)^β, h_min, h_max) c_v,
   normalised to a convex combination.
4. M_{t+1} = s·B_t A_t + η Σ_i w_i U_i V_i′ (+ carried residual), re-factorized to rank r.

Ablations (`AlignFedConfig`): `grouping=False` ignores base versions in the math (every update is
treated as fresh: τ = 0 in the weights, no alignment; `add` still enforces tau_max and refuses
future versions, which are ingest rules); `alignment=False` uses D′ = D and c = 1;
`fairness=False` drops the participation factor (set a = 0 or gamma = 0 to drop the others).

Aggregation is triggered by K buffered updates or by the oldest waiting `max_wait_s` (T). It
folds in the whole buffer, in a canonical order (base version, device, update id), so the result
does not depend on arrival order.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from alignfed.errors import RejectedUpdate
from alignfed.lowrank import Factors, Method
from coordinator import fairness as fair
from coordinator.alignment import ActivationSource, Aligner, GroupAlignment, confidence
from coordinator.strategies.base import AdapterState, Aggregation, ClientUpdate
from coordinator.strategies.buffered import BufferedStrategy, robust_config
from coordinator.strategies.robust import Aggregator, RobustConfig
from coordinator.strategies.staleness import TAU_MAX

StateLookup = Callable[[int], AdapterState | None]

_METHODS = ("pca", "qrcp", "cur")


@dataclass(frozen=True, slots=True)
class AlignFedConfig:
    """Every knob of the method; each stage can be switched off for ablations."""

    k: int = 8  # aggregate after K buffered updates ...
    max_wait_s: float = 60.0  # ... or when the oldest has waited T seconds
    tau_max: int = TAU_MAX  # refuse updates more than tau_max versions behind (staleness.TAU_MAX)
    server_lr: float = 1.0  # η
    a: float = 0.5  # freshness exponent: (1 + τ)^(−a)
    gamma: float = 0.5  # sample exponent: n_i^γ
    beta: float = 1.0  # participation exponent: (p̄/p_i)^β
    h_min: float = 0.25  # clip of the participation factor
    h_max: float = 4.0
    window: int = 64  # accepted updates in the participation window
    lam: float = 1e-2  # ridge λ relative to tr(X_tᵀX_t)/in
    rho0: float = 0.5  # confidence scale: c = exp(−ρ/ρ₀)
    method: Method = "pca"
    error_feedback: bool = True
    grouping: bool = True
    alignment: bool = True
    fairness: bool = True
    cache_versions: int = 0  # activation cache size in versions; 0 means tau_max + 2
    prefetch: bool = True  # calibrate each new version in the background, off the aggregation path
    # robust options, off by default (coordinator.strategies.robust)
    aggregator: Aggregator = "mean"  # mean | median | trimmed_mean
    trim: float = 0.2  # trimmed_mean: fraction cut at each end
    clip_norm: float = 0.0  # clip each ‖Δ_i‖_F to this; 0 = off
    clip_relative: float = 0.0  # clip to this multiple of the reference norm; 0 = off
    outlier_factor: float = 0.0  # drop updates above this multiple of the reference norm; 0 = off
    norm_window: int = 64  # kept-update norms remembered for that median

    def __post_init__(self) -> None:
        def bad(name: str, expected: str) -> ValueError:
            return ValueError(f"alignfed config: {name} must be {expected}, got {getattr(self, name)!r}")

        if self.k < 1:
            raise bad("k", "≥ 1")
        if not self.max_wait_s > 0:
            raise bad("max_wait_s", "> 0 seconds")
        if self.tau_max < 0:
            raise bad("tau_max", "≥ 0")
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise bad("server_lr", "> 0")
        if self.window < 1:
            raise bad("window", "≥ 1")
        if not (math.isfinite(self.lam) and self.lam > 0):
            raise bad("lam", "> 0")
        if not (math.isfinite(self.rho0) and self.rho0 > 0):
            raise bad("rho0", "> 0")
        if self.method not in _METHODS:
            raise bad("method", f"one of {', '.join(_METHODS)}")
        if self.cache_versions < 0 or self.cache_versions == 1:
            raise bad("cache_versions", "0 (auto) or ≥ 2")
        self.fairness_params()  # validates gamma, a, beta, h_min, h_max
        self.robust_config()  # validates the robust options

    def robust_config(self) -> RobustConfig:
        return robust_config(
            self.aggregator, self.trim, self.clip_norm, self.clip_relative, self.outlier_factor, self.norm_window
        )

    def fairness_params(self) -> fair.FairnessParams:
        return fair.FairnessParams(gamma=self.gamma, a=self.a, beta=self.beta, h_min=self.h_min, h_max=self.h_max)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> AlignFedConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"alignfed config: unknown option(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**dict(options))


class AlignFed(BufferedStrategy):
    """The AlignFed strategy. `activations` is required when alignment is on.

    `state_of(v)` returns the stored global adapter of version v (the coordinator's version
    store), or None if it is gone; states this strategy produced or was given are remembered for
    the last tau_max + 1 versions, so `state_of` is only needed after a restart.

    Metrics per aggregation: `trigger` ("k" | "max_wait"), `buffered`, `staleness` and `weights`
    (lists in `used` order), `staleness_histogram` {τ: count}, `groups` (one dict per base version:
    `base_version`, `tau`, `size`, `aligned`, `rho` {layer: ρ}, `rho_mean`, `confidence`, and
    `skipped` with the reason when alignment could not run), `alignment_residual` {layer: mean ρ
    over aligned groups}, `jain_index` and `shares` of the participation window, `forward_passes`
    (calibration runs so far), `residual_norm` and `residual_dropped` (error feedback beyond the 4r cap).
    """

    name: ClassVar[str] = "alignfed"
    needs: ClassVar[tuple[str, ...]] = ("activations", "state_of")

    def __init__(
        self,
        config: AlignFedConfig | None = None,
        activations: ActivationSource | None = None,
        state_of: StateLookup | None = None,
        *,
        cache_dtype: type[np.floating[Any]] = np.float16,
    ) -> None:
        self.config = cfg = config if config is not None else AlignFedConfig()
        super().__init__(cfg.k, cfg.server_lr, cfg.method, cfg.error_feedback, cfg.robust_config())
        self._params = cfg.fairness_params()
        self._aligner: Aligner | None = None
        if cfg.alignment and cfg.grouping:
            if activations is None:
                raise ValueError(
                    "alignfed: alignment needs an activation source (activations=...: the calibration "
                    "runner); pass alignment=False to run without cross-version alignment"
                )
            self._aligner = Aligner(
                activations,
                lam=cfg.lam,
                cache_versions=cfg.cache_versions or cfg.tau_max + 2,
                cache_dtype=cache_dtype,
            )
        self._state_of = state_of
        self._aligned_s = 0.0  # host seconds the last aggregation spent aligning (`timings`)
        self._states: dict[int, AdapterState] = {}
        self._window = fair.ParticipationWindow(cfg.window)
        self._round: _Round | None = None  # what `prepare` found, for `weights` and `describe`

    @classmethod
    def from_options(
        cls,
        config: AlignFedConfig | None = None,
        activations: ActivationSource | None = None,
        state_of: StateLookup | None = None,
        **options: Any,
    ) -> AlignFed:
        """Registry entry: either `config=` or the config's fields as keyword options."""
        if config is not None and options:
            raise ValueError(f"alignfed: give either config= or config fields, not both (got {sorted(options)})")
        return cls(config or AlignFedConfig.from_mapping(options), activations, state_of)

    # -- buffered-strategy hooks ------------------------------------------------------------------

    def admit(self, update: ClientUpdate, tau: int, current_version: int) -> None:
        if tau > self.config.tau_max:
            raise RejectedUpdate(
                f"stale: base version {update.base_version} is {tau} behind current {current_version} "
                f"(tau_max {self.config.tau_max})"
            )

    def accepted(self, update: ClientUpdate) -> None:
        self._window.record(update.device_id)  # p_i counts accepted updates

    def ready(self, now: float) -> bool:
        if len(self._buffer) >= self.config.k:
            return True
        oldest = self._buffer.oldest_received_at()
        return oldest is not None and now - oldest >= self.config.max_wait_s

    def remember(self, state: AdapterState) -> None:
        """Keep a global adapter so stale groups based on it can be aligned.

        Only A/B are kept (calibration runs the adapter, not the error-feedback residual), so the
        tau_max + 1 remembered versions cost a few adapters, not dense (out, in) residuals.
        """
        self._states[state.version] = AdapterState(
            version=state.version, tensors=state.tensors, scale=state.scale, rank=state.rank
        )
        floor = max(self._states) - self.config.tau_max
        for v in [v for v in self._states if v < floor]:
            del self._states[v]

    def participation(self) -> list[str]:
        """The participation window, oldest first (to persist across restarts)."""
        return self._window.devices()

    def restore_participation(self, devices: list[str]) -> None:
        self._window = fair.ParticipationWindow(self.config.window, devices)

    def history(self) -> dict[str, Any]:
        return {"participation": self.participation()}

    def restore(self, history: Mapping[str, Any]) -> None:
        self.restore_participation(list(history.get("participation", [])))

    def replay(self, aggregated: Iterable[tuple[str, int, int]]) -> None:
        devices = [device for device, _, _ in aggregated]
        self.restore_participation(devices[-self.config.window :])

    def prepare(
        self, updates: Sequence[ClientUpdate], taus: Sequence[int], current: AdapterState
    ) -> list[Mapping[str, Factors]]:
        cfg = self.config
        rnd = _Round(trigger="k" if len(self._buffer) >= cfg.k else "max_wait", conf=[1.0] * len(updates))
        self.remember(current)

        # 1. version-aware grouping: base version -> members (positions in `updates`)
        groups: dict[int, list[int]] = {}
        for i, u in enumerate(updates):
            groups.setdefault(u.base_version if cfg.grouping else current.version, []).append(i)

        # 2. alignment of every stale group onto version t
        deltas: list[Mapping[str, Factors]] = [u.deltas for u in updates]
        aligning = time.perf_counter()  # reported as alignment_seconds (the dashboard's histogram)
        for v in sorted(groups):
            members = groups[v]
            info: dict[str, Any] = {
                "base_version": v,
                "tau": current.version - v,
                "size": len(members),
                "aligned": False,
            }
            if v < current.version and self._aligner is not None:
                old = self._lookup(v)
                if old is None and self._aligner.cache.cached(v) is None:
                    info["skipped"] = f"adapter of version {v} is no longer available"
                else:
                    result: GroupAlignment = self._aligner.align_group(
                        [deltas[i] for i in members], old if old is not None else v, current
                    )
                    c_v = confidence(result.mean_rho(), cfg.rho0)
                    for i, d in zip(members, result.deltas, strict=True):
                        deltas[i] = d
                        rnd.conf[i] = c_v
                    info.update(aligned=True, rho=result.rho, rho_mean=result.mean_rho(), confidence=c_v)
                    if result.missing:
                        info["missing_activations"] = result.missing
                    for lid, r in result.rho.items():
                        rnd.layer_rhos.setdefault(lid, []).append(r)
            info.setdefault("confidence", 1.0)
            rnd.groups.append(info)
        self._aligned_s = time.perf_counter() - aligning
        self._round = rnd
        return deltas

    def weights(self, updates: Sequence[ClientUpdate], taus: Sequence[int]) -> list[float]:
        # 3. fairness-aware weights (a convex combination)
        cfg = self.config
        conf = self._round.conf if self._round is not None else [1.0] * len(updates)
        w = fair.weights(
            samples=[u.samples for u in updates],
            taus=[tau if cfg.grouping else 0 for tau in taus],
            devices=[u.device_id for u in updates],
            confidences=conf,
            window=self._window if cfg.fairness else None,
            params=self._params,
        )
        return [float(x) for x in w]

    def commit(self, updates: Sequence[ClientUpdate], taus: Sequence[int], state: AdapterState) -> None:
        # 4. happened in the base: M_{t+1} = s·B_t A_t + η Σ w_i D′_i, re-factorized with error feedback
        self.remember(state)
        if self._aligner is not None and self.config.prefetch:
            # the next aggregation aligns its stale groups onto this version: calibrate it now
            self._aligner.prefetch(self.state_for_calibration(state))

    @staticmethod
    def state_for_calibration(state: AdapterState) -> AdapterState:
        """A/B only: calibration runs the adapter, not the error-feedback residual."""
        return AdapterState(version=state.version, tensors=state.tensors, scale=state.scale, rank=state.rank)

    def close(self) -> None:
        """Stop the background calibration thread."""
        if self._aligner is not None:
            self._aligner.close()

    def timings(self) -> dict[str, float]:
        return {"alignment": self._aligned_s}

    def describe(self, updates: Sequence[ClientUpdate], taus: Sequence[int], weights: list[float]) -> dict[str, Any]:
        rnd = self._round if self._round is not None else _Round(trigger="k", conf=[])
        self._round = None
        counts = self._window.counts()
        return {
            "trigger": rnd.trigger,
            "buffered": len(updates),
            "staleness": list(taus),
            "weights": weights,
            "staleness_histogram": dict(sorted(Counter(taus).items())),
            "groups": rnd.groups,
            "alignment_residual": {lid: float(np.mean(r)) for lid, r in sorted(rnd.layer_rhos.items())},
            "jain_index": fair.jain_index(counts.values()),
            "shares": fair.shares(counts),
            "forward_passes": self._aligner.cache.forward_passes if self._aligner else 0,
        }

    def aggregate(self, current: AdapterState, now: float) -> Aggregation:
        try:
            return super().aggregate(current, now)
        finally:
            self._round = None

    def _lookup(self, version: int) -> AdapterState | None:
        state = self._states.get(version)
        if state is None and self._state_of is not None:
            state = self._state_of(version)
            if state is not None and state.version != version:
                raise ValueError(f"alignfed: state_of({version}) returned version {state.version}")
        return state


@dataclass
class _Round:
    """What one aggregation's alignment found, between `prepare` and `describe`."""

    trigger: str
    conf: list[float]  # c_v per update, 1 when not aligned
    groups: list[dict[str, Any]] = field(default_factory=list)
    layer_rhos: dict[str, list[float]] = field(default_factory=dict)
