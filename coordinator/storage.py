"""What every coordinator store offers (the choice between them: `coordinator.backend`).

`store.Store` (SQLite, one process) is the default; `pgstore.PgStore` (PostgreSQL) is shared by
several ingest workers and one elected aggregator (docs/scale.md). Both commit an update before
its ack and a version together with marking the updates it folded in, in one transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from alignfed import protocol
from alignfed.errors import AlignFedError
from alignfed.lowrank import Factors

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class StoreConflict(AlignFedError):
    """A write lost a race another process won (a version already saved, an update no longer pending)."""


class UpdateLookup(Protocol):
    """The stored outcome of one update (`store.UpdateRecord`)."""

    @property
    def update_id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def version(self) -> int | None: ...


class CoordinatorStore(Protocol):
    """The durable state the coordinator service, the ingest workers and the aggregator share."""

    def close(self) -> None: ...
    def add_device(self, device_id: str, key_hex: str, profile: str) -> None: ...
    def remove_device(self, device_id: str) -> bool: ...
    def device_key(self, device_id: str) -> bytes | None: ...
    def devices(self) -> list[tuple[str, str]]: ...
    def latest_version(self) -> int | None: ...
    def has_version(self, version: int) -> bool: ...
    def version(self, version: int) -> tuple[bytes, dict[str, Factors]]: ...
    def save_version(
        self,
        adapter: protocol.GlobalAdapter,
        encoded: bytes,
        residual: Mapping[str, Factors],
        used: Mapping[str, tuple[str, float]],
    ) -> None: ...
    def lookup(self, device_id: str, update_id: str) -> UpdateLookup | None: ...
    def record(
        self, update: protocol.AdapterUpdate, payload: bytes, received_at: float, *, status: str, reason: str = ""
    ) -> None: ...
    def reject_pending(self, device_id: str, update_id: str, reason: str) -> None: ...
    def quarantine(self, device_id: str, update_id: str, reason: str) -> None: ...
    def quarantined(self, limit: int = 20) -> list[dict[str, Any]]: ...
    def aggregated(self) -> list[tuple[str, int, int]]: ...
    def pending(self) -> list[tuple[bytes, float]]: ...
    def stats(self) -> dict[str, Any]: ...
    def last_eval_losses(self) -> dict[str, tuple[float, int]]: ...
    def last_losses(self) -> dict[str, float]: ...


def is_postgres(database: Path | str) -> bool:
    return isinstance(database, str) and database.startswith(POSTGRES_SCHEMES)


def pack_residual(residual: Mapping[str, Factors]) -> bytes:
    """Error-feedback factors as safetensors: `lid.u` (out, q) and `lid.v` (q, in), float32."""
    parts = {
        f"{lid}.{n}": np.asarray(t, np.float32) for lid, f in residual.items() for n, t in (("u", f.u), ("v", f.v))
    }
    return protocol.pack(parts, {})


def unpack_residual(blob: bytes) -> dict[str, Factors]:
    tensors, _ = protocol.unpack(blob, max_bytes=1 << 34)
    return {
        name[: -len(".u")]: Factors(u=np.array(t), v=np.array(tensors[name[: -len(".u")] + ".v"]))
        for name, t in tensors.items()
        if name.endswith(".u")
    }
