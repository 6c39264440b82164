"""The PyTorch trainer backend trains exactly like the ORT one on the same bundle.

On x86_64 both backends run side by side. ONNX Runtime training has no aarch64 wheels, so on a board
(or `make test-aarch64`, an emulated one) the bundles and the ORT run's numbers are made natively
beforehand (tests/aarch64/prepare.py) and found through ALIGNFED_PREEXPORTED: the torch backend on
aarch64 is compared with what ORT computed on x86_64. A missing ORT on x86_64 fails; only on aarch64
without recorded numbers is the parity half skipped.
"""

from __future__ import annotations

import logging
import os
import platform
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest
import torch

from alignfed import manifest as mf
from alignfed.errors import TrainingError
from alignfed.text import Batch
from edge.accelerator import Placement, choose
from edge.selfcheck import check_matmul
from edge.torch_trainer import TorchTrainer

if TYPE_CHECKING:  # as in export_case, export is imported only where a bundle is exported
    from export.onnx_graph import Quantization

LR = 0.01
# The families the export traces (Qwen3's q/k norms; Gemma 3's norms, scales, logit soft-capping and
# a sliding window shorter than the batch; Phi-3's fused projections), each as an int8 bundle (its
# "fp32" mode dequantizes, "lean" keeps int8) and Gemma 3 / Phi-3 as fp32 ones too.
PARAMS: list[tuple[str, Quantization]] = [
    ("llama", "fp32"),
    ("llama", "int8"),
    ("qwen2", "fp32"),
    ("qwen3", "int8"),
    ("gemma3_text", "fp32"),
    ("gemma3_text", "int8"),
    ("phi3", "fp32"),
    ("phi3", "int8"),
]
PREEXPORTED = os.environ.get("ALIGNFED_PREEXPORTED", "")
AARCH64 = platform.machine().lower() in ("aarch64", "arm64")
REFERENCE = "ort_reference.npz"


def _batches(vocab: int, n: int, seed: int = 0) -> list[Batch]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(0, vocab, size=(2, 16)).astype(np.int64)
        labels = ids.copy()
        labels[1, 12:] = -100  # padding is ignored by both
        out.append(Batch(input_ids=ids, labels=labels))
    return out


def export_case(family: str, quant: Quantization, work: Path) -> Path:
    """Export the tiny bundle of one case into `work`/bundle (needs the export extra and ORT training)."""
    from export.bundle import export_bundle
    from export.synthetic import TINY_CONFIGS, write_tiny_model

    model = write_tiny_model(work / "model", TINY_CONFIGS[family])
    targets = ("q", "k", "v", "o", "gate", "up", "down")
    export_bundle(
        model, work / "bundle", targets=targets, rank=4, alpha=8.0, quantization=quant, seed=0, write_gguf=False
    )
    return work / "bundle"


# The fp32 reference path; the lean one (int8 kept int8, chunked loss); lean with every decoder layer
# recomputed in backward and a loss chunk (7 rows) that splits the 30 scored tokens unevenly.
MODES: dict[str, dict[str, Any]] = {
    "fp32": {"lean": False},
    "lean": {"lean": True},
    "lean-ckpt": {"checkpoint": True, "loss_chunk": 7},
}


def start_adapter(start: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The bundle's initial adapter with B made non-zero, so every factor gets a gradient."""
    rng = np.random.default_rng(1)
    return {n: (rng.normal(0, 0.05, t.shape) if n.endswith(".B") else t).astype(np.float32) for n, t in start.items()}


def ort_trajectory(bundle: Path) -> dict[str, np.ndarray]:
    """What ORT training computes from `start_adapter`: first eval loss, 4 step losses, the adapter after."""
    from edge.trainer import OrtTrainer

    m = mf.load(bundle)
    ort = OrtTrainer(bundle, m, lr=LR, threads=1)
    out = {f"start/{n}": t for n, t in ort.adapter().items()}
    ort.load_adapter(start_adapter(ort.adapter()))
    batches = _batches(m.architecture.vocab, 4)
    out["eval_loss"] = np.array(ort.eval_loss(batches[0]))
    out["step_losses"] = np.array([ort.step(b) for b in batches])
    out.update({f"end/{n}": t for n, t in ort.adapter().items()})
    return out


def _ort_training() -> bool:
    try:
        import onnxruntime.training.api  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module", params=PARAMS, ids=[f"{f}-{q}" for f, q in PARAMS])
def bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    family, quant = request.param
    if PREEXPORTED:
        path = Path(PREEXPORTED) / f"{family}-{quant}" / "bundle"
        if not (path / "manifest.json").is_file():
            pytest.fail(f"ALIGNFED_PREEXPORTED={PREEXPORTED}: no bundle at {path}; run tests/aarch64/prepare.py")
        return path
    if AARCH64 and not _ort_training():
        pytest.skip("exporting needs onnxruntime.training (x86_64 only); set ALIGNFED_PREEXPORTED (make test-aarch64)")
    return export_case(family, quant, tmp_path_factory.mktemp(f"{family}-{quant}"))


def _reference(bundle: Path) -> dict[str, np.ndarray]:
    recorded = bundle.parent / REFERENCE
    if _ort_training():
        return ort_trajectory(bundle)
    if recorded.is_file():
        with np.load(recorded) as z:
            return {k: z[k] for k in z.files}
    if AARCH64:
        pytest.skip(f"onnxruntime.training has no aarch64 wheels and {recorded} was not recorded natively")
    pytest.fail("onnxruntime.training is not installed on x86_64: install the edge extra (scripts/setup.sh)")


# Tolerances: both backends run float32 with the same weights (dequantized by the same formula),
# so they differ only in summation order (matmul blocking, chunked vs one-pass log-softmax):
# ~1e-7 relative per op, amplified through 2 layers and 4 AdamW steps. Loss to rel 1e-5 (eval)
# and 1e-4 (training, after the adapter has moved); adapters to 2e-5 absolute, 10x below the
# smallest movement the last assert demands, so a wrong gradient cannot pass.
@pytest.mark.parametrize("mode", sorted(MODES))
def test_same_losses_and_adapter_as_ort(bundle: Path, mode: str) -> None:
    want = _reference(bundle)
    m = mf.load(bundle)
    torch_ = TorchTrainer(bundle, m, lr=LR, threads=1, **MODES[mode])
    for name, t in torch_.adapter().items():  # both start from the bundle's initial adapter
        np.testing.assert_array_equal(t, want[f"start/{name}"])
    nonzero = _assert_trains_like_ort(torch_, want, m.architecture.vocab)
    moved = max(float(np.abs(want[f"end/{n}"] - nonzero[n]).max()) for n in nonzero)
    assert moved > 10 * 2e-5  # the comparison is not between two unchanged adapters


def _assert_trains_like_ort(trainer: TorchTrainer, want: dict[str, np.ndarray], vocab: int) -> dict[str, np.ndarray]:
    """From the reference's non-zero start: ORT's eval loss (rel 1e-5), its four step losses
    (rel 1e-4) and its end adapter (2e-5 absolute). Returns the start adapter."""
    start = start_adapter(trainer.adapter())
    trainer.load_adapter(start)
    batches = _batches(vocab, 4)
    assert trainer.eval_loss(batches[0]) == pytest.approx(float(want["eval_loss"]), rel=1e-5)
    for b, loss in zip(batches, want["step_losses"], strict=True):
        assert trainer.step(b) == pytest.approx(float(loss), rel=1e-4)
    got = trainer.adapter()
    for name in got:
        np.testing.assert_allclose(got[name], want[f"end/{name}"], atol=2e-5, err_msg=name)
    return start


def test_wrong_adapter_shape_is_refused(bundle: Path) -> None:
    m = mf.load(bundle)
    t = TorchTrainer(bundle, m, lr=LR, threads=1)
    bad = t.adapter()
    name = sorted(bad)[0]
    bad[name] = np.zeros((1, 1), np.float32)
    with pytest.raises(TrainingError, match=f"{name} has shape"):
        t.load_adapter(bad)


# -- the start-up matmul check ----------------------------------------------------------------------


def test_matmul_check_passes_on_this_cpu_at_every_thread_count() -> None:
    import torch

    before = torch.get_num_threads()
    try:
        for n in (1, 4):  # multithreaded sgemm is where ARMv8.1-only BLAS kernels showed up
            torch.set_num_threads(n)
            assert check_matmul(torch).worst_error < 1e-6
    finally:
        torch.set_num_threads(before)


def test_wrong_products_are_refused_before_training(bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    right = torch.Tensor.__matmul__

    def off_by_a_bit(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # an SVE-like fault: small error
        y = right(a, b)
        return y + 1e-3 * y.abs().max() if b.shape[-1] <= 16 else y

    monkeypatch.setattr(torch.Tensor, "__matmul__", off_by_a_bit)
    with pytest.raises(TrainingError, match=r"multiplies matrices wrongly: \(B=\d+, T=\d+, in=\d+\) @ \((4|8|16), "):
        TorchTrainer(bundle, mf.load(bundle), lr=LR, threads=1)


# -- where training runs ---------------------------------------------------------------------------


def _fake_cuda_torch(bf16: bool) -> types.SimpleNamespace:
    """A stand-in for a CUDA torch (no GPU here): only what `choose` asks."""
    cuda = types.SimpleNamespace(
        is_available=lambda: True, get_device_name=lambda i: "Orin", is_bf16_supported=lambda: bf16
    )
    return types.SimpleNamespace(cuda=cuda, version=types.SimpleNamespace(cuda="12.6"), __version__="2.5.0")


def test_cuda_is_chosen_when_torch_sees_a_gpu() -> None:
    orin = choose(_fake_cuda_torch(bf16=True), "cuda")
    nano = choose(_fake_cuda_torch(bf16=False), "cuda")  # Maxwell: no bf16
    assert (orin.device, orin.compute_dtype) == ("cuda", "bfloat16")
    assert (nano.device, nano.compute_dtype) == ("cuda", "float16")
    assert choose(_fake_cuda_torch(bf16=True), "cpu").device == "cpu"  # the profile decides first


def test_auto_strict_and_float32_placements_for_the_simulators_batched_trainer() -> None:
    gpu = _fake_cuda_torch(bf16=True)
    no_gpu = types.SimpleNamespace(
        cuda=types.SimpleNamespace(is_available=lambda: False), version=types.SimpleNamespace(cuda=None),
        __version__="2.5.0",
    )  # fmt: skip
    assert (choose(gpu, "auto").device, choose(no_gpu, "auto").device) == ("cuda", "cpu")
    assert choose(gpu, "cuda", half=False).compute_dtype == "float32"  # simulated rounds match ORT's
    with pytest.raises(TrainingError, match=r"CUDA was asked for, but torch 2\.5\.0 is a CPU build"):
        choose(no_gpu, "cuda", strict=True)
    with pytest.raises(TrainingError, match="accelerator 'tpu'; expected one of auto, cpu, cuda"):
        choose(gpu, "tpu")


def test_cuda_profile_falls_back_to_the_cpu_with_a_logged_reason(
    bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the fallback cannot happen here")
    with caplog.at_level(logging.WARNING, logger="edge.accelerator"):
        t = TorchTrainer(bundle, mf.load(bundle), lr=LR, threads=1, accelerator="cuda")
    assert t.placement.device == "cpu" and t.placement.compute_dtype == "float32"
    assert "asks for CUDA but torch" in caplog.text and "training on the CPU" in caplog.text


def test_half_precision_base_keeps_fp32_lora_and_tracks_fp32(bundle: Path) -> None:
    """The GPU's mixed precision (bf16 base, fp32 LoRA and AdamW), run on the CPU where bf16 matmul exists."""
    m = mf.load(bundle)
    full = TorchTrainer(bundle, m, lr=LR, threads=1)
    half = TorchTrainer(bundle, m, lr=LR, threads=1, placement=Placement("cpu", "bfloat16", "test"))
    start = start_adapter(full.adapter())
    full.load_adapter(start)
    half.load_adapter(start)
    for b in _batches(m.architecture.vocab, 3):
        assert half.step(b) == pytest.approx(full.step(b), rel=2e-2)
    assert all(p.dtype == half._torch.float32 for p in half.params.values())
    a, b_ = full.adapter(), half.adapter()
    d_full = np.concatenate([(a[n] - start[n]).ravel() for n in a])
    d_half = np.concatenate([(b_[n] - start[n]).ravel() for n in a])
    cos = float(d_full @ d_half / (np.linalg.norm(d_full) * np.linalg.norm(d_half)))
    assert cos > 0.98  # the same update direction, up to bf16 rounding of the base's products


def test_lean_trainer_keeps_the_int8_base_int8(bundle: Path) -> None:
    """The int8 bundle's projections stay int8 (a quarter of fp32) and no fp32 copy is held."""
    from edge.lean_linear import Int8Weight

    m = mf.load(bundle)
    lean = TorchTrainer(bundle, m, lr=LR, threads=1)
    int8 = {n: w for n, w in lean.w.items() if isinstance(w, Int8Weight)}
    if m.train_quantization != "int8":
        assert not int8
        return
    projections = [n for n in lean.w if n.endswith("_proj.weight")]
    assert projections and sorted(int8) == sorted(projections)
    for w in int8.values():
        assert w.q_t.dtype == torch.int8


def _saved_bytes(trainer: TorchTrainer, batch: Batch) -> int:
    """Bytes autograd keeps for backward during one forward (what a training step holds)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.dtype != torch.int8:  # int8 weights are the base itself, not a new allocation
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer._loss(batch)
    return total


def test_lean_and_checkpointing_keep_less_for_backward(bundle: Path) -> None:
    m = mf.load(bundle)
    batch = _batches(m.architecture.vocab, 1)[0]
    plain, lean, ckpt = (TorchTrainer(bundle, m, lr=LR, threads=1, **MODES[k]) for k in ("fp32", "lean", "lean-ckpt"))
    saved = [_saved_bytes(t, batch) for t in (plain, lean, ckpt)]
    assert saved[0] > saved[1] > saved[2], saved
    # what the fp32 path keeps and the lean one does not: the (N, V) logits and their softmax
    n = batch.input_ids.shape[0] * (batch.input_ids.shape[1] - 1)
    assert saved[0] - saved[1] >= 4 * n * m.architecture.vocab


# -- on a CUDA GPU ----------------------------------------------------------------------------------
# A Jetson's path (profile `accelerator = "cuda"`). CI's machines have no GPU, so these run only where
# torch sees one (benchmarks/gpu_check.sh runs them on a GPU machine); the CPU half of the placement
# logic is tested above with a stand-in torch.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch sees none here")


def _update(got: dict[str, np.ndarray], start: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([(got[n] - start[n]).ravel() for n in sorted(got)])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@needs_cuda
def test_cuda_fp32_trains_like_ort(bundle: Path) -> None:
    """fp32 on the GPU (TF32 off): ORT's numbers up to summation order, the CPU path's tolerances."""
    want = _reference(bundle)
    m = mf.load(bundle)
    gpu = TorchTrainer(bundle, m, lr=LR, threads=1, placement=Placement("cuda", "float32", "test"))
    assert gpu.params[sorted(gpu.params)[0]].device.type == "cuda"
    _assert_trains_like_ort(gpu, want, m.architecture.vocab)


@needs_cuda
@pytest.mark.parametrize("half", ["bfloat16", "float16"])  # Orin and newer | the Nano's Maxwell
def test_cuda_half_precision_base_tracks_ort(bundle: Path, half: str) -> None:
    """Half-precision base, fp32 LoRA and AdamW: ORT's losses to 2 % and its update's direction.

    bf16 keeps 8 bits of mantissa (relative rounding 4e-3 per product), fp16 11; through two layers
    and four steps that moves the loss by well under 2 %, as on the CPU's bf16 test above.
    """
    want = _reference(bundle)
    m = mf.load(bundle)
    gpu = TorchTrainer(bundle, m, lr=LR, threads=1, placement=Placement("cuda", half, "test"))
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in gpu.params.values())
    start = start_adapter(gpu.adapter())
    gpu.load_adapter(start)
    for b, loss in zip(_batches(m.architecture.vocab, 4), want["step_losses"], strict=True):
        assert gpu.step(b) == pytest.approx(float(loss), rel=2e-2)
    ort_end = {n[len("end/") :]: want[n] for n in want if n.startswith("end/")}
    assert _cosine(_update(gpu.adapter(), start), _update(ort_end, start)) > 0.98


@needs_cuda
def test_cuda_profile_trains_on_the_gpu_in_half_precision(bundle: Path) -> None:
    m = mf.load(bundle)
    t = TorchTrainer(bundle, m, lr=LR, threads=1, accelerator="cuda")
    want = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    assert (t.placement.device, t.placement.compute_dtype) == ("cuda", want)
    assert torch.cuda.get_device_name(0) in t.placement.reason
    loss = t.step(_batches(m.architecture.vocab, 1)[0])
    assert np.isfinite(loss) and loss > 0


# -- an int8 embedding (profile `embedding = "int8"`) ------------------------------------------------


def test_int8_embedding_quarters_the_table_and_tracks_the_fp32_one(bundle: Path) -> None:
    """Per-row int8 moves each entry by ≤ 0.4 % of its row's largest: the losses stay within 1 % of the
    float32 table's and the update keeps its direction (cosine > 0.99) over four steps."""
    from edge.lean_linear import Int8Rows

    m = mf.load(bundle)
    full = TorchTrainer(bundle, m, lr=LR, threads=1)
    small = TorchTrainer(bundle, m, lr=LR, threads=1, embedding="int8")
    table = small.w["model.embed_tokens.weight"]
    assert isinstance(table, Int8Rows)
    v, hidden = full.w["model.embed_tokens.weight"].shape
    assert table.nbytes == v * hidden + 4 * v  # 1 byte an entry (float32: 4) and a scale per row
    start = start_adapter(full.adapter())
    full.load_adapter(start)
    small.load_adapter(start)
    for b in _batches(m.architecture.vocab, 4):
        assert small.step(b) == pytest.approx(full.step(b), rel=1e-2)
    assert _cosine(_update(small.adapter(), start), _update(full.adapter(), start)) > 0.99
    with pytest.raises(TrainingError, match="needs the lean trainer"):
        TorchTrainer(bundle, m, lr=LR, threads=1, lean=False, embedding="int8")
