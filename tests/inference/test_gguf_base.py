"""Base GGUF export: tokenizer round-trip through llama.cpp, tied embeddings, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from alignfed.errors import ExportError
from export.gguf_base import pre_tokenizer_name, write_base_gguf
from export.synthetic import TinyConfig, write_tiny_llama
from runtime.llama import Generator

from .conftest import TorchReference

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Question: what is 12 plus 30?  Answer:   42",
    "<|im_start|>user\nhello<|im_end|>",
    "unseen wörds and émojis 🙂",
]


def test_llama_cpp_tokenizes_like_hf_tokenizers(generator: Generator, tiny_dir: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    for text in TEXTS:
        assert generator.tokenize(text) == tok.encode(text).ids, f"token ids differ for {text!r}"


def test_base_gguf_metadata(base_gguf: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(base_gguf)
    fields = {name: f.contents() for name, f in reader.fields.items()}
    cfg = TinyConfig()
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == cfg.n_layers
    assert fields["llama.attention.head_count_kv"] == cfg.n_kv_heads
    assert fields["llama.rope.dimension_count"] == cfg.hidden // cfg.n_heads
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.token_type"][:3] == [int(gguf.TokenType.CONTROL)] * 3  # specials
    names = {t.name for t in reader.tensors}
    assert "output.weight" in names and "blk.1.ffn_down.weight" in names


def test_tied_embeddings_omit_output_and_match_transformers(tmp_path: Path) -> None:
    import gguf

    model_dir = write_tiny_llama(tmp_path / "tied", TinyConfig(tie_embeddings=True, seed=1))
    path = write_base_gguf(model_dir, tmp_path / "tied.gguf")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(path).tensors}

    ids = list(range(3, 40))
    with Generator(path, n_ctx=128, n_threads=2, kv_f32=True) as gen:
        got = gen.logits(ids)
    want = TorchReference(model_dir).logits(ids)
    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    assert err < 1e-5, f"expected relative logit error < 1e-5, got {err:.3e}"


def test_refuses_unsupported_model_type(tiny_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        (bad / name).symlink_to(tiny_dir / name)
    cfg = json.loads((tiny_dir / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg | {"model_type": "gpt_neox"}))
    with pytest.raises(ExportError, match=r"config\.json: model_type expected .*got 'gpt_neox'"):
        write_base_gguf(bad, tmp_path / "bad.gguf")
    (bad / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": 3}))
    with pytest.raises(ExportError, match=r"missing tensor\(s\) \['blk\.2\."):
        write_base_gguf(bad, tmp_path / "bad.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*.tmp"))


def test_pre_tokenizer_names() -> None:
    src = Path("tokenizer.json")
    assert pre_tokenizer_name({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, src) == "gpt-2"
    smollm = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True},
        ],
    }
    assert pre_tokenizer_name(smollm, src) == "smollm"
    with pytest.raises(ExportError, match="pre_tokenizer expected"):
        pre_tokenizer_name({"type": "Whitespace"}, src)
