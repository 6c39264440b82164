"""Analytic convergence tests on a quadratic whose optimum is known (in the style of FLSim's tests).

Device i's loss on each adapted layer is f_i(x) = ½‖x − x*_i‖²_F, x the adapter product s·B A
(out, in), x*_i = B*_i A* (rank r, one row space, so every weighted mean of optima is rank r too and
the adapter can represent it). Local training from the global x_v it was handed moves it by
gradient descent to x_v + c (x*_i − x_v) (c = 1 − (1 − lr)^E), so the delta it sends is
c (x*_i − x_v), as exact factors [c B*_i, −c s B_v] @ [A*; A_v].

- Same base for everyone (synchronous schedule): a strategy with weights w_i moves x to
  x + c Σ w_i (x*_i − x), whose fixed point is the w-weighted mean of the optima. Each strategy's
  weights are known in closed form (FedAvg n_i/N, FedBuff and FedStaleWeight uniform, AlignFed
  n_i^γ / Σ n_j^γ with equal participation), so the optimum it must reach is known.
- One shared optimum with stale bases (devices that are 0, 1 and 2 versions behind): every
  asynchronous strategy must still reach x*.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from alignfed import lora
from alignfed.lowrank import Factors
from coordinator.strategies import build
from coordinator.strategies.base import AdapterState, ClientUpdate, Strategy
from coordinator.strategies.server_update import layer_ids

SHAPES = {"0.q": (8, 6), "1.v": (5, 6)}
RANK, SCALE, STEP = 2, 2.0, 0.5  # adapter rank r, s = alpha/r, c of the local training
SAMPLES = [10, 40, 90]


def _optima(devices: int, seed: int = 0) -> list[dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Per device, per layer: (B*_i (out, r), A* (r, in)), with A* shared by all devices."""
    rng = np.random.default_rng(seed)
    a_star = {lid: rng.normal(size=(RANK, i)) for lid, (_, i) in SHAPES.items()}
    return [{lid: (rng.normal(size=(o, RANK)), a_star[lid]) for lid, (o, _) in SHAPES.items()} for _ in range(devices)]


def _start() -> AdapterState:
    rng = np.random.default_rng(99)
    tensors = {}
    for lid, (o, i) in SHAPES.items():
        layer, module = lora.split_layer_id(lid)
        tensors[lora.key(layer, module, "A")] = (0.1 * rng.normal(size=(RANK, i))).astype(np.float32)
        tensors[lora.key(layer, module, "B")] = np.zeros((o, RANK), dtype=np.float32)
    return AdapterState(version=0, tensors=tensors, scale=SCALE, rank=RANK)


def _delta(base: AdapterState, optimum: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Factors]:
    """c (x*_i − x_v) as exact factors (out, 2r) @ (2r, in)."""
    out = {}
    for lid, (b_star, a_star) in optimum.items():
        layer, module = lora.split_layer_id(lid)
        a_v = base.tensors[lora.key(layer, module, "A")].astype(np.float64)
        b_v = base.tensors[lora.key(layer, module, "B")].astype(np.float64)
        out[lid] = Factors(u=STEP * np.hstack([b_star, -base.scale * b_v]), v=np.vstack([a_star, a_v]))
    return out


def _product(state: AdapterState) -> dict[str, np.ndarray]:
    return {lid: lora.product(state.tensors, lid, state.scale) for lid in layer_ids(state)}


def _target(optima: list[dict[str, tuple[np.ndarray, np.ndarray]]], weights: list[float]) -> dict[str, np.ndarray]:
    w = np.asarray(weights) / np.sum(weights)
    return {lid: sum(wi * (o[lid][0] @ o[lid][1]) for wi, o in zip(w, optima, strict=True)) for lid in SHAPES}


def _error(state: AdapterState, target: dict[str, np.ndarray]) -> float:
    x = _product(state)
    num = np.sqrt(sum(np.sum((x[lid] - target[lid]) ** 2) for lid in target))
    return float(num / np.sqrt(sum(np.sum(t**2) for t in target.values())))


class _Frozen:
    """Calibration activations that no adapter changes: alignment runs and is the identity."""

    def activations(self, state: AdapterState) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(5)
        return {lid: rng.normal(size=(16, i)) for lid, (_, i) in SHAPES.items()}


def _build(name: str, devices: int) -> Strategy:
    options: dict[str, dict[str, Any]] = {
        "fedavg": {"n": devices},
        "fedbuff": {"k": devices},
        "fedstaleweight": {"k": devices},
        "fedasync": {"alpha": 0.6},
        # a window that is a multiple of the device count keeps participation equal (factor 1)
        "alignfed": {"k": devices, "activations": _Frozen(), "max_wait_s": 1e9, "window": 10 * devices},
    }
    return build(name, **options[name])


def _update(uid: str, device: int, base: AdapterState, optimum: Any) -> ClientUpdate:
    return ClientUpdate(
        device_id=f"d{device}",
        update_id=uid,
        base_version=base.version,
        samples=SAMPLES[device % len(SAMPLES)],
        deltas=_delta(base, optimum),
    )


# each strategy's weights on one round of fresh updates, in closed form
CLOSED_FORM = {
    "fedavg": [n / sum(SAMPLES) for n in SAMPLES],
    "fedbuff": [1.0, 1.0, 1.0],
    "fedstaleweight": [1.0, 1.0, 1.0],
    "alignfed": [n**0.5 for n in SAMPLES],  # n_i^γ, γ = 0.5; equal participation, fresh, c = 1
}


@pytest.mark.parametrize("name", sorted(CLOSED_FORM))
def test_synchronous_rounds_reach_the_weighted_mean_of_the_optima(name: str) -> None:
    optima = _optima(len(SAMPLES))
    strategy = _build(name, len(SAMPLES))
    state = _start()
    target = _target(optima, CLOSED_FORM[name])
    first = _error(state, target)
    for t in range(40):
        for i, optimum in enumerate(optima):
            strategy.add(_update(f"r{t}d{i}", i, state, optimum), state.version)
        assert strategy.ready(0.0)
        state = strategy.aggregate(state, 0.0).state
    assert first > 0.5
    assert _error(state, target) < 1e-5  # contraction (1 − c) per round: 0.5^40
    # and not to the plain (unweighted) mean where the weights differ from uniform
    if len(set(CLOSED_FORM[name])) > 1:
        assert _error(state, _target(optima, [1.0] * len(SAMPLES))) > 1e-2


@pytest.mark.parametrize("name", ["fedasync", "fedbuff", "fedstaleweight", "alignfed"])
def test_stale_devices_still_reach_the_shared_optimum(name: str) -> None:
    optimum = _optima(1, seed=3)[0]
    strategy = _build(name, 3)
    state = _start()
    history = {0: state}
    lag = [0, 1, 2]  # device i trains on the global of i versions ago
    arrivals = 0
    while state.version < 120:
        device = arrivals % 3
        base = history[max(0, state.version - lag[device])]
        strategy.add(_update(f"u{arrivals}", device, base, optimum), state.version)
        arrivals += 1
        if strategy.ready(0.0):
            state = strategy.aggregate(state, 0.0).state
            history[state.version] = state
    target = _target([optimum], [1.0])
    assert _error(state, target) < 1e-4
    assert _error(history[1], target) > 0.3  # it did have somewhere to go


@pytest.mark.parametrize(
    ("options", "reaches"),
    [
        ({}, False),
        ({"aggregator": "median"}, True),
        ({"aggregator": "trimmed_mean"}, True),
        ({"outlier_factor": 3.0}, True),
    ],
)
def test_one_hostile_device_in_five_with_and_without_robust_options(options: dict[str, Any], reaches: bool) -> None:
    """Device 4 sends −10× its honest delta (sign flip and scale); robust options must still reach x*."""
    optimum = _optima(1, seed=7)[0]
    fb = build("fedbuff", k=5, **options)
    state = _start()
    target = _target([optimum], [1.0])
    for t in range(40):
        for i in range(5):
            update = _update(f"r{t}d{i}", i, state, optimum)
            if i == 4:
                hostile = {lid: Factors(u=-10.0 * f.u, v=f.v) for lid, f in update.deltas.items()}
                update = ClientUpdate(
                    device_id="d4", update_id=update.update_id, base_version=state.version, samples=10, deltas=hostile
                )
            fb.add(update, state.version)
        state = fb.aggregate(state, 0.0).state
    assert (_error(state, target) < 1e-4) == reaches
