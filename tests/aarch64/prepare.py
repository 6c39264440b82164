"""Make, on x86_64, what the emulated aarch64 device cannot: bundles (export needs ORT training's
artifact builder) and the ORT run's numbers the torch backend is compared with.

    python -m tests.aarch64.prepare OUT

OUT/<family>-<quant>/bundle + ort_reference.npz for tests/edge/test_torch_trainer.py
(ALIGNFED_PREEXPORTED=OUT), and OUT/federation/ (bundle, a device's data) for tests/aarch64/federation.py.
A stamp keyed on the sources that shape them makes a rerun free.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np

from tests.edge.test_torch_trainer import PARAMS, REFERENCE, export_case, ort_trajectory

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("export", "alignfed/manifest.py", "alignfed/lora.py", "tests/edge/test_torch_trainer.py", __file__)


def digest() -> str:
    h = hashlib.sha256()
    for src in SOURCES:
        p = ROOT / src
        for f in sorted(p.rglob("*.py")) if p.is_dir() else [p]:
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def main(out: Path) -> None:
    stamp = out / ".prepared"
    if stamp.is_file() and stamp.read_text() == digest():
        print(f"== bundles in {out} are current")
        return
    from alignfed.corpora import write_domain
    from export.bundle import export_bundle
    from export.synthetic import write_tiny_llama

    for family, quant in PARAMS:
        work = out / f"{family}-{quant}"
        bundle = export_case(family, quant, work)
        np.savez(work / REFERENCE, allow_pickle=False, **ort_trajectory(bundle))
        print(f"== {bundle} + ORT reference")
    fed = out / "federation"
    model = write_tiny_llama(fed / "model")
    export_bundle(model, fed / "bundle", targets=("q", "v"), rank=4, alpha=8.0, quantization="fp32", seed=0)
    write_domain(fed / "data.jsonl", "prose", 40, seed=0)
    print(f"== {fed}/bundle for the federation")
    stamp.write_text(digest())


if __name__ == "__main__":
    main(Path(sys.argv[1]))
