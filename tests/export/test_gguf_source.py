"""Exporting from a GGUF file: a tiny Llama written as an F32 GGUF reads back as the same model
(architecture, weights in HF row order, tokenizer), its bundle trains on the same loss as the
bundle of the HF folder, and quantized or foreign GGUFs are handled or refused clearly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from alignfed import manifest as mf
from alignfed.errors import ExportError
from export.bundle import export_bundle
from export.gguf_base import write_base_gguf
from export.gguf_source import open_gguf
from export.hf_source import open_hf
from export.reader import open_source
from runtime.ort import open_session, set_params

RANK, ALPHA = 4, 8.0  # as tests/export/conftest.py
LOSS_TOL = 1e-5  # same float32 weights and graph: only ORT's own nondeterminism remains
# The make_batch fixture (conftest): (vocab, B, T, seed) -> input_ids, labels, both (B, T).
MakeBatch = Callable[[int, int, int, int], tuple[np.ndarray, np.ndarray]]
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is 12 plus 30?  Answer:   42, not 4 2 or 1234567.",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
    "def add(a, b):\n    return a + b\n",
    "unseen wörds and émojis 🙂<|endoftext|>",
    "   leading and trailing spaces   \n\n\t",
]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_base_gguf(tiny_dir, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.mark.parametrize("model_fixture", ["tiny_dir", "tiny_tied_dir"])
def test_f32_gguf_reads_back_as_the_hf_model(
    model_fixture: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model_dir: Path = request.getfixturevalue(model_fixture)
    hf = open_hf(model_dir)
    gg = open_gguf(write_base_gguf(model_dir, tmp_path / "m.gguf"))
    assert gg.architecture == hf.architecture
    assert gg.kind == "gguf" and gg.gguf_quantization == "F32"
    want, got = hf.load_weights(False), gg.load_weights(False)
    assert sorted(got) == sorted(want)
    for name, w in want.items():  # q/k rows went through llama.cpp's permutation and back
        np.testing.assert_array_equal(got[name], w, err_msg=name)


def test_rebuilt_tokenizer_tokenizes_like_the_original(tiny_dir: Path, tiny_gguf: Path) -> None:
    from tokenizers import Tokenizer

    original = Tokenizer.from_file(str(tiny_dir / mf.TOKENIZER))
    rebuilt = Tokenizer.from_str(open_gguf(tiny_gguf).tokenizer_json)
    for text in TEXTS:
        assert rebuilt.encode(text).ids == original.encode(text).ids, f"token ids differ for {text!r}"
        assert rebuilt.decode(rebuilt.encode(text).ids, skip_special_tokens=False) == text
    specials = [t for t in rebuilt.get_added_tokens_decoder().values() if t.special]
    assert {t.content for t in specials} == {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}


def test_gguf_export_trains_on_the_same_loss_as_the_hf_export(
    tiny_dir: Path, tiny_gguf: Path, bundle_factory: Callable[..., Path], make_batch: MakeBatch, tmp_path: Path
) -> None:
    from_hf = bundle_factory(tiny_dir, ("q", "v"))
    from_gguf = tmp_path / "bundle"
    manifest = export_bundle(tiny_gguf, from_gguf, targets=("q", "v"), rank=RANK, alpha=ALPHA)
    mf.verify(from_gguf, manifest)
    hf_manifest = mf.load(from_hf)
    assert manifest.architecture == hf_manifest.architecture
    assert manifest.gguf_quantization == "F32"
    assert manifest.base_sha256 == mf.sha256_file(tiny_gguf)
    assert (from_gguf / mf.BASE_GGUF).read_bytes() == tiny_gguf.read_bytes()  # the source file, as is
    assert manifest.tokenizer["eos_id"] == hf_manifest.tokenizer["eos_id"]

    rng = np.random.default_rng(3)  # nonzero A and B, so the adapter path counts too
    adapter = {k: (0.2 * rng.standard_normal(s)).astype(np.float32) for k, s in manifest.lora_shapes().items()}
    losses = []
    for bundle in (from_hf, from_gguf):
        session = open_session(bundle / mf.TRAIN_DIR)
        set_params(session.state, adapter)
        session.module.eval()
        ids, labels = make_batch(manifest.architecture.vocab, 2, 16, 5)
        losses.append(float(session.module(ids, labels)))
    print(f"HF {losses[0]:.7f} GGUF {losses[1]:.7f}")
    assert abs(losses[0] - losses[1]) <= LOSS_TOL


def test_q8_0_gguf_dequantizes_close_to_the_original(tiny_dir: Path, tiny_gguf: Path, tmp_path: Path) -> None:
    from export.gguf_quant import quantize_gguf

    source = open_gguf(quantize_gguf(tiny_gguf, tmp_path / "q8.gguf", "Q8_0"))
    assert source.gguf_quantization == "Q8_0"
    want, got = open_hf(tiny_dir).load_weights(False), source.load_weights(False)
    for name, w in want.items():
        if w.ndim == 2:
            # Q8_0: blocks of 32 along a row, q = round(x / d) in int8 with d = max|block| / 127 stored
            # as f16: |error| <= d / 2 (rounding) + 127 * d * 2^-11 (f16 scale) < 0.6 d.
            d = np.abs(w).reshape(w.shape[0], -1, 32).max(-1).repeat(32, -1) / 127  # (out, in)
            assert np.all(np.abs(got[name] - w) <= 0.6 * d + 1e-7), name
        else:
            np.testing.assert_array_equal(got[name], w)  # norms stay F32

    with pytest.raises(ExportError, match=r"gguf quantization Q4_1 asked for a GGUF source of type Q8_0"):
        export_bundle(source.path, tmp_path / "out", gguf_quant="Q4_1")


def _gguf_with(path: Path, arch: str, tokenizer: str = "gpt2", **keys: int) -> Path:
    import gguf

    w = gguf.GGUFWriter(path, arch)
    for k, v in keys.items():
        w.add_uint32(f"{arch}.{k}", v)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tokenizer_model(tokenizer)
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list([f"t{i}" for i in range(8)])
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_foreign_ggufs_are_refused_with_what_is_supported(tiny_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"general.architecture 'gpt2' is not supported; supported: llama, qwen2"):
        open_gguf(_gguf_with(tmp_path / "gpt2.gguf", "gpt2", block_count=1))
    with pytest.raises(ExportError, match=r"missing key llama.embedding_length"):
        open_gguf(_gguf_with(tmp_path / "partial.gguf", "llama", block_count=1))
    hparams = {"block_count": 1, "embedding_length": 4, "feed_forward_length": 8, "attention.head_count": 2}
    with pytest.raises(ExportError, match=r"tokenizer.ggml.model is 'llama'; supported: 'gpt2' \(byte-level BPE\)"):
        open_gguf(_gguf_with(tmp_path / "spm.gguf", "llama", "llama", context_length=16, **hparams))
    with pytest.raises(ExportError, match=r"head_dim 1 must be even"):  # validated as a HF config would be
        odd = {**hparams, "attention.head_count": 4}
        open_gguf(_gguf_with(tmp_path / "odd.gguf", "llama", "gpt2", context_length=16, **odd))
    with pytest.raises(ExportError, match=r"expected a Hugging Face model folder or a .gguf file"):
        open_source(tmp_path / "missing.gguf")
    (tmp_path / "model.bin").write_bytes(b"\0")
    with pytest.raises(ExportError, match=r"without the .gguf suffix"):
        open_source(tmp_path / "model.bin")
    # An adapter GGUF is not a base model.
    from alignfed.gguf_adapter import write_lora_gguf

    src = open_gguf(tiny_gguf)
    from export.bundle import init_lora

    layout = mf.LoraLayout(targets=("q",), rank=2, alpha=4.0)
    adapter = write_lora_gguf(tmp_path / "a.gguf", init_lora(src.architecture, layout, 0), src.architecture, layout)
    with pytest.raises(ExportError, match=r"general.type is 'adapter', expected 'model'"):
        open_gguf(adapter)
