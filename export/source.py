"""What an export reads from a base model, whatever its format: a Hugging Face folder or a GGUF file.

`export.reader.open_source` looks at the path and returns a `ModelSource`: the architecture, the tokenizer in
HF `tokenizers` JSON, the special token ids and chat template, an identity for the manifest, and a
loader for the float32 weights in HF naming and HF row order (what `export.onnx_graph` builds
from). Weights load only when asked, so a bad option fails before hundreds of MB are read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from alignfed.manifest import Architecture

SourceKind = Literal["hf", "gguf"]
GGUF_SUFFIX = ".gguf"
# progress: show a bar while reading (only on a tty) -> {HF name: float32 array}
LoadWeights = Callable[[bool], dict[str, np.ndarray]]


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A base model ready to export; see the module docstring."""

    kind: SourceKind
    path: Path
    base_id: str  # a readable name for the manifest (folder or file stem)
    base_sha256: str  # sha256 of the weights file (shards: of their digests in order)
    architecture: Architecture
    tokenizer_json: str  # HF `tokenizers` format, written to the bundle as tokenizer.json
    tokenizer_info: Mapping[str, Any]  # bos_id / eos_id / pad_id / chat_template, when known
    gguf_quantization: str | None  # quant type of a source GGUF ("Q4_1", ...); None for a HF folder
    load_weights: LoadWeights
