"""Device registration: HMAC keys in the store, Mosquitto passwords and ACL entries.

A device may publish only to its own `update` and `status` topics and read its own acks and the
global topics (DESIGN.md section 8). The coordinator's own broker user needs `coordinator_acl`.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from pathlib import Path

from alignfed.errors import ConfigError
from alignfed.profiles import load_profile
from alignfed.topics import Topics, check_id
from coordinator.backend import open_store
from coordinator.config import CoordinatorConfig


def device_acl(topics: Topics, device_id: str) -> str:
    return "\n".join(
        [
            f"user {device_id}",
            f"topic write {topics.update(device_id)}",
            f"topic write {topics.device_status(device_id)}",
            f"topic read {topics.ack(device_id)}",
            f"topic read {topics.root}/global/#",
            "",
        ]
    )


def coordinator_acl(topics: Topics, username: str) -> str:
    return f"user {username}\ntopic readwrite {topics.root}/#\n"


def set_password(passwd_file: Path, username: str, password: str) -> None:
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(tool).exists():
        raise ConfigError("mosquitto_passwd not found; install the mosquitto package")
    args = [tool, "-b", str(passwd_file), username, password]
    if not Path(passwd_file).exists():
        args.insert(1, "-c")
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ConfigError(f"mosquitto_passwd failed for {passwd_file}: {done.stderr.strip()}")


def add_device(
    cfg: CoordinatorConfig,
    device_id: str,
    profile: str,
    *,
    passwd_file: str | None = None,
    acl_file: str | None = None,
) -> str:
    """Register a device; returns its credentials as JSON (key, broker username and password)."""
    check_id(device_id, "device id")
    profile_name = load_profile(profile).name  # fail early on an unknown profile
    key = secrets.token_hex(32)
    store = open_store(cfg.database)
    try:
        store.add_device(device_id, key, profile_name)
    finally:
        store.close()
    password = ""
    if passwd_file:
        password = secrets.token_urlsafe(18)
        set_password(Path(passwd_file), device_id, password)
    if acl_file:
        with open(acl_file, "a") as f:
            f.write("\n" + device_acl(Topics(cfg.federation), device_id))
    return json.dumps(
        {"device_id": device_id, "key": key, "username": device_id if passwd_file else "", "password": password}
    )
