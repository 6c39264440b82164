"""The calibration runner on the tiny bundle (2 layers, LoRA on q and v)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from alignfed import manifest as mf
from alignfed.adapter import initial_adapter
from alignfed.errors import ConfigError
from coordinator.alignment import ActivationSource
from coordinator.calibration import CalibrationRunner, calibration_batch
from coordinator.strategies.base import AdapterState


def _state(bundle: Path, version: int, noise: float, seed: int = 0) -> AdapterState:
    m = mf.load(bundle)
    rng = np.random.default_rng(seed)
    tensors = {
        k: (v + noise * rng.normal(size=v.shape)).astype(np.float32) for k, v in initial_adapter(bundle, m).items()
    }
    return AdapterState(version=version, tensors=tensors, scale=m.lora.scale, rank=m.lora.rank)


@pytest.fixture(scope="module")
def runner(tiny_bundle: Path) -> CalibrationRunner:
    return CalibrationRunner.from_bundle(tiny_bundle, mf.load(tiny_bundle), None, 48)


def test_is_an_activation_source_with_one_matrix_per_adapted_layer(
    runner: CalibrationRunner, tiny_bundle: Path
) -> None:
    m = mf.load(tiny_bundle)
    acts = runner.activations(_state(tiny_bundle, 0, 0.0))
    assert isinstance(runner, ActivationSource)
    assert list(acts) == m.layer_ids == ["0.q", "0.v", "1.q", "1.v"]
    assert runner.tokens == 48
    for x in acts.values():
        assert x.shape == (48, m.architecture.hidden)  # (n, in)
        assert x.dtype == np.float32
        assert np.all(np.isfinite(x))


def test_layer_zero_inputs_never_depend_on_the_adapter(runner: CalibrationRunner, tiny_bundle: Path) -> None:
    base = runner.activations(_state(tiny_bundle, 0, 0.0))
    moved = runner.activations(_state(tiny_bundle, 1, 0.3))
    # q and v of layer 0 read the same normed embeddings, which no adapter touches
    assert np.array_equal(base["0.q"], moved["0.q"])
    assert np.array_equal(base["0.v"], moved["0.v"])
    assert np.array_equal(base["0.q"], base["0.v"])


def test_layer_one_inputs_depend_on_a_nonzero_adapter(runner: CalibrationRunner, tiny_bundle: Path) -> None:
    base = runner.activations(_state(tiny_bundle, 0, 0.0))
    moved = runner.activations(_state(tiny_bundle, 1, 0.3))
    for lid in ("1.q", "1.v"):
        rel = np.linalg.norm(moved[lid] - base[lid]) / np.linalg.norm(base[lid])
        assert rel > 1e-3, f"layer {lid} inputs did not move ({rel:.2e})"


def test_same_rows_for_every_version(runner: CalibrationRunner, tiny_bundle: Path) -> None:
    s = _state(tiny_bundle, 3, 0.2, seed=4)
    first, again = runner.activations(s), runner.activations(s)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    same_tensors_other_version = AdapterState(version=9, tensors=s.tensors, scale=s.scale, rank=s.rank)
    later = runner.activations(same_tensors_other_version)
    assert all(np.array_equal(first[k], later[k]) for k in first)


def test_loss_is_finite_and_follows_the_adapter(runner: CalibrationRunner, tiny_bundle: Path) -> None:
    a, b = runner.loss(_state(tiny_bundle, 0, 0.0)), runner.loss(_state(tiny_bundle, 1, 0.3))
    assert np.isfinite(a) and np.isfinite(b) and a != b


def test_data_file_and_token_cap(tiny_bundle: Path, tmp_path: Path) -> None:
    data = tmp_path / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": f"sensor {i} reports a quiet river."}) + "\n" for i in range(3)))
    m = mf.load(tiny_bundle)
    r = CalibrationRunner.from_bundle(tiny_bundle, m, data, 10_000)
    non_padding = int(np.sum(r.batch.labels != -100))
    assert r.tokens == non_padding  # fewer positions than asked: all of them
    assert r.activations(_state(tiny_bundle, 0, 0.0))["1.q"].shape == (non_padding, m.architecture.hidden)


def test_errors_name_what_was_expected(tiny_bundle: Path, tmp_path: Path) -> None:
    m = mf.load(tiny_bundle)
    with pytest.raises(ConfigError, match="tokens must be ≥ 1"):
        CalibrationRunner.from_bundle(tiny_bundle, m, None, 0)
    with pytest.raises(ConfigError, match="does not exist"):
        CalibrationRunner.from_bundle(tiny_bundle, m, tmp_path / "missing.jsonl", 16)
    runner = CalibrationRunner.from_bundle(tiny_bundle, m, None, 16)
    partial = dict(_state(tiny_bundle, 0, 0.0).tensors)
    del partial["lora.1.v.B"]
    with pytest.raises(ValueError, match=r"lora\.1\.v\.B"):
        runner.activations(AdapterState(version=0, tensors=partial, scale=2.0, rank=4))


def test_examples_are_packed_without_padding(runner: CalibrationRunner) -> None:
    labels = runner.batch.labels
    padding = int(np.sum(labels == -100))
    assert padding < labels.shape[1]  # only the tail of the last row
    assert np.all(labels[:-1] != -100)
    assert labels.size - padding >= 2 * runner.tokens  # OVERSAMPLE × tokens positions to draw from


def test_pruned_activations_equal_the_whole_graphs(runner: CalibrationRunner, tiny_bundle: Path) -> None:
    state = _state(tiny_bundle, 2, 0.2, seed=1)
    feeds = {"input_ids": runner.batch.input_ids, "labels": runner.batch.labels}
    feeds.update({k: np.asarray(v, np.float32) for k, v in state.tensors.items()})
    names = [o.name for o in runner._session.get_outputs() if o.name.startswith("act.")]
    whole = dict(zip(names, runner._session.run([*names, "loss"], feeds)[:-1], strict=True))
    pruned = runner.activations(state)
    for lid, x in pruned.items():
        flat = whole[f"act.{lid}"].reshape(-1, x.shape[1])
        np.testing.assert_array_equal(x, flat[runner._rows])


def test_packing_stops_at_max_examples_or_when_the_data_runs_out(tiny_bundle: Path) -> None:
    m = mf.load(tiny_bundle)
    tok, eos = tiny_bundle / mf.TOKENIZER, int(m.tokenizer.get("eos_id", 0))
    texts = [f"sensor {i} reports a quiet river at dawn." for i in range(40)]
    capped = calibration_batch(texts, tok, eos_id=eos, tokens=10_000, seq_len=16, max_examples=3)
    assert capped.input_ids.shape == (3, 16) and np.all(capped.labels != -100)  # 3 full rows
    few = calibration_batch(texts[:3], tok, eos_id=eos, tokens=10_000, seq_len=48, max_examples=64)
    held = int(np.sum(few.labels != -100))
    assert few.input_ids.shape[0] == -(-held // 48) and held < few.labels.size  # all of it, last row partial
    assert np.all(few.labels[:-1] != -100)
