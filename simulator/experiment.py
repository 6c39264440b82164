"""Experiments: named strategy variants (`simulator.variants`) run over the same testbed, seed and
virtual horizon, one `Simulation` each.

Strategies are built with `coordinator.strategies.build`, exactly as the live coordinator builds
them; AlignFed variants get the testbed's calibration runner (`activations=`) and the run's
version history (`state_of=`). The time-to-target column uses `target_loss`, by default the final
eval loss of `fedavg` (run first when it is among the variants).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from alignfed.errors import ConfigError
from coordinator.strategies import build, strategy_class
from coordinator.strategies.base import Strategy
from simulator.accuracy import AccuracyHook
from simulator.config import SimulationConfig
from simulator.engine import Simulation
from simulator.events import Event
from simulator.metrics import RunResult, Summary, summarize
from simulator.saved_adapters import SavedAdapter, SavingHistory, save_final, variant_dir
from simulator.testbed import Testbed
from simulator.variants import Variant
from simulator.versions import VersionHistory


class Progress(Protocol):
    def __call__(self, now: float) -> None: ...
    def close(self) -> None: ...


ProgressFactory = Callable[[str, float], Progress]  # (variant, horizon seconds) -> progress sink


@dataclass(frozen=True, slots=True)
class ExperimentConfig:
    variants: tuple[Variant, ...]
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    target_loss: float | None = None  # None: the final eval loss of `reference`
    reference: str = "fedavg"
    save_adapters: Path | None = None  # write final (and every save_every-th) global adapters here
    save_every: int = 0

    def __post_init__(self) -> None:
        names = [v.name for v in self.variants]
        if not names:
            raise ConfigError("experiment: no variants")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"experiment: variant name(s) {dupes} appear more than once")


@dataclass(frozen=True, slots=True)
class ExperimentResult:
    runs: list[RunResult]  # in the order of the config's variants
    target: float | None
    summaries: list[Summary]
    saved: dict[str, SavedAdapter] = field(default_factory=dict)  # variant -> its final adapter's files


def make_strategy(variant: Variant, testbed: Testbed, history: VersionHistory) -> Strategy:
    providers: dict[str, Callable[[], Any]] = {"activations": testbed.calibration, "state_of": lambda: history.get}
    try:
        needs = strategy_class(variant.strategy).needs  # what the strategy asks for (`Strategy.needs`)
        options = {**{need: providers[need]() for need in needs}, **variant.options}
        return build(variant.strategy, **options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"variant {variant.name!r}: {exc}") from exc


def run_variant(
    variant: Variant,
    testbed: Testbed,
    config: SimulationConfig,
    *,
    accuracy: AccuracyHook | None = None,
    progress: Progress | None = None,
    on_event: Callable[[Event, RunResult], None] | None = None,
    save_to: Path | None = None,
    save_every: int = 0,
) -> RunResult:
    """One variant's run; with `save_to`, every `save_every`-th version is written as it is made
    (`simulator.saved_adapters`) — the final one is the caller's to save."""
    history = (
        SavingHistory(
            testbed.initial,
            variant_dir(save_to, variant.name),
            every=save_every,
            variant=variant.name,
            manifest=testbed.manifest,
        )
        if save_to is not None
        else VersionHistory(testbed.initial)
    )
    strategy = make_strategy(variant, testbed, history)
    sim = Simulation(
        variant.name,
        strategy,
        testbed,
        config,
        synchronous=variant.synchronous,
        history=history,
        accuracy=accuracy,
        progress=progress,
        on_event=on_event,
    )
    try:
        return sim.run()
    finally:
        strategy.close()
        if progress is not None:
            progress.close()


def run_experiment(
    testbed: Testbed,
    config: ExperimentConfig,
    *,
    accuracy: AccuracyHook | None = None,
    progress: ProgressFactory | None = None,
    on_variant: Callable[[ExperimentResult], object] | None = None,
    events: Callable[[str], Callable[[Event, RunResult], None]] | None = None,
) -> ExperimentResult:
    """Run every variant; `on_variant` gets the result so far after each one (to save it as it
    grows: a long experiment interrupted halfway keeps the variants it finished)."""
    order = sorted(config.variants, key=lambda v: v.name != config.reference)  # the reference first
    runs: dict[str, RunResult] = {}
    saved: dict[str, SavedAdapter] = {}
    target = config.target_loss

    def so_far() -> ExperimentResult:
        ordered = [runs[v.name] for v in config.variants if v.name in runs]
        return ExperimentResult(
            runs=ordered, target=target, summaries=[summarize(r, target) for r in ordered], saved=dict(saved)
        )

    for v in order:
        bar = progress(v.name, config.simulation.horizon_s) if progress is not None else None
        sink = events(v.name) if events is not None else None  # e.g. the dashboard, one variant at a time
        runs[v.name] = run_variant(
            v,
            testbed,
            config.simulation,
            accuracy=accuracy,
            progress=bar,
            on_event=sink,
            save_to=config.save_adapters,
            save_every=config.save_every,
        )
        final = runs[v.name].final
        if config.save_adapters is not None and final is not None:
            saved[v.name] = save_final(final, config.save_adapters, variant=v.name, manifest=testbed.manifest)
        if target is None and v.name == config.reference and runs[v.name].curve:
            target = runs[v.name].curve[-1].mean
        if on_variant is not None and len(runs) < len(order):
            on_variant(so_far())
    return so_far()
