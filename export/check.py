"""`alignfed export --check BUNDLE`: is this bundle complete, consistent and servable?

Four checks, each reported OK / FAIL / SKIP with what was measured:
1. files: every file in manifest.json exists with its sha256 (nothing else runs if this fails);
2. tokenizer: tokenizer.json loads with `tokenizers` and the built-in sentences map to ids < vocab;
3. ORT parity: on those sentences, the training eval model (ORT training, initial checkpoint)
   and the calibration model (ORT inference, fed train/adapter_init.safetensors) give the same
   loss within `PARITY_TOL`, and the checkpoint's LoRA tensors equal adapter_init;
4. llama.cpp: gguf/base.gguf loads with the initial adapter as a LoRA GGUF and its next-token
   cross-entropy on the same sentences is within `GGUF_CE_RTOL` of the ORT loss. The two bases
   differ only by the GGUF's quantization, so a larger gap means a layout error (a wrong row
   order or a wrong tensor moves a loss by far more; see tests/inference).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from alignfed import manifest as mf
from alignfed.errors import AlignFedError, BundleError

PARITY_TOL = 1e-4  # |eval - calib| loss: same weights, same graph, two ORT sessions
# |CE(llama.cpp) - loss(ORT)| / loss(ORT) on SENTENCES. Measured: 3e-6 (F32 GGUF), 1e-5 (Q8_0),
# 1.4e-4 (Q4_K_M), 2.6e-4 (Q4_1) on the tiny Llama; 1.2e-3 tiny Qwen2 Q8_0 vs int8; 1e-4 for SmolLM2
# Q4_1 vs its int8 training base (0.6 % on a 4 x 64 corpus batch). q/k rows left in llama.cpp's
# order move SmolLM2's loss by 79 %, so 10 % separates rounding from layout errors.
GGUF_CE_RTOL = 0.1
SEQ_LEN = 32
SENTENCES = (
    "The device trains its adapter on local notes and publishes a compressed delta.",
    "Question: what is 12 plus 30? Answer: 12 + 30 = 42.",
    "def add(a, b):\n    return a + b\n",
    "A coordinator on the gateway aggregates stale updates after aligning them.",
)

Status = Literal["OK", "FAIL", "SKIP"]


@dataclass(frozen=True, slots=True)
class CheckResult:
    name: str
    status: Status
    detail: str


@dataclass(frozen=True, slots=True)
class CheckReport:
    bundle: Path
    results: tuple[CheckResult, ...]

    @property
    def ok(self) -> bool:
        return all(r.status != "FAIL" for r in self.results)

    def summary(self) -> str:
        lines = [f"{r.status:4} {r.name}: {r.detail}" for r in self.results]
        failed = sum(r.status == "FAIL" for r in self.results)
        lines.append(
            f"bundle {self.bundle}: OK" if self.ok else f"bundle {self.bundle}: FAIL ({failed} of {len(self.results)})"
        )
        return "\n".join(lines)

    def raise_on_failure(self) -> None:
        if not self.ok:
            raise BundleError(f"bundle check failed\n{self.summary()}")


def _batch(bundle: Path, manifest: mf.Manifest) -> tuple[np.ndarray, np.ndarray]:
    """input_ids, labels (B, T) of the built-in sentences, padded with eos and ignored labels."""
    from alignfed.text import Batcher

    eos = int(manifest.tokenizer.get("eos_id", 0))
    batcher = Batcher(list(SENTENCES), bundle / mf.TOKENIZER, batch=len(SENTENCES), seq_len=SEQ_LEN, eos_id=eos, seed=0)
    b = batcher.fixed(len(SENTENCES))
    return b.input_ids, b.labels


def _tokenizer(bundle: Path, manifest: mf.Manifest) -> str:
    ids, labels = _batch(bundle, manifest)
    top = int(ids.max())
    if top >= manifest.architecture.vocab:
        raise BundleError(f"token id {top} >= vocab {manifest.architecture.vocab}")
    n = int((labels >= 0).sum())
    return f"{len(SENTENCES)} sentences, {n} tokens, max id {top} < vocab {manifest.architecture.vocab}"


def _ort_losses(bundle: Path, manifest: mf.Manifest) -> tuple[float, float]:
    """(training eval-model loss, calibration-model loss) with the initial adapter."""
    from safetensors.numpy import load_file

    from runtime.ort import get_params, inference_session, open_session, session_options

    ids, labels = _batch(bundle, manifest)
    init = load_file(str(bundle / mf.ADAPTER_INIT))
    session = open_session(bundle / mf.TRAIN_DIR)
    held = get_params(session.state, list(manifest.lora_shapes()))
    differ = [k for k in held if k not in init or not np.array_equal(held[k], init[k])]
    if differ:
        raise BundleError(f"checkpoint LoRA tensor(s) {differ[:3]} differ from {mf.ADAPTER_INIT}")
    session.module.eval()
    eval_loss = float(session.module(ids, labels))
    # ORT's default threads and spinning, as the check always ran; errors only in the log
    calib = inference_session(bundle / mf.CALIB_MODEL, session_options(threads=0, spinning=True))
    calib_loss = float(calib.run(["loss"], {"input_ids": ids, "labels": labels, **init})[0])
    return eval_loss, calib_loss


def llama_cpp_ce(base: Path, adapter: Path | None, ids: np.ndarray, labels: np.ndarray, n_ctx: int) -> float:
    """Mean next-token cross-entropy of llama.cpp's logits over the labelled positions (HF shift)."""
    from runtime.llama import Generator

    total, count = 0.0, 0
    with Generator(base, n_ctx=n_ctx, n_threads=2, seed=0) as gen:
        if adapter is not None:
            gen.set_adapter(adapter)
        for row_ids, row_labels in zip(ids, labels, strict=True):
            n = int((row_labels >= 0).sum())  # labelled tokens form a prefix (right padding)
            logits = gen.logits([int(t) for t in row_ids[:n]]).astype(np.float64)  # (n, V)
            logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)  # (n,)
            target = row_labels[1:n]  # position t predicts token t + 1
            total += float(np.sum(logz[: n - 1] - logits[np.arange(n - 1), target]))
            count += n - 1
    return total / count


def _llama_cpp(bundle: Path, manifest: mf.Manifest, ort_loss: float | None) -> tuple[Status, str]:
    from safetensors.numpy import load_file

    from alignfed.gguf_adapter import write_lora_gguf

    base = bundle / mf.BASE_GGUF
    if mf.BASE_GGUF not in manifest.files:
        return "SKIP", f"no {mf.BASE_GGUF} in this bundle (exported without a GGUF)"
    ids, labels = _batch(bundle, manifest)
    with tempfile.TemporaryDirectory(prefix="alignfed-check-") as tmp:
        adapter = write_lora_gguf(
            Path(tmp) / "adapter-init.gguf",
            load_file(str(bundle / mf.ADAPTER_INIT)),
            manifest.architecture,
            manifest.lora,
        )
        ce = llama_cpp_ce(base, adapter, ids, labels, n_ctx=max(SEQ_LEN, 64))
    if not np.isfinite(ce):
        return "FAIL", f"{manifest.gguf_quantization} base + initial adapter gives a non-finite cross-entropy"
    if ort_loss is None:
        return "OK", f"{manifest.gguf_quantization} base + initial adapter loads; cross-entropy {ce:.4f}"
    gap = abs(ce - ort_loss) / ort_loss
    detail = (
        f"{manifest.gguf_quantization} base + initial adapter: cross-entropy {ce:.4f} vs ORT {ort_loss:.4f} "
        f"(relative gap {gap:.2e}, limit {GGUF_CE_RTOL:g})"
    )
    return ("OK" if gap <= GGUF_CE_RTOL else "FAIL"), detail


def _run(name: str, fn: Callable[[], tuple[Status, str]]) -> CheckResult:
    try:
        status, detail = fn()
    except (AlignFedError, OSError, ValueError, RuntimeError) as exc:
        return CheckResult(name, "FAIL", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return CheckResult(name, status, detail)


def check_bundle(bundle: Path) -> CheckReport:
    """Run every check on `bundle`; never raises for a bad bundle (see `CheckReport.raise_on_failure`)."""
    bundle = Path(bundle)
    try:
        manifest = mf.load(bundle)
        mf.verify(bundle, manifest)
    except BundleError as exc:
        return CheckReport(bundle, (CheckResult("files", "FAIL", str(exc)),))
    results = [CheckResult("files", "OK", f"{len(manifest.files)} files match {mf.MANIFEST_NAME}")]
    results.append(_run("tokenizer", lambda: ("OK", _tokenizer(bundle, manifest))))

    losses: list[float] = []

    def parity() -> tuple[Status, str]:
        eval_loss, calib_loss = _ort_losses(bundle, manifest)
        losses.append(eval_loss)
        diff = abs(eval_loss - calib_loss)
        detail = f"eval loss {eval_loss:.6f}, calib loss {calib_loss:.6f}, |diff| {diff:.1e} (limit {PARITY_TOL:g})"
        return ("OK" if diff <= PARITY_TOL else "FAIL"), detail

    results.append(_run("ORT parity", parity))
    results.append(_run("llama.cpp", lambda: _llama_cpp(bundle, manifest, losses[0] if losses else None)))
    return CheckReport(bundle, tuple(results))
