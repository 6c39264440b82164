"""`alignfed flash`: write a device's config (and systemd unit) from a firmware profile."""

from __future__ import annotations

import sys
from pathlib import Path

from alignfed import manifest as mf
from alignfed import tomlfile
from alignfed.errors import ConfigError
from alignfed.profiles import check_arch, load_profile
from alignfed.topics import check_id
from alignfed.transport import BrokerConfig
from edge.allocator import unit_environment
from edge.memory_fit import check_fits
from edge.openai_api import write_serve_unit

_UNIT = """[Unit]
Description=AlignFed edge daemon ({device_id})
After=network-online.target
Wants=network-online.target

[Service]
{environment}ExecStart={python} -m alignfed.cli edge --config {config}
Restart=always
RestartSec=10
Nice=10

[Install]
WantedBy=multi-user.target
"""


def flash(
    *,
    profile: str,
    device_id: str,
    federation: str,
    broker: str,
    bundle: Path,
    data: Path,
    target: Path,
    key: str,
    username: str = "",
    password: str = "",
    ca_file: str = "",
    extra: dict[str, object] | None = None,
) -> Path:
    prof = load_profile(profile)
    check_arch(prof)  # an x86_64 profile on a Pi would install fine and fail at the first step
    check_id(device_id, "device id")
    check_id(federation, "federation id")
    # Everything the daemon would refuse at boot is refused now, on the operator's terminal.
    manifest = mf.load(bundle)
    mf.verify(bundle, manifest)  # every file present with the manifest's sha256
    if not Path(data).is_file():
        raise ConfigError(f"--data {str(data)!r}: no such file (local training data, .jsonl, .json or text)")
    BrokerConfig(broker).endpoint()  # mqtt://host:port or mqtts://host:port
    check_fits(manifest, prof, bundle)  # a bundle that trains within the profile's memory, or the numbers now
    try:
        bytes.fromhex(key)
    except ValueError as exc:
        raise ConfigError(
            f"--key must be the hex key printed by `alignfed coordinator add-device`, got {key!r}"
        ) from exc
    target.mkdir(parents=True, exist_ok=True)
    doc: dict[str, object] = {
        "device_id": device_id,
        "federation": federation,
        "profile": str(Path(profile).resolve()) if Path(profile).suffix else prof.name,
        "bundle": str(bundle.resolve()),
        "data": str(data.resolve()),
        "state_dir": str((target / "state").resolve()),
        "key": key,
        **(extra or {}),
        "broker": {"url": broker, "username": username, "password": password, "ca_file": ca_file},
    }
    config = tomlfile.write(target / "device.toml", doc)
    (target / "alignfed-edge.service").write_text(
        _UNIT.format(
            device_id=device_id, python=sys.executable, config=config.resolve(), environment=unit_environment()
        )
    )
    write_serve_unit(target, device_id=device_id, python=sys.executable, config=config, host="127.0.0.1", port=8080)
    return config
