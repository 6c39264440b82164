"""Base model -> bundle (DESIGN.md section 3): ORT training artifacts, calibration model,
tokenizer, GGUF inference base and manifest.json with the sha256 of every file.

The base is a Hugging Face folder or a GGUF file, read through `export.reader.open_source`; from
here on both look the same (architecture, float32 HF-named weights, tokenizer.json text).
The manifest is written last and removed first, so a folder with a manifest is a complete bundle.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
from safetensors.numpy import save_file

from alignfed import atomic, lora
from alignfed import manifest as mf
from alignfed.errors import ConfigError, ExportError
from alignfed.manifest import Architecture, LoraLayout, Manifest
from export.calibration_set import write_calibration_set
from export.families import GraphChoice, graph_for
from export.onnx_graph import PROTO_LIMIT, QUANTIZATIONS, Quantization, build_model, lora_shapes
from export.reader import open_source
from export.source import ModelSource

BUNDLE_DIRS = (mf.TRAIN_DIR, "calib", "gguf")
F32 = "F32"


def check_gguf_request(source: ModelSource, gguf_quant: str) -> None:
    """A GGUF source keeps its own quantization; asking for another one is an error, not a surprise."""
    if gguf_quant != F32:
        from export.gguf_quant import check_quant

        check_quant(gguf_quant)
    if source.kind == "gguf" and gguf_quant not in (F32, source.gguf_quantization):
        raise ExportError(
            f"{source.path}: gguf quantization {gguf_quant} asked for a GGUF source of type "
            f"{source.gguf_quantization}; the source file is copied as it is (re-quantizing its "
            "dequantized weights would lose accuracy), so leave the option out"
        )


def write_gguf_base(source: ModelSource, out_path: Path, gguf_quant: str) -> str:
    """Write the bundle's inference base; returns its quantization for the manifest.

    A GGUF source is copied as it is (its own quantization of the original weights is more
    accurate than re-quantizing dequantized ones); a HF folder becomes an F32 GGUF, then
    llama.cpp's quantizer makes `gguf_quant` of it.
    """
    check_gguf_request(source, gguf_quant)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if source.kind == "gguf":
        with atomic.replacing(out_path) as tmp:
            shutil.copyfile(source.path, tmp)
        return source.gguf_quantization or F32
    from export.gguf_generic import write_hf_gguf as write_base_gguf

    if gguf_quant == F32:
        write_base_gguf(source.path, out_path)
        return F32
    from export.gguf_quant import quantize_gguf

    f32 = out_path.with_name(f".{out_path.name}.f32")
    try:
        write_base_gguf(source.path, f32)
        quantize_gguf(f32, out_path, gguf_quant)
    finally:
        f32.unlink(missing_ok=True)
    return gguf_quant


def init_lora(arch: Architecture, layout: LoraLayout, seed: int) -> dict[str, np.ndarray]:
    """PEFT's default init: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform, a=sqrt(5)), B = 0,
    so the adapted model starts equal to the base. Drawn in canonical key order from `seed`."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for name, shape in lora_shapes(arch, layout).items():
        if name.endswith(".A"):
            bound = 1.0 / np.sqrt(shape[1])  # A: (r, in)
            out[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
        else:
            out[name] = np.zeros(shape, dtype=np.float32)  # B: (out, r)
    return out


def _layout(targets: Iterable[str], rank: int, alpha: float) -> LoraLayout:
    try:
        checked = lora.check_targets(targets)
    except ConfigError as exc:
        raise ExportError(str(exc)) from exc
    if rank < 1:
        raise ExportError(f"LoRA rank must be >= 1, got {rank}")
    if alpha <= 0:
        raise ExportError(f"LoRA alpha must be > 0, got {alpha}")
    return LoraLayout(targets=checked, rank=int(rank), alpha=float(alpha))


def save_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Save a model, moving its weights to `<name>.data` when it exceeds protobuf's 2 GB limit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if model.ByteSize() > PROTO_LIMIT:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save_model(model, str(path))


def _bundle_files(out_dir: Path) -> dict[str, str]:
    files = [out_dir / mf.TOKENIZER]
    for sub in BUNDLE_DIRS:
        files += sorted(p for p in (out_dir / sub).rglob("*") if p.is_file())
    return {p.relative_to(out_dir).as_posix(): mf.sha256_file(p) for p in files}


def export_bundle(
    model: Path,
    out_dir: Path,
    *,
    targets: Iterable[str] = ("q", "v"),
    rank: int = 8,
    alpha: float = 16,
    quantization: Quantization = "fp32",
    seed: int = 0,
    write_gguf: bool | None = True,
    gguf_quant: str = F32,
    graph: GraphChoice = "auto",
    calibration: Path | None = None,
) -> Manifest:
    """Export a HF Llama / Qwen2 folder or a `.gguf` file to a bundle in `out_dir`; return its manifest.

    `write_gguf` False (or None) skips `gguf/base.gguf` (the bundle then cannot serve with
    llama.cpp). `gguf_quant` ("F32", "Q8_0", "Q4_1", "Q4_K_M", ...) applies to HF sources; a GGUF
    source is copied with its own quantization. `graph` picks the ONNX builder (`export.families`):
    "auto" is the hand-written graph for llama / qwen2 and the traced one for the other families.
    `calibration` is the calibration set's text file (None: the built-in generated corpora; see
    `export.calibration_set`).
    """
    from tqdm import tqdm

    from export.artifacts import write_training_artifacts

    out_dir = Path(out_dir)
    layout = _layout(targets, rank, alpha)
    if quantization not in QUANTIZATIONS:
        raise ExportError(f"quantization {quantization!r} is not supported; supported: {', '.join(QUANTIZATIONS)}")
    source = open_source(Path(model))
    builder = graph_for(source.architecture.family, graph)
    if write_gguf:
        check_gguf_request(source, gguf_quant)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / mf.MANIFEST_NAME).unlink(missing_ok=True)
    steps = ["read weights", "training artifacts", "calibration model", "GGUF base", "manifest"]
    progress = sys.stderr.isatty()
    bar = tqdm(total=len(steps), desc="export", unit="step", disable=not progress)
    try:
        bar.set_postfix_str(steps[0])
        arch = source.architecture
        weights = source.load_weights(progress)
        bar.update()

        bar.set_postfix_str(steps[1])
        init = init_lora(arch, layout, seed)
        calib = None
        if builder == "traced":  # one trace gives both models
            from export.traced_graph import build_traced, source_config

            train, calib = build_traced(source_config(source), arch, weights, layout, init, quantization=quantization)
        else:
            train = build_model(arch, weights, layout, init, mode="train", quantization=quantization)
        write_training_artifacts(train, list(init), out_dir / mf.TRAIN_DIR)
        # The coordinator publishes these as global version 0 without needing ORT training.
        save_file(
            {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in init.items()}, str(out_dir / mf.ADAPTER_INIT)
        )
        del train
        bar.update()

        bar.set_postfix_str(steps[2])
        if calib is None:
            calib = build_model(arch, weights, layout, {}, mode="calib", quantization=quantization)
        save_onnx(calib, out_dir / mf.CALIB_MODEL)
        from export.traced_graph import source_config

        (out_dir / mf.MODEL_CONFIG).write_text(json.dumps(source_config(source), indent=2, sort_keys=True))
        del calib, weights
        calibration_entry = write_calibration_set(out_dir, calibration)
        bar.update()

        bar.set_postfix_str(steps[3])
        (out_dir / mf.TOKENIZER).write_bytes(source.tokenizer_json.encode("utf-8"))
        gguf_path = out_dir / mf.BASE_GGUF
        if write_gguf:
            gguf_type = write_gguf_base(source, gguf_path, gguf_quant)
        else:
            gguf_path.unlink(missing_ok=True)
            gguf_type = source.gguf_quantization or gguf_quant
        bar.update()

        bar.set_postfix_str(steps[4])
        manifest = Manifest(
            base_id=source.base_id,
            base_sha256=source.base_sha256,
            architecture=arch,
            lora=layout,
            train_quantization=quantization,
            files=_bundle_files(out_dir),
            tokenizer=dict(source.tokenizer_info),
            gguf_quantization=gguf_type,
            calibration=calibration_entry,
        )
        mf.save(out_dir, manifest)
        bar.update()
    finally:
        bar.close()
    return manifest
