"""The on-disk outbox: every update is written here before it is published, deleted on ack.

Files are written through `alignfed.atomic` (temporary name, fsync, rename, fsync of the folder),
so a power cut leaves either the whole update or nothing. Names sort by sequence number, so resends go out oldest first.
"""

from __future__ import annotations

from pathlib import Path

from alignfed import atomic


class Outbox:
    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("*.tmp"):  # an interrupted write: the update was never sent
            stale.unlink()

    def _path(self, seq: int, update_id: str) -> Path:
        return self.dir / f"{seq:010d}-{update_id}.update"

    def put(self, seq: int, update_id: str, payload: bytes) -> Path:
        return atomic.write_bytes(self._path(seq, update_id), payload)

    def items(self) -> list[tuple[str, Path]]:
        """(update id, path) of every unacknowledged update, oldest first."""
        return [(p.stem.split("-", 1)[1], p) for p in sorted(self.dir.glob("*.update"))]

    def remove(self, update_id: str) -> bool:
        """Delete the update with exactly this id (ids come from acks: never used as a pattern)."""
        for uid, path in self.items():
            if uid == update_id:
                path.unlink()
                return True
        return False

    def __len__(self) -> int:
        return sum(1 for _ in self.dir.glob("*.update"))
