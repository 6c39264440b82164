"""Lay out a whole federation in one folder: a coordinator config, registered devices, device configs.

Used by `alignfed demo` and by the integration tests, so both exercise exactly what an operator
does by hand (`coordinator add-device`, then `flash` per device).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignfed import tomlfile
from coordinator import config as ccfg
from coordinator.devices import add_device
from edge.flash import flash


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    device_id: str
    profile: str  # a name from firmware_profiles/ or a path to a profile file
    data: Path
    extra: dict[str, Any] = field(default_factory=dict)  # more device.toml fields (max_rounds, ...)


@dataclass(frozen=True, slots=True)
class LocalFederation:
    root: Path
    coordinator_config: Path
    device_configs: dict[str, Path]


def lay_out(
    root: Path,
    *,
    bundle: Path,
    broker_url: str,
    devices: list[DeviceSpec],
    federation: str = "demo",
    strategy: dict[str, Any] | None = None,
    ingest: dict[str, Any] | None = None,
    dashboard: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
) -> LocalFederation:
    root.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {
        "federation": federation,
        "bundle": str(bundle.resolve()),
        "database": str((root / "coordinator" / "coordinator.sqlite").resolve()),
        "broker": {"url": broker_url},
        "strategy": strategy or {"name": "fedbuff", "k": 3, "server_lr": 1.0},
    }
    if ingest:
        doc["ingest"] = ingest
    if dashboard is not None:  # [dashboard]: the coordinator's page and /metrics
        doc["dashboard"] = dashboard
    if calibration is not None:
        doc["calibration"] = calibration
    coord_path = tomlfile.write(root / "coordinator" / "coordinator.toml", doc)
    cfg = ccfg.load(coord_path)
    paths: dict[str, Path] = {}
    for spec in devices:
        creds = json.loads(add_device(cfg, spec.device_id, spec.profile))
        paths[spec.device_id] = flash(
            profile=spec.profile,
            device_id=spec.device_id,
            federation=federation,
            broker=broker_url,
            bundle=bundle,
            data=spec.data,
            target=root / spec.device_id,
            key=creds["key"],
            extra=spec.extra,
        )
    return LocalFederation(root=root, coordinator_config=coord_path, device_configs=paths)
