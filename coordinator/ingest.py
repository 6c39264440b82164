"""Validation of incoming device updates (DESIGN.md sections 6 and 8).

Every check names what it found and what it expected; the reason goes into the reject ack and a
log line. Nothing here raises anything but `RejectedUpdate`, so bad input never crashes the
coordinator. Checks run cheapest first, and the payload size before any decoding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from alignfed import protocol
from alignfed.errors import ProtocolError, RejectedUpdate
from alignfed.lowrank import Factors
from alignfed.manifest import Manifest
from coordinator.strategies.staleness import TAU_MAX


@dataclass(frozen=True, slots=True)
class IngestLimits:
    max_payload_bytes: int = 64 << 20
    max_delta_norm: float = 100.0  # Frobenius norm bound per layer delta
    tau_max: int = TAU_MAX  # staleness bound in versions, AlignFed's too (staleness.TAU_MAX)


def payload_limit(limits: IngestLimits, manifest: Manifest) -> int:
    """The most bytes an update of this bundle may take, on the wire or inflated.

    The largest valid update sends every layer's exact delta in float32 (k = 2r, u and v plus int8
    scales at most) under a header of at most MAX_HEADER_BYTES; nothing bigger is decoded, so a
    small deflated payload cannot make the coordinator inflate up to `max_payload_bytes`.
    """
    k = 2 * manifest.lora.rank
    data = sum(4 * k * (out + inp) + 4 * (out + k) for out, inp in manifest.delta_shapes().values())
    return min(limits.max_payload_bytes, 8 + protocol.MAX_HEADER_BYTES + data)


def frobenius(f: Factors) -> float:
    """‖U V‖_F without forming U V; U (out, k), V (k, in)."""
    return math.sqrt(max(f.squared_norm(), 0.0))


def decode(payload: bytes, max_bytes: int) -> protocol.Decoded:
    """Decode an update once, for every check after it; a payload that does not decode is `malformed`."""
    try:
        return protocol.decode_update(payload, max_bytes)
    except ProtocolError as exc:
        raise RejectedUpdate(f"malformed: {exc}") from exc


def update_id_of(payload: bytes, max_bytes: int) -> str:
    """Best-effort update id of a payload that failed to decode, for the reject ack ("" if unreadable)."""
    try:
        _, meta = protocol.unpack(payload, max_bytes)
        return str(meta.get("update_id", ""))
    except Exception:  # anything unreadable has no id to report
        return ""


def trained_rank(update: protocol.AdapterUpdate, manifest: Manifest) -> int:
    """The LoRA rank an update was trained at: its stated rank (1 ≤ k ≤ the federation's r), r if unstated.

    Any k ≤ r is welcome (a device whose profile caps its rank); the strategies add deltas as
    products s·B A, where a rank-k update means what it says (docs/decisions.md, "Heterogeneous
    LoRA ranks"). A rank above r is refused: the global adapter could not hold what it learned.
    """
    r = manifest.lora.rank
    if update.rank == 0:
        return r
    if not 1 <= update.rank <= r:
        raise RejectedUpdate(
            f"LoRA rank {update.rank} in the header; the federation's adapter has rank {r}, so expected "
            f"1 ≤ rank ≤ {r}: cap the device's rank with max_rank = {r} (or less) in its profile"
        )
    return update.rank


def validate(
    device_id: str,
    payload: bytes | protocol.Decoded,
    *,
    manifest: Manifest,
    bundle: str,
    key_of: Callable[[str], bytes | None],
    has_version: Callable[[int], bool],
    current_version: int,
    limits: IngestLimits,
) -> protocol.AdapterUpdate:
    """Check one update published on `devices/{device_id}/update`: its payload, or the form `decode`
    already made of it (the coordinator decodes each message once)."""
    limit = payload_limit(limits, manifest)
    decoded = payload if isinstance(payload, protocol.Decoded) else decode(payload, limit)
    update = decoded.update
    for name in ("train_loss", "wall_time", "created_at"):
        if not math.isfinite(getattr(update, name)):
            raise RejectedUpdate(f"header field {name} is {getattr(update, name)!r}; expected a finite number")
    if update.eval_loss < 0:
        raise RejectedUpdate(f"header field eval_loss is {update.eval_loss!r}; expected a loss ≥ 0")
    if update.device_id != device_id:
        raise RejectedUpdate(
            f"device id {update.device_id[:80]!r} in the header does not match topic device {device_id!r}"
        )
    key = key_of(device_id)
    if key is None:
        raise RejectedUpdate(f"unknown device {device_id!r}: register it with `alignfed coordinator add-device`")
    if not decoded.verify(key):
        raise RejectedUpdate("bad signature: HMAC-SHA256 does not match the device key")
    if update.bundle != bundle:
        raise RejectedUpdate(f"bundle {update.bundle[:12]}… does not match the federation's bundle {bundle[:12]}…")
    if update.base_version > current_version:
        raise RejectedUpdate(f"future version: base version {update.base_version} > current {current_version}")
    if not has_version(update.base_version):
        raise RejectedUpdate(f"unknown base version {update.base_version}")
    tau = current_version - update.base_version
    if tau > limits.tau_max:
        raise RejectedUpdate(
            f"stale: base version {update.base_version} is {tau} behind current {current_version} "
            f"(tau_max {limits.tau_max})"
        )
    if update.samples <= 0 or update.local_steps <= 0:
        raise RejectedUpdate(f"samples={update.samples}, local_steps={update.local_steps}; expected both > 0")
    expected = manifest.delta_shapes()
    got = set(update.deltas)
    if got != set(expected):
        missing, extra = sorted(set(expected) - got), sorted(got - set(expected))
        shown = [lid[:40] for lid in extra[:5]] + (["…"] if len(extra) > 5 else [])
        raise RejectedUpdate(f"wrong layers: missing {missing}, unexpected {shown}")
    rank = trained_rank(update, manifest)
    max_k = 2 * rank  # the difference of two rank-`rank` products
    for lid, f in update.deltas.items():
        out_dim, in_dim = expected[lid]
        if f.u.shape[0] != out_dim or f.v.shape[1] != in_dim or not 1 <= f.rank <= max_k:
            raise RejectedUpdate(
                f"wrong shape for layer {lid}: got u {list(f.u.shape)} v {list(f.v.shape)}, "
                f"expected u [{out_dim}, k] v [k, {in_dim}] with 1 ≤ k ≤ {max_k} (2 × LoRA rank {rank})"
            )
        if not (np.isfinite(f.u).all() and np.isfinite(f.v).all()):
            raise RejectedUpdate(f"non-finite values (NaN/Inf) in layer {lid}")
        norm = frobenius(f)
        if norm > limits.max_delta_norm:
            raise RejectedUpdate(f"norm of layer {lid} delta is {norm:.3g}, bound is {limits.max_delta_norm:.3g}")
    return update
