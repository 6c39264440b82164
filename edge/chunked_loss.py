"""LM head + cross-entropy over chunks of tokens: the (tokens × vocab) logits never exist whole.

At 4 × 128 tokens and Qwen2.5's 151 936-token vocabulary the logits are 310 MB and autograd keeps
them plus their softmax for backward. Here the loss is computed `chunk` rows at a time, and the
gradient with respect to the hidden states is formed in the same pass — d loss / d h_i =
(softmax(h_i Wᵀ) − onehot(y_i)) W / n_valid (the head W is frozen, no gradient) — so what autograd
keeps is dh (N, H), not the logits. The mean is over labels ≠ −100, as ONNX
SoftmaxCrossEntropyLoss(reduction="mean", ignore_index=−100) and HF compute it.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100
DEFAULT_CHUNK = 128  # rows per chunk: chunk × vocab floats live at once (77 MB at Qwen2.5's vocab)


def _chunks(n: int, chunk: int) -> range:
    return range(0, n, max(1, chunk))


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, head: torch.Tensor, labels: torch.Tensor, chunk: int) -> torch.Tensor:
        # h: (N, H), head: (V, H), labels: (N,) int64
        valid = labels != IGNORE_INDEX
        n_valid = int(valid.sum())
        total = torch.zeros((), dtype=torch.float32)
        need_grad = ctx.needs_input_grad[0]
        dh = torch.zeros_like(h) if need_grad else None
        for s in _chunks(h.shape[0], chunk):
            y = labels[s : s + chunk]
            logits = h[s : s + chunk] @ head.T  # (c, V)
            logp = logits.log_softmax(dim=-1)
            keep = y != IGNORE_INDEX
            safe = torch.where(keep, y, 0)
            total = total - logp.gather(1, safe[:, None])[:, 0][keep].sum()
            if dh is not None:
                probs = logp.exp_()  # (c, V) in place: softmax
                probs[torch.arange(len(y)), safe] -= 1.0
                probs[~keep] = 0.0
                dh[s : s + chunk] = probs @ head  # (c, H)
        # No valid label: ONNX/HF give NaN (0/0); keep that, it marks an empty batch the same way.
        loss = total / n_valid if n_valid else total * float("nan")
        if dh is not None:
            ctx.save_for_backward(dh / max(n_valid, 1))
        return loss

    @staticmethod
    def backward(ctx: Any, dloss: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (dh,) = ctx.saved_tensors
        return dh * dloss, None, None, None


def chunked_head_loss(
    h: torch.Tensor, head: torch.Tensor, labels: torch.Tensor, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Mean cross-entropy of logits h @ headᵀ against labels (−100 ignored); h (N, H), head (V, H)."""
    out: torch.Tensor = _ChunkedHeadLoss.apply(h, head, labels, chunk)  # type: ignore[no-untyped-call]  # torch's stub
    return out
