"""Differential test: the exported ONNX graphs against transformers' LlamaForCausalLM.

The reference is the eager HF model loaded from the same folder, with a hand-written LoRA on the
same projections (`base(x) + s * (x @ A.T) @ B.T`). A and B are both random and nonzero, so a
wrong factor order, scale, transpose or target shows up in the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from alignfed import lora
from alignfed import manifest as mf
from export.onnx_graph import INPUT_IDS, LABELS, LOSS, act_name
from runtime.ort import get_params, open_session, set_params

TOL = 1e-4
# The make_batch fixture (conftest): (vocab, B, T, seed) -> input_ids, labels, both (B, T).
MakeBatch = Callable[[int, int, int, int], tuple[np.ndarray, np.ndarray]]
CASES = [
    ("qv", ("q", "v"), "tiny_dir"),
    ("all-seven", ("q", "k", "v", "o", "gate", "up", "down"), "tiny_dir"),
    ("tied-embeddings", ("q", "v"), "tiny_tied_dir"),
]


def random_adapter(manifest: mf.Manifest, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (0.2 * rng.standard_normal(s)).astype(np.float32) for k, s in manifest.lora_shapes().items()}


def torch_reference(
    model_dir: Path, manifest: mf.Manifest, adapter: dict[str, np.ndarray], ids: np.ndarray, labels: np.ndarray
) -> tuple[float, dict[str, np.ndarray]]:
    """HF loss with the LoRA added by forward hooks, and the input of every adapted projection."""
    from transformers import LlamaForCausalLM

    torch.set_num_threads(2)
    model = LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    scale = manifest.lora.scale
    acts: dict[str, np.ndarray] = {}
    for lid in manifest.layer_ids:
        layer, module = lora.split_layer_id(lid)
        a = torch.from_numpy(adapter[lora.key(layer, module, "A")])  # (r, in)
        b = torch.from_numpy(adapter[lora.key(layer, module, "B")])  # (out, r)
        proj = model.model.layers[layer].get_submodule(lora.MODULES[module].hf)

        def hook(
            _m: torch.nn.Module,
            inp: tuple[torch.Tensor, ...],
            out: torch.Tensor,
            a: torch.Tensor = a,
            b: torch.Tensor = b,
            lid: str = lid,
        ) -> torch.Tensor:
            acts[lid] = inp[0].detach().numpy().copy()
            return out + scale * (inp[0] @ a.T) @ b.T

        proj.register_forward_hook(hook)
    with torch.no_grad():
        loss = model(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels)).loss
    return float(loss), acts


@pytest.mark.parametrize(("case", "targets", "model_fixture"), CASES, ids=[c[0] for c in CASES])
def test_train_eval_and_calib_match_transformers(
    case: str,
    targets: tuple[str, ...],
    model_fixture: str,
    request: pytest.FixtureRequest,
    bundle_factory: Callable[..., Path],
    make_batch: MakeBatch,
) -> None:
    import onnxruntime as ort

    model_dir: Path = request.getfixturevalue(model_fixture)
    bundle = bundle_factory(model_dir, targets)
    manifest = mf.load(bundle)
    mf.verify(bundle, manifest)
    adapter = random_adapter(manifest, seed=7)

    session = open_session(bundle / mf.TRAIN_DIR)
    set_params(session.state, adapter)
    roundtrip = get_params(session.state, adapter)
    assert all(np.array_equal(roundtrip[k], v) for k, v in adapter.items())

    calib = ort.InferenceSession(str(bundle / mf.CALIB_MODEL), providers=["CPUExecutionProvider"])
    act_outputs = [act_name(lid) for lid in manifest.layer_ids]
    assert [o.name for o in calib.get_outputs()] == [LOSS, *act_outputs]
    assert [i.name for i in calib.get_inputs()] == [INPUT_IDS, LABELS, *manifest.lora_shapes()]

    # Dynamic batch and sequence length: two shapes through the same graphs.
    for b, t, seed in ((2, 16, 0), (1, 7, 1)):
        ids, labels = make_batch(manifest.architecture.vocab, b, t, seed)
        ref_loss, ref_acts = torch_reference(model_dir, manifest, adapter, ids, labels)

        session.module.eval()
        eval_loss = float(session.module(ids, labels))
        session.module.train()
        train_loss = float(session.module(ids, labels))
        session.module.lazy_reset_grad()
        outs = calib.run(None, {INPUT_IDS: ids, LABELS: labels, **adapter})
        calib_loss = float(outs[0])
        act_err = max(
            float(np.abs(got - ref_acts[lid]).max()) for lid, got in zip(manifest.layer_ids, outs[1:], strict=True)
        )
        print(
            f"[{case} B={b} T={t}] torch {ref_loss:.6f}  |eval-torch| {abs(eval_loss - ref_loss):.2e}  "
            f"|train-torch| {abs(train_loss - ref_loss):.2e}  |calib-torch| {abs(calib_loss - ref_loss):.2e}  "
            f"max|act-torch| {act_err:.2e}"
        )
        assert abs(eval_loss - ref_loss) < TOL
        assert abs(train_loss - ref_loss) < TOL
        assert abs(calib_loss - ref_loss) < TOL
        for lid, got in zip(manifest.layer_ids, outs[1:], strict=True):
            d_in, _ = manifest.architecture.in_out(lora.split_layer_id(lid)[1])
            assert got.shape == (b, t, d_in)
        assert act_err < TOL


def test_zero_init_adapter_is_the_base_model(
    tiny_dir: Path, bundle_factory: Callable[..., Path], make_batch: MakeBatch
) -> None:
    """The bundle's own init (B = 0) must give exactly the base model's loss."""
    from transformers import LlamaForCausalLM

    bundle = bundle_factory(tiny_dir, ("q", "v"))
    manifest = mf.load(bundle)
    session = open_session(bundle / mf.TRAIN_DIR)
    init = get_params(session.state, manifest.lora_shapes())
    assert all(not np.any(v) for k, v in init.items() if k.endswith(".B"))
    assert all(np.any(v) for k, v in init.items() if k.endswith(".A"))

    ids, labels = make_batch(manifest.architecture.vocab, 2, 12, 3)
    session.module.eval()
    model = LlamaForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = float(model(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels)).loss)
    assert abs(float(session.module(ids, labels)) - ref) < TOL
