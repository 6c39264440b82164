"""`alignfed export` end to end through the CLI: the summary it prints, `--check` on good and on
broken bundles (exit code 3 = bundle error), and option errors (exit code 4)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from alignfed import manifest as mf
from alignfed.cli import main
from alignfed.errors import BundleError, ExportError
from export.check import check_bundle


@pytest.fixture(scope="module")
def q8_bundle(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A bundle with a Q8_0 GGUF, exported and checked by the CLI; returns it and what was printed."""
    out = tmp_path_factory.mktemp("cli") / "bundle"
    text = io.StringIO()  # module-scoped fixtures cannot use capsys
    with contextlib.redirect_stdout(text):
        rc = main(["export", "--model", str(tiny_dir), "--out", str(out), "--targets", "q,v,down",
                   "--rank", "4", "--gguf-quant", "Q8_0", "--check"])  # fmt: skip
    assert rc == 0, text.getvalue()
    return out, text.getvalue()


def test_export_prints_a_summary_and_passes_its_check(q8_bundle: tuple[Path, str]) -> None:
    out, text = q8_bundle
    manifest = mf.load(out)
    assert manifest.gguf_quantization == "Q8_0"
    assert "trainable parameters  3.3 K (LoRA q,v,down r=4 alpha=16)" in text  # 2 layers x (q 512 + v 384 + down 768)
    assert "base parameters       115.0 K (training base fp32, GGUF Q8_0)" in text
    for rel in manifest.files:
        assert rel in text
    for name in ("files", "tokenizer", "ORT parity", "llama.cpp"):
        assert f"OK   {name}:" in text
    assert text.rstrip().endswith(f"bundle {out}: OK")


def _copy(bundle: Path, dst: Path) -> Path:
    shutil.copytree(bundle, dst)
    return dst


def test_check_fails_on_a_changed_file(
    q8_bundle: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = _copy(q8_bundle[0], tmp_path / "b")
    with open(broken / mf.TOKENIZER, "ab") as f:
        f.write(b" ")
    assert main(["export", "--check", str(broken)]) == BundleError.exit_code
    out = capsys.readouterr()
    assert "FAIL files:" in out.out and "tokenizer.json has sha256" in out.out
    assert "bundle check failed" in out.err


def test_check_fails_when_calibration_and_training_models_disagree(
    q8_bundle: tuple[Path, str], tiny_tied_dir: Path, bundle_factory: Callable[..., Path], tmp_path: Path
) -> None:
    """A calibration model from another base (same shapes, hashes updated) must not pass."""
    broken = _copy(q8_bundle[0], tmp_path / "b")
    other = bundle_factory(tiny_tied_dir, ("q", "v", "down"))
    shutil.copyfile(other / mf.CALIB_MODEL, broken / mf.CALIB_MODEL)
    manifest = mf.load(broken)
    files = dict(manifest.files) | {mf.CALIB_MODEL: mf.sha256_file(broken / mf.CALIB_MODEL)}
    mf.save(broken, dataclasses.replace(manifest, files=files))

    report = check_bundle(broken)
    status = {r.name: r.status for r in report.results}
    assert status == {"files": "OK", "tokenizer": "OK", "ORT parity": "FAIL", "llama.cpp": "OK"}, report.summary()
    with pytest.raises(BundleError, match="FAIL ORT parity"):
        report.raise_on_failure()


def test_check_skips_llama_cpp_without_a_gguf(tiny_dir: Path, bundle_factory: Callable[..., Path]) -> None:
    report = check_bundle(bundle_factory(tiny_dir, ("q", "v")))  # exported with write_gguf=None
    assert report.ok
    assert [r.status for r in report.results] == ["OK", "OK", "OK", "SKIP"]


def test_option_errors_use_the_export_exit_code(
    tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["export", "--model", str(tiny_dir), "--out", str(tmp_path / "o"), "--targets", "q,attn"])
    assert rc == ExportError.exit_code
    assert "unsupported LoRA target(s) ['attn']; supported: q, k, v, o, gate, up, down" in capsys.readouterr().err
    rc = main(["export", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")])
    assert rc == ExportError.exit_code
    assert "expected a Hugging Face model folder or a .gguf file" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--model and --out are required"):
        main(["export"])
