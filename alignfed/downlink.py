"""The global adapter as a chain of quantized version-to-version deltas (coordinator → devices).

Publishing the full float32 adapter every version costs the raw LoRA size per device per version.
Instead the coordinator publishes, for each new version v, the quantized change from v − 1, and
defines the published adapter P_v as exactly what a receiver reconstructs:

    T_v = gauge(S_v → P_{v−1}) + e_{v−1}      S_v: the strategy's new adapter; e: the carry
    W_v = quantize(T_v − P_{v−1})             (protocol.quantize_changes, per rank component)
    P_v = P_{v−1} + dequantize(W_v)           float32, bit-exact on every receiver
    e_v = T_v − P_v                           what the quantization lost, sent with the next version

The coordinator aggregates onto what it published (S_v is made from P_{v−1}), so without the
carry every version's quantization error would be lost for good and the federation would take a
random walk of them; with it, P stays within one quantization's error of where exact
publishing would have taken it (error feedback, as on the uplink). Every device that applies the
chain holds bit for bit what the coordinator holds; the message carries
`adapter_digest(P_v)` to prove it. P_v is the global version v: the coordinator stores, publishes
and aggregates onto it.

`gauge`: every strategy re-factorizes the aggregate (`lowrank.to_adapter`), and an SVD fixes its
factors only up to the signs and order of the components. B·Rᵀ, R·A with R orthogonal is the same
product; choosing R (orthogonal Procrustes) to bring the new factors closest to the published ones
keeps version-to-version changes as small as the product's change, not as large as the factors.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from alignfed import protocol
from alignfed.errors import ProtocolError


def gauge(prev: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`new` with each layer's factors rotated to the nearest of `prev`'s; every product B @ A unchanged.

    For A' = R A (r, in), B' = B Rᵀ (out, r) with R orthogonal (r, r), ‖A' − A_p‖² + ‖B' − B_p‖² is
    least for R = V Uᵀ where U Σ Vᵀ = A A_pᵀ + Bᵀ B_p (r, r). Tensors without a partner stay as they are.
    """
    out = {name: np.asarray(t, dtype=np.float32) for name, t in new.items()}
    for name in new:
        if not name.endswith(".A") or name[:-1] + "B" not in new or name not in prev:
            continue
        b_name = name[:-1] + "B"
        a, b = np.asarray(new[name], np.float64), np.asarray(new[b_name], np.float64)
        a_p, b_p = np.asarray(prev[name], np.float64), np.asarray(prev[b_name], np.float64)
        u, _, vt = np.linalg.svd(a @ a_p.T + b.T @ b_p)  # (r, r)
        r = vt.T @ u.T
        out[name] = (r @ a).astype(np.float32)
        out[b_name] = (b @ r.T).astype(np.float32)
    return out


@dataclass(frozen=True, slots=True)
class Step:
    """One published version: P_v, its wire tensors and its digest, and the carry e_v it leaves."""

    published: dict[str, np.ndarray]
    wire: dict[str, np.ndarray]
    digest: str
    carry: dict[str, np.ndarray]


def apply(base: Mapping[str, np.ndarray], changes: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """P_{v−1} + change, float32; the one addition both ends run. Raises ProtocolError if the names or shapes differ."""
    if set(base) != set(changes):
        missing, extra = sorted(set(base) - set(changes)), sorted(set(changes) - set(base))
        raise ProtocolError(f"global delta does not fit the adapter: missing {missing[:3]}, unexpected {extra[:3]}")
    out: dict[str, np.ndarray] = {}
    for name, held in base.items():
        change = changes[name]
        if change.shape != held.shape:
            raise ProtocolError(
                f"global delta: {name} has shape {list(change.shape)}, the adapter's is {list(held.shape)}"
            )
        out[name] = np.asarray(held, dtype=np.float32) + change.astype(np.float32)
    return out


class Broadcaster:
    """The coordinator's side: turns each new adapter into (P_v, wire, digest), keeping the carry e.

    `feedback=False` drops the quantization error instead of carrying it (the ablation). The carry
    lives in memory: a restarted coordinator goes on with the chain from the stored P, having lost
    at most one version's quantization error.
    """

    def __init__(self, quantization: str, *, feedback: bool = True) -> None:
        if quantization not in protocol.DOWNLINK_QUANTIZATIONS:
            raise ValueError(
                f"downlink: quantization {quantization!r}; expected one of {', '.join(protocol.DOWNLINK_QUANTIZATIONS)}"
            )
        self.quantization = quantization
        self.feedback = feedback
        self._carry: dict[str, np.ndarray] = {}

    def step(self, prev: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray]) -> Step:
        """The next version from P_{v−1} = `prev` and the strategy's `new`; the carry moves on only
        with `accept`, once the version is stored (a store that fails must not lose it)."""
        target = gauge(prev, new)
        for name, e in self._carry.items():
            if name in target:
                target[name] = target[name] + e
        wire = protocol.quantize_changes(
            {n: target[n] - np.asarray(prev[n], np.float32) for n in target}, self.quantization
        )
        published = apply(prev, protocol.dequantize_changes(wire, self.quantization))
        carry = {n: target[n] - published[n] for n in target} if self.feedback else {}
        return Step(published=published, wire=wire, digest=protocol.adapter_digest(published), carry=carry)

    def accept(self, step: Step) -> None:
        """`step`'s version was stored and goes out: its carry is the one the next version adds."""
        self._carry = step.carry

    def carried_norm(self) -> float:
        """‖e‖_F over all tensors: the change waiting to be published."""
        return float(np.sqrt(sum(float(np.sum(np.square(e, dtype=np.float64))) for e in self._carry.values())))


class Outcome(enum.Enum):
    APPLIED = "applied"  # the device now holds the delta's version, digest checked
    OLD = "old"  # the device already holds this version or a newer one
    GAP = "gap"  # the device does not hold the delta's parent: it needs a snapshot
    MISMATCH = "mismatch"  # applied, but the digest differs: it needs a snapshot


def follow(
    held_version: int | None, held: Mapping[str, np.ndarray] | None, delta: protocol.GlobalDelta
) -> tuple[Outcome, dict[str, np.ndarray] | None]:
    """A device's step along the chain: what a delta does to the adapter it holds (pure)."""
    if held_version is not None and delta.version <= held_version:
        return Outcome.OLD, None
    if held is None or held_version != delta.parent_version:
        return Outcome.GAP, None
    try:
        tensors = apply(held, delta.changes())
    except ProtocolError:
        return Outcome.MISMATCH, None
    # the digest proves the reconstruction, not who sent it (the broker's ACL does that); a
    # non-finite adapter is refused whatever its digest says
    if not all(np.isfinite(t).all() for t in tensors.values()) or protocol.adapter_digest(tensors) != delta.digest:
        return Outcome.MISMATCH, None
    return Outcome.APPLIED, tensors
