"""Tiny synthetic adapters, updates and a linear 'network' for strategy tests.

Helpers reach tests through the session-scoped `syn` fixture, which works with any pytest import
mode and inside Hypothesis tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

from alignfed import lora
from alignfed.lowrank import Factors
from coordinator.strategies.base import AdapterState, ClientUpdate
from coordinator.strategies.server_update import layer_ids

# layer id -> (out, in)
SHAPES: dict[str, tuple[int, int]] = {"0.q": (8, 6), "1.v": (5, 6)}
# chained shapes for LinearChain: in_j = out_{j−1}
CHAIN_SHAPES: dict[str, tuple[int, int]] = {"0.q": (6, 6), "1.q": (6, 6), "2.v": (4, 6)}
RANK = 2
SCALE = 2.0


def make_state(
    version: int = 0, seed: int = 0, rank: int = RANK, shapes: dict[str, tuple[int, int]] | None = None
) -> AdapterState:
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for lid, (out_dim, in_dim) in (shapes or SHAPES).items():
        layer, module = lora.split_layer_id(lid)
        tensors[lora.key(layer, module, "A")] = (0.3 * rng.normal(size=(rank, in_dim))).astype(np.float32)  # (r, in)
        tensors[lora.key(layer, module, "B")] = (0.3 * rng.normal(size=(out_dim, rank))).astype(np.float32)  # (out, r)
    return AdapterState(version=version, tensors=tensors, scale=SCALE, rank=rank)


def make_update(
    uid: str,
    base_version: int,
    device: str = "dev-0",
    samples: int = 10,
    seed: int = 0,
    received_at: float = 0.0,
    k: int = 2,
    shapes: dict[str, tuple[int, int]] | None = None,
) -> ClientUpdate:
    rng = np.random.default_rng(seed)
    deltas = {
        lid: Factors(
            u=(0.1 * rng.normal(size=(out_dim, k))).astype(np.float32),  # (out, k)
            v=rng.normal(size=(k, in_dim)).astype(np.float32),  # (k, in)
        )
        for lid, (out_dim, in_dim) in (shapes or SHAPES).items()
    }
    return ClientUpdate(
        device_id=device,
        update_id=uid,
        base_version=base_version,
        samples=samples,
        deltas=deltas,
        received_at=received_at,
    )


def products(state: AdapterState) -> dict[str, np.ndarray]:
    """s·B@A per layer, float64."""
    return {lid: lora.product(state.tensors, lid, state.scale) for lid in layer_ids(state)}


def totals(state: AdapterState) -> dict[str, np.ndarray]:
    """s·B@A + R per layer: what error feedback conserves."""
    out = products(state)
    for lid, r in state.residual.items():
        out[lid] = out[lid] + r.dense()
    return out


def dense(update: ClientUpdate) -> dict[str, np.ndarray]:
    return {lid: f.dense() for lid, f in update.deltas.items()}


def weighted_sum(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for u, w in zip(updates, weights, strict=True):
        for lid, d in dense(u).items():
            out[lid] = out.get(lid, 0) + w * d
    return out


class LinearChain:
    """A linear 'network' whose adapted layers feed each other (an `ActivationSource`).

    Layer j's input is X_j = X_{j−1} (W_{j−1} + s·B A of layer j−1)ᵀ, starting from fixed calibration
    inputs X_0 (n, in_0). Layer 0 never drifts; later layers drift when an upstream adapter changes.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]] = CHAIN_SHAPES, n: int = 64, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.ids = list(shapes)
        self.x0 = rng.normal(size=(n, shapes[self.ids[0]][1]))  # (n, in_0)
        self.w = {lid: np.eye(o, i) + 0.3 * rng.normal(size=(o, i)) for lid, (o, i) in shapes.items()}  # W (out, in)
        self.calls = 0

    def activations(self, state: AdapterState) -> dict[str, np.ndarray]:
        self.calls += 1
        out: dict[str, np.ndarray] = {}
        x = self.x0
        for lid in self.ids:
            out[lid] = x  # (n, in)
            x = x @ (self.w[lid] + lora.product(state.tensors, lid, state.scale)).T  # (n, out)
        return out


class Frozen:
    """An `ActivationSource` whose activations never depend on the adapter (nothing drifts)."""

    def __init__(self, shapes: dict[str, tuple[int, int]] = SHAPES, n: int = 32, seed: int = 1) -> None:
        rng = np.random.default_rng(seed)
        self.x = {lid: rng.normal(size=(n, i)) for lid, (_, i) in shapes.items()}

    def activations(self, state: AdapterState) -> dict[str, np.ndarray]:
        return {lid: x.copy() for lid, x in self.x.items()}


class Synthetic:
    """The helpers above, as the `syn` fixture."""

    shapes = SHAPES
    chain_shapes = CHAIN_SHAPES
    rank = RANK
    scale = SCALE
    state = staticmethod(make_state)
    update = staticmethod(make_update)
    products = staticmethod(products)
    totals = staticmethod(totals)
    dense = staticmethod(dense)
    weighted_sum = staticmethod(weighted_sum)
    chain = LinearChain
    frozen = Frozen


@pytest.fixture(scope="session")
def syn() -> Synthetic:
    return Synthetic()
