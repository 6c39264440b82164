"""What `pip install .` puts on a device: a wheel with the firmware profiles inside, loadable from it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from alignfed.errors import ConfigError
from alignfed.profiles import available, check_arch, load_profile

ROOT = Path(__file__).resolve().parents[2]
PROFILES = {"jetson-nano-4gb", "jetson-orin-nano-8gb", "rpi4-4gb", "rpi5-8gb", "x86-laptop"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources (the build writes build/ and *.egg-info beside them)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("alignfed", "edge", "coordinator", "export", "simulator"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(src)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (built,) = out.glob("alignfed-*.whl")
    return built


def test_wheel_carries_the_profiles_and_they_load_from_it(wheel: Path, tmp_path: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        inside = {Path(n).stem for n in z.namelist() if n.startswith("alignfed/firmware_profiles/")}
        z.extractall(tmp_path / "site")
    assert inside == PROFILES
    # A fresh interpreter with the unpacked wheel first on its path, run away from the sources.
    code = (
        "from alignfed.profiles import PROFILE_DIR, available, load_profile; "
        "print(PROFILE_DIR); print(','.join(available())); print(load_profile('rpi4-4gb').arch)"
    )
    out = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r}); {code}"],
        capture_output=True, text=True, check=True, cwd=tmp_path, timeout=60,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    ).stdout.split()  # fmt: skip
    assert Path(out[0]).is_relative_to(tmp_path / "site")
    assert set(out[1].split(",")) == PROFILES and out[2] == "aarch64"


def test_every_shipped_profile_names_its_architecture() -> None:
    assert set(available()) == PROFILES
    archs = {n: load_profile(n).arch for n in PROFILES}
    assert archs["x86-laptop"] == "x86_64" and {archs[n] for n in PROFILES - {"x86-laptop"}} == {"aarch64"}
    assert load_profile("jetson-orin-nano-8gb").accelerator == "cuda" and load_profile("rpi5-8gb").accelerator == "cpu"


def test_a_profile_for_another_architecture_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"'x86-laptop' is for x86_64 devices, this machine is aarch64; .*rpi4-4gb"):
        check_arch(load_profile("x86-laptop"), machine="aarch64")
    with pytest.raises(ConfigError, match=r"'rpi5-8gb' is for aarch64 devices, this machine is x86_64; .*x86-laptop"):
        check_arch(load_profile("rpi5-8gb"), machine="x86_64")
    check_arch(load_profile("rpi5-8gb"), machine="aarch64")  # the right one passes


def test_flash_refuses_a_profile_of_another_architecture(tmp_path: Path) -> None:
    from alignfed.profiles import host_arch
    from edge.flash import flash

    other = "rpi4-4gb" if host_arch() == "x86_64" else "x86-laptop"
    with pytest.raises(ConfigError, match=f"is for .* devices, this machine is {host_arch()}"):
        flash(profile=other, device_id="d1", federation="f", broker="mqtt://127.0.0.1:1", bundle=tmp_path,
              data=tmp_path / "d.jsonl", target=tmp_path / "t", key="00")  # fmt: skip
    assert not (tmp_path / "t").exists()  # refused before anything was written
