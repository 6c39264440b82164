"""The traced export path on tiny random models of every supported family (Llama and Qwen2, whose
default is the hand-written graph, go through the traced one here): ORT training loss equals
transformers' loss with the adapter merged, calibration outputs equal forward-hook captures, the
int8 base is DequantizeLinear -> MatMul, a few ORT steps learn, and an unsupported model_type is
refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from alignfed import lora
from alignfed import manifest as mf
from alignfed.errors import ExportError
from export.bundle import export_bundle
from export.families import FAMILIES, listing
from export.onnx_graph import INPUT_IDS, LABELS, Quantization, act_name
from export.synthetic import TINY_CONFIGS, write_tiny_model
from runtime.ort import get_params, open_session, set_params
from tests.support.hf_reference import merged_model, projection_inputs, random_adapter

TOL = 1e-4  # ORT vs transformers loss (fp32 both; differences are summation order)
ACT_TOL = 1e-4  # calibration activations vs hooks, relative to max |activation|
RANK, ALPHA = 4, 8.0
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS), ids=sorted(TINY_CONFIGS))
def family_bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    family = request.param
    root = tmp_path_factory.mktemp(family)
    model_dir = write_tiny_model(root / "model", TINY_CONFIGS[family])
    bundle = root / "bundle"
    export_bundle(model_dir, bundle, targets=ALL_TARGETS, rank=RANK, alpha=ALPHA, write_gguf=None, graph="traced")
    return model_dir, bundle


def _batch(vocab: int, seed: int, t: int = 13) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(2, t)).astype(np.int64)
    labels = ids.copy()
    labels[0, :4] = -100
    return ids, labels


def test_ort_training_loss_and_calibration_match_transformers(family_bundle: tuple[Path, Path]) -> None:
    import onnxruntime as ort

    model_dir, bundle = family_bundle
    manifest = mf.load(bundle)
    arch = manifest.architecture
    adapter = random_adapter(manifest.lora_shapes(), seed=11)
    reference = merged_model(model_dir, arch, adapter, manifest.lora)

    session = open_session(bundle / mf.TRAIN_DIR)
    set_params(session.state, adapter)
    calib = ort.InferenceSession(str(bundle / mf.CALIB_MODEL), providers=["CPUExecutionProvider"])
    # T = 13 > the trace's 8 and > Gemma's sliding window 4; T = 3 < both.
    for t, seed in ((13, 2), (3, 3)):
        ids, labels = _batch(arch.vocab, seed, t)
        with torch.no_grad():
            want = float(reference(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(labels)).loss)
        session.module.train()
        got_train = float(session.module(ids, labels))
        session.module.lazy_reset_grad()
        names = ["loss", *(act_name(lid) for lid in manifest.layer_ids)]
        outs = calib.run(names, {INPUT_IDS: ids, LABELS: labels, **adapter})
        print(
            f"[{arch.family} T={t}] transformers {want:.6f} |train-tf| {abs(got_train - want):.2e} "
            f"|calib-tf| {abs(float(outs[0]) - want):.2e}"
        )
        assert abs(got_train - want) < TOL
        assert abs(float(outs[0]) - want) < TOL

        hooks = projection_inputs(reference, arch, manifest.lora, ids)
        worst = max(
            float(np.abs(got - hooks[lid]).max() / np.abs(hooks[lid]).max())
            for lid, got in zip(manifest.layer_ids, outs[1:], strict=True)
        )
        print(f"[{arch.family} T={t}] calibration vs hooks: max relative {worst:.2e}")
        assert worst < ACT_TOL


def test_graph_conventions_and_steps_learn(family_bundle: tuple[Path, Path]) -> None:
    _, bundle = family_bundle
    manifest = mf.load(bundle)
    calib = onnx.load(str(bundle / mf.CALIB_MODEL), load_external_data=False)
    inits = {i.name for i in calib.graph.initializer}
    assert calib.ir_version <= 10
    assert not any(n.startswith("lora.") for n in inits)  # the adapter is an input of the calib model
    assert {i.name for i in calib.graph.input} >= set(manifest.lora_shapes())
    session = open_session(bundle / mf.TRAIN_DIR, learning_rate=1e-2)
    params = {name for name, _ in session.state.parameters}
    assert set(manifest.lora_shapes()) <= params
    assert "model.layers.0.self_attn.o_proj.weight.T" in params  # frozen projections, transposed
    # No two parameters share one buffer: every base tensor the family has is there by its HF name.
    assert "model.layers.1.input_layernorm.weight" in params

    ids, labels = _batch(manifest.architecture.vocab, 5)
    rng = np.random.default_rng(5)
    set_params(
        session.state,
        {
            n: (0.05 * rng.standard_normal(s)).astype(np.float32)
            for n, s in manifest.lora_shapes().items()
            if n.endswith(".B")
        },
    )
    before = get_params(session.state, list(manifest.lora_shapes()))
    session.module.train()
    losses = []
    for _ in range(4):
        losses.append(float(session.module(ids, labels)))
        session.optimizer.step()
        session.module.lazy_reset_grad()
    after = get_params(session.state, list(manifest.lora_shapes()))
    print(f"[{manifest.architecture.family}] losses {[round(x, 4) for x in losses]}")
    assert losses[-1] < losses[0]
    assert not [n for n in before if np.array_equal(before[n], after[n])]


@pytest.mark.parametrize("family", ["phi3"])  # fused weights: the hardest case for the rewrite
def test_int8_base_is_dequantize_matmul(family: str, tmp_path: Path) -> None:
    model_dir = write_tiny_model(tmp_path / "model", TINY_CONFIGS[family])
    fp32, int8 = tmp_path / "fp32", tmp_path / "int8"
    quants: tuple[tuple[Path, Quantization], ...] = ((fp32, "fp32"), (int8, "int8"))
    for out, quant in quants:
        export_bundle(model_dir, out, targets=("q", "v"), rank=RANK, alpha=ALPHA, quantization=quant, write_gguf=None)
    calib = onnx.load(str(int8 / mf.CALIB_MODEL))
    inits = {i.name: i for i in calib.graph.initializer}
    fused = "qkv_proj" if family == "phi3" else "q_proj"
    q = inits[f"model.layers.0.self_attn.{fused}.weight.T.int8"]
    assert q.data_type == onnx.TensorProto.INT8
    deq = [n for n in calib.graph.node if n.op_type == "DequantizeLinear"]
    consumers = {n.op_type for n in calib.graph.node for d in deq if d.output[0] in n.input}
    projections = {lora.hf_projection(family, m) for m in lora.MODULES}  # Phi-3: 4 weights for 7 projections
    assert len(deq) == len(projections) * mf.load(int8).architecture.n_layers and consumers == {"MatMul"}

    ids, labels = _batch(mf.load(int8).architecture.vocab, 7)
    losses = []
    for bundle in (fp32, int8):
        s = open_session(bundle / mf.TRAIN_DIR)
        s.module.eval()
        losses.append(float(s.module(ids, labels)))
    print(f"[{family} int8 vs fp32] {losses[1]:.6f} vs {losses[0]:.6f}")
    assert abs(losses[1] - losses[0]) < 2e-2 * losses[0]


def test_torch_trainer_runs_every_family_and_names_what_it_lacks(
    family_bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    """Parity with ORT is tests/edge/test_torch_trainer.py; here: what a bundle must give it."""
    import dataclasses

    from alignfed.errors import BundleError, TrainingError
    from edge.torch_network import TORCH_FAMILIES
    from edge.torch_trainer import TorchTrainer

    _, bundle = family_bundle
    manifest = mf.load(bundle)
    assert manifest.architecture.family in TORCH_FAMILIES
    alien = dataclasses.replace(manifest, architecture=dataclasses.replace(manifest.architecture, family="mamba"))
    with pytest.raises(TrainingError, match=r"runs llama, qwen2, qwen3, gemma3_text, phi3, not 'mamba'; train this"):
        TorchTrainer(bundle, alien, lr=1e-3, threads=1)
    if manifest.architecture.family in ("llama", "qwen2"):
        return  # plain Llama: bundles from before the model config train without it
    old = tmp_path / "bundle"
    shutil.copytree(bundle, old)
    (old / mf.MODEL_CONFIG).unlink()
    with pytest.raises(BundleError, match=r"model_config.json: missing; a \w+ bundle needs it for the torch trainer"):
        TorchTrainer(old, manifest, lr=1e-3, threads=1)


def test_auto_picks_traced_for_new_families_and_hand_written_for_llama(tmp_path: Path) -> None:
    model_dir = write_tiny_model(tmp_path / "qwen3", TINY_CONFIGS["qwen3"])
    export_bundle(model_dir, tmp_path / "b", targets=("q",), rank=2, alpha=4, write_gguf=None)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "b" / mf.CALIB_MODEL)).metadata_props}
    assert props["alignfed.graph"] == "traced"
    assert mf.load(tmp_path / "b").architecture.head_dim == 32  # decoupled from hidden / heads = 16
    with pytest.raises(ExportError, match=r"graph 'hand-written' does not exist for 'qwen3'"):
        export_bundle(model_dir, tmp_path / "c", write_gguf=None, graph="hand-written")


def test_unsupported_architecture_names_it_and_lists_the_supported(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    shutil.copytree(write_tiny_model(tmp_path / "src", TINY_CONFIGS["llama"]), model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(cfg | {"model_type": "mamba"}))
    with pytest.raises(ExportError, match=r"model_type 'mamba' is not supported; supported: " + ", ".join(FAMILIES)):
        export_bundle(model_dir, tmp_path / "out", write_gguf=None)


def test_export_list_prints_every_family_and_its_tests(capsys: pytest.CaptureFixture[str]) -> None:
    from alignfed.cli import main

    assert main(["export", "--list"]) == 0
    out = capsys.readouterr().out
    assert out.strip() == listing()
    for fam in FAMILIES.values():
        assert fam.model_type in out and fam.hf_class in out
