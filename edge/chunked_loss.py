"""LM head + cross-entropy over chunks of tokens: the (tokens × vocab) logits never exist whole.

At 4 × 128 tokens and Qwen2.5's 151 936-token vocabulary the logits are 310 MB and autograd keeps
them plus their softmax for backward. Here the loss is computed `chunk` rows at a time, and the
gradient with respect to the hidden states is formed in the same pass — d loss / d h_i =
(softmax(h_i Wᵀ) − onehot(y_i)) W / n_valid (the head W is frozen, no gradient) — so what autograd
keeps is dh (N, H), not the logits. The mean is over labels ≠ −100, as ONNX
SoftmaxCrossEntropyLoss(reduction="mean", ignore_index=−100) and HF compute it.

With logit soft-capping (Gemma: z = c·tanh(u / c), u = h Wᵀ) the chain rule adds the factor
dz/du = 1 − (z / c)² to each logit's gradient, computed from the same chunk's z.
"""

from __future__ import annotations

from typing import Any

import torch

IGNORE_INDEX = -100
EXP_FLOOR = -87.0  # log of the smallest normal float32 (1.18e-38), rounded up
DEFAULT_CHUNK = 128  # rows per chunk: chunk × vocab floats live at once (77 MB at Qwen2.5's vocab)


def _chunks(n: int, chunk: int) -> range:
    return range(0, n, max(1, chunk))


def _logits(h: torch.Tensor, head: Any) -> torch.Tensor:
    """h (c, H) @ headᵀ -> (c, V); an int8 head (edge.lean_linear.Int8Rows) a vocabulary block at a time."""
    if isinstance(head, torch.Tensor):
        return h @ head.T
    out = torch.empty((h.shape[0], head.shape[0]), dtype=torch.float32)
    for s, block in head.blocks():  # block: (b, H) float32, freed before the next
        out[:, s : s + block.shape[0]] = h @ block.T
    return out


def _back(probs: torch.Tensor, head: Any) -> torch.Tensor:
    """probs (c, V) @ head -> (c, H), blockwise for an int8 head like `_logits`."""
    if isinstance(head, torch.Tensor):
        return probs @ head
    out = torch.zeros((probs.shape[0], head.shape[1]), dtype=torch.float32)
    for s, block in head.blocks():
        out += probs[:, s : s + block.shape[0]] @ block
    return out


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, h: torch.Tensor, head: torch.Tensor, labels: torch.Tensor, chunk: int, softcap: float | None
    ) -> torch.Tensor:
        # h: (N, H), head: (V, H), labels: (N,) int64
        valid = labels != IGNORE_INDEX
        n_valid = int(valid.sum())
        total = torch.zeros((), dtype=torch.float32)
        need_grad = ctx.needs_input_grad[0]
        dh = torch.zeros_like(h) if need_grad else None
        for s in _chunks(h.shape[0], chunk):
            y = labels[s : s + chunk]
            logits = _logits(h[s : s + chunk], head)  # (c, V)
            if softcap is not None:
                logits = (logits / softcap).tanh() * softcap
            logp = logits.log_softmax(dim=-1)
            keep = y != IGNORE_INDEX
            safe = torch.where(keep, y, 0)
            total = total - logp.gather(1, safe[:, None])[:, 0][keep].sum()
            if dh is not None:
                # (c, V) in place: softmax. Clamped first: exp of a float below −87 underflows, and
                # torch's CPU exp takes a scalar path for those (16× slower on a random-weight 0.5 B
                # model's logits, 190 vs 12 ms); every such probability is < 1.7e-38, i.e. zero here.
                probs = logp.clamp_(min=EXP_FLOOR).exp_()
                probs[torch.arange(len(y)), safe] -= 1.0
                probs[~keep] = 0.0
                if softcap is not None:  # through z = c·tanh(u / c): × (1 − (z / c)²)
                    probs *= 1.0 - (logits / softcap) ** 2
                dh[s : s + chunk] = _back(probs, head)  # (c, H)
        # No valid label: ONNX/HF give NaN (0/0); keep that, it marks an empty batch the same way.
        loss = total / n_valid if n_valid else total * float("nan")
        if dh is not None:
            ctx.save_for_backward(dh / max(n_valid, 1))
        return loss

    @staticmethod
    def backward(ctx: Any, dloss: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        (dh,) = ctx.saved_tensors
        return dh * dloss, None, None, None, None


def chunked_head_loss(
    h: torch.Tensor,
    head: Any,
    labels: torch.Tensor,
    chunk: int = DEFAULT_CHUNK,
    softcap: float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of logits h @ headᵀ (soft-capped to ±softcap when given) against labels
    (−100 ignored); h (N, H), head (V, H) float32 or `edge.lean_linear.Int8Rows`."""
    out: torch.Tensor = _ChunkedHeadLoss.apply(h, head, labels, chunk, softcap)  # type: ignore[no-untyped-call]  # torch's stub
    return out
