"""The `[dashboard]` table (coordinator.toml) and `--dashboard HOST:PORT`, validated on load."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alignfed import tomlfile
from alignfed.errors import ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


@dataclass(frozen=True, slots=True)
class DashboardConfig:
    enabled: bool = True
    host: str = DEFAULT_HOST  # loopback unless configured: the page is for the gateway's operator
    port: int = DEFAULT_PORT  # 0 = any free port
    username: str = ""  # HTTP basic auth on every route when set (advised when bound beyond loopback)
    password: str = ""
    max_device_labels: int = 64  # devices with their own Prometheus series

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def parse(table: dict[str, Any], source: str | Path, *, name: str = "dashboard") -> DashboardConfig:
    """A `[dashboard]` table read by the project's typed loader, plus the checks a type cannot say."""
    values = tomlfile.check_table(table, tomlfile.fields_of(DashboardConfig), source=source, table=name)
    cfg = DashboardConfig(**values)
    where = f"{source}: [{name}]" if name else str(source)
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"{where}.port = {cfg.port}; expected 0-65535")
    if cfg.max_device_labels < 1:
        raise ConfigError(f"{where}.max_device_labels = {cfg.max_device_labels}; expected ≥ 1")
    if bool(cfg.username) != bool(cfg.password):
        raise ConfigError(f"{where}: set both username and password for basic auth, or neither")
    return cfg


def parse_address(text: str, where: str = "--dashboard") -> DashboardConfig:
    """'HOST:PORT', ':PORT' or 'PORT' -> an enabled config (no auth: the CLI form is for local runs)."""
    host, _, port = text.rpartition(":")
    try:
        number = int(port)
    except ValueError as exc:
        raise ConfigError(f"{where} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080") from exc
    return parse({"host": host or DEFAULT_HOST, "port": number}, where, name="")
