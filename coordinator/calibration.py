"""The calibration runner: the bundle's calibration model under ONNX Runtime *inference*.

AlignFed's cross-version alignment (DESIGN.md section 6, stage 2) needs, for a global adapter
version, the inputs X (n, in) of every adapted projection on a fixed calibration mini-batch. The
bundle's `calib/calib_model.onnx` takes `input_ids`, `labels` (B, T) int64 and every LoRA tensor
`lora.{i}.{m}.A` (r, in) / `.B` (out, r) as inputs and returns `loss` and `act.{i}.{m}` (B, T, in),
the hidden state entering each adapted projection. This module feeds it one fixed batch and keeps
a fixed, seeded subset of the non-padding token positions, so every version is measured on exactly
the same n tokens (the rows of X_v and X_t must correspond for P = (X_vᵀX_t + λI)(X_tᵀX_t + λI)⁻¹).

Only inference is needed, which plain `onnxruntime` provides on every platform (the coordinator
on an aarch64 gateway has no onnxruntime-training wheel).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from alignfed import corpora
from alignfed import manifest as mf
from alignfed.errors import BundleError, ConfigError, TrainingError
from alignfed.text import IGNORE, Batch, Batcher, load_texts
from coordinator.strategies.base import AdapterState

INPUT_IDS = "input_ids"
LABELS = "labels"
LOSS = "loss"
ACT_PREFIX = "act."
DEFAULT_SEQ_LEN = 64
MAX_EXAMPLES = 64  # cap on the calibration batch (B): a forward pass must stay cheap
OVERSAMPLE = 2  # take examples until they hold ≥ OVERSAMPLE × tokens positions, then subsample
BUILTIN_PER_DOMAIN = 24  # examples per built-in domain when no calibration data is given


def builtin_texts(seed: int = 0, per_domain: int = BUILTIN_PER_DOMAIN) -> list[str]:
    """Calibration texts from the built-in corpora, domains interleaved (arithmetic, code, prose, ...)."""
    per = [corpora.texts(d, per_domain, seed + i) for i, d in enumerate(corpora.DOMAINS)]
    return [text for group in zip(*per, strict=True) for text in group]


def _check_tokens(tokens: int) -> None:
    if tokens < 1:
        raise ConfigError(f"calibration: tokens must be ≥ 1, got {tokens}")


def calibration_batch(
    texts: Sequence[str],
    tokenizer: Path,
    *,
    eos_id: int,
    tokens: int,
    seq_len: int = DEFAULT_SEQ_LEN,
    max_examples: int = MAX_EXAMPLES,
    seed: int = 0,
) -> Batch:
    """One fixed batch (B ≤ max_examples rows, seq_len) of shuffled examples packed end to end.

    Examples are cut to seq_len tokens as devices cut them; those that fit keep their EOS, which
    separates them from the next as in pre-training. Rows are filled until they hold ≥ OVERSAMPLE ×
    tokens positions (fewer only when the data or `max_examples` runs out). Packing leaves no
    padding to compute: with one example per row, short examples made padding most of the batch
    (1344 positions for 512 tokens on the built-in corpora at seq_len 64).
    """
    _check_tokens(tokens)
    batcher = Batcher(list(texts), tokenizer, batch=1, seq_len=seq_len, eos_id=eos_id, seed=seed)
    want = min(OVERSAMPLE * tokens, max_examples * seq_len)
    stream: list[np.ndarray] = []
    held = 0
    for i in np.random.default_rng(seed).permutation(batcher.samples):
        if held >= want:
            break
        stream.append(batcher.rows[int(i)])
        held += int(batcher.rows[int(i)].size)
    flat = np.concatenate(stream)[: -(-min(held, want) // seq_len) * seq_len]  # whole rows, the last one partial
    return batcher.make([flat[j : j + seq_len] for j in range(0, flat.size, seq_len)])


class CalibrationRunner:
    """An `ActivationSource` (coordinator.alignment) backed by the bundle's calibration model.

    `activations(state)` returns layer id -> X (n, in) float32: the inputs of that adapted layer at
    the same n token positions for every state (n = min(tokens, non-padding positions of the batch)).
    `loss(state)` is the mean next-token loss of the calibration batch under `state`'s adapter.
    """

    def __init__(
        self,
        model_path: Path,
        manifest: mf.Manifest,
        batch: Batch,
        *,
        tokens: int,
        seed: int = 0,
        threads: int = 1,
    ) -> None:
        _check_tokens(tokens)
        if not Path(model_path).is_file():
            raise BundleError(f"{model_path}: no calibration model; re-export the bundle with `alignfed export`")
        import onnxruntime as ort

        from runtime.ort import inference_session, session_options

        # No spinning worker threads: the coordinator's CPU time should be the work it does.
        self._session = inference_session(model_path, session_options(threads=threads, spinning=False))
        self.layer_ids: list[str] = list(manifest.layer_ids)
        self._shapes = manifest.lora_shapes()
        self._check_signature(model_path)
        self._outputs = [LOSS, *(ACT_PREFIX + lid for lid in self.layer_ids)]
        # Compute only what a run fetches: activations skip the LM head and the loss (0.6× the time
        # of the whole graph on SmolLM2). Honoured by the onnxruntime-training build.
        self._run_options = ort.RunOptions()
        self._run_options.only_execute_path_to_fetches = True

        self.batch = batch
        positions = np.flatnonzero(batch.labels.reshape(-1) != IGNORE)  # flat indices into (B·T)
        if positions.size == 0:
            raise ConfigError("calibration: the calibration batch has no non-padding tokens")
        keep = np.random.default_rng(seed).choice(positions.size, size=min(tokens, positions.size), replace=False)
        self._rows = positions[np.sort(keep)]  # (n,) fixed for every version
        self.forward_passes = 0

    @classmethod
    def from_bundle(
        cls,
        bundle: Path,
        manifest: mf.Manifest,
        data: Path | None,
        tokens: int,
        *,
        seq_len: int = DEFAULT_SEQ_LEN,
        max_examples: int = MAX_EXAMPLES,
        seed: int = 0,
        threads: int = 1,
    ) -> CalibrationRunner:
        """The runner of `bundle`, on examples from `data` (JSONL / JSON / text, as edge data) or, when
        None, on the calibration set the bundle carries (`mf.CALIB_DATA`, chosen at export), or on the
        built-in corpora for a bundle without one. `tokens` is n, the calibration positions kept per layer."""
        bundle = Path(bundle)
        carried = bundle / mf.CALIB_DATA
        if data is None and carried.is_file():
            expected = manifest.files.get(mf.CALIB_DATA)
            if expected is not None and mf.sha256_file(carried) != expected:
                raise BundleError(f"{carried}: sha256 differs from the manifest's; re-export the bundle")
            data = carried
        if data is None:
            texts = builtin_texts(seed)
        else:
            try:
                texts = load_texts(Path(data))
            except TrainingError as exc:
                raise ConfigError(f"calibration data: {exc}") from exc
        seq_len = min(seq_len, manifest.architecture.max_seq)
        try:
            batch = calibration_batch(
                texts,
                bundle / mf.TOKENIZER,
                eos_id=int(manifest.tokenizer.get("eos_id", 0)),
                tokens=tokens,
                seq_len=seq_len,
                max_examples=max_examples,
                seed=seed,
            )
        except TrainingError as exc:
            raise ConfigError(f"calibration data {data or '(built-in corpora)'}: {exc}") from exc
        return cls(bundle / mf.CALIB_MODEL, manifest, batch, tokens=tokens, seed=seed, threads=threads)

    @property
    def tokens(self) -> int:
        """n: the calibration positions every activation matrix has as rows."""
        return int(self._rows.size)

    def activations(self, state: AdapterState) -> dict[str, np.ndarray]:
        """Layer id -> X (n, in) float32, the input of that adapted layer under `state`'s adapter."""
        outs = self._run(state, self._outputs[1:])
        acts: dict[str, np.ndarray] = {}
        for lid, x in zip(self.layer_ids, outs, strict=True):
            flat = x.reshape(-1, x.shape[-1])  # (B·T, in)
            acts[lid] = np.ascontiguousarray(flat[self._rows], dtype=np.float32)  # (n, in)
        return acts

    def loss(self, state: AdapterState) -> float:
        """Mean next-token cross-entropy of the calibration batch under `state`'s adapter."""
        return float(np.asarray(self._run(state, [LOSS])[0]))

    # -- internals ---------------------------------------------------------------------------------

    def _run(self, state: AdapterState, outputs: list[str]) -> list[np.ndarray]:
        feeds: dict[str, np.ndarray] = {INPUT_IDS: self.batch.input_ids, LABELS: self.batch.labels}
        feeds.update(self._adapter_feeds(state.tensors))
        self.forward_passes += 1
        return list(self._session.run(outputs, feeds, self._run_options))

    def _adapter_feeds(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [k for k in self._shapes if k not in tensors]
        if missing:
            raise ValueError(f"calibration: adapter lacks tensor(s) {missing[:4]}; expected every key of the bundle")
        feeds: dict[str, np.ndarray] = {}
        for key, shape in self._shapes.items():
            value = np.ascontiguousarray(tensors[key], dtype=np.float32)
            if value.shape != shape:
                raise ValueError(f"calibration: adapter tensor {key} has shape {value.shape}, expected {shape}")
            feeds[key] = value
        return feeds

    def _check_signature(self, model_path: Path) -> None:
        inputs = {i.name for i in self._session.get_inputs()}
        outputs = {o.name for o in self._session.get_outputs()}
        want_in = {INPUT_IDS, LABELS, *self._shapes}
        want_out = {LOSS, *(ACT_PREFIX + lid for lid in self.layer_ids)}
        if not (want_in <= inputs and want_out <= outputs):
            raise BundleError(
                f"{model_path}: calibration model does not match the manifest; missing inputs "
                f"{sorted(want_in - inputs)[:4]}, missing outputs {sorted(want_out - outputs)[:4]}"
            )
