"""A frozen linear layer whose weight stays int8 in memory (the lean PyTorch trainer).

The bundle's training base is int8 per output channel: `q_t` (in, out) int8 and `scale` (out,)
float32, dequantized as ONNX `DequantizeLinear(axis=1)` does, w = float(q_t) · scale. The fp32 base
of a 1 B model is ~4 GB; int8 is a quarter of that. The dequantized (in, out) matrix of one layer
exists only while that layer computes:

- forward: y = x @ w, then w is dropped; autograd saves only `q_t` and `scale` (references to the
  tensors the trainer holds anyway, so nothing new) — not x, since the base needs no weight gradient;
- backward: dx = dy @ wᵀ, computed as (dy · scale) @ float(q_t)ᵀ — the scale applied to the
  (tokens × out) gradient instead of to the (in × out) weight, one weight-sized pass less.

Dequantizing before the matmul (rather than scaling its output) keeps the ORT graph's order of
operations, so the lean trainer computes the same numbers as the ORT backend (up to the matmul's
own summation order). The cost is one int8 -> float32 pass over the layer's weights in forward and
one in backward (benchmarks/bench_lean.py measures it against the fp32 base).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alignfed.errors import BundleError


@dataclass(frozen=True, slots=True)
class Int8Weight:
    """A frozen projection as the bundle stores it: q_t (in, out) int8, scale (out,) float32."""

    q_t: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def from_numpy(cls, q_t: np.ndarray, scale: np.ndarray) -> Int8Weight:
        if q_t.dtype != np.int8 or q_t.ndim != 2 or scale.shape != (q_t.shape[1],):
            raise ValueError(
                f"int8 weight expected q_t (in, out) int8 and scale (out,), got {q_t.dtype} {q_t.shape}, {scale.shape}"
            )
        return cls(torch.from_numpy(np.ascontiguousarray(q_t)), torch.from_numpy(scale.astype(np.float32)))

    def dequantize(self) -> torch.Tensor:
        """(in, out) float32, exactly DequantizeLinear(q_t, scale, axis=1)."""
        return self.q_t.to(torch.float32).mul_(self.scale)

    @property
    def nbytes(self) -> int:
        return self.q_t.numel() + 4 * self.scale.numel()


@dataclass(frozen=True, slots=True)
class Int8Rows:
    """An embedding table (and the LM head tied to it) kept int8 per row: q (V, H) int8, scale (V,).

    The bundle stores the embedding float32 (the ORT graph gathers from it), and on a 1 B model it
    is the largest tensor: 128 256 × 2048 floats, 1.05 GB of the 2.05 GB base. Quantized here, at
    load, symmetric per row (scale = max |row| / 127), it takes a quarter; each element moves by at
    most scale / 2, i.e. 0.4 % of its row's largest entry. The numbers then differ from the ORT
    backend's by that rounding (tests/edge/test_lean_pieces.py bounds it), so it is a profile option
    (`embedding = "int8"`) for boards where the fp32 table does not fit, not the default.
    """

    q: torch.Tensor
    scale: torch.Tensor

    BLOCK = 8192  # vocabulary rows dequantized at once for the LM head: 8192 × H floats (64 MB at H 2048)

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Int8Rows:
        """Per-row symmetric int8 of w (V, H) float32; an all-zero row gets scale 1 (it stays zero).
        BLOCK rows at a time, so the float temporaries are a block's, not a second table's."""
        q = torch.empty(w.shape, dtype=torch.int8)
        scale = torch.empty(w.shape[0], dtype=torch.float32)
        for s in range(0, w.shape[0], cls.BLOCK):
            block = w[s : s + cls.BLOCK].to(torch.float32)  # (b, H); w itself is left as it was
            peak = block.abs().amax(dim=1)  # (b,)
            step = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak))
            q[s : s + cls.BLOCK] = (block / step[:, None]).round_().clamp_(-127, 127).to(torch.int8)
            scale[s : s + cls.BLOCK] = step
        return cls(q, scale)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.q.shape[0]), int(self.q.shape[1]))

    @property
    def nbytes(self) -> int:
        return self.q.numel() + 4 * self.scale.numel()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup: (...) int64 -> (..., H) float32."""
        return self.q[ids].to(torch.float32).mul_(self.scale[ids][..., None])

    def blocks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, dequantized (b, H) float32 block) over the vocabulary, BLOCK rows at a time."""
        for s in range(0, self.q.shape[0], self.BLOCK):
            yield s, self.q[s : s + self.BLOCK].to(torch.float32).mul_(self.scale[s : s + self.BLOCK, None])


# At most this many weights dequantized at once (4 MB of float32). Measured, side by side against the
# fp32 trainer at 2×64 tokens: untiled, the int8 → float32 copies of a 1 B model's projections took
# 23 % of the step (1.39× fp32); tiled, 1.03× (Qwen2.5-0.5B: 1.10× → 1.03×). SmolLM2's largest
# projection (576 × 1536) is below the bound and stays whole.
TILE_WEIGHTS = 1 << 20


def _tile_width(q_t: torch.Tensor) -> int:
    """Output columns per tile of an (in, out) weight: whole below TILE_WEIGHTS, else equal tiles under it."""
    n_in, n_out = q_t.shape
    tiles = max(1, -(-(n_in * n_out) // TILE_WEIGHTS))
    return -(-n_out // tiles)


class _Int8MatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, q_t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q_t, scale)  # int8 + (out,): the dequantized weight is not kept
        width = _tile_width(q_t)
        if width >= q_t.shape[1]:
            return x @ q_t.to(torch.float32).mul_(scale)  # (..., in) @ (in, out): dequantize, then multiply
        # A large layer a tile of output columns at a time: the float32 tile is read by the matmul while
        # it is still in cache, instead of a whole (in, out) float32 matrix written to memory and read back.
        y = x.new_empty((*x.shape[:-1], q_t.shape[1]))
        for s in range(0, q_t.shape[1], width):
            y[..., s : s + width] = x @ q_t[:, s : s + width].to(torch.float32).mul_(scale[s : s + width])
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        q_t, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        # dy @ (q·s)ᵀ = (dy·s) @ qᵀ: the per-output scale goes onto dy (tokens × out), not onto the
        # weight (in × out) — one weight-sized pass less per projection and step.
        g = dy * scale  # (..., out)
        width = _tile_width(q_t)
        if width >= q_t.shape[1]:
            return g @ q_t.to(torch.float32).T, None, None  # (..., out) @ (out, in)
        dx = g[..., :width] @ q_t[:, :width].to(torch.float32).T
        for s in range(width, q_t.shape[1], width):  # the same tiles of output columns, their products summed
            dx += g[..., s : s + width] @ q_t[:, s : s + width].to(torch.float32).T
        return dx, None, None


def int8_matmul(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """x (..., in) -> (..., out) through the int8 weight; differentiable in x only."""
    out: torch.Tensor = _Int8MatMul.apply(x, w.q_t, w.scale)  # type: ignore[no-untyped-call]  # torch's stub
    return out


def lean_base(calib_model: Path, *, embedding: str = "fp32") -> dict[str, torch.Tensor | Int8Weight | Int8Rows]:
    """The frozen base in HF names, int8 projections kept int8, read one tensor at a time.

    Projections come back as `Int8Weight` (int8 bundle) or as an (out, in) float32 view of the
    stored (in, out) matrix (fp32 bundle, no copy); norms and embeddings as float32 tensors, or with
    `embedding="int8"` the embedding table and LM head as `Int8Rows`, each quantized as soon as it
    is read, so its float32 form and the rest of the base are never in memory together (on a 1 B
    model that is the difference between a 2.6 GB and a 1.6 GB peak while loading).
    """
    from alignfed import manifest as mf
    from edge.onnx_weights import read_initializers

    tables = ("model.embed_tokens.weight", "lm_head.weight") if embedding == "int8" else ()
    out: dict[str, torch.Tensor | Int8Weight | Int8Rows] = {}
    pending: dict[str, np.ndarray] = {}  # an int8 matrix or its scale, until its partner is read
    for name, arr in read_initializers(calib_model, lambda n: not n.startswith("const.")):
        if name.endswith(mf.BASE_SCALE) or name.endswith(mf.BASE_INT8):  # (in, out) int8 · scale (out,)
            hf = name[: -len(mf.BASE_SCALE if name.endswith(mf.BASE_SCALE) else mf.BASE_INT8)]
            pending[name] = arr
            q, scale = pending.get(hf + mf.BASE_INT8), pending.get(hf + mf.BASE_SCALE)
            if q is not None and scale is not None:
                out[hf] = Int8Weight.from_numpy(q, scale)
                del pending[hf + mf.BASE_INT8], pending[hf + mf.BASE_SCALE]
        elif name.endswith(mf.BASE_T):  # (in, out) float32 -> an (out, in) view
            out[name[: -len(mf.BASE_T)]] = torch.from_numpy(arr.astype(np.float32, copy=False)).T
        elif name in tables:
            out[name] = Int8Rows.quantize(torch.from_numpy(arr))
            del arr  # the float32 table goes before the next tensor is read
        else:
            out[name] = torch.from_numpy(arr.astype(np.float32, copy=False))
    if pending:
        raise BundleError(f"{calib_model}: int8 weights without their scale (or the reverse): {sorted(pending)}")
    return out
