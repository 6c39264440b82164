"""A quantized downlink's error folded into the strategy's residual (server_update.fold_published)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from alignfed import lora
from alignfed.downlink import Broadcaster
from alignfed.lowrank import Factors
from coordinator.strategies.base import AdapterState
from coordinator.strategies.server_update import apply, fold_published, layer_ids
from tests.strategies.conftest import make_state


def _with_residual(state: AdapterState, product: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """layer id -> s·B A + R (out, in): what the next aggregation starts from."""
    out = {}
    for lid in layer_ids(state):
        layer, module = lora.split_layer_id(lid)
        a = state.tensors[lora.key(layer, module, "A")].astype(np.float64)
        b = state.tensors[lora.key(layer, module, "B")].astype(np.float64)
        r = state.residual.get(lid)
        out[lid] = state.scale * b @ a + (r.dense() if r is not None else 0.0) + product.get(lid, 0.0)
    return out


def test_folding_keeps_product_plus_residual_and_the_next_step_puts_it_back() -> None:
    """P's product + the folded residual = U's product + U's residual, to float32 rounding; and an
    aggregation with nothing to add starts from exactly that, not from the quantized P."""
    rng = np.random.default_rng(3)
    parent = make_state(version=0, seed=1)
    strategy_new = make_state(version=1, seed=2)  # the strategy's factors U
    lid0 = layer_ids(strategy_new)[0]
    out_dim, in_dim = strategy_new.tensors["lora.0.q.B"].shape[0], strategy_new.tensors["lora.0.q.A"].shape[1]
    old = Factors(u=0.01 * rng.normal(size=(out_dim, 2)), v=rng.normal(size=(2, in_dim)))
    strategy_new = replace(strategy_new, residual={lid0: old})
    step = Broadcaster("int4c", feedback=False).step(parent.tensors, strategy_new.tensors)
    moved = any(not np.array_equal(step.published[n], strategy_new.tensors[n]) for n in step.published)
    assert moved  # int4 codes changed the factors: there is an error to keep

    folded = fold_published(strategy_new, step.published)
    assert all(np.array_equal(folded.tensors[n], step.published[n]) for n in step.published)
    want, got = _with_residual(strategy_new, {}), _with_residual(folded, {})
    for lid in want:
        np.testing.assert_allclose(got[lid], want[lid], rtol=0, atol=1e-6 * np.abs(want[lid]).max())
    # without the fold the published state loses the quantization error
    lost = _with_residual(replace(strategy_new, tensors=step.published), {})
    assert max(float(np.abs(lost[lid] - want[lid]).max()) for lid in want) > 1e3 * 1e-6

    after = apply(folded, {}, server_lr=1.0)  # nothing added: the product is only re-factorized
    again = _with_residual(after, {})
    for lid in want:  # ≤ 4r residual directions: nothing dropped at these ranks
        np.testing.assert_allclose(again[lid], want[lid], rtol=0, atol=1e-5 * np.abs(want[lid]).max())
    assert after.dropped < 1e-6
