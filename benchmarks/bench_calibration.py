"""What one calibration forward pass costs AlignFed's coordinator on SmolLM2-135M (LoRA q,v, r = 8).

    python benchmarks/bench_calibration.py [--bundle DIR] [--tokens 256] [--repeats 3]

Side by side in one process, one ORT thread (as the coordinator runs): the activations of every
adapted layer for one adapter version computed

- as first built: one example per row padded to seq_len, the whole graph run (LM head and loss
  included) and the activation outputs picked from it;
- as the runner does now (`CalibrationRunner.activations`): examples packed end to end, only the
  path to the fetched activations executed.

Both draw the same number of calibration positions (n = --tokens) per layer. With no --bundle, a
fp32 bundle of the reference GGUF is exported to a temporary folder first (about a minute).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np

from alignfed import manifest as mf
from alignfed.adapter import initial_adapter
from alignfed.text import Batcher
from coordinator.calibration import (
    ACT_PREFIX,
    INPUT_IDS,
    LABELS,
    LOSS,
    MAX_EXAMPLES,
    OVERSAMPLE,
    CalibrationRunner,
    builtin_texts,
)
from coordinator.strategies.base import AdapterState


def padded_batch(runner: CalibrationRunner, bundle: Path, m: mf.Manifest, tokens: int) -> tuple[dict[str, Any], int]:
    """The first form: shuffled examples one per row until they hold OVERSAMPLE × tokens positions."""
    seq_len = runner.batch.input_ids.shape[1]
    batcher = Batcher(
        builtin_texts(0), bundle / mf.TOKENIZER, batch=1, seq_len=seq_len, eos_id=int(m.tokenizer["eos_id"]), seed=0
    )
    rows: list[np.ndarray] = []
    held = 0
    for i in np.random.default_rng(0).permutation(batcher.samples):
        if len(rows) >= MAX_EXAMPLES or held >= OVERSAMPLE * tokens:
            break
        rows.append(batcher.rows[int(i)])
        held += int(batcher.rows[int(i)].size)
    b = batcher.make(rows)
    return {INPUT_IDS: b.input_ids, LABELS: b.labels}, held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="a SmolLM2 bundle (default: export one to a temporary folder)")
    ap.add_argument("--tokens", type=int, default=256, help="calibration positions n per layer (default 256)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes of each form (median printed)")
    args = ap.parse_args()
    if args.bundle:
        bundle = Path(args.bundle)
    else:
        from export.bundle import export_bundle
        from export.reference_model import smollm2_gguf

        bundle = Path(tempfile.mkdtemp(prefix="alignfed-bench-")) / "bundle"
        export_bundle(smollm2_gguf(), bundle, targets=("q", "v"), rank=8, alpha=16.0, quantization="fp32")
    m = mf.load(bundle)
    runner = CalibrationRunner.from_bundle(bundle, m, None, args.tokens, threads=1)
    state = AdapterState(0, initial_adapter(bundle, m), m.lora.scale, m.lora.rank)
    feeds, held = padded_batch(runner, bundle, m, args.tokens)
    feeds.update({k: np.asarray(v, np.float32) for k, v in state.tensors.items()})
    outputs = [LOSS, *(ACT_PREFIX + lid for lid in m.layer_ids)]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; bundle {bundle}; n = {args.tokens}")

    def timed(run: Callable[[], object]) -> float:
        times = []
        for _ in range(args.repeats + 1):  # the first pass warms up
            t0 = time.process_time()
            run()
            times.append(time.process_time() - t0)
        return float(np.median(times[1:]))

    whole = timed(lambda: runner._session.run(outputs, feeds))
    packed = timed(lambda: runner.activations(state))
    b_old, b_new = feeds[INPUT_IDS].shape, runner.batch.input_ids.shape
    print(f"   padded rows, whole graph: batch {b_old[0]}x{b_old[1]} ({held} tokens), {whole:.2f} s CPU")
    print(
        f"   packed rows, fetched path: batch {b_new[0]}x{b_new[1]}, {packed:.2f} s CPU -> {whole / packed:.1f}x less"
    )


if __name__ == "__main__":
    main()
