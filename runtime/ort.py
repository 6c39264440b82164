"""ONNX Runtime sessions: their options, and named access to the parameters of a training session
(onnxruntime-training 1.19).

`session_options` and `inference_session` are the one place sessions are set up (the edge trainer,
the coordinator's calibration runner and export's bundle check): thread counts, spinning, the
memory arena, the log level and the execution providers.

Measured behaviour of 1.19.2 that shapes this module:
- `state.parameters[name].data` returns a numpy *view* of the live buffer: editing it edits the
  model, and the next optimizer step changes an array you hold. `get_params` returns copies.
- Writing a parameter (`Parameter.data = ...` or `Parameters[name] = ...`) before a `Module` has
  been created from the state crashes the process (segfault). `open_session` creates the Module
  first and marks the state as safe to write; `set_params` refuses any other state.
- Unknown names raise KeyError in `Parameters`; a wrong shape or dtype raises a RuntimeError deep
  in C++. Both are checked here first so the message names the parameter, expected and actual.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from alignfed.errors import BundleError, TrainingError
from alignfed.manifest import CHECKPOINT_FILE as CHECKPOINT
from alignfed.manifest import EVAL_FILE as EVAL_MODEL
from alignfed.manifest import OPTIMIZER_FILE as OPTIMIZER_MODEL
from alignfed.manifest import TRAINING_FILE as TRAINING_MODEL

# CheckpointStates that have a Module bound to them (only those can be written safely).
_BOUND: weakref.WeakSet[Any] = weakref.WeakSet()

PROVIDERS: tuple[str, ...] = ("CPUExecutionProvider",)  # every session runs on the CPU
QUIET = 3  # ORT log severity: errors only (its warnings are about graph rewrites, not the user's input)


def session_options(*, threads: int, spinning: bool = False, arena: bool = True, log_level: int = QUIET) -> Any:
    """`onnxruntime.SessionOptions` for one session.

    `threads`: intra-op threads (0: ORT's default, one per core); inter-op stays 1, the graphs here
    are a chain. `spinning`: whether idle intra-op workers busy-wait for the next op; off, a
    process's CPU time is the work it does (the coordinator reports it). `arena`: ORT's CPU memory
    arena; off, activations are freed between runs (decision 10)."""
    import onnxruntime as ort

    if threads < 0:
        raise ValueError(f"session_options: threads must be ≥ 0 (0 = one per core), got {threads}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = log_level
    opts.enable_cpu_mem_arena = arena
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def inference_session(model: Path, options: Any) -> Any:
    """An `onnxruntime.InferenceSession` of `model` with `options` (from `session_options`) on `PROVIDERS`."""
    import onnxruntime as ort

    return ort.InferenceSession(str(model), options, providers=list(PROVIDERS))


@dataclass(frozen=True, slots=True)
class TrainingSession:
    """A checkpoint state with its Module (training + eval graphs) and Optimizer."""

    state: Any  # onnxruntime.training.api.CheckpointState
    module: Any  # onnxruntime.training.api.Module
    optimizer: Any  # onnxruntime.training.api.Optimizer


def open_session(
    train_dir: Path, *, learning_rate: float | None = None, session_options: Any = None
) -> TrainingSession:
    """Load `train_dir` (a bundle's train/ folder) into a CheckpointState, Module and Optimizer."""
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    train_dir = Path(train_dir)
    for name in (TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT):
        if not (train_dir / name).exists():
            raise BundleError(f"{train_dir}: missing {name}; re-export the bundle with `alignfed export`")
    state = CheckpointState.load_checkpoint(str(train_dir / CHECKPOINT))
    module = Module(
        str(train_dir / TRAINING_MODEL), state, str(train_dir / EVAL_MODEL), session_options=session_options
    )
    _BOUND.add(state)
    optimizer = Optimizer(str(train_dir / OPTIMIZER_MODEL), module)
    if learning_rate is not None:
        optimizer.set_learning_rate(float(learning_rate))
    return TrainingSession(state=state, module=module, optimizer=optimizer)


def bind(state: Any, module: Any) -> None:
    """Declare that `module` was created from `state`, so `set_params` may write to it."""
    del module  # the argument documents the precondition; ORT offers no way to check it
    _BOUND.add(state)


def parameter_names(state: Any, *, trainable_only: bool = False) -> list[str]:
    return [name for name, p in state.parameters if p.requires_grad or not trainable_only]


def _check_names(state: Any, names: Iterable[str]) -> None:
    unknown = [n for n in names if n not in state.parameters]
    if unknown:
        known = parameter_names(state, trainable_only=True)
        raise BundleError(
            f"checkpoint has no parameter(s) {unknown}; its trainable parameters are "
            f"{known[:6]}{' …' if len(known) > 6 else ''}"
        )


def get_params(state: Any, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Copies of the named parameters (the ORT getter returns views of live buffers)."""
    wanted = list(names)
    _check_names(state, wanted)
    return {name: np.array(state.parameters[name].data, copy=True) for name in wanted}


def set_params(state: Any, values: Mapping[str, np.ndarray]) -> None:
    """Overwrite the named parameters in place; every name, shape and dtype is checked first."""
    if state not in _BOUND:
        raise TrainingError(
            "parameters can only be written after a Module was created from this CheckpointState "
            "(onnxruntime-training 1.19 crashes otherwise); use runtime.ort.open_session, or "
            "call runtime.ort.bind(state, module) after creating the Module yourself"
        )
    _check_names(state, values)
    prepared: dict[str, np.ndarray] = {}
    for name, value in values.items():
        current = state.parameters[name].data  # view, only read for shape and dtype
        arr = np.ascontiguousarray(value, dtype=current.dtype)
        if arr.shape != current.shape:
            raise BundleError(f"parameter {name!r}: expected shape {current.shape}, got {arr.shape}")
        prepared[name] = arr
    for name, arr in prepared.items():
        state.parameters[name] = arr
