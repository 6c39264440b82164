"""The batched trainer trains each device exactly as it would train alone.

Tolerances. Against the single-device PyTorch step (edge.torch_trainer.TorchTrainer, and the
batched trainer given one job at a time) the numbers are the same float32 operations in the same
order per row, so they must agree to 1e-6 (measured: bit-identical on the CPU). Against ONNX
Runtime the network is the same but its kernels sum in another order: the existing ORT-vs-PyTorch
differential test (tests/edge/test_torch_trainer.py) allows rel 1e-4 on step losses and 2e-5 on
adapters after four AdamW steps (measured here: ≤ 5e-7 on losses, ≤ 3e-6 on adapters); the same
bounds hold here, and each adapter moves more than 10× the bound so the comparison is not vacuous.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from alignfed import manifest as mf
from alignfed.errors import ConfigError, TrainingError
from alignfed.text import Batch
from edge.torch_trainer import TorchTrainer
from simulator.batched import BatchedTrainer
from simulator.metrics import RunResult
from simulator.testbed import Testbed
from simulator.training import SharedTrainer, TrainJob

ORT_LOSS_REL, ORT_ADAPTER_ATOL, TORCH_ATOL = 1e-4, 2e-5, 1e-6


# Llama, and the traced families whose forward pass differs most: Phi-3's fused projections split
# into per-device adapters, Gemma 3's norms, logit soft-capping and sliding window.
FAMILIES = ("llama", "phi3", "gemma3_text")


@pytest.fixture(scope="module", params=FAMILIES)
def bundle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """LoRA on all seven projections over an int8 base: every adapted path and the dequantization."""
    from export.bundle import export_bundle
    from export.synthetic import TINY_CONFIGS, write_tiny_model

    out = tmp_path_factory.mktemp("batched-bundle")
    model = (
        tiny_model
        if request.param == "llama"
        else write_tiny_model(out.parent / f"{out.name}-model", TINY_CONFIGS[request.param])
    )
    targets = ("q", "k", "v", "o", "gate", "up", "down")
    export_bundle(model, out, targets=targets, rank=4, alpha=8.0, quantization="int8", seed=0, write_gguf=False)
    return out


def _batches(vocab: int, n: int, rng: np.random.Generator, rows: int = 2, t: int = 16) -> list[Batch]:
    out = []
    for _ in range(n):
        ids = rng.integers(0, vocab, size=(rows, t)).astype(np.int64)
        labels = ids.copy()
        labels[-1, t - 5 :] = -100  # padding: ignored in each device's own mean
        out.append(Batch(input_ids=ids, labels=labels))
    return out


def _jobs(shapes: dict[str, tuple[int, ...]], vocab: int) -> list[TrainJob]:
    """Three devices: own start adapters (B ≠ 0), own learning rates, 3/2/3 steps, one of another batch shape."""
    rng = np.random.default_rng(7)
    starts = [{n: rng.normal(0, 0.05, s).astype(np.float32) for n, s in shapes.items()} for _ in range(3)]
    return [
        TrainJob(starts[0], _batches(vocab, 3, rng), 0.01),
        TrainJob(starts[1], _batches(vocab, 2, rng), 0.02),
        TrainJob(starts[2], _batches(vocab, 3, rng, rows=3), 0.005),
    ]


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[n] - b[n]).max()) for n in a)


def test_batched_rounds_equal_ort_rounds(bundle: Path) -> None:
    m = mf.load(bundle)
    ort, batched = SharedTrainer(bundle, m), BatchedTrainer(bundle, m, device="cpu")
    jobs = _jobs(ort.shapes, m.architecture.vocab)
    want, got = ort.train_many(jobs), batched.train_many(jobs)
    for job, w, g in zip(jobs, want, got, strict=True):
        assert g.losses == pytest.approx(w.losses, rel=ORT_LOSS_REL)
        assert _max_diff(g.tensors, w.tensors) <= ORT_ADAPTER_ATOL
        assert _max_diff(g.tensors, dict(job.start)) > 10 * ORT_ADAPTER_ATOL
    assert batched.steps == 8
    assert batched.passes == 6  # steps 1, 2: the (2×16) pair + the (3×16) one; step 3: one of each shape


def _cosine(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    x = np.concatenate([a[n].ravel() for n in sorted(a)])
    y = np.concatenate([b[n].ravel() for n in sorted(a)])
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def test_bf16_base_tracks_ort_rounds(bundle: Path) -> None:
    """`precision="bf16"`: ORT's step losses to 0.5 % and each round's update in ORT's direction.

    bfloat16 keeps 8 bits of mantissa (relative rounding 4e-3 per product, averaging out over the
    sums); the adapters, moments and loss stay float32. Measured on these bundles: losses within
    4.3e-4 relative, update cosines ≥ 0.9986; the bounds (5e-3, 0.995) leave ~3× room and are
    tighter than the Jetson bf16 path's (2 %, 0.98, tests/edge/test_torch_trainer.py). Not parity:
    the option trades it for speed.
    """
    m = mf.load(bundle)
    ort, fast = SharedTrainer(bundle, m), BatchedTrainer(bundle, m, device="cpu", precision="bf16")
    assert fast.net.compute == torch.bfloat16
    jobs = _jobs(ort.shapes, m.architecture.vocab)
    for job, w, g in zip(jobs, ort.train_many(jobs), fast.train_many(jobs), strict=True):
        assert g.losses == pytest.approx(w.losses, rel=5e-3)
        start = dict(job.start)
        moved = {n: g.tensors[n] - start[n] for n in start}
        want = {n: w.tensors[n] - start[n] for n in start}
        assert _cosine(moved, want) > 0.995
        assert all(t.dtype == np.float32 for t in g.tensors.values())
    with pytest.raises(TrainingError, match="precision must be one of fp32, bf16, got 'fp16'"):
        BatchedTrainer(bundle, m, device="cpu", precision="fp16")


def test_batched_rounds_equal_single_device_torch_steps(bundle: Path) -> None:
    m = mf.load(bundle)
    batched = BatchedTrainer(bundle, m, device="cpu")
    jobs = _jobs(batched.shapes, m.architecture.vocab)
    together = batched.train_many(jobs)
    for job, g in zip(jobs, together, strict=True):
        alone = batched.train_many([job])[0]
        assert _max_diff(g.tensors, alone.tensors) <= TORCH_ATOL
        assert g.losses == pytest.approx(alone.losses, abs=TORCH_ATOL)
        # the edge's plain fp32 path is the same network with one adapter (its lean path sums the
        # chunked loss in another order: equal to ~1e-6, tested against ORT in tests/edge)
        edge = TorchTrainer(bundle, m, lr=job.lr, threads=1, lean=False)
        edge.load_adapter(job.start)
        losses = [edge.step(b) for b in job.batches]
        assert g.losses == pytest.approx(losses, abs=TORCH_ATOL)
        assert _max_diff(g.tensors, edge.adapter()) <= TORCH_ATOL


def test_each_device_keeps_its_own_moments(bundle: Path) -> None:
    """Moments carried into a second round give that round's result; no moment leaks across devices."""
    m = mf.load(bundle)
    ort, batched = SharedTrainer(bundle, m), BatchedTrainer(bundle, m, device="cpu")
    jobs = _jobs(ort.shapes, m.architecture.vocab)
    mo_ort = [ort.fresh_moments() for _ in jobs]
    mo_bat = [batched.fresh_moments() for _ in jobs]
    for _ in range(2):  # two rounds, moments kept per device
        ort.train_many([TrainJob(j.start, j.batches, j.lr, mo) for j, mo in zip(jobs, mo_ort, strict=True)])
        got = batched.train_many([TrainJob(j.start, j.batches, j.lr, mo) for j, mo in zip(jobs, mo_bat, strict=True)])
    assert [mo.step for mo in mo_bat] == [6, 4, 6]
    for a, b in zip(mo_ort, mo_bat, strict=True):
        assert _max_diff(b.m1, a.m1) <= 1e-5 * max(float(np.abs(x).max()) for x in a.m1.values())
    fresh = batched.train_many(jobs)
    assert _max_diff(got[0].tensors, fresh[0].tensors) > 10 * ORT_ADAPTER_ATOL  # the moments mattered


def test_eval_losses_equal_ort(bundle: Path) -> None:
    m = mf.load(bundle)
    ort, batched = SharedTrainer(bundle, m), BatchedTrainer(bundle, m, device="cpu")
    rng = np.random.default_rng(3)
    tensors = {n: rng.normal(0, 0.05, s).astype(np.float32) for n, s in ort.shapes.items()}
    batches = _batches(m.architecture.vocab, 3, rng, rows=4, t=32) + _batches(m.architecture.vocab, 1, rng, rows=1)
    assert batched.eval_losses(tensors, batches) == pytest.approx(ort.eval_losses(tensors, batches), rel=1e-5)


def test_wrong_adapter_is_refused(bundle: Path) -> None:
    from alignfed.errors import TrainingError

    m = mf.load(bundle)
    batched = BatchedTrainer(bundle, m, device="cpu")
    bad = batched.fresh_moments().m1
    name = sorted(bad)[0]
    bad[name] = np.zeros((1, 1), np.float32)
    with pytest.raises(TrainingError, match=f"{name} has shape"):
        batched.train_many([TrainJob(bad, [], 0.01)])


def test_unknown_trainer_is_refused(bundle: Path) -> None:
    import argparse

    from simulator.cli import add_simulate_parser
    from simulator.testbed import TRAINERS, TestbedConfig

    parser = argparse.ArgumentParser()
    sim = add_simulate_parser(parser.add_subparsers())
    assert tuple(next(a for a in sim._actions if a.dest == "trainer").choices or ()) == TRAINERS

    with pytest.raises(ConfigError, match="trainer must be one of ort, batched"):
        TestbedConfig(bundle=bundle, trainer="gpu")


def test_a_reserved_position_breaks_ties_as_if_pushed_then() -> None:
    from simulator.clock import EventQueue

    q: EventQueue[str] = EventQueue()
    early = q.reserve()
    q.push(5.0, "pushed first")
    q.push(5.0, "reserved before it", order=early)
    assert [q.pop()[1], q.pop()[1]] == ["reserved before it", "pushed first"]


def test_simulation_on_the_batched_trainer_matches_ort(testbed: Testbed, tiny_bundle: Path) -> None:
    """Same rounds, same versions, same staleness on both trainers; several devices share passes."""
    from simulator.events import to_csv
    from simulator.experiment import run_variant
    from simulator.variants import standard_variant
    from tests.simulator.conftest import make_sim_config, make_testbed_config

    batched_bed = Testbed.build(make_testbed_config(tiny_bundle, trainer="batched"))
    assert isinstance(batched_bed.trainer, BatchedTrainer)
    runs = []
    for bed in (testbed, batched_bed):
        variant = standard_variant("fedbuff", devices=len(bed.devices), k=2)
        runs.append(run_variant(variant, bed, make_sim_config()))
    ort_run, batched_run = runs

    def story(run: RunResult) -> list[tuple[str, str, int, int]]:
        # Sorted: devices of one class start together and train equally long, so their arrivals
        # differ only by their payloads' sizes, which float32 rounding may change by a few bytes —
        # near-ties whose order is not part of the parity claim.
        return sorted((e.kind, e.device, e.version or 0, e.staleness or 0) for e in run.events)

    assert story(batched_run) == story(ort_run)
    assert batched_run.versions == ort_run.versions > 0
    assert batched_run.curve[-1].mean == pytest.approx(ort_run.curve[-1].mean, rel=1e-4)
    trainer = batched_bed.trainer
    arrived = sum(e.kind == "arrive" for e in batched_run.events)
    # 2 local steps a round; a round started but not needed before the run stopped is never trained
    assert 2 * arrived <= trainer.steps <= 2 * batched_run.rounds
    assert trainer.passes < trainer.steps  # rounds were trained together
    again = run_variant(
        standard_variant("fedbuff", devices=len(batched_bed.devices), k=2), batched_bed, make_sim_config()
    )
    assert to_csv([("b", again.events)]) == to_csv([("b", batched_run.events)])  # deterministic for a seed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch sees none here")
def test_batched_rounds_on_cuda_equal_ort_rounds(bundle: Path) -> None:
    """The simulator's GPU path (fp32, TF32 off): ORT's rounds within the CPU path's tolerances."""
    m = mf.load(bundle)
    ort, gpu = SharedTrainer(bundle, m), BatchedTrainer(bundle, m, device="cuda")
    assert gpu.device == "cuda"
    jobs = _jobs(ort.shapes, m.architecture.vocab)
    for job, w, g in zip(jobs, ort.train_many(jobs), gpu.train_many(jobs), strict=True):
        assert g.losses == pytest.approx(w.losses, rel=ORT_LOSS_REL)
        assert _max_diff(g.tensors, w.tensors) <= ORT_ADAPTER_ATOL
        assert _max_diff(g.tensors, dict(job.start)) > 10 * ORT_ADAPTER_ATOL
