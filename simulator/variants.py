"""Named strategy variants: which strategy, with which options, each experiment row runs.

| variant                 | strategy         | options (beyond the shared ones)       |
|-------------------------|------------------|----------------------------------------|
| `fedavg`                | `fedavg`         | n = every device (synchronous rounds)  |
| `fedasync`              | `fedasync`       |                                        |
| `fedbuff`               | `fedbuff`        | k                                      |
| `fedstaleweight`        | `fedstaleweight` | k                                      |
| `alignfed`              | `alignfed`       | k                                      |
| `alignfed-no-grouping`  | `alignfed`       | k, grouping = false                    |
| `alignfed-no-alignment` | `alignfed`       | k, alignment = false                   |
| `alignfed-no-fairness`  | `alignfed`       | k, fairness = false                    |
| `alignfed-qrcp`         | `alignfed`       | k, method = "qrcp"                     |
| `alignfed-cur`          | `alignfed`       | k, method = "cur"                      |

Robust variants (not in `all`): `STRATEGY+ROBUST` for a buffered variant and one of
`median`, `trimmed` (trimmed mean, 20 % cut at each end), `clip` (clip to the median norm) and
`outlier` (drop updates above 3× the median norm), e.g. `fedbuff+median`, `alignfed+outlier`.

The options are constructor options of `coordinator.strategies.build`, the same the live
coordinator reads from `[strategy]` in coordinator.toml. Overrides `TARGET.KEY=VALUE` change an
option of every variant whose name or strategy is TARGET (`alignfed.tau_max=16` applies to all
six AlignFed variants, `alignfed-cur.k=4` to one). Light on imports, so the CLI parser can use it.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from alignfed.errors import ConfigError

VARIANT_NAMES: tuple[str, ...] = (
    "fedavg",
    "fedasync",
    "fedbuff",
    "fedstaleweight",
    "alignfed",
    "alignfed-no-grouping",
    "alignfed-no-alignment",
    "alignfed-no-fairness",
    "alignfed-qrcp",
    "alignfed-cur",
)

# AlignFed variant -> the config fields that make it
ALIGNFED_VARIANTS: dict[str, dict[str, Any]] = {
    "alignfed": {},
    "alignfed-no-grouping": {"grouping": False},
    "alignfed-no-alignment": {"alignment": False},
    "alignfed-no-fairness": {"fairness": False},
    "alignfed-qrcp": {"method": "qrcp"},
    "alignfed-cur": {"method": "cur"},
}


# robust suffix -> the options it adds (coordinator.strategies.robust)
ROBUST_VARIANTS: dict[str, dict[str, Any]] = {
    "median": {"aggregator": "median"},
    "trimmed": {"aggregator": "trimmed_mean"},
    "clip": {"clip_relative": 1.0},
    "outlier": {"outlier_factor": 3.0},
}


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    strategy: str  # a name in coordinator.strategies.REGISTRY
    options: Mapping[str, Any] = field(default_factory=dict)  # constructor options
    synchronous: bool = False  # devices wait for a newer version before the next round (fedavg)


def default_k(devices: int) -> int:
    """Buffer size K of the buffered strategies: a third of the fleet, at least 2 (at most N)."""
    return max(1, min(devices, max(2, round(devices / 3))))


def standard_variant(name: str, *, devices: int, k: int) -> Variant:
    base, plus, robust = name.partition("+")
    if plus:
        if robust not in ROBUST_VARIANTS:
            raise ConfigError(f"variant {name!r}: robust suffix must be one of {', '.join(ROBUST_VARIANTS)}")
        v = standard_variant(base, devices=devices, k=k)
        return Variant(name, v.strategy, {**v.options, **ROBUST_VARIANTS[robust]}, v.synchronous)
    if name == "fedavg":
        return Variant(name, "fedavg", {"n": devices}, synchronous=True)
    if name == "fedasync":
        return Variant(name, "fedasync", {})
    if name in ("fedbuff", "fedstaleweight"):
        return Variant(name, name, {"k": k})
    if name in ALIGNFED_VARIANTS:
        return Variant(name, "alignfed", {"k": k, **ALIGNFED_VARIANTS[name]})
    raise ConfigError(f"unknown variant {name!r}; expected 'all' or some of {', '.join(VARIANT_NAMES)}")


def parse_override(spec: str) -> tuple[str, str, Any]:
    """`TARGET.KEY=VALUE` -> (target, key, value); VALUE is read as a TOML value, else as a string."""
    left, sep, raw = spec.partition("=")
    target, dot, key = left.strip().rpartition(".")
    if not (sep and dot and target and key):
        raise ConfigError(f"--set {spec!r}: expected TARGET.KEY=VALUE, e.g. alignfed.tau_max=16")
    try:
        value: Any = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return target, key.strip(), value


def select_variants(
    names: Sequence[str], *, devices: int, k: int | None = None, overrides: Sequence[str] = ()
) -> list[Variant]:
    """The variants named (`all` = every standard variant), with `--set` overrides applied."""
    wanted: list[str] = []
    for n in names:
        for part in (p.strip() for p in n.split(",")):
            if not part:
                continue
            for v in VARIANT_NAMES if part == "all" else (part,):
                if v not in wanted:
                    wanted.append(v)
    if not wanted:
        raise ConfigError("no variants selected; expected 'all' or some of " + ", ".join(VARIANT_NAMES))
    from coordinator.strategies import NAMES as STRATEGY_NAMES  # here: the registry pulls in numpy

    kk = default_k(devices) if k is None else k
    variants = [standard_variant(n, devices=devices, k=kk) for n in wanted]
    for spec in overrides:
        target, key, value = parse_override(spec)
        hits = [i for i, v in enumerate(variants) if target in (v.name, v.strategy)]
        if not hits and target not in (*VARIANT_NAMES, *STRATEGY_NAMES):
            raise ConfigError(f"--set {spec!r}: {target!r} is neither a variant nor a strategy")
        for i in hits:
            old = variants[i]
            variants[i] = Variant(old.name, old.strategy, {**old.options, key: value}, old.synchronous)
    return variants
