"""The real model: SmolLM2-135M-Instruct from its Q4_1 GGUF to an int8 training bundle.

- the tokenizer.json rebuilt from the GGUF tokenizes like llama.cpp on the same file;
- 10 ORT AdamW steps on one fixed 4 x 64 batch (built-in corpora) lower its loss;
- the ORT loss agrees with the cross-entropy of llama.cpp's logits on the same tokens. The training
  weights are dequantized from the very Q4_1 blocks llama.cpp multiplies with, so what separates
  the two is llama.cpp's own rounding: it quantizes activations to 8 bits (Q8_1 blocks of 32) for
  every Q4_1 matmul and keeps K/V in F16. Measured relative gaps: 0.14 % for the fp32-dequantized
  graph, 0.63 % for the int8 training base (per-channel int8 of the dequantized weights adds its
  own rounding). Bounds: 1 % and 2 %. A layout error is far outside them: the q/k rows left in
  llama.cpp's order gives 79 % (loss 3.39 vs 1.89).
Measured on 2 shared cores: the module takes ~70 s (export 17-20 s; peak RSS 2.3 GB for the
export, 3.7 GB for the whole module).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from alignfed import manifest as mf
from export.bundle import export_bundle
from export.check import llama_cpp_ce
from runtime.llama import Generator
from runtime.ort import open_session

pytestmark = pytest.mark.slow

B, T = 4, 64
STEPS, LR = 10, 2e-3  # the firmware profiles' learning rate
FP32_GAP, INT8_GAP = 0.01, 0.02
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Question: what is 12 plus 30?  Answer:   42",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "unseen wörds and émojis 🙂",
    "1234567890 3.14159 -42 1e-5",
    "  leading spaces and trailing   ",
    "\n\n\ttabs\tand\nnewlines\r\n",
    "It's they're we'll I'd you've",
    "<repo_name>x<file_sep>y<|endoftext|>",
    "日本語のテキストと中文",
    "HTTP/1.1 200 OK; x=y&z=[1,2]{}",
]


@pytest.fixture(scope="module")
def smol_gguf() -> Path:
    from export.reference_model import smollm2_gguf

    return smollm2_gguf()


@pytest.fixture(scope="module")
def bundle(smol_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "bundle"
    start = time.monotonic()
    m = export_bundle(smol_gguf, out, targets=("q", "v"), rank=8, alpha=16.0, quantization="int8")
    print(f"\nexport {time.monotonic() - start:.1f} s")
    assert m.gguf_quantization == "Q4_1" and m.architecture.n_layers == 30 and m.architecture.tie_embeddings
    assert m.tokenizer["eos_id"] == 2 and "chat_template" in m.tokenizer
    return out


@pytest.fixture(scope="module")
def generator(smol_gguf: Path) -> Iterator[Generator]:
    with Generator(smol_gguf, n_ctx=256, n_threads=2) as gen:
        yield gen


@pytest.fixture(scope="module")
def batch(bundle: Path) -> tuple[np.ndarray, np.ndarray]:
    """input_ids = labels (B, T): the built-in corpora tokenized and packed, eos between texts."""
    from tokenizers import Tokenizer

    from alignfed.corpora import DOMAINS, write_domain
    from alignfed.text import load_texts

    with tempfile.TemporaryDirectory() as tmp:
        texts = [t for i, d in enumerate(DOMAINS) for t in load_texts(write_domain(Path(tmp) / f"{d}.jsonl", d, 12, i))]
    tok = Tokenizer.from_file(str(bundle / mf.TOKENIZER))
    eos = int(mf.load(bundle).tokenizer["eos_id"])
    stream = [i for enc in tok.encode_batch(texts, add_special_tokens=False) for i in [*enc.ids, eos]]
    assert len(stream) >= B * T
    ids = np.asarray(stream[: B * T], dtype=np.int64).reshape(B, T)
    return ids, ids.copy()


def test_rebuilt_tokenizer_tokenizes_like_llama_cpp(bundle: Path, generator: Generator) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(bundle / mf.TOKENIZER))
    for text in TEXTS:
        assert tok.encode(text).ids == generator.tokenize(text), f"token ids differ for {text!r}"


def test_ten_ort_steps_lower_the_loss(bundle: Path, batch: tuple[np.ndarray, np.ndarray]) -> None:
    ids, labels = batch
    session = open_session(bundle / mf.TRAIN_DIR, learning_rate=LR)
    session.module.eval()
    before = float(session.module(ids, labels))
    session.module.train()
    start = time.monotonic()
    losses = []
    for _ in range(STEPS):
        losses.append(float(session.module(ids, labels)))
        session.optimizer.step()
        session.module.lazy_reset_grad()
    per_step = (time.monotonic() - start) / STEPS
    session.module.eval()
    after = float(session.module(ids, labels))
    print(f"\nloss {before:.4f} -> {after:.4f} after {STEPS} steps ({per_step:.2f} s/step); train {losses}")
    assert np.isfinite(losses).all()
    assert after < before - 0.05


def test_ort_loss_agrees_with_llama_cpp_cross_entropy(
    bundle: Path, smol_gguf: Path, batch: tuple[np.ndarray, np.ndarray]
) -> None:
    import onnxruntime as ort
    from safetensors.numpy import load_file

    from export.gguf_source import read_gguf_model
    from export.onnx_graph import build_model

    ids, labels = batch
    manifest = mf.load(bundle)
    init = load_file(str(bundle / mf.ADAPTER_INIT))  # B = 0: the adapted model is the base
    ce = llama_cpp_ce(smol_gguf, None, ids, labels, n_ctx=T)

    session = open_session(bundle / mf.TRAIN_DIR)
    session.module.eval()
    int8 = float(session.module(ids, labels))
    del session

    arch, weights = read_gguf_model(smol_gguf)
    graph = build_model(arch, weights, manifest.lora, {}, mode="calib", quantization="fp32").SerializeToString()
    del weights
    calib = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    fp32 = float(calib.run(["loss"], {"input_ids": ids, "labels": labels, **init})[0])

    fp32_gap, int8_gap = abs(fp32 - ce) / ce, abs(int8 - ce) / ce
    print(f"\nllama.cpp CE {ce:.4f}; ORT fp32 {fp32:.4f} (gap {fp32_gap:.2%}), int8 {int8:.4f} (gap {int8_gap:.2%})")
    assert fp32_gap < FP32_GAP
    assert int8_gap < INT8_GAP
