"""ONNX Runtime on-device training artifacts for a model whose first output is the loss.

`generate_artifacts` (onnxruntime-training 1.19) writes the training, eval and optimizer models
and the checkpoint. The model already computes the loss, so no loss block is added (ORT then uses
a pass-through loss: the model's first output). LoRA tensors are the trainable parameters; every
other parameter initializer (base weights, fp32 or int8 with its scales) is frozen and lives in the
checkpoint, so the graphs stay small and ORT cannot constant-fold int8 weights back to fp32.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import onnx

from alignfed.errors import ExportError
from alignfed.manifest import CHECKPOINT_FILE as CHECKPOINT
from alignfed.manifest import EVAL_FILE as EVAL_MODEL
from alignfed.manifest import OPTIMIZER_FILE as OPTIMIZER_MODEL
from alignfed.manifest import TRAINING_FILE as TRAINING_MODEL
from export.onnx_graph import PROTO_LIMIT, is_parameter

MAX_IR_VERSION = 10  # the highest IR version onnxruntime 1.19 loads


@dataclass(frozen=True, slots=True)
class TrainingArtifacts:
    training_model: Path
    eval_model: Path
    optimizer_model: Path
    checkpoint: Path


@contextlib.contextmanager
def _native_stderr_captured() -> Iterator[IO[bytes]]:
    """Send fd 2 to a temporary file: ORT's graph optimizer logs every transformer at INFO level
    from C++ (its SessionOptions are not reachable through generate_artifacts)."""
    with tempfile.TemporaryFile() as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield sink
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _tail(sink: IO[bytes], limit: int = 2000) -> str:
    sink.seek(0)
    text = sink.read().decode(errors="replace")
    lines = [ln for ln in text.splitlines() if "[I:onnxruntime" not in ln]
    return "\n".join(lines)[-limit:]


def _cap_ir_version(path: Path) -> None:
    """Rewrite `path` with ir_version <= MAX_IR_VERSION (the ops used exist at that IR)."""
    model = onnx.load(str(path), load_external_data=False)
    if model.ir_version > MAX_IR_VERSION:
        model.ir_version = MAX_IR_VERSION
        onnx.save(model, str(path))


def _check_gradients(path: Path, lora_names: Sequence[str]) -> None:
    """Every LoRA tensor must get a gradient, or training would silently skip it."""
    model = onnx.load(str(path), load_external_data=False)
    produced = {out for node in model.graph.node for out in node.output}
    missing = [name for name in lora_names if f"{name}_grad" not in produced]
    if missing:
        raise ExportError(f"{path}: no gradient for LoRA tensor(s) {missing}; is the adapter connected to the loss?")


def write_training_artifacts(model: onnx.ModelProto, lora_names: Sequence[str], out_dir: Path) -> TrainingArtifacts:
    """Write training_model.onnx, eval_model.onnx, optimizer_model.onnx and checkpoint to `out_dir`.

    `model` must have the loss as its first output and the LoRA tensors as initializers; it may be
    modified in place by ORT.
    """
    from onnxruntime.training import artifacts

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    trainable = list(lora_names)
    initializers = {init.name for init in model.graph.initializer}
    unknown = sorted(set(trainable) - initializers)
    if unknown:
        raise ExportError(f"LoRA tensor(s) {unknown} are not initializers of the training model")
    frozen = [
        init.name for init in model.graph.initializer if is_parameter(init.name) and init.name not in set(trainable)
    ]
    if not model.graph.output:
        raise ExportError("the training model has no outputs; its first output must be the loss")

    # generate_artifacts logs every step at INFO; keep an export quiet unless asked.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        with _native_stderr_captured() as sink, tempfile.TemporaryDirectory() as tmp:
            source: onnx.ModelProto | str = model
            if model.ByteSize() > min(PROTO_LIMIT, onnx.checker.MAXIMUM_PROTOBUF):
                # generate_artifacts wants a path for models past protobuf's 2 GB limit, and its
                # blocks run onnx.checker, whose in-memory limit is lower (2e9 bytes: a 1 B int8 base).
                source = str(Path(tmp) / "model.onnx")
                onnx.save_model(model, source, save_as_external_data=True, location="model.onnx.data")
            try:
                artifacts.generate_artifacts(
                    source,
                    requires_grad=trainable,
                    frozen_params=frozen,
                    loss=None,
                    optimizer=artifacts.OptimType.AdamW,
                    artifact_directory=str(out_dir),
                )
            except Exception as exc:
                raise ExportError(f"onnxruntime could not build the training artifacts: {exc}\n{_tail(sink)}") from exc
    finally:
        root.setLevel(level)

    result = TrainingArtifacts(
        training_model=out_dir / TRAINING_MODEL,
        eval_model=out_dir / EVAL_MODEL,
        optimizer_model=out_dir / OPTIMIZER_MODEL,
        checkpoint=out_dir / CHECKPOINT,
    )
    for path in (result.training_model, result.eval_model, result.optimizer_model):
        _cap_ir_version(path)
    _check_gradients(result.training_model, trainable)
    return result
