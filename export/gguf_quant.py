"""F32 GGUF -> quantized GGUF with llama.cpp's own quantizer (`llama_model_quantize`).

Using llama.cpp's quantizer, not gguf-py's numpy one, gives exactly the per-tensor choices
llama-quantize makes for a type: in a Q4_K_M file some tensors are Q6_K, token embeddings and
1-D norms stay as llama.cpp wants them. K-quants pack 256 values per block: a tensor whose row
length is not a multiple of 256 (every tensor of the tiny test models, hidden 64) gets llama.cpp's
fallback type instead (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0; see `llama_tensor_get_type` in
llama-quant.cpp), and the file still says Q4_K_M in `general.file_type`.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import logging
import os
from pathlib import Path

from alignfed import atomic
from alignfed.errors import ExportError

# name -> llama_ftype constant in llama_cpp (values are llama.h's enum llama_ftype)
QUANT_TYPES: dict[str, str] = {
    "F16": "LLAMA_FTYPE_MOSTLY_F16",
    "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "Q5_K_M": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "Q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1",
    "Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}
LOGGER = "llama-cpp-python"  # the logger llama-cpp-python routes llama.cpp's log through


def check_quant(name: str) -> str:
    """Validate a GGUF quantization name ("F32" means no quantization)."""
    if name != "F32" and name not in QUANT_TYPES:
        raise ExportError(f"GGUF quantization {name!r} is not supported; supported: F32, {', '.join(QUANT_TYPES)}")
    return name


def quantize_gguf(src: Path, dst: Path, quant: str, *, threads: int | None = None) -> Path:
    """Quantize the F32/F16 GGUF `src` to `quant`, written atomically to `dst`.

    llama.cpp's log (which tensors fell back to which type) is captured and shown only on failure.
    """
    import llama_cpp

    check_quant(quant)
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ExportError(f"{src}: GGUF to quantize not found")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANT_TYPES[quant])
    params.nthread = threads or os.cpu_count() or 1
    log = logging.getLogger(LOGGER)
    level = log.level
    sink = io.StringIO()
    log.setLevel(logging.WARNING)
    with atomic.replacing(dst) as tmp:
        try:
            with contextlib.redirect_stderr(sink):
                rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        finally:
            log.setLevel(level)
        if rc != 0 or not tmp.is_file():
            raise ExportError(
                f"{src}: llama.cpp could not quantize to {quant} (return code {rc})\n{sink.getvalue()[-2000:]}"
            )
    return dst
