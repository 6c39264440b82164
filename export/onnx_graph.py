"""The Llama forward graph with LoRA, written node by node with `onnx.helper`.

The graph matches Hugging Face `LlamaForCausalLM` with eager attention (RMSNorm in fp32,
rotate-half RoPE, grouped-query attention, causal mask, SwiGLU MLP, shifted cross-entropy with
ignore index -100), and `Qwen2ForCausalLM`, which is the same network plus a bias on the q, k and
v projections (`Architecture.qkv_bias`). Building it directly from numpy weights, instead of
tracing a PyTorch model, gives canonical tensor names by construction and works the same for
weights read from safetensors or from a GGUF file.

Two flavours share one builder:
- "train": LoRA tensors are initializers (trainable), base weights are initializers (frozen);
  the only output is `loss`, so ORT's training artifacts can use it as the loss directly.
- "calib": LoRA tensors are graph inputs (same names and shapes); outputs are `loss` and, per
  adapted layer `{i}.{m}`, the hidden state entering that projection, `act.{i}.{m}` (B, T, in).

Initializers whose names start with `const.` are graph constants (shapes, RoPE tables); every other
initializer is a model parameter (LoRA or frozen base weight).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from alignfed import lora
from alignfed.errors import ExportError
from alignfed.lowrank import quantize_rows
from alignfed.manifest import BASE_INT8, BASE_SCALE, BASE_T, Architecture, LoraLayout
from alignfed.rope import rope_tables
from export.hf_layout import QKV_BIAS_MODULES, bias_name

Mode = Literal["train", "calib"]
Quantization = Literal["fp32", "int8"]

OPSET = 17
IR_VERSION = 8  # opset 17 needs IR >= 8; ORT 1.19 reads IR <= 10
PROTO_LIMIT = 2**31 - 1  # protobuf cannot serialise a bigger ModelProto: use external data
CONST_PREFIX = "const."
INPUT_IDS = "input_ids"
LABELS = "labels"
LOSS = "loss"
IGNORE_INDEX = -100  # HF / PyTorch cross-entropy convention
SUPPORTED_FAMILIES = ("llama", "qwen2")
QUANTIZATIONS = ("fp32", "int8")
MODES = ("train", "calib")


def act_name(lid: str) -> str:
    """Calibration output holding the input of adapted layer `lid`, e.g. `act.0.q`."""
    return f"act.{lid}"


def is_parameter(name: str) -> bool:
    """Whether an initializer is a model parameter (LoRA or base weight), not a graph constant."""
    return not name.startswith(CONST_PREFIX)


class _Graph:
    """Accumulates nodes, initializers and value infos with unique names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()
        self._consts: dict[tuple[str, bytes], str] = {}

    def _unique(self, hint: str) -> str:
        name, n = hint, 1
        while name in self._names:
            n += 1
            name = f"{hint}_{n}"
        self._names.add(name)
        return name

    def declare(self, name: str) -> str:
        """Reserve an exact name (graph inputs, parameters); a clash is a bug in the caller."""
        if name in self._names:
            raise ExportError(f"duplicate tensor name {name!r} in the ONNX graph")
        self._names.add(name)
        return name

    def param(self, name: str, arr: np.ndarray) -> str:
        self.declare(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def const(self, hint: str, arr: np.ndarray | np.generic | Sequence[int] | float) -> str:
        """A graph constant (deduplicated by value: shapes and axes repeat in every layer)."""
        value = np.asarray(arr)
        if value.dtype == np.float64:
            value = value.astype(np.float32)
        k = (f"{value.dtype}{value.shape}", value.tobytes())
        if k not in self._consts:
            name = self._unique(CONST_PREFIX + hint)
            self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
            self._consts[k] = name
        return self._consts[k]

    def op(self, op_type: str, inputs: Sequence[str], hint: str, **attrs: Any) -> str:
        out = self._unique(hint)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def op_n(self, op_type: str, inputs: Sequence[str], hints: Sequence[str], **attrs: Any) -> list[str]:
        outs = [self._unique(h) for h in hints]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=outs[0], **attrs))
        return outs

    def named_output(self, tensor: str, name: str, elem: int, shape: Sequence[int | str]) -> None:
        """Expose `tensor` as graph output `name` (through Identity so one tensor can feed many)."""
        self.declare(name)
        self.nodes.append(helper.make_node("Identity", [tensor], [name], name=f"{name}.identity"))
        self.outputs.append(helper.make_tensor_value_info(name, elem, list(shape)))


class _LlamaBuilder:
    def __init__(
        self,
        g: _Graph,
        arch: Architecture,
        weights: Mapping[str, np.ndarray],
        layout: LoraLayout,
        quantization: Quantization,
    ) -> None:
        self.g, self.arch, self.w, self.layout, self.quant = g, arch, weights, layout, quantization
        self.targets = set(layout.targets)
        self.acts: dict[str, str] = {}  # layer id -> tensor entering that projection

    def weight(self, name: str) -> np.ndarray:
        try:
            return np.asarray(self.w[name], dtype=np.float32)
        except KeyError:
            raise ExportError(f"base weights have no tensor {name!r}") from None

    # --- building blocks -------------------------------------------------------------------
    def rms_norm(self, x: str, weight_name: str, hint: str) -> str:
        """HF LlamaRMSNorm: x * rsqrt(mean(x^2, -1) + eps) * w, all in fp32."""
        g = self.g
        w = g.param(weight_name, self.weight(weight_name))  # (H,)
        sq = g.op("Mul", [x, x], f"{hint}.sq")
        var = g.op("ReduceMean", [sq], f"{hint}.var", axes=[-1], keepdims=1)  # (B, T, 1)
        std = g.op("Sqrt", [g.op("Add", [var, g.const("eps", self.arch.rms_eps)], f"{hint}.var_eps")], f"{hint}.std")
        normed = g.op("Div", [x, std], f"{hint}.normed")
        return g.op("Mul", [normed, w], hint)

    def linear(self, x: str, layer: int, module: str) -> str:
        """x (B, T, in) -> (B, T, out): frozen base projection (+ bias) plus the LoRA branch if adapted."""
        g = self.g
        hf = lora.hf_weight_name(layer, module)
        w = self.weight(hf)  # (out, in)
        hint = f"layers.{layer}.{module}"
        if self.quant == "int8":
            q, scale = quantize_rows(w)  # per output channel: w (out, in) ≈ q * scale[:, None]
            q_t = g.param(hf + BASE_INT8, q.T)  # (in, out) int8
            s = g.param(hf + BASE_SCALE, scale)  # (out,)
            w_t = g.op("DequantizeLinear", [q_t, s], f"{hint}.w", axis=1)  # (in, out) fp32
        else:
            w_t = g.param(hf + BASE_T, w.T)  # (in, out)
        y = g.op("MatMul", [x, w_t], f"{hint}.base")  # (B, T, out)
        if self.arch.qkv_bias and module in QKV_BIAS_MODULES:
            name = bias_name(layer, module)
            y = g.op("Add", [y, g.param(name, self.weight(name))], f"{hint}.biased")  # bias: (out,), fp32
        if module not in self.targets:
            return y
        lid = lora.layer_id(layer, module)
        self.acts[lid] = x
        a_t = g.op("Transpose", [lora.key(layer, module, "A")], f"{hint}.A_t", perm=[1, 0])  # (in, r)
        b_t = g.op("Transpose", [lora.key(layer, module, "B")], f"{hint}.B_t", perm=[1, 0])  # (r, out)
        xa = g.op("MatMul", [x, a_t], f"{hint}.xa")  # (B, T, r)
        xa = g.op("Mul", [xa, g.const("lora_scale", self.layout.scale)], f"{hint}.xa_scaled")
        delta = g.op("MatMul", [xa, b_t], f"{hint}.lora")  # (B, T, out)
        return g.op("Add", [y, delta], hint)

    def rope(self, x: str, cos: str, sin: str, hint: str) -> str:
        """x (B, h, T, hd) -> x * cos + rotate_half(x) * sin, rotate_half = cat(-x2, x1)."""
        g = self.g
        half = self.arch.head_dim // 2
        x1, x2 = g.op_n("Split", [x, g.const("split_half", [half, half])], [f"{hint}.x1", f"{hint}.x2"], axis=-1)
        rot = g.op("Concat", [g.op("Neg", [x2], f"{hint}.neg_x2"), x1], f"{hint}.rot", axis=-1)
        return g.op(
            "Add",
            [g.op("Mul", [x, cos], f"{hint}.cos"), g.op("Mul", [rot, sin], f"{hint}.sin")],
            f"{hint}.rope",
        )

    def attention(self, x: str, layer: int, cos: str, sin: str, mask: str) -> str:
        """Eager grouped-query attention; x (B, T, H) -> (B, T, H)."""
        g, a = self.g, self.arch
        hd, nh, nkv = a.head_dim, a.n_heads, a.n_kv_heads
        rep = nh // nkv
        p = f"layers.{layer}.attn"

        def heads(t: str, n: int, name: str) -> str:  # (B, T, n*hd) -> (B, n, T, hd)
            t = g.op("Reshape", [t, g.const(f"shape_bt{n}h", [0, 0, n, hd])], f"{p}.{name}_split")
            return g.op("Transpose", [t], f"{p}.{name}_heads", perm=[0, 2, 1, 3])

        q = self.rope(heads(self.linear(x, layer, "q"), nh, "q"), cos, sin, f"{p}.q")  # (B, nh, T, hd)
        k = self.rope(heads(self.linear(x, layer, "k"), nkv, "k"), cos, sin, f"{p}.k")  # (B, nkv, T, hd)
        v = heads(self.linear(x, layer, "v"), nkv, "v")  # (B, nkv, T, hd)
        # GQA without materialising repeated kv heads: query head j = kv * rep + r reads kv head
        # j // rep (HF repeat_kv), so view q as (B, nkv, rep, T, hd) and broadcast k, v over rep.
        q5 = g.op("Reshape", [q, g.const("shape_q5", [0, nkv, rep, -1, hd])], f"{p}.q5")
        k5 = g.op("Unsqueeze", [k, g.const("axis2", [2])], f"{p}.k5")  # (B, nkv, 1, T, hd)
        v5 = g.op("Unsqueeze", [v, g.const("axis2", [2])], f"{p}.v5")  # (B, nkv, 1, T, hd)
        k5_t = g.op("Transpose", [k5], f"{p}.k5_t", perm=[0, 1, 2, 4, 3])  # (B, nkv, 1, hd, T)
        scores = g.op("MatMul", [q5, k5_t], f"{p}.scores")  # (B, nkv, rep, T, T)
        scores = g.op("Mul", [scores, g.const("attn_scale", float(hd) ** -0.5)], f"{p}.scores_scaled")
        scores = g.op("Add", [scores, mask], f"{p}.scores_masked")
        probs = g.op("Softmax", [scores], f"{p}.probs", axis=-1)
        ctx = g.op("MatMul", [probs, v5], f"{p}.ctx5")  # (B, nkv, rep, T, hd)
        ctx = g.op("Reshape", [ctx, g.const("shape_ctx", [0, nh, -1, hd])], f"{p}.ctx")  # (B, nh, T, hd)
        ctx = g.op("Transpose", [ctx], f"{p}.ctx_t", perm=[0, 2, 1, 3])  # (B, T, nh, hd)
        ctx = g.op("Reshape", [ctx, g.const("shape_merge", [0, 0, nh * hd])], f"{p}.ctx_merged")
        return self.linear(ctx, layer, "o")

    def mlp(self, x: str, layer: int) -> str:
        """SwiGLU: down(silu(gate(x)) * up(x)); x (B, T, H)."""
        g = self.g
        p = f"layers.{layer}.mlp"
        gate = self.linear(x, layer, "gate")  # (B, T, I)
        up = self.linear(x, layer, "up")  # (B, T, I)
        silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}.sigmoid")], f"{p}.silu")
        return self.linear(g.op("Mul", [silu, up], f"{p}.act"), layer, "down")

    # --- whole model -----------------------------------------------------------------------
    def build(self) -> str:
        """Adds the forward graph and the loss; returns the loss tensor name."""
        g, a = self.g, self.arch
        seq_1d = g.op("Shape", [INPUT_IDS], "seq_len_1d", start=1, end=2)  # (1,) = [T]
        seq = g.op("Squeeze", [seq_1d], "seq_len")  # scalar T

        cos_table, sin_table = rope_tables(a)  # (S, hd)
        zero_1d = g.const("zero_1d", [0])
        cos = g.op("Slice", [g.const("rope_cos", cos_table), zero_1d, seq_1d, zero_1d], "rope.cos")  # (T, hd)
        sin = g.op("Slice", [g.const("rope_sin", sin_table), zero_1d, seq_1d, zero_1d], "rope.sin")  # (T, hd)

        # Causal mask (T, T): 0 where key <= query, float32 min above the diagonal (as HF).
        pos = g.op("Range", [g.const("zero", np.int64(0)), seq, g.const("one", np.int64(1))], "positions")
        rows = g.op("Unsqueeze", [pos, g.const("axis1", [1])], "mask.rows")  # (T, 1)
        cols = g.op("Unsqueeze", [pos, g.const("axis0", [0])], "mask.cols")  # (1, T)
        future = g.op("Greater", [cols, rows], "mask.future")  # (T, T) bool
        mask = g.op(
            "Where",
            [future, g.const("neg_min", np.float32(np.finfo(np.float32).min)), g.const("zero_f", np.float32(0))],
            "mask",
        )

        emb = g.param("model.embed_tokens.weight", self.weight("model.embed_tokens.weight"))  # (V, H)
        h = g.op("Gather", [emb, INPUT_IDS], "embed", axis=0)  # (B, T, H)
        for i in range(a.n_layers):
            p = f"model.layers.{i}."
            x = self.rms_norm(h, p + "input_layernorm.weight", f"layers.{i}.attn_norm")
            h = g.op("Add", [h, self.attention(x, i, cos, sin, mask)], f"layers.{i}.attn_residual")
            x = self.rms_norm(h, p + "post_attention_layernorm.weight", f"layers.{i}.mlp_norm")
            h = g.op("Add", [h, self.mlp(x, i)], f"layers.{i}.mlp_residual")
        h = self.rms_norm(h, "model.norm.weight", "final_norm")  # (B, T, H)

        # HF ForCausalLMLoss: position t predicts labels[t + 1]; mean over labels != -100.
        one_1d, axis1 = g.const("one_1d", [1]), g.const("axis1_1d", [1])
        h = g.op("Slice", [h, zero_1d, g.const("minus_one_1d", [-1]), axis1], "final_shifted")  # (B, T-1, H)
        h = g.op("Reshape", [h, g.const("shape_rows_h", [-1, a.hidden])], "final_rows")  # (N, H)
        head = (
            "model.embed_tokens.weight"
            if a.tie_embeddings
            else g.param("lm_head.weight", self.weight("lm_head.weight"))
        )  # (V, H)
        logits = g.op("Gemm", [h, head], "logits", transB=1)  # (N, V)
        big = g.const("int64_max_1d", [np.iinfo(np.int64).max])
        targets = g.op("Slice", [LABELS, one_1d, big, axis1], "labels_shifted")  # (B, T-1)
        targets = g.op("Reshape", [targets, g.const("shape_flat", [-1])], "labels_flat")  # (N,)
        return g.op(
            "SoftmaxCrossEntropyLoss",
            [logits, targets],
            LOSS,
            reduction="mean",
            ignore_index=IGNORE_INDEX,
        )


def lora_shapes(arch: Architecture, layout: LoraLayout) -> dict[str, tuple[int, int]]:
    """Canonical key -> shape (A: (r, in), B: (out, r)) for every adapted layer."""
    shapes: dict[str, tuple[int, int]] = {}
    for lid in lora.layer_ids(arch.n_layers, layout.targets):
        layer, module = lora.split_layer_id(lid)
        d_in, d_out = arch.in_out(module)
        shapes[lora.key(layer, module, "A")] = (layout.rank, d_in)
        shapes[lora.key(layer, module, "B")] = (d_out, layout.rank)
    return shapes


def build_model(
    arch: Architecture,
    weights: Mapping[str, np.ndarray],
    layout: LoraLayout,
    lora_init: Mapping[str, np.ndarray],
    *,
    mode: Mode,
    quantization: Quantization,
) -> onnx.ModelProto:
    """The Llama + LoRA graph for training ("train") or calibration ("calib").

    `weights` uses HF names (nn.Linear weights (out, in)); `lora_init` maps canonical keys to
    initial values and is only read in "train" mode ("calib" takes the adapter as inputs).
    Inputs: `input_ids`, `labels` int64 (B, T); then, in "calib" mode, every LoRA tensor.
    Outputs: `loss` (scalar); then, in "calib" mode, `act.{i}.{m}` (B, T, in) per adapted layer.
    """
    if arch.family not in SUPPORTED_FAMILIES:
        raise ExportError(f"architecture {arch.family!r} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}")
    if mode not in MODES:
        raise ExportError(f"mode {mode!r} is not supported; supported: {', '.join(MODES)}")
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"quantization {quantization!r} is not supported; supported: {', '.join(QUANTIZATIONS)}")
    layout = LoraLayout(targets=lora.check_targets(layout.targets), rank=layout.rank, alpha=layout.alpha)
    shapes = lora_shapes(arch, layout)

    g = _Graph()
    for name in (INPUT_IDS, LABELS):
        g.declare(name)
        g.inputs.append(helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "seq"]))
    for name, shape in shapes.items():
        if mode == "calib":
            g.declare(name)
            g.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape)))
            continue
        if name not in lora_init:
            raise ExportError(f"LoRA init has no tensor {name!r}")
        value = np.asarray(lora_init[name], dtype=np.float32)
        if value.shape != shape:
            raise ExportError(f"LoRA init {name!r} has shape {value.shape}, expected {shape}")
        g.param(name, value)

    builder = _LlamaBuilder(g, arch, weights, layout, quantization)
    loss = builder.build()
    g.outputs.insert(0, helper.make_tensor_value_info(loss, TensorProto.FLOAT, []))
    if mode == "calib":
        for lid in lora.layer_ids(arch.n_layers, layout.targets):
            d_in, _ = arch.in_out(lora.split_layer_id(lid)[1])
            g.named_output(builder.acts[lid], act_name(lid), TensorProto.FLOAT, ["batch", "seq", d_in])

    graph = helper.make_graph(g.nodes, f"{arch.family}_lora_{mode}", g.inputs, g.outputs, initializer=g.initializers)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="alignfed",
        ir_version=IR_VERSION,
    )
    meta = {
        "alignfed.mode": mode,
        "alignfed.quantization": quantization,
        "alignfed.lora.targets": ",".join(layout.targets),
        "alignfed.lora.rank": str(layout.rank),
        "alignfed.lora.alpha": str(layout.alpha),
    }
    helper.set_model_props(model, meta)
    return model
