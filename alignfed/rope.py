"""Rotary position embedding tables, shared by the exported ONNX graph and the PyTorch trainer."""

from __future__ import annotations

import numpy as np

from alignfed.manifest import Architecture


def rope_tables(arch: Architecture) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (max_seq, head_dim) as HF's default rotary embedding computes them.

    HF multiplies positions by inv_freq in float32, so the angle is rounded to float32 before
    cos/sin; the same is done here. inv_freq itself is the correctly rounded float32 of
    theta^(-2i/d); torch's float32 pow differs from it by 1 ulp in some entries, which moves the
    angle by ~1e-4 rad at position 8192 and by nothing measurable at short positions.
    """
    hd = arch.head_dim
    inv_freq = (1.0 / (arch.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))).astype(np.float32)
    pos = np.arange(arch.max_seq, dtype=np.float32)
    freqs = pos[:, None] * inv_freq[None, :]  # (S, hd/2), float32 products
    emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)  # (S, hd)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
