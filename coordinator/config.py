"""Coordinator configuration (`coordinator.toml`), validated on load."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignfed import tomlfile
from alignfed.errors import ConfigError
from alignfed.topics import check_id
from alignfed.transport import BrokerConfig
from coordinator.ingest import IngestLimits


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
    calibration_data: Path | None = None  # JSONL/text for the alignment mini-batch (alignfed strategy)
    calibration_tokens: int = 256


def _database(value: str, rel: Any) -> Path | str:
    return value if value.startswith(("postgresql://", "postgres://")) else Path(rel(value))


def load(path: Path) -> CoordinatorConfig:
    raw = tomlfile.read(path)
    base = Path(path).resolve().parent

    def need(table: dict[str, Any], name: str, where: str) -> Any:
        if name not in table:
            raise ConfigError(f"{path}: missing field {where}{name!r}")
        return table[name]

    def rel(p: str) -> Path:
        q = Path(p)
        return q if q.is_absolute() else base / q

    broker_raw = raw.get("broker", {})
    strat = dict(raw.get("strategy", {}))
    name = strat.pop("name", "fedbuff")
    lim = raw.get("ingest", {})
    casts = {"max_payload_bytes": int, "max_delta_norm": float, "tau_max": int}
    unknown = sorted(set(lim) - set(casts))
    if unknown:
        raise ConfigError(f"{path}: [ingest] unknown field(s) {unknown}; expected some of {sorted(casts)}")
    values: dict[str, Any] = {}
    for field_name, cast in casts.items():
        if field_name in lim:
            value = lim[field_name]
            try:
                values[field_name] = cast(value)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{path}: [ingest].{field_name} = {value!r}; expected a {cast.__name__}") from exc
            if values[field_name] < 0:
                raise ConfigError(f"{path}: [ingest].{field_name} = {value!r}; expected a value ≥ 0")
    limits = IngestLimits(**values)
    calib = raw.get("calibration", {})
    return CoordinatorConfig(
        federation=check_id(str(need(raw, "federation", "")), "federation id"),
        bundle=rel(str(need(raw, "bundle", ""))),
        database=_database(str(raw.get("database", "coordinator.sqlite")), rel),
        broker=BrokerConfig(
            url=str(need(broker_raw, "url", "[broker].")),
            username=str(broker_raw.get("username", "")),
            password=str(broker_raw.get("password", "")),
            ca_file=str(broker_raw.get("ca_file", "")),
        ),
        strategy=name,
        strategy_options=strat,
        limits=limits,
        client_id=str(raw.get("client_id", "alignfed-coordinator")),
        calibration_data=rel(calib["data"]) if "data" in calib else None,
        calibration_tokens=int(calib.get("tokens", 256)),
    )
