"""Atomic writes: a reader sees the old file or the new one, never a part; failures leave no litter."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from alignfed import atomic


def test_write_replaces_whole_file_with_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.json"
    atomic.write_text(path, "old")
    atomic.write_bytes(path, b"new", mode=0o600)
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]


def test_failed_writer_keeps_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "adapter.gguf"
    path.write_bytes(b"version 1")
    with pytest.raises(RuntimeError, match="writer died"), atomic.replacing(path) as tmp:
        tmp.write_bytes(b"half of version 2")
        raise RuntimeError("writer died")
    assert path.read_bytes() == b"version 1"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.gguf"]


def test_writer_that_writes_nothing_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    with pytest.raises(FileNotFoundError), atomic.replacing(path):
        pass
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_format_bytes() -> None:
    from alignfed.sizes import format_bytes

    assert [format_bytes(n) for n in (0, 1023, 1024, 5 * 1024**2 + 1, 3 * 1024**3)] == [
        "0 B",
        "1023 B",
        "1.0 KiB",
        "5.0 MiB",
        "3.0 GiB",
    ]
