"""The traced graph: any Hugging Face causal LM + LoRA, traced from transformers' own modeling code.

Where `export.onnx_graph` writes the Llama network node by node, this builder instantiates the
family's transformers class (eager attention, fp32), loads the base weights, puts the project's
LoRA layers (`LoraProjection`) on the target projections and traces the model with
`torch.onnx.export` (TorchScript exporter; decision 11 in docs/decisions.md says why not optimum).
The trace is then normalised to the bundle's conventions, the same as the hand-written graph:

- inputs `input_ids`, `labels` (B, T) int64; output 0 `loss` (shifted cross-entropy, ignore -100);
- LoRA tensors named by the canonical keys `lora.{i}.{m}.A|B` (trainable initializers in "train",
  graph inputs in "calib"), never merged with one another (the exporter deduplicates initializers
  of equal value, so the trace uses distinct placeholder values and the real ones are set after);
- each frozen projection stored transposed as `{hf}.T` (in, out), or int8 weight-only as
  `{hf}.T.int8` + `{hf}.scale` feeding DequantizeLinear -> MatMul; every other base tensor keeps its
  HF name; exporter constants and buffers get the `const.` prefix;
- "calib" outputs `act.{i}.{m}` (B, T, in): the hidden state entering each adapted projection;
- opset 17, IR version 8 (ORT 1.19 reads <= 10).

A fused projection (Phi-3's qkv_proj, gate_up_proj; `alignfed.lora.FUSED`) keeps one frozen
weight; the LoRA of each logical projection adds to its row block only.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from alignfed import lora
from alignfed.errors import ExportError
from alignfed.lowrank import quantize_rows
from alignfed.manifest import BASE_INT8, BASE_SCALE, BASE_T, Architecture, LoraLayout
from export.onnx_graph import (
    CONST_PREFIX,
    IGNORE_INDEX,
    INPUT_IDS,
    IR_VERSION,
    LABELS,
    LOSS,
    OPSET,
    Quantization,
    act_name,
    lora_shapes,
)
from export.source import ModelSource

TRACE_SHAPE = (2, 8)  # (B, T) of the example batch; both axes stay dynamic in the graph


def config_from_architecture(arch: Architecture) -> dict[str, Any]:
    """A transformers config for llama / qwen2 when the source has no config.json (a GGUF file)."""
    if arch.family not in ("llama", "qwen2"):
        raise ExportError(f"a {arch.family!r} model needs its config.json; only llama and qwen2 are rebuilt from GGUF")
    cfg: dict[str, Any] = {
        "model_type": arch.family,
        "hidden_size": arch.hidden,
        "intermediate_size": arch.intermediate,
        "num_hidden_layers": arch.n_layers,
        "num_attention_heads": arch.n_heads,
        "num_key_value_heads": arch.n_kv_heads,
        "head_dim": arch.head_dim,
        "vocab_size": arch.vocab,
        "max_position_embeddings": arch.max_seq,
        "rope_theta": arch.rope_theta,
        "rms_norm_eps": arch.rms_eps,
        "tie_word_embeddings": arch.tie_embeddings,
        "hidden_act": "silu",
    }
    if arch.family == "qwen2":
        cfg["use_sliding_window"] = False
    return cfg


def source_config(source: ModelSource) -> dict[str, Any]:
    """The transformers config of a source: its config.json, or rebuilt from a GGUF's architecture."""
    if source.kind == "hf":
        from export.hf_source import read_config

        return read_config(source.path)
    return config_from_architecture(source.architecture)


def torch_model(config: Mapping[str, Any], weights: Mapping[str, np.ndarray]) -> nn.Module:
    """The family's transformers model (eager attention, fp32, eval mode) holding `weights` (HF names)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    params = {k: v for k, v in config.items() if k != "model_type"}
    cfg = AutoConfig.for_model(str(config["model_type"]), **params)
    cfg.use_cache = False
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    state = {name: torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32)) for name, w in weights.items()}
    result = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise ExportError(
            f"{config['model_type']} weights do not match {type(model).__name__}: missing {missing[:4]}, "
            f"unexpected {sorted(result.unexpected_keys)[:4]}"
        )
    if tied:
        model.tie_weights()
    module: nn.Module = model.eval()
    return module


class LoraProjection(nn.Module):
    """A frozen nn.Linear (out, in) plus LoRA branches on row blocks of its output.

    Each block (module, start, stop) adds `s * (x @ A.T) @ B.T` to rows [start, stop), with
    A: (r, in), B: (stop - start, r); an unfused projection has one block covering every row.
    The input x (B, T, in) of every block is recorded in `captured` under its layer id.
    """

    def __init__(
        self,
        base: nn.Linear,
        layer: int,
        blocks: Sequence[tuple[str, int, int]],
        rank: int,
        scale: float,
        captured: dict[str, torch.Tensor],
    ) -> None:
        super().__init__()
        self.base = base
        self.layer, self.blocks, self.scale, self.captured = layer, tuple(blocks), scale, captured
        for module, start, stop in self.blocks:
            self.register_parameter(f"lora_A_{module}", nn.Parameter(torch.zeros(rank, base.in_features)))
            self.register_parameter(f"lora_B_{module}", nn.Parameter(torch.zeros(stop - start, rank)))

    def factor(self, module: str, which: str) -> nn.Parameter:
        p = getattr(self, f"lora_{which}_{module}")
        assert isinstance(p, nn.Parameter)
        return p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base(x)  # (B, T, out)
        out = self.base.out_features
        for module, start, stop in self.blocks:
            self.captured[lora.layer_id(self.layer, module)] = x
            a, b = self.factor(module, "A"), self.factor(module, "B")
            delta = ((x @ a.t()) * self.scale) @ b.t()  # (B, T, stop - start)
            if (start, stop) != (0, out):
                delta = nn.functional.pad(delta, (start, out - stop))  # zero rows outside the block
            y = y + delta
        return y


class LossAndActivations(nn.Module):
    """input_ids, labels (B, T) -> (loss, *inputs of each adapted projection in layer-id order)."""

    def __init__(self, model: nn.Module, layer_ids: Sequence[str], captured: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model, self.layer_ids, self.captured = model, tuple(layer_ids), captured

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.captured.clear()
        # An explicit all-ones mask keeps transformers' mask code on its tracing-friendly path
        # (without one it probes position_ids for packed sequences with aten::diff, not exportable).
        out = self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False)
        logits = out.logits  # (B, T, V)
        vocab = logits.shape[-1]
        # HF ForCausalLMLoss: position t predicts labels[t + 1]; mean over labels != -100.
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
        )
        return (loss, *(self.captured[lid] for lid in self.layer_ids))


def _decoder_layers(model: nn.Module) -> Sequence[nn.Module]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ExportError(f"{type(model).__name__} has no model.layers; not a decoder-only causal LM")
    return list(layers)


def add_lora(
    model: nn.Module, arch: Architecture, layout: LoraLayout, captured: dict[str, torch.Tensor]
) -> dict[str, LoraProjection]:
    """Replace each adapted projection of `model` by a `LoraProjection`; returns them by HF path
    (`model.layers.{i}.{attr}`)."""
    outs = {m: arch.in_out(m)[1] for m in lora.MODULES}
    wrapped: dict[str, LoraProjection] = {}
    for i, layer in enumerate(_decoder_layers(model)):
        by_path: dict[str, list[tuple[str, int, int]]] = {}
        for module in layout.targets:
            spec = lora.fused_spec(arch.family, module)
            start, stop = lora.row_block(spec, module, outs) if spec is not None else (0, outs[module])
            by_path.setdefault(lora.hf_projection(arch.family, module), []).append((module, start, stop))
        for path, blocks in by_path.items():
            parent_path, attr = path.rsplit(".", 1)
            parent = layer.get_submodule(parent_path)
            base = getattr(parent, attr)
            spec = lora.fused_spec(arch.family, blocks[0][0])
            rows = sum(outs[m] for m in spec.parts) if spec is not None else outs[blocks[0][0]]
            if not isinstance(base, nn.Linear) or base.out_features != rows:
                raise ExportError(
                    f"layer {i}: {path} is {type(base).__name__} with {getattr(base, 'out_features', '?')} "
                    f"output rows, expected an nn.Linear with {rows}"
                )
            proj = LoraProjection(base, i, blocks, layout.rank, layout.scale, captured)
            setattr(parent, attr, proj)
            wrapped[f"model.layers.{i}.{path}"] = proj
    return wrapped


def adapted_model(
    config: Mapping[str, Any],
    arch: Architecture,
    weights: Mapping[str, np.ndarray],
    layout: LoraLayout,
    tensors: Mapping[str, np.ndarray] | None = None,
) -> tuple[LossAndActivations, dict[str, nn.Parameter]]:
    """The traced module and its LoRA parameters by canonical key (set to `tensors` when given)."""
    captured: dict[str, torch.Tensor] = {}
    model = torch_model(config, weights)
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = add_lora(model, arch, layout, captured)
    by_key: dict[str, nn.Parameter] = {}
    for proj in wrapped.values():
        for module, _, _ in proj.blocks:
            for which in ("A", "B"):
                by_key[lora.key(proj.layer, module, which)] = proj.factor(module, which)
    if tensors is not None:
        with torch.no_grad():
            for k, p in by_key.items():
                p.copy_(torch.from_numpy(np.asarray(tensors[k], dtype=np.float32)))
    return LossAndActivations(model, lora.layer_ids(arch.n_layers, layout.targets), captured), by_key


# --- graph normalisation ---------------------------------------------------------------------------


def _rename_everywhere(graph: onnx.GraphProto, renames: Mapping[str, str]) -> None:
    for init in graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in graph.node:
        for j, name in enumerate(node.input):
            if name in renames:
                node.input[j] = renames[name]


def _unmerge_initializers(graph: onnx.GraphProto, params: Mapping[str, str]) -> None:
    """Undo the exporter's deduplication: it keeps one of several equal parameters (all-ones
    norms) and feeds the others through `Identity(kept) -> other`; each gets its own initializer
    again, so every parameter has its name and ORT never sees two frozen copies share a buffer."""
    inits = {init.name: init for init in graph.initializer}
    kept: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] in params:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _transposed_projections(graph: onnx.GraphProto, quantization: Quantization) -> None:
    """W (out, in) -> Transpose -> MatMul becomes `{hf}.T` (in, out) -> MatMul, or with int8
    `{hf}.T.int8` (in, out) + `{hf}.scale` (out,) -> DequantizeLinear(axis=1) -> MatMul."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    inits = {init.name: init for init in graph.initializer}
    drop_nodes: set[int] = set()
    new_nodes: list[onnx.NodeProto] = []
    for name, init in list(inits.items()):
        if not (name.startswith("model.layers.") and name.endswith(".weight") and len(init.dims) == 2):
            continue
        users = consumers.get(name, [])
        if not users or any(
            u.op_type != "Transpose" or list(helper.get_attribute_value(u.attribute[0])) != [1, 0] for u in users
        ):
            continue
        w = numpy_helper.to_array(init)  # (out, in)
        graph.initializer.remove(init)
        if quantization == "int8":
            q, scale = quantize_rows(w)  # per output channel: w (out, in) ≈ q * scale[:, None]
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(q.T), name + BASE_INT8))
            graph.initializer.append(numpy_helper.from_array(scale, name + BASE_SCALE))
            source = name + ".T.dequantized"
            new_nodes.append(
                helper.make_node(
                    "DequantizeLinear", [name + BASE_INT8, name + BASE_SCALE], [source], name=source, axis=1
                )
            )
        else:
            source = name + BASE_T
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), source))
        for u in users:
            drop_nodes.add(id(u))
            for other in consumers.get(u.output[0], []):
                for j, inp in enumerate(other.input):
                    if inp == u.output[0]:
                        other.input[j] = source
    kept = [n for n in graph.node if id(n) not in drop_nodes]
    del graph.node[:]
    graph.node.extend(new_nodes + kept)


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers no graph output depends on."""
    needed = {o.name for o in graph.output}
    kept: list[onnx.NodeProto] = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    unused = [init for init in graph.initializer if init.name not in needed]
    for init in unused:
        graph.initializer.remove(init)


def normalise(
    traced: onnx.ModelProto,
    renames: Mapping[str, str],
    arch: Architecture,
    layout: LoraLayout,
    lora_init: Mapping[str, np.ndarray],
    quantization: Quantization,
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The traced model -> ("train", "calib") models in the bundle's conventions (module docstring)."""
    graph = traced.graph
    _unmerge_initializers(graph, renames)
    params = set(renames.values())
    full = dict(renames)
    for init in graph.initializer:
        if init.name not in full:
            full[init.name] = CONST_PREFIX + init.name.removeprefix("model.")
    _rename_everywhere(graph, full)
    shapes = lora_shapes(arch, layout)
    missing = sorted(set(shapes) - {i.name for i in graph.initializer})
    if missing:
        raise ExportError(f"the traced graph lost LoRA tensor(s) {missing[:4]}; the exporter merged or folded them")
    for init in graph.initializer:
        if init.name in shapes:  # the real values replace the trace's placeholders
            init.CopyFrom(numpy_helper.from_array(np.asarray(lora_init[init.name], dtype=np.float32), init.name))
        elif init.name not in params and not init.name.startswith(CONST_PREFIX):
            raise ExportError(f"unexpected initializer {init.name!r} in the traced graph")
    _transposed_projections(graph, quantization)

    calib = onnx.ModelProto()
    calib.CopyFrom(traced)
    # "calib": the adapter comes in as graph inputs of the same names and shapes.
    lora_inits = [i for i in calib.graph.initializer if i.name in shapes]
    for init in lora_inits:
        calib.graph.initializer.remove(init)
    calib.graph.input.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, list(s)) for n, s in shapes.items())

    train = traced
    del train.graph.output[1:]
    _prune(train.graph)
    for model, mode in ((train, "train"), (calib, "calib")):
        model.ir_version = IR_VERSION
        model.graph.name = f"{arch.family}_lora_{mode}_traced"
        helper.set_model_props(
            model,
            {
                "alignfed.mode": mode,
                "alignfed.graph": "traced",
                "alignfed.quantization": quantization,
                "alignfed.lora.targets": ",".join(layout.targets),
                "alignfed.lora.rank": str(layout.rank),
                "alignfed.lora.alpha": str(layout.alpha),
            },
        )
    return train, calib


def build_traced(
    config: Mapping[str, Any],
    arch: Architecture,
    weights: Mapping[str, np.ndarray],
    layout: LoraLayout,
    lora_init: Mapping[str, np.ndarray],
    *,
    quantization: Quantization,
) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The ("train", "calib") ONNX models of `config`'s family with LoRA, from one trace."""
    layout = LoraLayout(targets=lora.check_targets(layout.targets), rank=layout.rank, alpha=layout.alpha)
    module, by_key = adapted_model(config, arch, weights, layout)
    # Distinct placeholder values: the exporter would merge equal initializers (all-zero B).
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in by_key.values():
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
    param_key = {id(p): k for k, p in by_key.items()}
    renames: dict[str, str] = {}
    for name, p in module.named_parameters():
        hf = name.removeprefix("model.").replace(".base.", ".")
        renames[name] = param_key.get(id(p), hf)
    layer_ids = lora.layer_ids(arch.n_layers, layout.targets)
    ids = torch.zeros(TRACE_SHAPE, dtype=torch.int64)
    axes = {0: "batch", 1: "seq"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "traced.onnx"
        torch.onnx.export(
            module,
            (ids, ids),
            str(path),
            input_names=[INPUT_IDS, LABELS],
            output_names=[LOSS, *(act_name(lid) for lid in layer_ids)],
            dynamic_axes={INPUT_IDS: axes, LABELS: axes, **{act_name(lid): axes for lid in layer_ids}},
            opset_version=OPSET,
            do_constant_folding=False,
            dynamo=False,
        )
        traced = onnx.load(str(path))
    return normalise(traced, renames, arch, layout, lora_init, quantization)
