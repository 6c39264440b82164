"""What a run records besides its clock: the event log, evaluation and accuracy points, and the
coordinator's CPU time (the one host measure, kept out of the event log)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TypeVar

from coordinator.strategies.base import AdapterState
from simulator.accuracy import AccuracyHook
from simulator.config import SimulationConfig
from simulator.evaluator import Evaluator
from simulator.events import Event
from simulator.metrics import AccuracyPoint, EvalPoint, RunResult

T = TypeVar("T")


class Ledger:
    """Appends to one `RunResult`: events (also to `on_event`), eval and accuracy points, CPU seconds."""

    def __init__(
        self,
        result: RunResult,
        evaluator: Evaluator,
        config: SimulationConfig,
        *,
        accuracy: AccuracyHook | None = None,
        on_event: Callable[[Event, RunResult], None] | None = None,
    ) -> None:
        self.result = result
        self.evaluator = evaluator
        self.cfg = config
        self.accuracy = accuracy
        self.on_event = on_event
        self._last_eval = -1
        self._last_eval_at = -math.inf

    def log(self, event: Event) -> None:
        self.result.events.append(event)
        if self.on_event is not None:
            self.on_event(event, self.result)

    def timed(self, fn: Callable[[], T]) -> T:
        """Run a coordinator call, charging its process time to the coordinator CPU metric."""
        start = time.process_time()
        try:
            return fn()
        finally:
            self.result.cpu_s += time.process_time() - start

    def published(self, state: AdapterState, now: float) -> None:
        """Evaluate a new version every `eval_every` versions (at most every `eval_interval_s`), and
        score its accuracy every `accuracy_every`."""
        cfg = self.cfg
        if state.version % cfg.eval_every == 0 and now - self._last_eval_at >= cfg.eval_interval_s:
            self.evaluate(state, now)
        if self.accuracy is not None and cfg.accuracy_every and state.version % cfg.accuracy_every == 0:
            self.score(state, now)

    def close(self, final: AdapterState, since: float) -> None:
        """The final version, evaluated and scored if it was not yet; `since`: when it was made."""
        if self._last_eval != final.version:
            self.evaluate(final, since)
        self.result.final = final
        if self.accuracy is not None and (
            not self.result.accuracy or self.result.accuracy[-1].version != final.version
        ):
            self.score(final, since)

    def evaluate(self, state: AdapterState, now: float) -> None:
        ev = self.evaluator.evaluate(state.tensors)
        self._last_eval = state.version
        self._last_eval_at = now
        self.result.curve.append(
            EvalPoint(
                time=now,
                version=state.version,
                mean=ev.mean,
                worst_domain=ev.worst_domain,
                worst_device=ev.worst_device,
                per_domain=ev.per_domain,
                per_device=ev.per_device,
            )
        )
        self.log(
            Event(
                now,
                "eval",
                version=state.version,
                loss=ev.mean,
                detail=f"worst_domain={ev.worst_domain:.6g};worst_device={ev.worst_device:.6g}",
            )
        )

    def score(self, state: AdapterState, now: float) -> None:
        assert self.accuracy is not None
        acc = float(self.accuracy(state.tensors))
        if not 0.0 <= acc <= 1.0:
            raise ValueError(f"accuracy hook returned {acc}; expected a fraction in [0, 1]")
        self.result.accuracy.append(AccuracyPoint(time=now, version=state.version, accuracy=acc))
