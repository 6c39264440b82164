"""The bundle's network in PyTorch, with one LoRA adapter per group of rows.

It runs the same network as the bundle's ONNX graph (export/onnx_graph.py: RMSNorm in fp32,
rotate-half RoPE, grouped-query eager attention with HF's additive causal mask, SwiGLU, shifted
cross-entropy with ignore index −100, Qwen2's q/k/v bias) on the frozen base weights read from the
bundle's calibration model — the int8 bundle's weights are dequantized exactly as
`DequantizeLinear` does, so it computes the numbers the ORT graph computes. The other families'
differences (Qwen3's q/k norms, Gemma 3's norms, scales, logit soft-capping and sliding windows, Phi-3's
fused projections and partial RoPE) are switches read by `edge.torch_families`.

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
from alignfed.rope import rope_table
from edge import torch_families
from edge.torch_families import TORCH_FAMILIES

__all__ = ["TORCH_FAMILIES", "TorchNetwork", "base_weights", "import_torch"]

QKV_BIAS = ("q", "k", "v")  # projections with a bias when Architecture.qkv_bias (Qwen2)


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
        embedding: str = "fp32",
    ) -> None:
        """`compute`: dtype of the frozen matrices and their products (torch.float32 by default; a
        Jetson's GPU uses bf16/fp16, see `edge.accelerator`); norms, biases, the adapters and the
        loss stay fp32. `lean` (CPU): the int8 base stays int8 (`edge.lean_linear`) and one adapter's
        LM head and loss run in chunks of `loss_chunk` tokens (`edge.chunked_loss`); `checkpoint`
        recomputes each decoder layer in backward instead of keeping its activations; `embedding`
        "int8" (lean only) keeps the embedding table and the LM head int8 per row (`Int8Rows`)."""
        torch = self._torch = import_torch()
        self.compute = compute or torch.float32
        self.arch = a = manifest.architecture
        self.traits = torch_families.load(bundle, a)  # refuses a family without a forward pass here
        self.scale = manifest.lora.scale
        self.targets = set(manifest.lora.targets)
        self.device = device
        if device == "cuda":  # fp32 matmuls, not TF32, so CUDA results stay comparable to the CPU's
            torch.backends.cuda.matmul.allow_tf32 = False
        self.lean, self.checkpoint, self.loss_chunk = lean, checkpoint, loss_chunk
        if embedding not in ("fp32", "int8"):
            raise TrainingError(f"embedding must be 'fp32' or 'int8', got {embedding!r}")
        if embedding == "int8" and not lean:  # the lean loader quantizes the tables as it reads them
            raise TrainingError("embedding = 'int8' needs the lean trainer (CPU, fp32 compute)")
        if lean:
            from edge.lean_linear import lean_base

            w: dict[str, Any] = lean_base(Path(bundle) / mf.CALIB_MODEL, embedding=embedding)
        else:
            w = {k: self._place(torch.from_numpy(v)) for k, v in base_weights(bundle).items()}
        missing = [n for n in ("model.embed_tokens.weight", "model.norm.weight") if n not in w]
        if missing:
            raise BundleError(f"{bundle}: calibration model lacks base tensors {missing}")
        self.w = w
        self.rope = {  # RoPE base -> cos, sin (S, rotary_dim)
            theta: tuple(torch.from_numpy(x).to(device) for x in rope_table(theta, self.traits.rotary_dim, a.max_seq))
            for theta in set(self.traits.rope_thetas)
        }

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
        # adapter of each kept position (ascending: rows are grouped by adapter) and how many each has
        counts = np.bincount(keep // ((t - 1) * (n // d)), minlength=d)  # (D,)
        rope = {theta: (cos[:t], sin[:t]) for theta, (cos, sin) in self.rope.items()}  # (T, rotary_dim)
        masks = {window: self._mask(t, window) for window in set(self.traits.windows)}  # (T, T)
        table = w["model.embed_tokens.weight"]  # (V, H) float32, or int8 rows
        h = table[ids].float() if isinstance(table, torch.Tensor) else table.rows(ids)  # (N, T, H)
        if self.traits.embed_scale != 1.0:
            h = h * self.traits.embed_scale
        for i in range(a.n_layers):
            cos, sin = rope[self.traits.rope_thetas[i]]
            mask = masks[self.traits.windows[i]]
            if self.checkpoint and torch.is_grad_enabled():  # keep only h (N, T, H) per layer
                from torch.utils.checkpoint import checkpoint

                h = checkpoint(self._decoder_layer, h, i, cos, sin, mask, params, use_reentrant=False)
            else:
                h = self._decoder_layer(h, i, cos, sin, mask, params)
        h = self._rms(h, w["model.norm.weight"])[:, :-1].reshape(-1, a.hidden)  # (N·(T−1), H)
        rows = torch.from_numpy(keep).to(self.device)
        head = w["model.embed_tokens.weight"] if a.tie_embeddings else w["lm_head.weight"]  # (V, H)
        gold = torch.from_numpy(target.reshape(-1)[keep]).to(self.device)  # (K,)
        cap = self.traits.final_softcap
        if self.lean and d == 1:  # the (K, V) logits and their gradient never exist whole
            from edge.chunked_loss import chunked_head_loss

            return chunked_head_loss(h[rows], head, gold, self.loss_chunk, softcap=cap).reshape(1)
        if not isinstance(head, torch.Tensor):  # int8 rows: the chunked loss is the only head that reads them
            raise TrainingError("an int8 embedding trains one adapter at a time, with the lean trainer")
        logits = (h[rows].to(self.compute) @ head.T).float()  # (K, V): the head in the compute dtype
        if cap is not None:
            logits = (logits / cap).tanh() * cap
        each = torch.nn.functional.cross_entropy(logits, gold, reduction="none")  # (K,) in fp32
        # Per-adapter sums over contiguous segments, not index_add: its atomic float adds on CUDA sum in
        # a different order every run, and a simulation must repeat bit for bit for its seed.
        total = torch.stack([seg.sum() for seg in each.split(counts.tolist())])  # (D,)
        return total / torch.from_numpy(counts).to(each)  # NaN for an adapter without labelled tokens, as ORT's mean

    def _place(self, t: Any) -> Any:
        """A frozen base tensor on the device: matrices (2-D) in the compute dtype, vectors fp32."""
        t = t.to(self.device)
        return t.to(self.compute) if t.ndim == 2 else t

    def _mask(self, t: int, window: int) -> Any:
        """(T, T) additive mask: −inf-like where the key is after the query, or (window > 0) where
        it is `window` or more positions before it (transformers' sliding_window_overlay)."""
        torch = self._torch
        pos = torch.arange(t, device=self.device)
        hidden = pos[None, :] > pos[:, None]  # key after query
        if window:
            hidden = hidden | (pos[None, :] <= pos[:, None] - window)
        return torch.where(hidden, torch.finfo(torch.float32).min, 0.0)

    def _decoder_layer(self, h: Any, i: int, cos: Any, sin: Any, mask: Any, params: Mapping[str, Any]) -> Any:
        p = f"model.layers.{i}."
        attn = self._attention(self._rms(h, self.w[p + "input_layernorm.weight"]), i, cos, sin, mask, params)
        if self.traits.sandwich_norms:  # Gemma 3: norm the attention output, and the MLP's input and output
            h = h + self._rms(attn, self.w[p + "post_attention_layernorm.weight"])
            mlp = self._mlp(self._rms(h, self.w[p + "pre_feedforward_layernorm.weight"]), i, params)
            return h + self._rms(mlp, self.w[p + "post_feedforward_layernorm.weight"])
        h = h + attn
        return h + self._mlp(self._rms(h, self.w[p + "post_attention_layernorm.weight"]), i, params)

    def _rms(self, x: Any, weight: Any) -> Any:
        var = (x * x).mean(dim=-1, keepdim=True)  # (N, T, 1)
        if self.traits.norm_offset:  # Gemma: x·rsqrt(var + eps)·(1 + w)
            return x / (var + self.arch.rms_eps).sqrt() * (weight + self.traits.norm_offset)
        return x / (var + self.arch.rms_eps).sqrt() * weight

    def _frozen(self, x: Any, hf: str) -> Any:
        """x (N, T, in) -> (N, T, out) through the frozen weight `hf` (out, in)."""
        base = self.w[hf]
        if self.lean and not self._torch.is_tensor(base):  # an Int8Weight: dequantized inside the matmul
            from edge.lean_linear import int8_matmul

            return int8_matmul(x, base)
        return (x.to(self.compute) @ base.T).float()  # frozen base in the compute dtype, fp32 out

    def _projections(self, x: Any, layer: int, modules: tuple[str, ...], params: Mapping[str, Any]) -> list[Any]:
        """The outputs of `modules` on x: one matmul per fused weight (Phi-3's qkv_proj, gate_up_proj),
        split into its row blocks; each logical projection gets its own adapter."""
        spec = lora.fused_spec(self.arch.family, modules[0])
        if spec is None:
            return [self._linear(x, layer, m, params) for m in modules]
        if spec.parts != modules:
            raise TrainingError(f"{spec.hf} holds {spec.parts}, asked for {modules}")
        fused = self._frozen(x, f"model.layers.{layer}.{spec.hf}.weight")  # (N, T, Σ out)
        outs, start = [], 0
        for m in modules:
            width = self.arch.in_out(m)[1]
            outs.append(self._adapted(fused[..., start : start + width], x, layer, m, params))
            start += width
        return outs

    def _linear(self, x: Any, layer: int, module: str, params: Mapping[str, Any]) -> Any:
        """x (N, T, in) -> (N, T, out): frozen projection (+ bias) + each adapter's s·(x Aᵀ) Bᵀ."""
        hf = lora.hf_weight_name(layer, module)
        y = self._frozen(x, hf)
        if self.arch.qkv_bias and module in QKV_BIAS:
            y = y + self.w[hf[: -len("weight")] + "bias"]
        return self._adapted(y, x, layer, module, params)

    def _adapted(self, y: Any, x: Any, layer: int, module: str, params: Mapping[str, Any]) -> Any:
        """y (N, T, out) + each adapter's s·(x Aᵀ) Bᵀ when `module` is a target."""
        if module in self.targets:
            a_ = params[lora.key(layer, module, "A")]  # (D, r, in)
            b_ = params[lora.key(layer, module, "B")]  # (D, out, r)
            n, t, _ = x.shape
            xd = x.reshape(a_.shape[0], -1, x.shape[-1])  # (D, B·T, in): adapter d's rows
            low = self._torch.bmm(xd, a_.transpose(1, 2)) * self.scale  # (D, B·T, r)
            y = y + self._torch.bmm(low, b_.transpose(1, 2)).reshape(n, t, -1)  # (N, T, out)
        return y

    def _rope(self, x: Any, cos: Any, sin: Any) -> Any:
        """Rotate-half RoPE on the first rotary_dim channels of each head (all but Phi-3's partial)."""
        rd = self.traits.rotary_dim
        if rd != self.arch.head_dim:
            return self._torch.cat([self._rope_full(x[..., :rd], cos, sin), x[..., rd:]], dim=-1)
        return self._rope_full(x, cos, sin)

    def _rope_full(self, x: Any, cos: Any, sin: Any) -> Any:
        half = x.shape[-1] // 2
        rot = self._torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rot * sin

    def _attention(self, x: Any, layer: int, cos: Any, sin: Any, mask: Any, params: Mapping[str, Any]) -> Any:
        a = self.arch
        b, t, _ = x.shape
        hd, nh, nkv = a.head_dim, a.n_heads, a.n_kv_heads

        def heads(y: Any, n: int) -> Any:  # (N, T, n·hd) -> (N, n, T, hd)
            return y.reshape(b, t, n, hd).transpose(1, 2)

        q, k, v = self._projections(x, layer, ("q", "k", "v"), params)
        q, k, v = heads(q, nh), heads(k, nkv), heads(v, nkv)
        if self.traits.qk_norm:  # Qwen3, Gemma 3: RMSNorm over each head before RoPE
            p = f"model.layers.{layer}.self_attn."
            q, k = self._rms(q, self.w[p + "q_norm.weight"]), self._rms(k, self.w[p + "k_norm.weight"])
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        q5 = q.reshape(b, nkv, nh // nkv, t, hd)  # query head j reads kv head j // rep (HF repeat_kv)
        scores = q5 @ k.unsqueeze(2).transpose(-1, -2) * self.traits.query_scale + mask  # (N, nkv, rep, T, T)
        ctx = scores.softmax(dim=-1) @ v.unsqueeze(2)  # (N, nkv, rep, T, hd)
        ctx = ctx.reshape(b, nh, t, hd).transpose(1, 2).reshape(b, t, nh * hd)
        return self._linear(ctx, layer, "o", params)

    def _mlp(self, x: Any, layer: int, params: Mapping[str, Any]) -> Any:
        gate, up = self._projections(x, layer, ("gate", "up"), params)
        return self._linear(self._act(gate) * up, layer, "down", params)

    def _act(self, x: Any) -> Any:
        kind = self.traits.activation
        if kind == "silu":
            return x * x.sigmoid()
        return self._torch.nn.functional.gelu(x, approximate="tanh" if kind == "gelu_tanh" else "none")
