"""The virtual clock: a time-ordered event queue.

Simulated time only moves when an event is taken from the queue; nothing here reads the host's
clock, so a run is the same on a fast and a slow machine. Events due at the same instant come out
in the order they were scheduled (a sequence number breaks ties), which keeps runs deterministic.
"""

from __future__ import annotations

import heapq
import math
from typing import Generic, TypeVar

T = TypeVar("T")


class EventQueue(Generic[T]):
    """Items scheduled at virtual times (seconds ≥ 0); `pop` returns the earliest, FIFO on ties."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, T]] = []
        self._seq = 0
        self.now = 0.0  # time of the last popped item

    def push(self, at: float, item: T, *, order: int | None = None) -> None:
        """Schedule `item`; `order` (from `reserve`) places it among ties as if pushed back then."""
        if not math.isfinite(at):
            raise ValueError(f"event time must be finite, got {at}")
        if at < self.now:
            raise ValueError(f"cannot schedule an event at {at:.6f} s, before the current time {self.now:.6f} s")
        heapq.heappush(self._heap, (at, self.reserve() if order is None else order, item))

    def reserve(self) -> int:
        """A tie-breaking position for an item to be pushed later."""
        self._seq += 1
        return self._seq - 1

    def pop(self) -> tuple[float, T]:
        if not self._heap:
            raise IndexError("the event queue is empty")
        at, _, item = heapq.heappop(self._heap)
        self.now = at
        return at, item

    def next_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)
