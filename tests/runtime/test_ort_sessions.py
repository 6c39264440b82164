"""ONNX Runtime session setup lives in `runtime.ort`: its options, and the sessions built from them."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignfed import manifest as mf
from coordinator.calibration import CalibrationRunner
from runtime.ort import PROVIDERS, QUIET, inference_session, session_options

SPINNING = "session.intra_op.allow_spinning"


def test_options_carry_threads_arena_log_level_and_no_spinning_by_default() -> None:
    opts = session_options(threads=3, arena=False)
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (3, 1)
    assert opts.log_severity_level == QUIET
    assert opts.enable_cpu_mem_arena is False
    assert opts.get_session_config_entry(SPINNING) == "0"
    spinning = session_options(threads=0, spinning=True)
    assert spinning.intra_op_num_threads == 0 and spinning.enable_cpu_mem_arena is True
    with pytest.raises(RuntimeError, match=SPINNING):  # ORT's default (spinning) left alone
        spinning.get_session_config_entry(SPINNING)
    with pytest.raises(ValueError, match="threads must be ≥ 0"):
        session_options(threads=-1)


def test_an_inference_session_runs_on_the_cpu_with_the_options_given(tiny_bundle: Path) -> None:
    session = inference_session(tiny_bundle / mf.CALIB_MODEL, session_options(threads=2))
    assert session.get_providers() == list(PROVIDERS)
    got = session.get_session_options()
    assert got.intra_op_num_threads == 2 and got.get_session_config_entry(SPINNING) == "0"


def test_the_coordinators_calibration_session_does_not_spin(tiny_bundle: Path) -> None:
    runner = CalibrationRunner.from_bundle(tiny_bundle, mf.load(tiny_bundle), None, 16, threads=2)
    got = runner._session.get_session_options()
    assert got.intra_op_num_threads == 2 and got.log_severity_level == QUIET
    assert got.get_session_config_entry(SPINNING) == "0"
