"""Local LoRA training with PyTorch: the backend for devices without ONNX Runtime training (aarch64).

onnxruntime-training has no aarch64 wheels, so Raspberry Pis and Jetsons train with this class. It
runs the same network as the bundle's ONNX graph (export/onnx_graph.py: RMSNorm in fp32,
rotate-half RoPE, grouped-query eager attention with HF's additive causal mask, SwiGLU, shifted
cross-entropy with ignore index −100, Qwen2's q/k/v bias) on the same frozen base weights, read
from the bundle's calibration model — the int8 bundle's weights are dequantized exactly as
`DequantizeLinear` does, so both backends train the same numbers. Gradients come from autograd;
the update is `edge.adamw.AdamW` with the bundle's optimizer hyper-parameters, i.e. the ORT
kernel's, so a device's result does not depend on which backend it runs.

`lean=True` (what the daemon runs) keeps the int8 base int8 in memory (edge/lean_linear.py), reads
it from the bundle one tensor at a time (edge/onnx_weights.py) and computes the LM head and loss in
chunks of tokens (edge/chunked_loss.py); `checkpoint=True` also recomputes each decoder layer in
backward instead of keeping its activations (the profile's `checkpointing = "layers"`).
`lean=False` is the plain fp32 path, kept as the reference the lean one is measured against.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from alignfed import lora, protocol
from alignfed import manifest as mf
from alignfed.errors import BundleError, TrainingError
from alignfed.rope import rope_tables
from alignfed.text import Batch
from edge.adamw import AdamW, Moments

QKV_BIAS = ("q", "k", "v")  # projections with a bias when Architecture.qkv_bias (Qwen2)


def base_weights(bundle: Path) -> dict[str, np.ndarray]:
    """The frozen base in HF names (Linear weights (out, in), float32) from the calibration model."""
    import onnx
    from onnx import numpy_helper

    path = Path(bundle) / mf.CALIB_MODEL
    if not path.is_file():
        raise BundleError(f"{path}: missing calibration model; re-export the bundle with `alignfed export`")
    inits = {t.name: t for t in onnx.load(str(path)).graph.initializer}
    out: dict[str, np.ndarray] = {}
    for name, t in inits.items():
        if name.startswith("const.") or name.endswith(mf.BASE_SCALE):
            continue
        arr = numpy_helper.to_array(t)
        if name.endswith(mf.BASE_INT8):  # (in, out) int8 · scale (out,), as DequantizeLinear(axis=1)
            hf = name[: -len(mf.BASE_INT8)]
            scale = numpy_helper.to_array(inits[hf + mf.BASE_SCALE]).astype(np.float32)
            out[hf] = np.ascontiguousarray((arr.astype(np.float32) * scale[None, :]).T)
        elif name.endswith(mf.BASE_T):
            out[name[: -len(mf.BASE_T)]] = np.ascontiguousarray(arr.T.astype(np.float32))
        else:
            out[name] = arr.astype(np.float32)
    return out


class TorchTrainer:
    """The `edge.trainer.Trainer` protocol on PyTorch (CPU)."""

    def __init__(
        self,
        bundle: Path,
        manifest: mf.Manifest,
        *,
        lr: float,
        threads: int,
        lean: bool = True,
        checkpoint: bool = False,
        loss_chunk: int = 128,
    ) -> None:
        try:
            import torch
        except ImportError as exc:
            raise TrainingError(
                "PyTorch is not installed; the torch trainer backend needs `pip install torch` "
                "(on x86_64 the default ort backend needs no torch)"
            ) from exc
        self._torch = torch
        torch.set_num_threads(max(1, threads))
        self.arch = a = manifest.architecture
        self.scale = manifest.lora.scale
        self.lr = lr
        self.shapes = manifest.lora_shapes()
        self.names = sorted(self.shapes)
        self.targets = set(manifest.lora.targets)
        self.optimizer = AdamW.from_model(Path(bundle) / mf.OPTIMIZER_MODEL)
        self.moments = Moments.zeros(self.shapes)
        self.lean, self.checkpoint, self.loss_chunk = lean, checkpoint, loss_chunk
        if lean:
            from edge.lean_linear import lean_base

            w: dict[str, Any] = lean_base(Path(bundle) / mf.CALIB_MODEL)
        else:
            w = {k: torch.from_numpy(v) for k, v in base_weights(bundle).items()}
        missing = [n for n in ("model.embed_tokens.weight", "model.norm.weight") if n not in w]
        if missing:
            raise BundleError(f"{bundle}: calibration model lacks base tensors {missing}")
        self.w = w
        cos, sin = rope_tables(a)  # (S, hd)
        self.cos, self.sin = torch.from_numpy(cos), torch.from_numpy(sin)
        self.params: dict[str, Any] = {}
        init = Path(bundle) / mf.ADAPTER_INIT
        if init.is_file():
            tensors, _ = protocol.unpack(init.read_bytes(), max_bytes=init.stat().st_size)
            self.load_adapter(tensors)
        else:
            self.load_adapter({n: np.zeros(s, np.float32) for n, s in self.shapes.items()})

    # -- adapter in and out -------------------------------------------------------------------

    def load_adapter(self, tensors: Mapping[str, np.ndarray]) -> None:
        torch = self._torch
        for name in self.names:
            if name not in tensors:
                raise TrainingError(f"adapter has no tensor {name}")
            if tuple(tensors[name].shape) != self.shapes[name]:
                raise TrainingError(
                    f"adapter tensor {name} has shape {tensors[name].shape}, expected {self.shapes[name]}"
                )
        self.params = {
            n: torch.tensor(np.asarray(tensors[n], dtype=np.float32), requires_grad=True) for n in self.names
        }

    def adapter(self) -> dict[str, np.ndarray]:
        return {n: p.detach().numpy().copy() for n, p in self.params.items()}

    # -- training -----------------------------------------------------------------------------

    def step(self, batch: Batch) -> float:
        loss = self._loss(batch)
        for p in self.params.values():
            p.grad = None
        loss.backward()
        grads = {n: p.grad.numpy() for n, p in self.params.items()}
        new = self.optimizer.update(self.adapter(), grads, self.moments, self.lr)
        self.load_adapter(new)
        return float(loss.detach())

    def eval_loss(self, batch: Batch) -> float:
        with self._torch.no_grad():
            return float(self._loss(batch))

    # -- the network (mirrors export/onnx_graph.py) ---------------------------------------------

    def _loss(self, batch: Batch) -> Any:
        torch, a, w = self._torch, self.arch, self.w
        ids = torch.from_numpy(np.asarray(batch.input_ids, dtype=np.int64))  # (B, T)
        labels = torch.from_numpy(np.asarray(batch.labels, dtype=np.int64))  # (B, T)
        t = ids.shape[1]
        cos, sin = self.cos[:t], self.sin[:t]  # (T, hd)
        future = torch.arange(t)[None, :] > torch.arange(t)[:, None]  # (T, T): key after query
        mask = torch.where(future, torch.finfo(torch.float32).min, 0.0)
        h = w["model.embed_tokens.weight"][ids]  # (B, T, H)
        for i in range(a.n_layers):
            if self.checkpoint and torch.is_grad_enabled():  # keep only h (B, T, H) per layer
                from torch.utils.checkpoint import checkpoint

                h = checkpoint(self._decoder_layer, h, i, cos, sin, mask, use_reentrant=False)
            else:
                h = self._decoder_layer(h, i, cos, sin, mask)
        h = self._rms(h, w["model.norm.weight"])[:, :-1].reshape(-1, a.hidden)  # (N, H): t predicts t + 1
        head = w["model.embed_tokens.weight"] if a.tie_embeddings else w["lm_head.weight"]  # (V, H)
        if self.lean:
            from edge.chunked_loss import chunked_head_loss

            return chunked_head_loss(h, head, labels[:, 1:].reshape(-1), self.loss_chunk)
        logits = h @ head.T  # (N, V)
        return torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)

    def _decoder_layer(self, h: Any, i: int, cos: Any, sin: Any, mask: Any) -> Any:
        p = f"model.layers.{i}."
        h = h + self._attention(self._rms(h, self.w[p + "input_layernorm.weight"]), i, cos, sin, mask)
        return h + self._mlp(self._rms(h, self.w[p + "post_attention_layernorm.weight"]), i)

    def _rms(self, x: Any, weight: Any) -> Any:
        var = (x * x).mean(dim=-1, keepdim=True)  # (B, T, 1)
        return x / (var + self.arch.rms_eps).sqrt() * weight

    def _linear(self, x: Any, layer: int, module: str) -> Any:
        """x (B, T, in) -> (B, T, out): frozen projection (+ bias) + s·(x Aᵀ) Bᵀ when adapted."""
        from edge.lean_linear import Int8Weight, int8_matmul

        hf = lora.hf_weight_name(layer, module)
        base = self.w[hf]
        y = int8_matmul(x, base) if isinstance(base, Int8Weight) else x @ base.T
        if self.arch.qkv_bias and module in QKV_BIAS:
            y = y + self.w[hf[: -len("weight")] + "bias"]
        if module in self.targets:
            a_ = self.params[lora.key(layer, module, "A")]  # (r, in)
            b_ = self.params[lora.key(layer, module, "B")]  # (out, r)
            y = y + ((x @ a_.T) * self.scale) @ b_.T
        return y

    def _rope(self, x: Any, cos: Any, sin: Any) -> Any:
        half = self.arch.head_dim // 2
        rot = self._torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def _attention(self, x: Any, layer: int, cos: Any, sin: Any, mask: Any) -> Any:
        a = self.arch
        b, t, _ = x.shape
        hd, nh, nkv = a.head_dim, a.n_heads, a.n_kv_heads

        def heads(y: Any, n: int) -> Any:  # (B, T, n·hd) -> (B, n, T, hd)
            return y.reshape(b, t, n, hd).transpose(1, 2)

        q = self._rope(heads(self._linear(x, layer, "q"), nh), cos, sin)
        k = self._rope(heads(self._linear(x, layer, "k"), nkv), cos, sin)
        v = heads(self._linear(x, layer, "v"), nkv)
        q5 = q.reshape(b, nkv, nh // nkv, t, hd)  # query head j reads kv head j // rep (HF repeat_kv)
        scores = q5 @ k.unsqueeze(2).transpose(-1, -2) * float(hd) ** -0.5 + mask  # (B, nkv, rep, T, T)
        ctx = scores.softmax(dim=-1) @ v.unsqueeze(2)  # (B, nkv, rep, T, hd)
        ctx = ctx.reshape(b, nh, t, hd).transpose(1, 2).reshape(b, t, nh * hd)
        return self._linear(ctx, layer, "o")

    def _mlp(self, x: Any, layer: int) -> Any:
        gate = self._linear(x, layer, "gate")
        return self._linear(gate * gate.sigmoid() * self._linear(x, layer, "up"), layer, "down")
