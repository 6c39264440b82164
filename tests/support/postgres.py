"""A PostgreSQL server for tests: the machine's (ALIGNFED_TEST_POSTGRES, default 127.0.0.1:5432)
when it answers, else a throw-away cluster (initdb + pg_ctl) on a free port in a temp dir.
Each test gets its own fresh database, dropped afterwards."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from tests.support.broker import free_port

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=2):
            return True
    except psycopg.Error:
        return False


def _pg_tool(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise RuntimeError(f"{name} not found: install PostgreSQL (scripts/setup.sh installs Debian's postgresql)")
    return found


class LocalCluster:
    """initdb + pg_ctl in `workdir`, listening on 127.0.0.1 only, trust auth. As root it runs as `postgres`."""

    def __init__(self, workdir: Path | None = None) -> None:
        # its own directory under /tmp: pytest's temp dirs are private to root, the server user must enter
        self.dir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="alignfed-pg-"))
        self.port = free_port()
        self._user: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            self._user = ["runuser", "-u", "postgres", "--"]

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run([*self._user, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> LocalCluster:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self._user:
            self.dir.chmod(0o755)
            shutil.chown(self.dir, "postgres", "postgres")
        data = self.dir / "data"
        self._run(_pg_tool("initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync")
        opts = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off"
        self._run(_pg_tool("pg_ctl"), "-D", str(data), "-o", opts, "-l", str(self.dir / "pg.log"), "-w", "start")
        return self

    def stop(self) -> None:
        self._run(_pg_tool("pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yields an admin URL (database `postgres`) of a reachable server."""
    url = os.environ.get("ALIGNFED_TEST_POSTGRES", DEFAULT_ADMIN_URL)
    if _answers(url):
        yield url
        return
    cluster = LocalCluster().start()
    try:
        yield cluster.admin_url
    finally:
        cluster.stop()


@contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    """A new empty database on the server of `admin_url`; yields its URL, drops it afterwards."""
    name = f"alignfed_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]  # generated name, not input
    base = admin_url.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True) as db:
            db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # type: ignore[arg-type]
