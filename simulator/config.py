"""How one simulated run is set up: horizon, wire format, evaluation cadence, timing, attacks and
the coordinator's ingest limits. Checked on construction; errors name the field and the value."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from alignfed import protocol
from alignfed.errors import ConfigError
from coordinator.ingest import IngestLimits
from simulator import attacks
from simulator.timing import Timing

OptimizerScope = Literal["round", "device"]


DOWNLINK_FEEDBACK = ("carry", "residual", "off")


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    horizon_s: float = 3600.0  # virtual seconds to simulate
    max_versions: int = 0  # stop after this many aggregations (0: no limit)
    wall_limit_s: float = 0.0  # stop a run after this many wall seconds, at the virtual time reached (0: none)
    wire_quantization: str = "int8c"  # how update factors travel: "int8c" | "int8" | "fp32"
    wire_codec: str = "deflate"  # envelope of each update: "deflate" | "none" (lossless)
    delta_rank: int = 0  # rank of the sent delta factors; 0 = exact (2r)
    delta_feedback: bool = True  # devices carry what compression drops into their next update
    carry_rank: int = 0  # rank of that carry per layer; 0 = the sent rank
    # how new versions reach devices: "snapshot" (the full float32 adapter every version) or the
    # quantization of version-to-version deltas ("int4c" | "int8c" | "fp32"; alignfed.downlink)
    downlink: str = "snapshot"
    # where a delta downlink's quantization error goes: "carry" (factor space, added to the next
    # version's change), "residual" (product space, into the strategy's error feedback) or "off"
    downlink_feedback: str = "carry"
    poll_s: float = 1.0  # re-check `ready` this often while updates are buffered
    optimizer: OptimizerScope = "round"  # AdamW moments: fresh every round, or kept per device
    eval_every: int = 1  # evaluate every n-th version (and always the last)
    eval_interval_s: float = 0.0  # ... and only if this many virtual seconds passed since the last one
    accuracy_every: int = 0  # call the accuracy hook every n-th version too (0: final adapter only)
    timing: Timing = field(default_factory=Timing)
    seed: int = 0
    byzantine: float = 0.0  # fraction of devices that send hostile, correctly signed updates
    attack: str = "scale"  # what they send: scale | signflip | random | mixed (simulator.attacks)
    limits: IngestLimits = field(default_factory=IngestLimits)  # the coordinator's ingest checks

    def __post_init__(self) -> None:
        if not (math.isfinite(self.horizon_s) and self.horizon_s > 0):
            raise ConfigError(f"simulation: horizon_s must be > 0 seconds, got {self.horizon_s}")
        if self.max_versions < 0:
            raise ConfigError(f"simulation: max_versions must be ≥ 0 (0 = no limit), got {self.max_versions}")
        if not (math.isfinite(self.wall_limit_s) and self.wall_limit_s >= 0):
            raise ConfigError(f"simulation: wall_limit_s must be ≥ 0 seconds (0 = none), got {self.wall_limit_s}")
        if self.wire_quantization not in protocol.QUANTIZATIONS:
            raise ConfigError(
                f"simulation: wire_quantization must be one of {', '.join(protocol.QUANTIZATIONS)}, "
                f"got {self.wire_quantization!r}"
            )
        if self.wire_codec not in protocol.CODECS:
            raise ConfigError(
                f"simulation: wire_codec must be one of {', '.join(protocol.CODECS)}, got {self.wire_codec!r}"
            )
        if self.delta_rank < 0 or self.carry_rank < 0:
            raise ConfigError(
                f"simulation: delta_rank and carry_rank must be ≥ 0, got {self.delta_rank}, {self.carry_rank}"
            )
        if self.downlink not in ("snapshot", *protocol.DOWNLINK_QUANTIZATIONS):
            raise ConfigError(
                f"simulation: downlink must be 'snapshot' or one of {', '.join(protocol.DOWNLINK_QUANTIZATIONS)}, "
                f"got {self.downlink!r}"
            )
        if self.downlink_feedback not in DOWNLINK_FEEDBACK:
            raise ConfigError(
                f"simulation: downlink_feedback must be one of {', '.join(DOWNLINK_FEEDBACK)}, "
                f"got {self.downlink_feedback!r}"
            )
        if not self.poll_s > 0:
            raise ConfigError(f"simulation: poll_s must be > 0 seconds, got {self.poll_s}")
        if self.optimizer not in ("round", "device"):
            raise ConfigError(f"simulation: optimizer must be 'round' or 'device', got {self.optimizer!r}")
        if not (math.isfinite(self.eval_interval_s) and self.eval_interval_s >= 0):
            raise ConfigError(f"simulation: eval_interval_s must be ≥ 0 seconds, got {self.eval_interval_s}")
        attacks.check(self.byzantine, self.attack)
        if not self.limits.max_delta_norm > 0 or self.limits.tau_max < 0:
            raise ConfigError(
                f"simulation: limits need max_delta_norm > 0 and tau_max ≥ 0, got {self.limits.max_delta_norm}, "
                f"{self.limits.tau_max}"
            )
        if self.eval_every < 1 or self.accuracy_every < 0:
            raise ConfigError(
                f"simulation: eval_every must be ≥ 1 and accuracy_every ≥ 0, got {self.eval_every}, "
                f"{self.accuracy_every}"
            )
