"""Coordinator configuration (`coordinator.toml`), validated on load by the typed loader.

Strategy options are checked against the chosen strategy's own constructor (or config dataclass),
read by introspection, so an option a strategy gains is accepted here with its type checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignfed import protocol, tomlfile
from alignfed.errors import ConfigError
from alignfed.tomlfile import Field, check_table, subtable
from alignfed.topics import check_id
from alignfed.transport import BrokerConfig
from coordinator import strategies
from coordinator.ingest import IngestLimits
from dashboard import config as dashboard_config

_TOP = {
    "federation": Field("federation", str),
    "bundle": Field("bundle", str),
    "database": Field("database", str, "coordinator.sqlite"),
    "client_id": Field("client_id", str, "alignfed-coordinator"),
    "downlink": Field("downlink", str, "int4c"),
    **{name: Field(name, Any, {}) for name in ("broker", "strategy", "ingest", "calibration", "dashboard")},
}
_BROKER = tomlfile.fields_of(BrokerConfig)
_CALIBRATION = {"data": Field("data", str, ""), "tokens": Field("tokens", int, 256)}


@dataclass(frozen=True, slots=True)
class CoordinatorConfig:
    federation: str
    bundle: Path
    database: Path | str  # an SQLite file, or a postgresql:// URL (coordinator/pgstore.py)
    broker: BrokerConfig
    strategy: str = "fedbuff"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    limits: IngestLimits = field(default_factory=IngestLimits)
    client_id: str = "alignfed-coordinator"
    # new versions also go out as deltas quantized so (alignfed.downlink): "int4c" | "int8c" | "fp32";
    # "snapshot": only the full adapter, as before deltas existed
    downlink: str = "int4c"
    calibration_data: Path | None = None  # JSONL/text for the alignment mini-batch (alignfed strategy)
    calibration_tokens: int = 256
    source: str = "coordinator config"  # the file it was read from, for error messages
    # [dashboard]: the live page and /metrics (dashboard/config.py); on by default, loopback only
    dashboard: dashboard_config.DashboardConfig = field(default_factory=dashboard_config.DashboardConfig)


def strategy_options(raw: dict[str, Any], source: str | Path, *, complete: bool = False) -> tuple[str, dict[str, Any]]:
    """(name, typed options) of a `[strategy]` table; options checked against the strategy's signature.

    Options the strategy requires (fedbuff's k) are only demanded with `complete`, when the
    coordinator builds the strategy: `add-device` reads the same file and needs none of them."""
    options = dict(raw)
    name = options.pop("name", "fedbuff")
    if not isinstance(name, str) or name not in strategies.NAMES:
        raise ConfigError(f"{source}: [strategy].name = {name!r}; expected one of {', '.join(strategies.NAMES)}")
    spec = tomlfile.fields_of(strategies.strategy_class(name))
    return name, check_table(options, spec, source=source, table="strategy", complete=complete)


def _downlink(value: str, source: str | Path) -> str:
    choices = ("snapshot", *protocol.DOWNLINK_QUANTIZATIONS)
    if value not in choices:
        raise ConfigError(f"{source}: downlink = {value!r}; expected one of {', '.join(choices)}")
    return value


def _database(value: str, rel: Any) -> Path | str:
    return value if value.startswith(("postgresql://", "postgres://")) else Path(rel(value))


def load(path: Path) -> CoordinatorConfig:
    raw = tomlfile.read(path)
    base = Path(path).resolve().parent
    top = check_table(raw, _TOP, source=path)

    def rel(p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else base / q

    broker = check_table(subtable(raw, "broker", source=path), _BROKER, source=path, table="broker")
    name, options = strategy_options(subtable(raw, "strategy", source=path), path)
    limits = check_table(
        subtable(raw, "ingest", source=path), tomlfile.fields_of(IngestLimits), source=path, table="ingest"
    )
    for key, value in limits.items():
        if value < 0:
            raise ConfigError(f"{path}: [ingest].{key} = {value!r}; expected a value ≥ 0")
    calib = check_table(subtable(raw, "calibration", source=path), _CALIBRATION, source=path, table="calibration")
    return CoordinatorConfig(
        federation=check_id(top["federation"], "federation id"),
        bundle=rel(top["bundle"]),
        database=_database(top.get("database", "coordinator.sqlite"), rel),
        broker=BrokerConfig(**broker),
        strategy=name,
        strategy_options=options,
        limits=IngestLimits(**limits),
        client_id=top.get("client_id", "alignfed-coordinator"),
        downlink=_downlink(top.get("downlink", "int4c"), path),
        calibration_data=rel(calib["data"]) if calib.get("data") else None,
        calibration_tokens=calib.get("tokens", 256),
        source=str(path),
        dashboard=dashboard_config.parse(subtable(raw, "dashboard", source=path), path),
    )
