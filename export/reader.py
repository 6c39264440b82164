"""Which reader opens a base model: a Hugging Face folder or a GGUF file, chosen by the path."""

from __future__ import annotations

from pathlib import Path

from alignfed.errors import ExportError
from export.gguf_source import open_gguf
from export.hf_source import open_hf
from export.source import GGUF_SUFFIX, ModelSource


def open_source(path: Path) -> ModelSource:
    """A Hugging Face model folder or a `.gguf` file as a `ModelSource`."""
    path = Path(path)
    if path.is_dir():
        return open_hf(path)
    if path.is_file() and path.suffix.lower() == GGUF_SUFFIX:
        return open_gguf(path)
    what = "a file without the .gguf suffix" if path.is_file() else "missing"
    raise ExportError(f"{path}: expected a Hugging Face model folder or a {GGUF_SUFFIX} file, got {what}")
