"""Global adapter -> llama.cpp LoRA adapter GGUF.

llama.cpp loads a LoRA as a GGUF with `general.type=adapter`, `adapter.type=lora`,
`adapter.lora.alpha` and, per adapted weight `blk.{i}.{stem}.weight`, two tensors
`.lora_a` (r, in) and `.lora_b` (out, r) in numpy order (gguf-py reverses dims, so ggml sees
ne = [in, r] and [r, out], matching the base weight's ne = [in, out]). At run time it adds
`scale * alpha / r * B @ A` to the weight, the same product as `alignfed.lora`.

llama.cpp's `llama` architecture applies RoPE to adjacent pairs (x0, x1), (x2, x3), ... of each
head (LLAMA_ROPE_TYPE_NORM), while Hugging Face rotates the two halves (rotate_half). Converters
therefore permute the rows of attn_q and attn_k (`permute_qk_rows`); an adapter's B, whose rows
are output rows, must get the same permutation or the adapter's change lands on the wrong rotary
channels. Its `qwen2` architecture rotates halves like HF (LLAMA_ROPE_TYPE_NEOX), and
convert_hf_to_gguf.py's Qwen2Model keeps the rows as they are. `GGUF_FAMILIES` records which
family does what; it and `permute_qk_rows` are the one definition that the base writer
(`export.gguf_base`), the GGUF reader (`export.gguf_source`) and the adapter writer share.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from alignfed import atomic, lora
from alignfed.errors import BundleError
from alignfed.manifest import Architecture, LoraLayout

QK_MODULES = ("q", "k")  # projections whose output rows llama.cpp permutes for RoPE


@dataclass(frozen=True, slots=True)
class GgufFamily:
    """How llama.cpp names and lays out one `Architecture.family`."""

    arch: str  # general.architecture, also the prefix of its hyper-parameter keys
    permute_qk: bool  # q/k output rows go to interleaved RoPE order (`permute_qk_rows`)


GGUF_FAMILIES: dict[str, GgufFamily] = {
    "llama": GgufFamily(arch="llama", permute_qk=True),
    "qwen2": GgufFamily(arch="qwen2", permute_qk=False),
    # The traced graph's families: llama.cpp runs all three with NEOX (rotate-half) RoPE.
    "qwen3": GgufFamily(arch="qwen3", permute_qk=False),
    "gemma3_text": GgufFamily(arch="gemma3", permute_qk=False),
    "phi3": GgufFamily(arch="phi3", permute_qk=False),
}


def permute_qk_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate_half row order -> GGML interleaved RoPE row order, per head.

    w: (n_heads * head_dim, ...) rows of q_proj / k_proj weights, or of a LoRA B for them.
    Within a head HF's rows are [x_0 .. x_{d/2-1} | x_{d/2} .. x_{d-1}] and rotate x_j with
    x_{j+d/2}; GGML rotates adjacent rows, so row j goes to 2j and row j+d/2 to 2j+1.
    Use n_heads = n_kv_heads for k.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads) != 0:
        raise ValueError(f"expected rows divisible by 2*n_heads={2 * n_heads}, got {rows} rows")
    half = rows // n_heads // 2
    # (H, 2, d/2, ...) -> (H, d/2, 2, ...): interleave the two halves of each head.
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `permute_qk_rows`: GGML interleaved row order -> HF rotate_half row order."""
    rows = w.shape[0]
    if rows % (2 * n_heads) != 0:
        raise ValueError(f"expected rows divisible by 2*n_heads={2 * n_heads}, got {rows} rows")
    half = rows // n_heads // 2
    # (H, d/2, 2, ...) -> (H, 2, d/2, ...): even rows back to the first half, odd to the second.
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def heads_for(arch: Architecture, module: str) -> int:
    """Number of heads whose rows `permute_qk_rows` groups for a q or k projection."""
    return arch.n_heads if module == "q" else arch.n_kv_heads


def family_spec(family: str) -> GgufFamily | None:
    """The GGUF spelling of an architecture family, or None if llama.cpp support is not wired."""
    return GGUF_FAMILIES.get(family)


def permutes_rows(arch: Architecture, module: str) -> bool:
    """Whether the output rows of projection `module` (weight, bias or LoRA B) are stored permuted."""
    spec = GGUF_FAMILIES.get(arch.family)
    return spec is not None and spec.permute_qk and module in QK_MODULES


def to_gguf_rows(t: np.ndarray, arch: Architecture, module: str) -> np.ndarray:
    """HF row order -> the row order llama.cpp expects for `module` of this family."""
    if not permutes_rows(arch, module):
        return t
    return np.ascontiguousarray(permute_qk_rows(t, heads_for(arch, module)))


def from_gguf_rows(t: np.ndarray, arch: Architecture, module: str) -> np.ndarray:
    """Inverse of `to_gguf_rows`: llama.cpp's row order -> HF row order."""
    if not permutes_rows(arch, module):
        return t
    return np.ascontiguousarray(unpermute_qk_rows(t, heads_for(arch, module)))


def gguf_tensors(tensors: Mapping[str, np.ndarray], arch: Architecture, layout: LoraLayout) -> dict[str, np.ndarray]:
    """Canonical LoRA tensors -> {GGUF name: float32 array}, B of q/k row-permuted where the
    family's GGUF layout permutes them (llama, not qwen2).

    Every key the layout implies must be present with its expected shape; extra keys are refused
    so a mismatched adapter never loads silently.
    """
    expected = set()
    out: dict[str, np.ndarray] = {}
    for lid in lora.layer_ids(arch.n_layers, layout.targets):
        layer, module = lora.split_layer_id(lid)
        d_in, d_out = arch.in_out(module)
        for factor, shape in (("A", (layout.rank, d_in)), ("B", (d_out, layout.rank))):
            name = lora.key(layer, module, factor)
            expected.add(name)
            if name not in tensors:
                raise BundleError(f"LoRA adapter: missing tensor {name} (expected shape {shape})")
            t = np.asarray(tensors[name])
            if t.shape != shape:
                raise BundleError(f"LoRA adapter: {name} expected shape {shape}, got {t.shape}")
            if not np.all(np.isfinite(t)):
                raise BundleError(f"LoRA adapter: {name} has non-finite values")
            t = np.ascontiguousarray(t, dtype=np.float32)
            if factor == "B":
                t = to_gguf_rows(t, arch, module)
            out[lora.gguf_name(layer, module, factor)] = t  # A: (r, in), B: (out, r)
    extra = sorted(set(tensors) - expected)
    if extra:
        raise BundleError(f"LoRA adapter: unexpected tensor(s) {extra[:4]} for targets {list(layout.targets)}")
    return _fuse(out, arch, layout) if arch.family in lora.FUSED else out


def _fuse(named: dict[str, np.ndarray], arch: Architecture, layout: LoraLayout) -> dict[str, np.ndarray]:
    """Per-projection adapters -> one adapter per fused weight (`lora.FUSED`).

    k adapted parts of a fused weight (out_total, in) become one LoRA of rank k*r: A stacks the
    parts' A (k*r, in); B (out_total, k*r) holds each part's B in its row block and its own rank
    columns, zero elsewhere, so B @ A = the parts' products in their row blocks. llama.cpp scales a
    tensor pair by alpha / rank with rank = rows of A (k*r), hence B times k keeps alpha / r.
    """
    outs = {m: arch.in_out(m)[1] for m in lora.MODULES}
    fused: dict[str, np.ndarray] = {}
    r = layout.rank
    for layer in range(arch.n_layers):
        for spec in lora.FUSED[arch.family]:
            parts = [m for m in spec.parts if m in layout.targets]
            if not parts:
                continue
            k = len(parts)
            a = np.concatenate([named.pop(lora.gguf_name(layer, m, "A")) for m in parts])  # (k*r, in)
            b = np.zeros((sum(outs[m] for m in spec.parts), k * r), dtype=np.float32)  # (out_total, k*r)
            for j, m in enumerate(parts):
                start, stop = lora.row_block(spec, m, outs)
                b[start:stop, j * r : (j + 1) * r] = k * named.pop(lora.gguf_name(layer, m, "B"))
            fused[f"blk.{layer}.{spec.gguf}.weight.lora_a"] = a
            fused[f"blk.{layer}.{spec.gguf}.weight.lora_b"] = b
    return {**named, **fused}


def write_lora_gguf(
    path: Path,
    tensors: Mapping[str, np.ndarray],
    arch: Architecture,
    layout: LoraLayout,
) -> Path:
    """Write canonical LoRA tensors as a llama.cpp LoRA adapter GGUF (F32), atomically.

    tensors: canonical keys `lora.{layer}.{module}.A` (r, in) / `.B` (out, r), unscaled; llama.cpp
    applies alpha / r itself from `adapter.lora.alpha`.
    """
    import gguf  # the edge extra; imported here so the coordinator never needs it

    spec = family_spec(arch.family)
    if spec is None:
        raise BundleError(
            f"LoRA adapter: architecture family {arch.family!r} has no GGUF spelling; "
            f"expected one of {sorted(GGUF_FAMILIES)}"
        )
    named = gguf_tensors(tensors, arch, layout)
    path = Path(path)
    with atomic.replacing(path) as tmp:
        writer = gguf.GGUFWriter(tmp, spec.arch)
        try:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(layout.alpha))
            writer.add_file_type(gguf.LlamaFileType.ALL_F32)
            for name, t in named.items():
                writer.add_tensor(name, t)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return path
