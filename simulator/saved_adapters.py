"""Keep what a run produced: global adapters as safetensors and as llama.cpp GGUF LoRAs.

`SavingHistory` is the run's version store (`versions.VersionHistory`) that also writes every
`every`-th version as it is made; `save_final` writes the run's last version. Files, per variant:

    {out}/{variant}/v{version:05d}.safetensors + .gguf     every N-th version (--save-every N)
    {out}/{variant}/final.safetensors + final.gguf         the final global adapter

The safetensors file holds the canonical LoRA tensors (`lora.{layer}.{module}.A` (r, in), `.B`
(out, r), unscaled) with the version, variant, rank, alpha and bundle digest in its metadata; the
GGUF is what `llama.cpp --lora` (and `runtime.llama.Generator.set_adapter`) loads on the bundle's
`gguf/base.gguf`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignfed import manifest as mf
from alignfed.errors import ConfigError
from alignfed.gguf_adapter import write_lora_gguf
from coordinator.strategies.base import AdapterState
from simulator.versions import VersionHistory

FINAL = "final"


@dataclass(frozen=True, slots=True)
class SavedAdapter:
    safetensors: Path
    gguf: Path
    version: int


def variant_dir(out: Path, variant: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", variant):
        raise ConfigError(f"variant name {variant!r} cannot name a folder; expected letters, digits, _ . + -")
    return Path(out) / variant


def save_adapter(state: AdapterState, folder: Path, stem: str, *, variant: str, manifest: mf.Manifest) -> SavedAdapter:
    """Write `state`'s tensors as `{folder}/{stem}.safetensors` and `{folder}/{stem}.gguf`."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state.tensors.items()}
    meta = {
        "version": str(state.version),
        "variant": variant,
        "rank": str(manifest.lora.rank),
        "alpha": str(manifest.lora.alpha),
        "bundle": mf.bundle_digest(manifest),
    }
    st = folder / f"{stem}.safetensors"
    save_file(tensors, str(st), metadata=meta)
    gguf = write_lora_gguf(folder / f"{stem}.gguf", tensors, manifest.architecture, manifest.lora)
    return SavedAdapter(st, gguf, state.version)


class SavingHistory(VersionHistory):
    """The version store that also saves every `every`-th new version (version 0 is the bundle's)."""

    def __init__(self, initial: AdapterState, folder: Path, *, every: int, variant: str, manifest: mf.Manifest):
        if every < 0:
            raise ConfigError(f"--save-every must be ≥ 0 (0: final adapters only), got {every}")
        self._folder, self._every, self._variant, self._manifest = folder, every, variant, manifest
        self.saved: list[SavedAdapter] = []
        super().__init__(initial)

    def add(self, state: AdapterState) -> None:
        super().add(state)
        if self._every and state.version > 0 and state.version % self._every == 0:
            self.saved.append(
                save_adapter(
                    state, self._folder, f"v{state.version:05d}", variant=self._variant, manifest=self._manifest
                )
            )


def save_final(state: AdapterState, out: Path, *, variant: str, manifest: mf.Manifest) -> SavedAdapter:
    return save_adapter(state, variant_dir(out, variant), FINAL, variant=variant, manifest=manifest)
