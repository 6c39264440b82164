"""The calibration set a bundle carries: the texts AlignFed's coordinator aligns stale updates on.

Alignment is only as good as its calibration batch (DESIGN.md section 6), so the owner chooses it
at export (`alignfed export --calibration FILE`: representative data in any format devices read);
without a choice the bundle carries the project's built-in corpora, text the project generates
itself (alignfed/corpora.py), so no third-party licence applies. The set is stored as
`calib/calibration.jsonl` ({"text": ...} per line) and listed in the manifest with its sha256, so
it is part of the bundle's identity; the coordinator uses it unless its config names another file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from alignfed import corpora
from alignfed import manifest as mf
from alignfed.errors import ExportError, TrainingError
from alignfed.text import load_texts

MAX_EXAMPLES = 1024  # a calibration batch uses at most 64 rows; more only makes the bundle larger
BUILTIN_PER_DOMAIN = 24  # as the coordinator's built-in default (coordinator.calibration)
BUILTIN_SOURCE = "built-in generated corpora"


def write_calibration_set(out_dir: Path, data: Path | None, *, seed: int = 0) -> dict[str, Any]:
    """Write the set into `out_dir`; returns the manifest's `calibration` entry."""
    if data is None:
        texts, source = corpora.mixed_texts(BUILTIN_PER_DOMAIN, seed), BUILTIN_SOURCE
    else:
        try:
            texts = load_texts(Path(data))
        except TrainingError as exc:
            raise ExportError(f"--calibration {data}: {exc}") from exc
        source = Path(data).name
    if len(texts) > MAX_EXAMPLES:  # a seeded sample, kept in file order
        keep = np.sort(np.random.default_rng(seed).choice(len(texts), size=MAX_EXAMPLES, replace=False))
        texts = [texts[int(i)] for i in keep]
    path = Path(out_dir) / mf.CALIB_DATA
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    return {"file": mf.CALIB_DATA, "sha256": mf.sha256_file(path), "source": source, "examples": len(texts)}
