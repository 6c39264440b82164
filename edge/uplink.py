"""What a device sends: its delta, truncated and quantized, with device-side error feedback.

Sending the exact delta s·(B_i A_i − B_v A_v) costs rank 2r factors in float32. The uplink sends
the best rank-k part (k = `delta_rank`, usually r) quantized to int8, and remembers what that
compression lost:

    full_t = Δ_t + e_{t−1}                 (e: the carry, kept on the device)
    sent_t = quantize(best rank-k of full_t)
    e_t    = best rank-q of (full_t − dequantize(sent_t))

so whatever one round does not transmit is sent in later rounds instead of being lost (error
feedback as in EF-SGD, Karimireddy et al. 2019, applied to low-rank factors). Everything stays
factored: a layer's carry is q = `carry_rank` directions, O((out + in)·q) floats.
"""

from __future__ import annotations

from collections.abc import Mapping

from alignfed import lowrank, protocol
from alignfed.lowrank import Factors


class Uplink:
    """Compresses a device's deltas for the wire and carries the compression error to the next one.

    `delta_rank` 0 sends every direction of the delta (k = its rank, ≤ 2r); `feedback=False`
    drops the compression error instead of carrying it (the ablation).
    """

    def __init__(self, quantization: str, delta_rank: int = 0, *, feedback: bool = True, carry_rank: int = 0) -> None:
        if quantization not in protocol.QUANTIZATIONS:
            raise ValueError(
                f"uplink: quantization {quantization!r}; expected one of {', '.join(protocol.QUANTIZATIONS)}"
            )
        if delta_rank < 0:
            raise ValueError(f"uplink: delta_rank must be ≥ 0, got {delta_rank}")
        self.quantization = quantization
        self.delta_rank = delta_rank
        self.feedback = feedback
        self.carry_rank = carry_rank
        self._carry: dict[str, Factors] = {}

    def compress(self, deltas: Mapping[str, Factors]) -> dict[str, Factors]:
        """The factors to send (before the wire's quantization) for these deltas plus the carry."""
        sent: dict[str, Factors] = {}
        carry: dict[str, Factors] = {}
        for lid, delta in deltas.items():
            full = lowrank.stack([delta, self._carry[lid]]) if lid in self._carry else delta
            sv = lowrank.Svd.of_factors(full)
            k = min(self.delta_rank or delta.rank, sv.s.size)
            sent[lid] = sv.head(k)  # (out, k) @ (k, in)
            if self.feedback:
                received = protocol.wire_roundtrip(sent[lid], self.quantization)
                lost = lowrank.Svd.of_factors(lowrank.stack([full, Factors(u=-received.u, v=received.v)]))
                q = min(self.carry_rank or max(k, 1), lost.s.size)
                carry[lid] = lost.head(q)
        self._carry = carry
        return sent

    def carried_norm(self) -> float:
        """‖e‖_F over all layers: how much movement is waiting to be sent."""
        return float(sum(f.squared_norm() for f in self._carry.values()) ** 0.5)
