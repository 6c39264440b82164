"""Which model families `alignfed export` supports, which ONNX graph builds each, and what is tested.

Two builders exist: the hand-written Llama graph (`export.onnx_graph`, decision 1) for "llama" and
"qwen2", and the traced graph (`export.traced_graph`), which traces transformers' own modeling code
with the project's LoRA layers in place and so serves any family whose forward pass transformers
implements. A family is keyed by its Hugging Face `model_type`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from alignfed.errors import ExportError

Graph = Literal["hand-written", "traced"]
GraphChoice = Literal["auto", "hand-written", "traced"]
GRAPH_CHOICES: tuple[GraphChoice, ...] = ("auto", "hand-written", "traced")


@dataclass(frozen=True, slots=True)
class Family:
    model_type: str  # Hugging Face config.json `model_type`
    hf_class: str  # the transformers class that runs it
    graph: Graph  # the builder `auto` picks
    tie_default: bool  # the config class's default for tie_word_embeddings
    notes: str  # what the family adds to Llama, for `--list`
    tested: tuple[str, ...]  # acceptance checks with a test in tests/export (see `--list`)


_TRACED = ("traced: ORT train/calib loss = transformers", "calibration = hooks", "ORT steps learn")
FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family(
            "llama",
            "LlamaForCausalLM",
            "hand-written",
            False,
            "SmolLM2, TinyLlama",
            (
                "hand-written: ORT loss = transformers",
                "calibration = hooks",
                "int8 base",
                "llama.cpp logits",
                "PyTorch trainer = ORT",
                "federation",
                *_TRACED,
            ),
        ),
        Family(
            "qwen2",
            "Qwen2ForCausalLM",
            "hand-written",
            False,
            "q/k/v biases",
            ("hand-written: ORT loss = transformers", "llama.cpp logits", "PyTorch trainer = ORT", *_TRACED),
        ),
        Family(
            "qwen3",
            "Qwen3ForCausalLM",
            "traced",
            False,
            "q/k RMSNorm, decoupled head_dim",
            (*_TRACED, "PyTorch trainer = ORT (int8, lean)", "llama.cpp logits with LoRA", "federation to version 3"),
        ),
        Family(
            "gemma3_text",
            "Gemma3ForCausalLM",
            "traced",
            True,
            "Gemma norms, GELU, logit soft-capping, sliding-window layers",
            (
                *_TRACED,
                "PyTorch trainer = ORT (fp32, int8, lean)",
                "llama.cpp logits with LoRA (final soft-capping, own layer layout and local RoPE base)",
            ),
        ),
        Family(
            "phi3",
            "Phi3ForCausalLM",
            "traced",
            False,
            "fused qkv and gate_up projections, partial RoPE",
            (
                *_TRACED,
                "int8 base",
                "PyTorch trainer = ORT (fp32, int8, lean)",
                "fused GGUF LoRA = row blocks",
                "llama.cpp logits with LoRA",
                "federation to version 3 (PyTorch trainer)",
            ),
        ),
    )
}


def supported() -> str:
    return ", ".join(FAMILIES)


def family(model_type: object, source: Path | str) -> Family:
    """The family of a config's model_type; an unknown one is an error naming it and the supported ones."""
    if isinstance(model_type, str) and model_type in FAMILIES:
        return FAMILIES[model_type]
    hint = ""
    if model_type == "gemma3":
        hint = " (a multimodal Gemma 3 config; export its text model, model_type 'gemma3_text')"
    raise ExportError(f"{source}: model_type {model_type!r} is not supported{hint}; supported: {supported()}")


def graph_for(model_type: str, choice: GraphChoice) -> Graph:
    """The builder for a family: `auto` takes the family's default; `hand-written` only exists for
    the families decision 1 covers."""
    fam = family(model_type, "architecture")
    if choice == "auto":
        return fam.graph
    if choice == "hand-written" and fam.graph != "hand-written":
        raise ExportError(
            f"graph 'hand-written' does not exist for {model_type!r}; it covers "
            f"{', '.join(f.model_type for f in FAMILIES.values() if f.graph == 'hand-written')}; use 'traced' or 'auto'"
        )
    if choice not in GRAPH_CHOICES:
        raise ExportError(f"graph {choice!r} is not supported; supported: {', '.join(GRAPH_CHOICES)}")
    return choice


def listing() -> str:
    """The text of `alignfed export --list`."""
    width = max(len(f.model_type) for f in FAMILIES.values())
    lines = ["supported families (Hugging Face model_type; graph `auto` picks; what tests check):"]
    for f in FAMILIES.values():
        lines.append(f"  {f.model_type:<{width}}  {f.hf_class:<18} {f.graph:<12} {f.notes}")
        lines.append(f"  {'':<{width}}  tested: {', '.join(f.tested)}")
    return "\n".join(lines)
