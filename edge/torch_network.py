"""The bundle's network in PyTorch, with one LoRA adapter per group of rows.

It runs the same network as the bundle's ONNX graph (export/onnx_graph.py: RMSNorm in fp32,
rotate-half RoPE, grouped-query eager attention with HF's additive causal mask, SwiGLU, shifted
cross-entropy with ignore index −100, Qwen2's q/k/v bias) on the frozen base weights read from the
bundle's calibration model — the int8 bundle's weights are dequantized exactly as
`DequantizeLinear` does, so it computes the numbers the ORT graph computes.

The rows of a batch belong to D adapters (D = 1 for one device): rows [d·B, (d+1)·B) use adapter
d. The frozen base runs once over all D·B rows; each adapted projection adds its own adapter's
`s·(x Aᵀ) Bᵀ` by a batched matmul over adapters, and the loss is each adapter's own mean over its
rows' labelled tokens. Adapters share no parameter, so the gradient of the summed losses with
respect to adapter d is the gradient of loss d alone: one backward pass trains D devices exactly
as D separate passes would. Both the edge's PyTorch trainer (D = 1) and the simulator's batched
trainer use this class.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from alignfed import lora
from alignfed import manifest as mf
from alignfed.errors import BundleError, TrainingError
from alignfed.rope import rope_tables

QKV_BIAS = ("q", "k", "v")  # projections with a bias when Architecture.qkv_bias (Qwen2)
TORCH_FAMILIES = ("llama", "qwen2")  # the families whose forward pass this module writes by hand


def import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise TrainingError(
            "PyTorch is not installed; the torch trainer backend needs `pip install torch` "
            "(on x86_64 the default ort backend needs no torch)"
        ) from exc
    return torch


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


class TorchNetwork:
    """Frozen base + per-row-group LoRA; `losses` gives one loss per adapter."""

    def __init__(
        self,
        bundle: Path,
        manifest: mf.Manifest,
        *,
        device: str = "cpu",
        compute: Any = None,
        lean: bool = False,
        checkpoint: bool = False,
        loss_chunk: int = 128,
    ) -> None:
        """`compute`: dtype of the frozen matrices and their products (torch.float32 by default; a
        Jetson's GPU uses bf16/fp16, see `edge.accelerator`); norms, biases, the adapters and the
        loss stay fp32. `lean` (CPU): the int8 base stays int8 (`edge.lean_linear`) and one adapter's
        LM head and loss run in chunks of `loss_chunk` tokens (`edge.chunked_loss`); `checkpoint`
        recomputes each decoder layer in backward instead of keeping its activations."""
        torch = self._torch = import_torch()
        self.compute = compute or torch.float32
        self.arch = a = manifest.architecture
        if a.family not in TORCH_FAMILIES:  # its forward pass is Llama's; others would train silently wrong
            raise TrainingError(
                f"the torch trainer backend runs {', '.join(TORCH_FAMILIES)}, not {a.family!r}; "
                "train this bundle with the ort backend"
            )
        self.scale = manifest.lora.scale
        self.targets = set(manifest.lora.targets)
        self.device = device
        if device == "cuda":  # fp32 matmuls, not TF32, so CUDA results stay comparable to the CPU's
            torch.backends.cuda.matmul.allow_tf32 = False
        self.lean, self.checkpoint, self.loss_chunk = lean, checkpoint, loss_chunk
        if lean:
            from edge.lean_linear import lean_base

            w: dict[str, Any] = lean_base(Path(bundle) / mf.CALIB_MODEL)
        else:
            w = {k: self._place(torch.from_numpy(v)) for k, v in base_weights(bundle).items()}
        missing = [n for n in ("model.embed_tokens.weight", "model.norm.weight") if n not in w]
        if missing:
            raise BundleError(f"{bundle}: calibration model lacks base tensors {missing}")
        self.w = w
        cos, sin = rope_tables(a)  # (S, hd)
        self.cos, self.sin = torch.from_numpy(cos).to(device), torch.from_numpy(sin).to(device)

    def losses(self, input_ids: np.ndarray, labels: np.ndarray, params: Mapping[str, Any]) -> Any:
        """(D,) mean token loss of each adapter's rows.

        input_ids, labels: (D·B, T) int64, rows grouped by adapter; params: canonical key ->
        (D, r, in) for A, (D, out, r) for B (torch tensors on `self.device`). Two savings change
        no loss and no gradient: trailing columns no row labels are dropped, and the LM head
        (the largest matmul on small models: V × H per position) runs only at labelled positions.
        """
        torch, a, w = self._torch, self.arch, self.w
        labels = np.asarray(labels, dtype=np.int64)
        d = next(iter(params.values())).shape[0]
        n = labels.shape[0]
        if n % d:
            raise TrainingError(f"{n} rows cannot be split evenly over {d} adapters")
        # Columns after the last labelled one change no loss (attention is causal): drop them.
        used = np.flatnonzero((labels != -100).any(axis=0))
        t = max(2, int(used[-1]) + 1 if used.size else 2)
        ids = torch.from_numpy(np.ascontiguousarray(np.asarray(input_ids, dtype=np.int64)[:, :t])).to(self.device)
        target = labels[:, 1:t]  # (N, T−1): position t predicts t + 1
        keep = np.flatnonzero(target.reshape(-1) != -100)  # labelled positions: the only logits needed
        owner = torch.from_numpy((keep // ((t - 1) * (n // d))).astype(np.int64)).to(self.device)  # adapter per kept
        cos, sin = self.cos[:t], self.sin[:t]  # (T, hd)
        future = torch.arange(t, device=self.device)[None, :] > torch.arange(t, device=self.device)[:, None]
        mask = torch.where(future, torch.finfo(torch.float32).min, 0.0)  # (T, T): key after query
        h = w["model.embed_tokens.weight"][ids].float()  # (N, T, H)
        for i in range(a.n_layers):
            if self.checkpoint and torch.is_grad_enabled():  # keep only h (N, T, H) per layer
                from torch.utils.checkpoint import checkpoint

                h = checkpoint(self._decoder_layer, h, i, cos, sin, mask, params, use_reentrant=False)
            else:
                h = self._decoder_layer(h, i, cos, sin, mask, params)
        h = self._rms(h, w["model.norm.weight"])[:, :-1].reshape(-1, a.hidden)  # (N·(T−1), H)
        rows = torch.from_numpy(keep).to(self.device)
        head = w["model.embed_tokens.weight"] if a.tie_embeddings else w["lm_head.weight"]  # (V, H)
        gold = torch.from_numpy(target.reshape(-1)[keep]).to(self.device)  # (K,)
        if self.lean and d == 1:  # the (K, V) logits and their gradient never exist whole
            from edge.chunked_loss import chunked_head_loss

            return chunked_head_loss(h[rows], head, gold, self.loss_chunk).reshape(1)
        each = torch.nn.functional.cross_entropy(
            (h[rows].to(self.compute) @ head.T).float(), gold, reduction="none"
        )  # (K,): the head in the compute dtype, the loss in fp32
        total = torch.zeros(d, dtype=each.dtype, device=self.device).index_add(0, owner, each)  # (D,)
        counted = torch.bincount(owner, minlength=d).to(each.dtype)  # (D,)
        return total / counted  # NaN for an adapter without labelled tokens, as ORT's mean

    def _place(self, t: Any) -> Any:
        """A frozen base tensor on the device: matrices (2-D) in the compute dtype, vectors fp32."""
        t = t.to(self.device)
        return t.to(self.compute) if t.ndim == 2 else t

    def _decoder_layer(
        self, h: Any, i: int, cos: Any, sin: Any, mask: Any, params: Mapping[str, Any]
    ) -> Any:
        p = f"model.layers.{i}."
        h = h + self._attention(self._rms(h, self.w[p + "input_layernorm.weight"]), i, cos, sin, mask, params)
        return h + self._mlp(self._rms(h, self.w[p + "post_attention_layernorm.weight"]), i, params)

    def _rms(self, x: Any, weight: Any) -> Any:
        var = (x * x).mean(dim=-1, keepdim=True)  # (N, T, 1)
        return x / (var + self.arch.rms_eps).sqrt() * weight

    def _linear(self, x: Any, layer: int, module: str, params: Mapping[str, Any]) -> Any:
        """x (N, T, in) -> (N, T, out): frozen projection (+ bias) + each adapter's s·(x Aᵀ) Bᵀ."""
        hf = lora.hf_weight_name(layer, module)
        base = self.w[hf]
        if self.lean and not self._torch.is_tensor(base):  # an Int8Weight: dequantized inside the matmul
            from edge.lean_linear import int8_matmul

            y = int8_matmul(x, base)
        else:
            y = (x.to(self.compute) @ base.T).float()  # frozen base in the compute dtype, fp32 out
        if self.arch.qkv_bias and module in QKV_BIAS:
            y = y + self.w[hf[: -len("weight")] + "bias"]
        if module in self.targets:
            a_ = params[lora.key(layer, module, "A")]  # (D, r, in)
            b_ = params[lora.key(layer, module, "B")]  # (D, out, r)
            n, t, _ = x.shape
            xd = x.reshape(a_.shape[0], -1, x.shape[-1])  # (D, B·T, in): adapter d's rows
            low = self._torch.bmm(xd, a_.transpose(1, 2)) * self.scale  # (D, B·T, r)
            y = y + self._torch.bmm(low, b_.transpose(1, 2)).reshape(n, t, -1)  # (N, T, out)
        return y

    def _rope(self, x: Any, cos: Any, sin: Any) -> Any:
        half = self.arch.head_dim // 2
        rot = self._torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def _attention(self, x: Any, layer: int, cos: Any, sin: Any, mask: Any, params: Mapping[str, Any]) -> Any:
        a = self.arch
        b, t, _ = x.shape
        hd, nh, nkv = a.head_dim, a.n_heads, a.n_kv_heads

        def heads(y: Any, n: int) -> Any:  # (N, T, n·hd) -> (N, n, T, hd)
            return y.reshape(b, t, n, hd).transpose(1, 2)

        q = self._rope(heads(self._linear(x, layer, "q", params), nh), cos, sin)
        k = self._rope(heads(self._linear(x, layer, "k", params), nkv), cos, sin)
        v = heads(self._linear(x, layer, "v", params), nkv)
        q5 = q.reshape(b, nkv, nh // nkv, t, hd)  # query head j reads kv head j // rep (HF repeat_kv)
        scores = q5 @ k.unsqueeze(2).transpose(-1, -2) * float(hd) ** -0.5 + mask  # (N, nkv, rep, T, T)
        ctx = scores.softmax(dim=-1) @ v.unsqueeze(2)  # (N, nkv, rep, T, hd)
        ctx = ctx.reshape(b, nh, t, hd).transpose(1, 2).reshape(b, t, nh * hd)
        return self._linear(ctx, layer, "o", params)

    def _mlp(self, x: Any, layer: int, params: Mapping[str, Any]) -> Any:
        gate = self._linear(x, layer, "gate", params)
        return self._linear(gate * gate.sigmoid() * self._linear(x, layer, "up", params), layer, "down", params)
