"""Generator: text generation, runtime adapter swaps, adapter file pruning and adapter GGUF checks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from alignfed import lora
from alignfed.errors import BundleError
from alignfed.gguf_adapter import write_lora_gguf
from alignfed.manifest import Architecture, LoraLayout
from runtime.llama import Generator, adapter_path, prune_adapters

from .conftest import random_lora

LAYOUT = LoraLayout(targets=("q", "v"), rank=4, alpha=8.0)


def test_generate_returns_greedy_text(generator: Generator, tiny_dir: Path) -> None:
    from tokenizers import Tokenizer

    generator.set_adapter(None)
    prompt = "Question: what is two plus"
    text = generator.generate(prompt, max_tokens=8)
    assert isinstance(text, str)
    assert generator.generate(prompt, max_tokens=8) == text, "expected greedy decoding to repeat"

    # The first generated token is the argmax of the prompt's last logits.
    ids = generator.tokenize(prompt)
    first = int(np.argmax(generator.logits(ids)[-1]))
    tok = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    piece = tok.decode([first])
    assert piece, f"expected a printable first token for this prompt, got id {first}"
    assert text.startswith(piece), f"expected text to start with {piece!r}, got {text!r}"


def test_runtime_adapter_swap_changes_logits(generator: Generator, arch: Architecture, tmp_path: Path) -> None:
    ids = generator.tokenize("The device trains its adapter")
    generator.set_adapter(None)
    base = generator.logits(ids)

    a = write_lora_gguf(adapter_path(tmp_path, 1), random_lora(arch, LAYOUT, seed=1), arch, LAYOUT)
    b = write_lora_gguf(adapter_path(tmp_path, 2), random_lora(arch, LAYOUT, seed=2), arch, LAYOUT)
    generator.set_adapter(a)
    assert generator.adapter == a
    with_a = generator.logits(ids)
    generator.set_adapter(b)
    with_b = generator.logits(ids)
    generator.set_adapter(a)
    again_a = generator.logits(ids)
    generator.set_adapter(None)
    assert generator.adapter is None
    again_base = generator.logits(ids)

    assert np.max(np.abs(with_a - base)) > 1e-2, "expected adapter a to change the logits"
    assert np.max(np.abs(with_b - with_a)) > 1e-2, "expected adapter b to differ from a"
    np.testing.assert_allclose(again_a, with_a, atol=1e-5)
    np.testing.assert_allclose(again_base, base, atol=1e-5)


def test_set_adapter_refuses_a_bad_file(generator: Generator, tmp_path: Path) -> None:
    bad = tmp_path / "adapter-00000003.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(BundleError, match="refused the LoRA adapter"):
        generator.set_adapter(bad)
    with pytest.raises(BundleError, match="not found"):
        generator.set_adapter(tmp_path / "missing.gguf")
    assert generator.logits([1, 2, 3]).shape[0] == 3  # still usable


def test_adapter_gguf_layout(arch: Architecture, tmp_path: Path) -> None:
    import gguf

    tensors = random_lora(arch, LAYOUT, seed=3)
    path = write_lora_gguf(tmp_path / "a.gguf", tensors, arch, LAYOUT)
    reader = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items()}
    assert fields["general.type"] == "adapter"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(LAYOUT.alpha)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}  # numpy order
    d_in, d_out = arch.in_out("v")
    assert shapes[lora.gguf_name(1, "v", "A")] == (LAYOUT.rank, d_in)
    assert shapes[lora.gguf_name(1, "v", "B")] == (d_out, LAYOUT.rank)
    assert len(shapes) == 2 * len(lora.layer_ids(arch.n_layers, LAYOUT.targets))
    assert not list(tmp_path.glob(".*.tmp")), "expected no temp file left behind"


def test_adapter_writer_checks_keys_and_shapes(arch: Architecture, tmp_path: Path) -> None:
    tensors = random_lora(arch, LAYOUT, seed=4)
    missing = {k: v for k, v in tensors.items() if k != "lora.0.q.A"}
    with pytest.raises(BundleError, match=r"missing tensor lora\.0\.q\.A"):
        write_lora_gguf(tmp_path / "x.gguf", missing, arch, LAYOUT)
    wrong = dict(tensors, **{"lora.1.v.B": np.zeros((3, 4), np.float32)})
    with pytest.raises(BundleError, match=r"expected shape \(32, 4\), got \(3, 4\)"):
        write_lora_gguf(tmp_path / "x.gguf", wrong, arch, LAYOUT)
    extra = dict(tensors, **{"lora.0.k.A": np.zeros((4, 64), np.float32)})
    with pytest.raises(BundleError, match="unexpected tensor"):
        write_lora_gguf(tmp_path / "x.gguf", extra, arch, LAYOUT)
    assert not (tmp_path / "x.gguf").exists()


def test_prune_adapters_keeps_the_newest(tmp_path: Path) -> None:
    for v in (1, 2, 10, 3, 11):
        adapter_path(tmp_path, v).write_bytes(b"x")
    stale = tmp_path / ".adapter-00000012.gguf.999999999.tmp"  # a crashed writer's leftover
    mine = tmp_path / f".adapter-00000013.gguf.{os.getpid()}.tmp"  # being written right now
    other = tmp_path / "notes.txt"
    for p in (stale, mine, other):
        p.write_bytes(b"x")

    removed = prune_adapters(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == sorted([stale.name] + [adapter_path(tmp_path, v).name for v in (1, 2, 3)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [mine.name, other.name, "adapter-00000010.gguf", "adapter-00000011.gguf"]
    )
    assert prune_adapters(tmp_path, keep=2) == []
    with pytest.raises(ValueError, match=r"keep expected >= 1, got 0"):
        prune_adapters(tmp_path, keep=0)
