"""The two tiers' shared arithmetic: how a site combines its devices' updates, and how the root
sees a site update — as its member devices, so fairness and weights stay per device.

Site side (`combine`): the device updates of one base version v (same τ at the root, as AlignFed's
version-aware grouping requires) become one delta D_site = Σ_i w̃_i D_i, with w̃ the within-site
weights (convex). Its factors are the stacked members' (rank Σ k_i), cut to the wire's 2r by
truncated SVD; the cut-off part is the site's error feedback, added to its next site update.

Root side (`client_updates`): a site update with m members enters the strategy as m updates, one
per member device (its own id and samples), each carrying D_site. Whatever per-update weights
w_i the root's strategy gives them, the result is Σ_i w_i D_site = W_site · Σ_i w̃_i D_i with
W_site = Σ_i w_i: the root decides each site's total weight from its devices (samples,
participation counted per device, staleness), the site only splits it among them. When the site
splits by the same rule (`weighting` matching the root strategy), that equals the flat federation
up to the participation window each tier sees (docs/decisions.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from alignfed.lowrank import Factors, Svd, stack
from alignfed.protocol import AdapterUpdate, Member
from coordinator import fairness
from coordinator.fairness import FairnessParams, ParticipationWindow
from coordinator.strategies.base import ClientUpdate

# a member's update id at the root: "<member's update id>@<site>@<site update id>" (a device may have
# several updates in one site update); ids never hold "@"
_SEP = "@"

WEIGHTINGS = ("uniform", "samples", "fairness")


def member_weights(
    samples: Sequence[int],
    weighting: str,
    devices: Sequence[str] = (),
    window: ParticipationWindow | None = None,
    params: FairnessParams | None = None,
) -> np.ndarray:
    """Within-site weights w̃ (m,), convex, for updates of one base version.

    "uniform": FedBuff, FedAsync (s(τ)/K is equal within a group). "samples": FedAvg. "fairness":
    AlignFed's n_i^γ · clip((p̄/p_i)^β) with p counted in the site's participation window; τ and the
    alignment confidence are the group's, equal for all members, so they drop out of the split.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"site weighting {weighting!r}: expected one of {', '.join(WEIGHTINGS)}")
    m = len(samples)
    if weighting == "fairness":
        if len(devices) != m:
            raise ValueError(f"site weighting 'fairness': {m} updates but {len(devices)} device ids")
        return fairness.weights(samples, [0] * m, devices, [1.0] * m, window, params or FairnessParams())
    n = np.asarray(samples, dtype=np.float64)
    if weighting == "samples" and n.sum() > 0:
        return np.asarray(n / n.sum())
    return np.full(m, 1.0 / m)


def combine(
    updates: Sequence[AdapterUpdate | ClientUpdate],
    weights: Sequence[float],
    max_rank: int,
    residual: Mapping[str, Factors],
) -> tuple[dict[str, Factors], dict[str, Factors]]:
    """(site delta per layer with rank ≤ max_rank, new residual) of Σ_i w_i D_i + residual.

    D_i = u_i @ v_i: u_i (out, k_i), v_i (k_i, in). The stacked sum has rank ≤ Σ k_i (+ the residual's);
    its best rank-`max_rank` part goes out, the rest (‖·‖ = the SVD tail) stays for the next one.
    """
    if len({u.base_version for u in updates}) != 1:
        raise ValueError("combine: the updates of one site update must share their base version")
    deltas: dict[str, Factors] = {}
    rest: dict[str, Factors] = {}
    for lid in updates[0].deltas:
        parts = [
            Factors(u=u.deltas[lid].u * np.float32(w), v=u.deltas[lid].v) for u, w in zip(updates, weights, strict=True)
        ]
        if lid in residual:
            parts.append(residual[lid])
        sv = Svd.of_factors(stack(parts))
        k = min(max_rank, sv.s.size)
        deltas[lid] = sv.head(k)
        tail = sv.s[k:]
        if tail.size and float(tail.max()) > 0:
            root = np.sqrt(tail)
            rest[lid] = Factors(
                u=(sv.u[:, k:] * root).astype(np.float32), v=(root[:, None] * sv.vt[k:]).astype(np.float32)
            )
    return deltas, rest


def client_updates(update: AdapterUpdate, received_at: float) -> list[ClientUpdate]:
    """The strategy's view of an update: itself, or one update per member of a site update."""
    if not update.members:
        return [ClientUpdate.from_message(update, received_at)]
    return member_updates(
        update.members, update.device_id, update.update_id, update.base_version, update.deltas, received_at,
        update.train_loss,
    )  # fmt: skip


def member_updates(
    members: Sequence[Member],
    site: str,
    site_update_id: str,
    base_version: int,
    deltas: Mapping[str, Factors],
    received_at: float,
    train_loss: float = float("nan"),
) -> list[ClientUpdate]:
    """One strategy update per member device, each carrying the site delta (see the module docstring)."""
    return [
        ClientUpdate(
            device_id=m.device_id,
            update_id=_SEP.join((m.update_id, site, site_update_id)),
            base_version=base_version,
            samples=m.samples,
            deltas=deltas,
            received_at=received_at,
            train_loss=train_loss,
        )
        for m in members
    ]


def stored_key(device_id: str, update_id: str) -> tuple[str, str]:
    """(device, update id) of the stored row a strategy's update came from."""
    parts = update_id.split(_SEP)
    return (parts[1], parts[2]) if len(parts) == 3 else (device_id, update_id)


def stored_keys(used: Mapping[str, tuple[str, float]]) -> dict[str, tuple[str, float]]:
    """Map the strategy's used updates (update id -> (device, weight)) to stored rows: a site update's
    members collapse into its row (site id, summed weight)."""
    out: dict[str, tuple[str, float]] = {}
    for uid, (device, weight) in used.items():
        parts = uid.split(_SEP)
        if len(parts) == 3:
            _, site, site_uid = parts
            out[site_uid] = (site, out.get(site_uid, (site, 0.0))[1] + weight)
        else:
            out[uid] = (device, weight)
    return out


def members_of(updates: Sequence[AdapterUpdate | ClientUpdate], weights: Sequence[float]) -> tuple[Member, ...]:
    return tuple(Member(u.device_id, u.update_id, u.samples, float(w)) for u, w in zip(updates, weights, strict=True))
