from __future__ import annotations

import math

import pytest

from simulator.metrics import EvalPoint, late_mean, time_to_target


def point(t: float, loss: float) -> EvalPoint:
    return EvalPoint(
        time=t, version=int(t), mean=loss, worst_domain=loss, worst_device=loss, per_domain={}, per_device={}
    )


def test_late_mean_averages_the_second_half_of_the_run() -> None:
    curve = [point(0, 9.0), point(10, 5.0), point(29, 4.0), point(30, 3.0), point(45, 2.0), point(60, 1.0)]
    assert late_mean(curve) == pytest.approx((3.0 + 2.0 + 1.0) / 3)  # t ≥ 30
    assert late_mean([point(0, 2.5)]) == 2.5
    assert math.isnan(late_mean([]))


def test_time_to_target_is_the_first_evaluation_at_or_below_it() -> None:
    curve = [point(0, 3.0), point(5, 2.0), point(9, 2.5), point(12, 1.5)]
    assert time_to_target(curve, 2.0) == 5
    assert time_to_target(curve, 1.0) is None
