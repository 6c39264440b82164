"""Rotary position embedding tables, shared by the exported ONNX graph and the PyTorch trainer."""

from __future__ import annotations

import numpy as np

from alignfed.manifest import Architecture


def rope_tables(arch: Architecture) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (max_seq, head_dim) as HF's default rotary embedding computes them (`rope_table`)."""
    return rope_table(arch.rope_theta, arch.head_dim, arch.max_seq)


def rope_table(theta: float, dim: int, max_seq: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (max_seq, dim) of plain RoPE with base `theta` over `dim` rotated channels.

    HF multiplies positions by inv_freq in float32, so the angle is rounded to float32 before
    cos/sin; the same is done here. inv_freq itself is the correctly rounded float32 of
    theta^(-2i/d); torch's float32 pow differs from it by 1 ulp in some entries, which moves the
    angle by ~1e-4 rad at position 8192 and by nothing measurable at short positions.
    """
    inv_freq = (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))).astype(np.float32)
    pos = np.arange(max_seq, dtype=np.float32)
    freqs = pos[:, None] * inv_freq[None, :]  # (S, dim/2), float32 products
    emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)  # (S, dim)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
