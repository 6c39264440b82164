"""Issue 10, defect 3: `alignfed flash` refuses what the daemon would only fail on later, in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from alignfed.cli import main
from alignfed.corpora import DOMAINS, write_domain
from alignfed.errors import EXIT_CODES
from alignfed.profiles import host_arch
from edge.allocator import find_jemalloc

# a profile for this machine's architecture: flash refuses the other's (issue 15, defect 7)
PROFILE = "x86-laptop" if host_arch() == "x86_64" else "rpi5-8gb"


def flash(tmp_path: Path, bundle: Path, data: Path, broker: str = "mqtt://gw:1883") -> list[str]:
    return [
        "flash", "--profile", PROFILE, "--device-id", "dev-1", "--broker", broker, "--bundle", str(bundle),
        "--data", str(data), "--target", str(tmp_path / "target"), "--key", "00" * 32,
    ]  # fmt: skip


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err.strip()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_domain(tmp_path / "d.jsonl", DOMAINS[0], 4, seed=0)


def test_a_good_bundle_flashes(
    tmp_path: Path, tiny_bundle: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(flash(tmp_path, tiny_bundle, data), capsys) == (0, "")
    assert (tmp_path / "target" / "device.toml").is_file()
    unit = (tmp_path / "target" / "alignfed-edge.service").read_text()
    lib = find_jemalloc()
    assert lib is not None, "libjemalloc2 is not installed: run scripts/setup.sh"
    assert f"Environment=LD_PRELOAD={lib}\n" in unit  # the daemon trains on jemalloc (edge/allocator.py)


def test_a_bundle_whose_hashes_do_not_match_is_refused(
    tmp_path: Path, tiny_bundle: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bad)
    (bad / "tokenizer.json").write_text((bad / "tokenizer.json").read_text() + " ")
    code, err = run(flash(tmp_path, bad, data), capsys)
    assert code == 3 and EXIT_CODES[code].startswith("bundle error")
    assert err.count("\n") == 0 and "tokenizer.json has sha256" in err, err
    assert not (tmp_path / "target" / "device.toml").exists()


def test_a_missing_data_file_is_refused(tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run(flash(tmp_path, tiny_bundle, tmp_path / "nope.jsonl"), capsys)
    assert code == 2 and err.count("\n") == 0 and "--data" in err and "nope.jsonl" in err, err


@pytest.mark.parametrize("url", ["gw:1883", "gateway", "http://gw:1883", "mqtt://"])
def test_a_broker_url_without_a_scheme_is_refused(
    tmp_path: Path, tiny_bundle: Path, data: Path, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run(flash(tmp_path, tiny_bundle, data, url), capsys)
    assert code == 2 and err.count("\n") == 0 and "mqtt://host:port" in err and repr(url) in err, err
