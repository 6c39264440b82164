"""Device profiles: what a class of device can spend on federated fine-tuning.

One TOML file per device class lives in `alignfed/firmware_profiles/` (package data, so a wheel or
a non-editable install carries them). A profile bounds the edge daemon (threads, batch, sequence
length, local steps, memory, duty cycle) and tells the simulator how fast the device trains and how
fast its link is.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from alignfed import tomlfile
from alignfed.errors import ConfigError

# Resolved through the package, not the source tree: `pip install .` copies them into site-packages.
PROFILE_DIR = Path(str(resources.files("alignfed") / "firmware_profiles"))


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
    accelerator: str = "cpu"  # "cpu" | "cuda": where the torch backend may train (Jetson: "cuda", CPU fallback)
    # Lean training (torch backend): "layers" recomputes each decoder layer in backward instead of
    # keeping its activations (less memory, ~1/3 more compute); "none" keeps them.
    checkpointing: str = "none"
    # Lean training (torch backend): "int8" keeps the embedding table and the LM head int8 per row
    # (a quarter of float32; numbers then differ from the ORT backend's by that rounding).
    embedding: str = "fp32"
    # Lean training: tokens per chunk of the LM head and loss; chunk × vocab floats exist three times
    # over while it runs (logits, log-softmax, softmax), so a smaller chunk trades head passes for memory.
    loss_chunk: int = 128
    # The largest base this device trains at its batch × seq_len within memory_mb, as measured by
    # benchmarks/bench_lean.py (BENCHMARKS.md); `flash` refuses bundles whose estimate exceeds memory_mb.
    largest_model: str = ""
    # Cap on the LoRA rank this device trains (0: the bundle's rank r). A capped device trains the
    # global adapter truncated to its best rank-k approximation and sends an update of rank k
    # (`lora_rank`, docs/decisions.md "Heterogeneous LoRA ranks").
    max_rank: int = 0


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
    "max_rank": (0, 4096),
    "loss_chunk": (8, 4096),
}
_CHOICES: dict[str, tuple[str, ...]] = {
    "arch": ("x86_64", "aarch64"),
    "trainer": ("ort", "torch"),
    "quantization": ("int8", "fp32"),
    "accelerator": ("cpu", "cuda"),
    "checkpointing": ("none", "layers"),
    "embedding": ("fp32", "int8"),
}


def parse_profile(raw: dict[str, Any], source: str) -> DeviceProfile:
    """Build a profile from a TOML table, naming the file, field, expected and actual value."""
    values = tomlfile.check_table(raw, tomlfile.fields_of(DeviceProfile), source=source)
    for name, value in values.items():
        if name in _RANGES:
            lo, hi = _RANGES[name]
            if not lo <= float(value) <= hi:
                raise ConfigError(f"{source}: {name} = {value!r}; expected {lo} ≤ value ≤ {hi}")
        if name in _CHOICES and value not in _CHOICES[name]:
            raise ConfigError(f"{source}: {name} = {value!r}; expected one of {list(_CHOICES[name])}")
    return DeviceProfile(**values)


def lora_rank(profile: DeviceProfile, bundle_rank: int) -> int:
    """The LoRA rank a device of this profile trains at: the bundle's rank r, or the profile's cap if lower."""
    return min(profile.max_rank, bundle_rank) if profile.max_rank > 0 else bundle_rank


def capped_delta_rank(delta_rank: int, rank: int, bundle_rank: int) -> int:
    """The uplink's delta rank (0: exact) for a device training at LoRA rank `rank`: a rank-k device's
    delta has rank ≤ 2k, and ingest refuses factors wider than that, so a capped device sends ≤ 2k."""
    if rank >= bundle_rank:
        return delta_rank
    return min(delta_rank or 2 * rank, 2 * rank)


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """Load `firmware_profiles/<name>.toml`, or a profile file given by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ConfigError(f"no device profile {name_or_path!r}; available: {', '.join(available())}")
    return parse_profile(tomlfile.read(path), str(path))


def available() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


# platform.machine() spellings of the two architectures a profile can name.
_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def host_arch() -> str:
    """This machine's architecture in a profile's spelling ("x86_64" | "aarch64"), or as the OS says it."""
    machine = platform.machine()
    return _MACHINES.get(machine.lower(), machine)


def check_arch(profile: DeviceProfile, machine: str | None = None) -> None:
    """Refuse a profile made for another CPU architecture than `machine` (default: this machine).

    The backends differ by architecture (ORT training on x86_64, torch on aarch64), so a wrong profile
    would install fine and fail only when the daemon starts training.
    """
    here = machine or host_arch()
    if profile.arch == here:
        return
    fits = [n for n in available() if _arch_of(n) == here]
    raise ConfigError(
        f"profile {profile.name!r} is for {profile.arch} devices, this machine is {here}; "
        f"choose a profile for {here}: {', '.join(fits) or '(none shipped)'}"
    )


def _arch_of(name: str) -> str | None:
    try:
        return load_profile(name).arch
    except ConfigError:
        return None
