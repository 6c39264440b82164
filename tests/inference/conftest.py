"""Fixtures for the llama.cpp tests: a tiny random Llama, its F32 GGUF and a torch reference."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from alignfed import lora
from alignfed.manifest import Architecture, LoraLayout
from export.synthetic import TinyConfig, write_tiny_llama

if TYPE_CHECKING:
    from runtime.llama import Generator

CFG = TinyConfig()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), CFG)


@pytest.fixture(scope="session")
def arch(tiny_dir: Path) -> Architecture:
    import json

    vocab = json.loads((tiny_dir / "config.json").read_text())["vocab_size"]
    return Architecture(
        family="llama",
        n_layers=CFG.n_layers,
        hidden=CFG.hidden,
        intermediate=CFG.intermediate,
        n_heads=CFG.n_heads,
        n_kv_heads=CFG.n_kv_heads,
        vocab=vocab,
        max_seq=CFG.max_seq,
        rope_theta=CFG.rope_theta,
        rms_eps=CFG.rms_eps,
        tie_embeddings=CFG.tie_embeddings,
    )


@pytest.fixture(scope="session")
def base_gguf(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.gguf_base import write_base_gguf

    return write_base_gguf(tiny_dir, tmp_path_factory.mktemp("gguf") / "base.gguf")


@pytest.fixture(scope="session")
def generator(base_gguf: Path) -> Iterator[Generator]:
    from runtime.llama import Generator

    gen = Generator(base_gguf, n_ctx=CFG.max_seq, n_threads=2, seed=0)
    yield gen
    gen.close()


@pytest.fixture(scope="session")
def exact_generator(base_gguf: Path) -> Iterator[Generator]:
    """Same base with an F32 KV cache: the whole forward pass is float32, like the reference."""
    from runtime.llama import Generator

    gen = Generator(base_gguf, n_ctx=CFG.max_seq, n_threads=2, seed=0, kv_f32=True)
    yield gen
    gen.close()


def random_lora(arch: Architecture, layout: LoraLayout, seed: int, std: float = 0.1) -> dict[str, np.ndarray]:
    """Both factors random and nonzero, so a wrong row order in A or B shows up in the logits."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for lid in lora.layer_ids(arch.n_layers, layout.targets):
        layer, module = lora.split_layer_id(lid)
        d_in, d_out = arch.in_out(module)
        out[lora.key(layer, module, "A")] = (rng.standard_normal((layout.rank, d_in)) * std).astype(np.float32)
        out[lora.key(layer, module, "B")] = (rng.standard_normal((d_out, layout.rank)) * std).astype(np.float32)
    return out


class TorchReference:
    """HF LlamaForCausalLM (eager attention, float32) with optionally merged LoRA weights."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import LlamaForCausalLM

        torch.manual_seed(0)
        self.model = LlamaForCausalLM.from_pretrained(
            model_dir, attn_implementation="eager", dtype=torch.float32
        ).eval()
        self.base = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def logits(
        self,
        token_ids: list[int],
        tensors: Mapping[str, np.ndarray] | None = None,
        layout: LoraLayout | None = None,
    ) -> np.ndarray:
        """(T, vocab) logits of the base, or of W + s * B @ A for every adapted layer."""
        import torch

        self.model.load_state_dict(self.base)
        with torch.no_grad():
            if tensors is not None and layout is not None:
                for lid in lora.layer_ids(self.model.config.num_hidden_layers, layout.targets):
                    layer, module = lora.split_layer_id(lid)
                    w = self.model.get_parameter(lora.hf_weight_name(layer, module))  # (out, in)
                    delta = lora.product(tensors, lid, layout.scale)  # (out, in) float64
                    w.add_(torch.from_numpy(delta).to(w.dtype))
            out = self.model(input_ids=torch.tensor([token_ids])).logits[0]  # (T, vocab)
        self.model.load_state_dict(self.base)
        logits: np.ndarray = out.numpy().astype(np.float32)  # (T, vocab)
        return logits


@pytest.fixture(scope="session")
def torch_ref(tiny_dir: Path) -> TorchReference:
    return TorchReference(tiny_dir)


@pytest.fixture(scope="session")
def token_ids(tiny_dir: Path) -> list[int]:
    """A real tokenization, long enough that RoPE rotates by many different angles."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    text = "The device trains its adapter on local notes. Question: what is two plus three?"
    ids = tok.encode(text).ids
    assert len(ids) >= 24, f"expected a sequence of >= 24 tokens, got {len(ids)}"
    return ids
