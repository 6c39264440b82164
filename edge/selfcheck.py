"""Start-up check that this machine's torch computes matrix products right.

With torch 2.13's aarch64 wheel under an SVE core model (qemu's default `max`, `a64fx`) torch was
seen to compute `x @ A.T` with a small transposed operand wrongly (error 15.9 on values of about
23) while every loss stayed finite: training would run on wrong numbers and nothing would say so.
Under the same emulated cores numpy and the pinned torch 2.9.1 (its SVE256 ATen kernels and
OpenBLAS's SVE sgemm included) compute these products right, which points at a kernel of that
wheel rather than at the emulator; SVE hardware (Graviton 3/4, Grace, Jetson Thor) may meet such a
kernel too (docs/devices.md). So before it trains, the trainer multiplies the shapes it uses
(activations times a transposed (r, in) LoRA factor or (out, in) weight) and compares them with a
float64 numpy reference; a mismatch is refused with the numbers.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from typing import Any

import numpy as np

from alignfed.errors import TrainingError

# (B, T, in) @ (out, in)ᵀ cases shaped like the trainer's: LoRA A (r=4..16), projections, the head.
_CASES: tuple[tuple[int, int, int, int], ...] = (
    (2, 16, 64, 4),
    (2, 63, 576, 8),
    (4, 64, 576, 16),
    (2, 64, 576, 576),
    (1, 17, 96, 1536),
    (2, 16, 64, 1000),
)


@dataclass(frozen=True, slots=True)
class MatmulCheck:
    worst_error: float  # largest |torch − float64| over all cases, relative to the case's scale
    case: tuple[int, int, int, int]  # (B, T, in, out) of the worst case
    tolerance: float


def check_matmul(torch: Any, *, device: str = "cpu", dtype: Any = None, tolerance: float | None = None) -> MatmulCheck:
    """Multiply `_CASES` with torch on `device` in `dtype` and compare with float64; raise on a mismatch.

    The error of a case is max |y − y64| / (max |x| · max |w| · in^½): rounding of a dot product of
    length `in` grows like √in · ε, so one tolerance serves every size. fp32 passes at 1e-5 with a
    wide margin (observed ≤ 1e-7); the faulty SVE path gave about 0.1.
    """
    dtype = dtype or torch.float32
    if tolerance is None:
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # fp16/bf16 compute: ε of 1e-3 / 8e-3
    rng = np.random.default_rng(0)
    worst, worst_case = 0.0, _CASES[0]
    for case in _CASES:
        b, t, n_in, n_out = case
        x = rng.normal(0.0, 1.0, (b, t, n_in)).astype(np.float32)  # (B, T, in)
        w = rng.normal(0.0, 1.0, (n_out, n_in)).astype(np.float32)  # (out, in), used transposed
        want = x.astype(np.float64) @ w.astype(np.float64).T  # (B, T, out)
        xt = torch.from_numpy(x).to(device=device, dtype=dtype)
        wt = torch.from_numpy(w).to(device=device, dtype=dtype)
        got = (xt @ wt.T).float().cpu().numpy().astype(np.float64)
        scale = float(np.abs(x).max() * np.abs(w).max() * np.sqrt(n_in))
        err = float(np.abs(got - want).max()) / scale if np.isfinite(got).all() else float("inf")
        if err > worst:
            worst, worst_case = err, case
    result = MatmulCheck(worst_error=worst, case=worst_case, tolerance=tolerance)
    if worst > tolerance:
        b, t, n_in, n_out = worst_case
        raise TrainingError(
            f"torch {torch.__version__} on this {platform.machine()} CPU ({cpu_capability(torch)}) multiplies "
            f"matrices wrongly: (B={b}, T={t}, in={n_in}) @ ({n_out}, {n_in})ᵀ is off by {worst:.3g} relative "
            f"to a float64 reference, expected at most {tolerance:g}; training here would produce wrong "
            "updates, so it is refused. Install the torch that scripts/setup-device.sh pins (it passes this "
            "check from ARMv8.0 to SVE cores); docs/devices.md, 'The matmul check and SVE'"
        )
    return result


def cpu_capability(torch: Any) -> str:
    """The vector kernels ATen dispatches to ("sve256", "default", "avx2", ...), when torch says."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:
        return "unknown"


def report(torch: Any) -> str:
    """One line for a device's set-up: torch version, kernels, thread count, the check's result."""
    threads = torch.get_num_threads()
    lines = []
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        c = check_matmul(torch)
        lines.append(f"{n} thread(s) error {c.worst_error:.2g}")
    return (
        f"torch {torch.__version__} on {platform.machine()} ({cpu_capability(torch)} kernels): "
        f"matmul check passed ({', '.join(lines)}; tolerance {c.tolerance:g})"
    )
