"""The server step every strategy ends with: add a combined delta to the global adapter, re-factorize.

For each adapted layer ℓ with product s·B_t A_t (out, in):

    M_{t+1} = s·B_t A_t + η·Δ_ℓ (+ R_t, the residual kept last time, when error feedback is on)
    (A_{t+1}, B_{t+1}, R_{t+1}) = lowrank.to_adapter(M_{t+1}, r, s, method)

Every term is kept as factors (B, A; the deltas' u, v; the residual's own factors), so M_{t+1} is
one stacked factor pair of rank ≤ r + Σk_i + 4r and its SVD costs O((out + in)·rank²), not a
dense SVD of (out, in) per layer (8× less server CPU on SmolLM2's 60 adapted layers).
s·B_{t+1} A_{t+1} + R_{t+1} = M_{t+1} up to float32 rounding and what the residual's rank cap
(4r directions) drops, reported as `dropped`: with error feedback a truncation is deferred, not
lost (the server-side error feedback of
"Fully asynchronous FL for LLMs", ICLR 2026 workshop; AlignFed stage 4). PCA is the default
factorization (Eckart–Young optimal), QRCP and CUR the alternatives benchmarked in that paper.

A delta is always `after − before` of the product s·B A (what a device sends, see `ClientUpdate`),
so adding it moves the global adapter the way the device moved its local copy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from alignfed import lora
from alignfed.lowrank import Factors, Method, difference, stack, to_adapter
from coordinator.strategies.base import AdapterState, ClientUpdate

RESIDUAL_RANKS = 4  # error feedback keeps the best 4r directions of what truncation drops; see decisions.md


def layer_ids(state: AdapterState) -> list[str]:
    """Adapted layers of a state, in the order of its A tensors: ['0.q', '0.v', ...]."""
    ids = []
    for name in state.tensors:
        layer, module, factor = lora.parse_key(name)
        if factor == "A":
            ids.append(lora.layer_id(layer, module))
    return ids


def combine(deltas: Sequence[Mapping[str, Factors]], weights: Sequence[float]) -> dict[str, Factors]:
    """Σ_i w_i · u_i @ v_i per layer, as stacked factors [w_1 u_1 …] (out, Σk) @ [v_1; …] (Σk, in).

    Kept factored: the sum has rank ≤ Σ k_i, far below min(out, in), so the server step never
    needs the dense (out, in) matrix. Layers missing from an update count as zero.
    """
    if len(deltas) != len(weights):
        raise ValueError(f"combine: {len(deltas)} deltas but {len(weights)} weights")
    parts: dict[str, list[Factors]] = {}
    for delta, w in zip(deltas, weights, strict=True):
        for lid, f in delta.items():
            if lid in parts and parts[lid][0].shape != f.shape:
                raise ValueError(
                    f"combine: layer {lid} has shape {f.shape} in one update, {parts[lid][0].shape} in another"
                )
            parts.setdefault(lid, []).append(Factors(u=float(w) * f.u.astype(np.float64), v=f.v.astype(np.float64)))
    return {lid: stack(p) for lid, p in parts.items()}


def combine_updates(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> dict[str, Factors]:
    """`combine` over the deltas of validated updates."""
    return combine([u.deltas for u in updates], weights)


def residual_rank(rank: int) -> int:
    """How many directions of error feedback each layer keeps: RESIDUAL_RANKS × the adapter rank."""
    return RESIDUAL_RANKS * rank


def apply(
    current: AdapterState,
    combined: Mapping[str, Factors],
    *,
    server_lr: float,
    method: Method = "pca",
    error_feedback: bool = True,
) -> AdapterState:
    """M_{t+1} = s·B_t A_t + η·combined (+ R_t), re-factorized to rank r; version t + 1.

    `combined[layer_id]` is a delta as factors (out, k) @ (k, in); layers of `current` absent from
    it get a zero delta (they are still re-factorized so their carried residual can be folded back
    in). With `error_feedback=False` the truncation residual is discarded and the new state carries
    none. `dropped` of the new state is what the residual's rank cap lost, summed over layers.
    """
    ids = layer_ids(current)
    unknown = sorted(set(combined) - set(ids))
    if unknown:
        raise ValueError(f"delta for layer(s) {unknown} that the adapter does not have (layers: {ids})")
    tensors = dict(current.tensors)
    residual: dict[str, Factors] = {}
    dropped_sq = 0.0
    keep = residual_rank(current.rank) if error_feedback else 0
    for lid in ids:
        layer, module = lora.split_layer_id(lid)
        a_t = current.tensors[lora.key(layer, module, "A")].astype(np.float64)  # (r, in)
        b_t = current.tensors[lora.key(layer, module, "B")].astype(np.float64)  # (out, r)
        parts = [Factors(u=current.scale * b_t, v=a_t)]
        if lid in combined:
            d = combined[lid]
            if d.shape != (b_t.shape[0], a_t.shape[1]):
                raise ValueError(
                    f"delta for layer {lid} has shape {d.shape}, adapter product is {(b_t.shape[0], a_t.shape[1])}"
                )
            parts.append(Factors(u=server_lr * d.u.astype(np.float64), v=d.v.astype(np.float64)))
        if error_feedback and lid in current.residual:
            parts.append(current.residual[lid])
        split = to_adapter(stack(parts), current.rank, current.scale, method, residual_rank=keep)
        tensors[lora.key(layer, module, "A")] = split.a
        tensors[lora.key(layer, module, "B")] = split.b
        if error_feedback:
            residual[lid] = split.residual
            dropped_sq += split.dropped**2
    return AdapterState(
        version=current.version + 1,
        tensors=tensors,
        scale=current.scale,
        rank=current.rank,
        residual=residual,
        dropped=float(np.sqrt(dropped_sq)),
    )


def fold_published(state: AdapterState, published: Mapping[str, np.ndarray]) -> AdapterState:
    """`state` moved onto the factors devices were sent, what that changed kept as error feedback.

    A quantized downlink publishes P ≠ the strategy's factors U. The next aggregation starts from P,
    so the product s·(B_U A_U − B_P A_P) is added to each layer's residual (factors of rank ≤ 2r,
    `lowrank.difference`): P's product plus the residual is then exactly U's plus the old residual,
    and the next re-factorization puts that error back where it belongs, in product space — it does
    not depend on how the two factorizations are rotated against each other (decisions §30).
    """
    residual = dict(state.residual)
    for lid in layer_ids(state):
        layer, module = lora.split_layer_id(lid)
        a_name, b_name = lora.key(layer, module, "A"), lora.key(layer, module, "B")
        lost = difference(
            state.tensors[b_name], state.tensors[a_name], published[b_name], published[a_name], state.scale
        )  # (out, 2r) @ (2r, in)
        residual[lid] = stack([residual[lid], lost]) if lid in residual else lost
    return dataclasses.replace(state, tensors=dict(published), residual=residual)


def residual_norm(state: AdapterState) -> float:
    """‖R‖_F over all layers: how much the last re-factorization deferred (0 without error feedback)."""
    return float(np.sqrt(sum(r.squared_norm() for r in state.residual.values())))
