from __future__ import annotations

import importlib.util
import inspect
import os
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import Mosquitto

# Every optional dependency the suite exercises. A missing one fails the run at once instead of
# letting tests skip quietly (set ALIGNFED_PARTIAL_ENV=1 where a lane installs a part on purpose).
REQUIRED_MODULES = (
    "gguf",
    "llama_cpp",
    "onnx",
    "onnxruntime.training.api",
    "tokenizers",
    "torch",
    "transformers",
    "hypothesis",
    "psycopg",
)


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.environ.get("ALIGNFED_PARTIAL_ENV") == "1":
        return
    missing = [name for name in REQUIRED_MODULES if not _installed(name)]
    if missing:
        raise pytest.UsageError(
            f"missing test dependencies {missing}: run scripts/setup.sh (or `make test`), which installs them"
        )


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path / "broker").start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.synthetic import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A bundle of the tiny model with LoRA on q and v (fp32 base), exported once per session."""
    from export.bundle import export_bundle

    out = tmp_path_factory.mktemp("tiny-bundle")
    export_bundle(tiny_model, out, targets=("q", "v"), rank=4, alpha=8.0, quantization="fp32", seed=0)
    return out


@cache
def _exports(func: Callable[..., Any]) -> bool:
    try:
        return "export_bundle(" in inspect.getsource(func)
    except (OSError, TypeError):
        return False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `bundle` every test that exports a bundle, itself or through any fixture it uses, so
    `-m "not bundle"` gives the quick unit tests and no exporting test goes unmarked."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        funcs = [getattr(item, "function", None)]
        if info is not None:
            funcs += [d.func for defs in info.name2fixturedefs.values() for d in defs]
        if any(f is not None and _exports(f) for f in funcs):
            item.add_marker(pytest.mark.bundle)


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[str]:
    """A PostgreSQL server's admin URL: the machine's, or one started for this session."""
    from tests.support.postgres import postgres_server

    with postgres_server() as url:
        yield url


@pytest.fixture
def postgres_url(postgres_admin: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test."""
    from tests.support.postgres import fresh_database

    with fresh_database(postgres_admin) as url:
        yield url
