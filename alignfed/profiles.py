"""Device profiles: what a class of device can spend on federated fine-tuning.

One TOML file per device class lives in `firmware_profiles/`. A profile bounds the edge daemon
(threads, batch, sequence length, local steps, memory, duty cycle) and tells the simulator how fast
the device trains and how fast its link is.
"""

from __future__ import annotations

import tomllib
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from alignfed.errors import ConfigError

PROFILE_DIR = Path(__file__).resolve().parent.parent / "firmware_profiles"


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    name: str
    description: str
    arch: str  # "x86_64" | "aarch64"
    trainer: str  # "ort" | "torch": which training backend the device runs
    threads: int
    memory_mb: int  # RAM the daemon may use; the daemon refuses bundles that don't fit
    batch: int
    seq_len: int
    local_steps: int  # optimizer steps per round
    lr: float
    duty_cycle: float  # fraction of wall time the device may train (0, 1]
    step_speed: float  # relative training speed (x86 laptop = 1.0); the simulator charges time by it
    uplink_kbps: float
    downlink_kbps: float
    latency_ms: float
    availability: float  # probability the device is online for a round (simulator)
    quantization: str = "int8"  # training base the device can afford: "int8" | "fp32"
    # Lean training (torch backend): "layers" recomputes each decoder layer in backward instead of
    # keeping its activations (less memory, ~1/3 more compute); "none" keeps them.
    checkpointing: str = "none"
    # The largest base this device trains at its batch × seq_len within memory_mb, as measured by
    # benchmarks/bench_lean.py (BENCHMARKS.md); `flash` refuses bundles whose estimate exceeds memory_mb.
    largest_model: str = ""


_RANGES: dict[str, tuple[float, float]] = {
    "threads": (1, 256),
    "memory_mb": (64, 1 << 20),
    "batch": (1, 1024),
    "seq_len": (8, 32768),
    "local_steps": (1, 100000),
    "lr": (1e-8, 1.0),
    "duty_cycle": (1e-3, 1.0),
    "step_speed": (1e-4, 1e4),
    "uplink_kbps": (1.0, 1e8),
    "downlink_kbps": (1.0, 1e8),
    "latency_ms": (0.0, 1e6),
    "availability": (0.0, 1.0),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "arch": ("x86_64", "aarch64"),
    "trainer": ("ort", "torch"),
    "quantization": ("int8", "fp32"),
    "checkpointing": ("none", "layers"),
}


def parse_profile(raw: dict[str, Any], source: str) -> DeviceProfile:
    """Build a profile from a TOML table, naming the file, field, expected and actual value."""
    known = {f.name: f for f in fields(DeviceProfile)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown}; expected some of {sorted(known)}")
    values: dict[str, Any] = {}
    for name, f in known.items():
        if name not in raw:
            if f.default is not MISSING:
                continue
            raise ConfigError(f"{source}: missing field {name!r}")
        value: Any = raw[name]
        typ: type = {"int": int, "float": float, "str": str}[str(f.type)]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise ConfigError(f"{source}: field {name!r} = {value!r}; expected a {typ.__name__}")
        if name in _RANGES:
            lo, hi = _RANGES[name]
            if not lo <= float(raw[name]) <= hi:
                raise ConfigError(f"{source}: field {name!r} = {value!r}; expected {lo} ≤ value ≤ {hi}")
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ConfigError(f"{source}: field {name!r} = {value!r}; expected one of {list(_CHOICES[name])}")
        values[name] = value
    return DeviceProfile(**values)


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load `firmware_profiles/<name>.toml`, or a profile file given by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ConfigError(f"no device profile {name_or_path!r}; available: {', '.join(available())}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from exc
    return parse_profile(raw, str(path))


def available() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))
