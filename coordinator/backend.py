"""The coordinator store named by the `database` setting: an SQLite file or a PostgreSQL URL."""

from __future__ import annotations

from pathlib import Path

from coordinator.storage import CoordinatorStore, is_postgres


def open_store(database: Path | str) -> CoordinatorStore:
    """PostgreSQL for a `postgresql://` URL, else the SQLite file at that path."""
    if is_postgres(database):
        from coordinator.pgstore import PgStore

        return PgStore(str(database))
    from coordinator.store import Store

    return Store(Path(database))
