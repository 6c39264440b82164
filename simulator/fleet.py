"""The simulated fleet: N devices drawn from K device classes (firmware profiles).

Classes are picked from the candidate profiles (every file in `firmware_profiles/` unless given)
sorted by `step_speed`, spread evenly from the slowest to the fastest, so K ≥ 2 spans the whole
speed range of the candidates (the shipped profiles span 10×: Raspberry Pi 4 at 0.1 to an x86
laptop at 1.0). Device i belongs to class i mod K. `overrides` replace profile fields for every
class (e.g. a shorter `seq_len` or fewer `local_steps` to bound the cost of a simulation); they
are validated like a profile file. `class_ranks` caps the LoRA rank class by class (a mixed-rank
fleet: slow boards at a low rank, fast ones at the bundle's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from alignfed.errors import ConfigError
from alignfed.profiles import DeviceProfile, available, load_profile, parse_profile


@dataclass(frozen=True, slots=True)
class FleetConfig:
    devices: int = 8
    classes: int = 4
    profiles: tuple[str, ...] = ()  # profile names or .toml paths; () = every firmware profile
    overrides: Mapping[str, Any] = field(default_factory=dict)  # profile field -> value, for every class
    # LoRA rank cap (`max_rank`) of each class, slowest first; () keeps the profiles' own (a mixed-rank fleet)
    class_ranks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise ConfigError(f"fleet: devices must be ≥ 1, got {self.devices}")
        if self.classes < 1:
            raise ConfigError(f"fleet: classes must be ≥ 1, got {self.classes}")
        if self.classes > self.devices:
            raise ConfigError(f"fleet: {self.classes} classes need at least as many devices, got {self.devices}")
        if self.class_ranks and len(self.class_ranks) != self.classes:
            raise ConfigError(
                f"fleet: {len(self.class_ranks)} class ranks {list(self.class_ranks)} for {self.classes} classes; "
                "expected one per class (0 = the bundle's rank)"
            )


@dataclass(frozen=True, slots=True)
class SimDevice:
    device_id: str
    index: int  # position in the fleet; seeds the device's random streams
    profile: DeviceProfile
    device_class: int  # 0 = slowest class


def speed_classes(candidates: Sequence[DeviceProfile], k: int) -> list[DeviceProfile]:
    """K profiles spread from the slowest to the fastest candidate (by step_speed, then name)."""
    ranked = sorted(candidates, key=lambda p: (p.step_speed, p.name))
    if k > len(ranked):
        raise ConfigError(
            f"fleet: {k} device classes asked for, but only {len(ranked)} profiles are available "
            f"({', '.join(p.name for p in ranked)}); pass more profiles or fewer classes"
        )
    picks = np.round(np.linspace(0, len(ranked) - 1, k)).astype(int) if k > 1 else np.array([len(ranked) - 1])
    return [ranked[int(i)] for i in picks]


def apply_overrides(profile: DeviceProfile, overrides: Mapping[str, Any]) -> DeviceProfile:
    if not overrides:
        return profile
    return parse_profile({**asdict(profile), **dict(overrides)}, f"profile {profile.name!r} with overrides")


def build_fleet(cfg: FleetConfig) -> list[SimDevice]:
    names = cfg.profiles or tuple(available())
    if not names:
        raise ConfigError("fleet: no device profiles found; pass profile files explicitly")
    classes = [apply_overrides(p, cfg.overrides) for p in speed_classes([load_profile(n) for n in names], cfg.classes)]
    if cfg.class_ranks:
        classes = [apply_overrides(p, {"max_rank": k}) for p, k in zip(classes, cfg.class_ranks, strict=True)]
    return [
        SimDevice(device_id=f"dev-{i:02d}", index=i, profile=classes[i % len(classes)], device_class=i % len(classes))
        for i in range(cfg.devices)
    ]


def speed_span(devices: Sequence[SimDevice]) -> float:
    """Fastest / slowest step_speed in the fleet."""
    speeds = [d.profile.step_speed for d in devices]
    return max(speeds) / min(speeds)
