"""Device-side compression with error feedback (edge.uplink)."""

from __future__ import annotations

import numpy as np
import pytest

from alignfed import protocol
from alignfed.lowrank import Factors, Svd
from edge.uplink import Uplink


def _delta(rng: np.random.Generator, out_dim: int = 24, in_dim: int = 20, k: int = 8) -> dict[str, Factors]:
    return {
        "0.q": Factors(
            u=rng.standard_normal((out_dim, k)).astype(np.float32),
            v=rng.standard_normal((k, in_dim)).astype(np.float32),
        )
    }


def _received(sent: dict[str, Factors], quant: str) -> np.ndarray:
    return protocol.wire_roundtrip(sent["0.q"], quant).dense()


@pytest.mark.parametrize("quant", ["fp32", "int8c", "int4c"])
def test_feedback_telescopes_what_was_not_sent(quant: str) -> None:
    """Σ received + carry = Σ deltas: nothing the compression drops is lost (carry cap not hit)."""
    rng = np.random.default_rng(0)
    up = Uplink(quant, delta_rank=2, carry_rank=64)
    total = np.zeros((24, 20))
    got = np.zeros((24, 20))
    for _ in range(5):
        d = _delta(rng)
        total += d["0.q"].dense()
        sent = up.compress(d)
        assert sent["0.q"].rank == 2
        got += _received(sent, quant)
    carry = total - got
    assert up.carried_norm() == pytest.approx(np.linalg.norm(carry), rel=1e-4)
    assert np.linalg.norm(carry) < 0.9 * np.linalg.norm(total)


def test_feedback_beats_dropping_over_rounds() -> None:
    """The same delta every round: with feedback the cumulative error stays bounded, without it grows."""
    rng = np.random.default_rng(1)
    d = _delta(rng)
    errors = {}
    for feedback in (True, False):
        up = Uplink("int8c", delta_rank=2, feedback=feedback)
        got = sum(_received(up.compress(d), "int8c") for _ in range(8))
        errors[feedback] = np.linalg.norm(8 * d["0.q"].dense() - got)
    assert errors[True] < 0.5 * errors[False]


def test_rank_zero_sends_every_direction_exactly_in_fp32() -> None:
    rng = np.random.default_rng(2)
    d = _delta(rng, k=3)
    up = Uplink("fp32")
    sent = up.compress(d)
    assert sent["0.q"].rank == 3
    np.testing.assert_allclose(sent["0.q"].dense(), d["0.q"].dense(), atol=1e-4)
    assert up.carried_norm() < 1e-4
    s = Svd.of_factors(sent["0.q"]).s
    assert s.size == 3


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="quantization 'int4'"):
        Uplink("int4")
    with pytest.raises(ValueError, match="delta_rank"):
        Uplink("int8c", -1)
