"""ORT on-device training on exported bundles: gradients reach every LoRA tensor, a few AdamW
steps lower the loss (fp32 and int8 bases), and named parameter get/set behaves."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

from alignfed import manifest as mf
from alignfed.errors import BundleError, TrainingError
from export.artifacts import MAX_IR_VERSION
from runtime.ort import bind, get_params, open_session, set_params

QV = ("q", "v")
# The make_batch fixture (conftest): (vocab, B, T, seed) -> input_ids, labels, both (B, T).
MakeBatch = Callable[[int, int, int, int], tuple[np.ndarray, np.ndarray]]


@pytest.mark.parametrize("quantization", ["fp32", "int8"])
def test_steps_lower_loss_and_every_lora_tensor_learns(
    quantization: str, tiny_dir: Path, bundle_factory: Callable[..., Path], make_batch: MakeBatch
) -> None:
    bundle = bundle_factory(tiny_dir, ("q", "k", "v", "o", "gate", "up", "down"), quantization)
    manifest = mf.load(bundle)
    assert manifest.train_quantization == quantization
    names = list(manifest.lora_shapes())
    session = open_session(bundle / mf.TRAIN_DIR, learning_rate=1e-2)
    ids, labels = make_batch(manifest.architecture.vocab, 2, 16, 11)

    # Nonzero B first: with the PEFT init (B = 0) the gradient of every A is exactly zero.
    rng = np.random.default_rng(5)
    set_params(
        session.state,
        {
            n: (0.05 * rng.standard_normal(s)).astype(np.float32)
            for n, s in manifest.lora_shapes().items()
            if n.endswith(".B")
        },
    )
    before = get_params(session.state, names)

    session.module.train()
    losses = [float(session.module(ids, labels))]
    grads = {n: session.state.parameters[n].grad for n in names}
    assert all(g is not None and np.isfinite(g).all() and np.abs(g).max() > 0 for g in grads.values()), [
        n for n, g in grads.items() if g is None or not np.abs(g).max() > 0
    ]
    session.optimizer.step()
    session.module.lazy_reset_grad()
    for _ in range(5):
        losses.append(float(session.module(ids, labels)))
        session.optimizer.step()
        session.module.lazy_reset_grad()
    session.module.eval()
    losses.append(float(session.module(ids, labels)))
    print(f"[{quantization}] losses {[round(x, 4) for x in losses]}")
    assert losses[-1] < losses[0] - 0.1
    assert all(b < a for a, b in itertools.pairwise(losses))

    after = get_params(session.state, names)
    unchanged = [n for n in names if np.array_equal(after[n], before[n])]
    assert not unchanged


def test_int8_base_is_close_to_fp32(tiny_dir: Path, bundle_factory: Callable[..., Path], make_batch: MakeBatch) -> None:
    fp32 = open_session(bundle_factory(tiny_dir, QV, "fp32") / mf.TRAIN_DIR)
    int8_bundle = bundle_factory(tiny_dir, QV, "int8")
    int8 = open_session(int8_bundle / mf.TRAIN_DIR)
    ids, labels = make_batch(320, 2, 16, 2)
    fp32.module.eval()
    int8.module.eval()
    a, b = float(fp32.module(ids, labels)), float(int8.module(ids, labels))
    print(f"[int8 vs fp32] {b:.6f} vs {a:.6f}")
    assert abs(a - b) < 2e-2 * abs(a)

    # The frozen projections live in the checkpoint as int8, never dequantized into the graphs.
    params = dict(int8.state.parameters)
    q_proj = params["model.layers.0.self_attn.q_proj.weight.T.int8"]
    assert q_proj.data.dtype == np.int8 and not q_proj.requires_grad
    assert (int8_bundle / mf.CHECKPOINT).stat().st_size < (
        bundle_factory(tiny_dir, QV, "fp32") / mf.CHECKPOINT
    ).stat().st_size


def test_artifacts_are_loadable_by_ort_1_19(tiny_dir: Path, bundle_factory: Callable[..., Path]) -> None:
    bundle = bundle_factory(tiny_dir, QV)
    for rel in (mf.TRAINING_MODEL, mf.EVAL_MODEL, mf.OPTIMIZER_MODEL, mf.CALIB_MODEL):
        model = onnx.load(str(bundle / rel))
        assert model.ir_version <= MAX_IR_VERSION, rel
    training = onnx.load(str(bundle / mf.TRAINING_MODEL))
    produced = {out for node in training.graph.node for out in node.output}
    assert {f"{n}_grad" for n in mf.load(bundle).lora_shapes()} <= produced
    assert training.graph.output[0].name == "loss"


def test_named_parameter_access_is_checked(tiny_dir: Path, bundle_factory: Callable[..., Path]) -> None:
    from onnxruntime.training.api import CheckpointState, Module

    bundle = bundle_factory(tiny_dir, QV)
    session = open_session(bundle / mf.TRAIN_DIR)
    with pytest.raises(BundleError, match=r"no parameter\(s\) \['lora.0.x.A'\]"):
        get_params(session.state, ["lora.0.x.A"])
    with pytest.raises(BundleError, match="no parameter"):
        set_params(session.state, {"lora.9.q.A": np.zeros((4, 64), np.float32)})
    with pytest.raises(BundleError, match=r"expected shape \(4, 64\), got \(64, 4\)"):
        set_params(session.state, {"lora.0.q.A": np.zeros((64, 4), np.float32)})
    assert "lora.9.q.A" not in session.state.parameters  # a failed set adds nothing

    # The getter of ORT returns a view of the live buffer; get_params must hand out copies.
    copy = get_params(session.state, ["lora.0.q.A"])["lora.0.q.A"]
    copy += 1.0
    assert not np.array_equal(get_params(session.state, ["lora.0.q.A"])["lora.0.q.A"], copy)

    # float64 input is converted; the written value reads back.
    value = np.arange(4 * 64, dtype=np.float64).reshape(4, 64) / 100
    set_params(session.state, {"lora.0.q.A": value})
    assert np.array_equal(get_params(session.state, ["lora.0.q.A"])["lora.0.q.A"], value.astype(np.float32))

    # Writing before a Module exists crashes ORT 1.19; set_params refuses instead.
    train_dir = bundle / mf.TRAIN_DIR
    state = CheckpointState.load_checkpoint(str(train_dir / "checkpoint"))
    with pytest.raises(TrainingError, match="Module"):
        set_params(state, {"lora.0.q.A": np.zeros((4, 64), np.float32)})
    module = Module(str(train_dir / "training_model.onnx"), state, str(train_dir / "eval_model.onnx"))
    bind(state, module)
    set_params(state, {"lora.0.q.A": np.zeros((4, 64), np.float32)})
    assert not get_params(state, ["lora.0.q.A"])["lora.0.q.A"].any()
