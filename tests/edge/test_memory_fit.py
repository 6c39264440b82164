"""`flash` refuses a bundle that would not train within the profile's memory, naming the numbers."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from alignfed import manifest as mf
from alignfed.errors import ConfigError
from alignfed.profiles import host_arch, load_profile, parse_profile
from edge.memory_fit import activation_bytes, check_fits, training_memory_mb, weight_bytes

# Llama-3.2-1B's published shape (config.json), q/v LoRA rank 8 as benchmarks/lean_shapes.py exports it.
LLAMA_1B: dict[str, Any] = dict(n_layers=16, hidden=2048, intermediate=8192, n_heads=32, n_kv_heads=8, vocab=128256)


def _as_1b(m: mf.Manifest) -> mf.Manifest:
    arch = dataclasses.replace(m.architecture, tie_embeddings=True, **LLAMA_1B)
    return dataclasses.replace(m, architecture=arch, train_quantization="int8")


def test_weights_and_activations_count_what_the_trainer_holds(tiny_bundle: Path) -> None:
    a = _as_1b(mf.load(tiny_bundle)).architecture
    # 1.236 B parameters: 0.97 B in int8 projections + 0.26 B in the float32 (tied) embedding
    assert weight_bytes(a, "int8") == pytest.approx(0.973e9 + 4 * 0.2627e9, rel=0.01)
    assert weight_bytes(a, "fp32") == pytest.approx(4 * 1.236e9, rel=0.01)
    full = activation_bytes(a, 4, 128, checkpoint=False)
    ckpt = activation_bytes(a, 4, 128, checkpoint=True)
    assert ckpt < full / 3  # per-layer checkpointing keeps one layer's activations, not sixteen


def test_flash_refuses_a_bundle_too_big_for_the_board(tiny_bundle: Path, tmp_path: Path) -> None:
    m = mf.load(tiny_bundle)
    rpi4 = load_profile("rpi4-4gb")
    check_fits(m, rpi4, tiny_bundle)  # the tiny model fits anywhere
    big = _as_1b(m)
    small_board = dataclasses.replace(rpi4, memory_mb=1024, checkpointing="none")
    need = training_memory_mb(big, small_board)
    with pytest.raises(ConfigError) as err:
        check_fits(big, small_board, tiny_bundle)
    msg = str(err.value)
    assert f"needs about {need:.0f} MB" in msg and "allows 1024 MB" in msg and "batch 2 × 64" in msg
    assert 'checkpointing = "layers"' in msg
    # the same base on the 8 GB board's profile fits
    check_fits(big, load_profile("rpi5-8gb"), tiny_bundle)

    from edge.flash import flash

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "x"}) + "\n")
    profile = tmp_path / "tiny-board.toml"
    raw = {f.name: getattr(small_board, f.name) for f in dataclasses.fields(small_board)}
    raw["memory_mb"] = 64
    raw["arch"] = host_arch()  # flash refuses a profile of another architecture first
    profile.write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in raw.items()))
    with pytest.raises(ConfigError, match="allows 64 MB"):
        flash(
            profile=str(profile),
            device_id="d1",
            federation="f",
            broker="mqtt://127.0.0.1:1883",
            bundle=tiny_bundle,
            data=data,
            target=tmp_path / "etc",
            key="00" * 32,
        )
    assert not (tmp_path / "etc" / "device.toml").exists()


def test_profile_checkpointing_is_validated() -> None:
    raw = {f.name: getattr(load_profile("rpi4-4gb"), f.name) for f in dataclasses.fields(load_profile("rpi4-4gb"))}
    assert parse_profile({**raw, "checkpointing": "layers"}, "p.toml").checkpointing == "layers"
    with pytest.raises(ConfigError, match="checkpointing = 'all'; expected one of"):
        parse_profile({**raw, "checkpointing": "all"}, "p.toml")


def test_an_int8_embedding_quarters_the_table_in_the_estimate(tiny_bundle: Path) -> None:
    a = _as_1b(mf.load(tiny_bundle)).architecture
    table = a.vocab * a.hidden  # tied: one table of 0.26 B entries
    saved = weight_bytes(a, "int8") - weight_bytes(a, "int8", embedding="int8")
    assert saved == 3 * table - 4 * a.vocab  # 4 bytes -> 1 byte per entry, plus a scale per row
    raw = {f.name: getattr(load_profile("rpi4-4gb"), f.name) for f in dataclasses.fields(load_profile("rpi4-4gb"))}
    assert parse_profile({**raw, "embedding": "int8"}, "p.toml").embedding == "int8"
    with pytest.raises(ConfigError, match="embedding = 'int4'; expected one of"):
        parse_profile({**raw, "embedding": "int4"}, "p.toml")
    board = dataclasses.replace(load_profile("rpi4-4gb"), memory_mb=1024)
    with pytest.raises(ConfigError, match='or embedding = "int8"'):  # the refusal names the option
        check_fits(_as_1b(mf.load(tiny_bundle)), board, tiny_bundle)


def test_a_smaller_loss_chunk_is_estimated_and_validated(tiny_bundle: Path) -> None:
    m = _as_1b(mf.load(tiny_bundle))
    board = load_profile("rpi4-4gb")
    small = dataclasses.replace(board, loss_chunk=32)
    saved = training_memory_mb(m, board) - training_memory_mb(m, small)
    assert saved * 2**20 == pytest.approx(3 * 4 * (128 - 32) * m.architecture.vocab)  # logits, log-softmax, softmax
    raw = {f.name: getattr(board, f.name) for f in dataclasses.fields(board)}
    assert parse_profile({**raw, "loss_chunk": 32}, "p.toml").loss_chunk == 32
    with pytest.raises(ConfigError, match="loss_chunk = 4; expected 8"):
        parse_profile({**raw, "loss_chunk": 4}, "p.toml")
