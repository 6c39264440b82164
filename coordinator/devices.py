"""Device registration: HMAC keys in the store, Mosquitto passwords and ACL entries.

A device may publish only to its own `update` and `status` topics and read its own acks and the
global topics (DESIGN.md section 8). The coordinator's own broker user (`init_broker`, once per
federation) may read and write everything under the federation's root. `remove_device` undoes
`add_device`: password, ACL block and key go, and the coordinator answers the device's updates
"unknown device". Mosquitto reads its password and ACL files at start and on SIGHUP.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
from pathlib import Path

from alignfed import atomic, tomlfile
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


def _passwd_tool() -> str:
    tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    if not Path(tool).exists():
        raise ConfigError("mosquitto_passwd not found; install the mosquitto package")
    return tool


def set_password(passwd_file: Path, username: str, password: str) -> None:
    args = [_passwd_tool(), "-b", str(passwd_file), username, password]
    if not Path(passwd_file).exists():
        args.insert(1, "-c")
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ConfigError(f"mosquitto_passwd failed for {passwd_file}: {done.stderr.strip()}")


def delete_password(passwd_file: Path, username: str) -> bool:
    """Remove a user from a Mosquitto password file; False if it was not there."""
    if not Path(passwd_file).exists():
        return False
    done = subprocess.run([_passwd_tool(), "-D", str(passwd_file), username], capture_output=True, text=True)
    return done.returncode == 0


def acl_users(acl_file: Path) -> list[str]:
    """The users that have a block in a Mosquitto ACL file."""
    if not Path(acl_file).exists():
        return []
    return [line.split(None, 1)[1].strip() for line in Path(acl_file).read_text().splitlines() if _is_user(line)]


def _is_user(line: str) -> bool:
    return line.startswith("user ") and len(line.split(None, 1)) == 2


def remove_acl_user(acl_file: Path, username: str) -> bool:
    """Drop `user <username>` and its topic lines (up to the next `user` or `pattern` line)."""
    path = Path(acl_file)
    if not path.exists():
        return False
    kept: list[str] = []
    dropping = found = False
    for line in path.read_text().splitlines():
        if _is_user(line) or line.startswith("pattern "):
            dropping = _is_user(line) and line.split(None, 1)[1].strip() == username
            found = found or dropping
        if not dropping:
            kept.append(line)
    atomic.write_text(path, "\n".join(kept).strip("\n") + "\n", mode=path.stat().st_mode & 0o777)
    return found


def init_broker(config_path: Path, *, passwd_file: str, acl_file: str, username: str = "alignfed-coordinator") -> str:
    """Create the coordinator's own broker user and ACL for a broker with `allow_anonymous false`.

    Writes a fresh password for `username` into the password file, its ACL block (readwrite on the
    federation's root) into the ACL file, and the credentials into coordinator.toml's [broker]
    table (the file is rewritten: comments are not kept). Running it again replaces the password.
    Returns the credentials as JSON."""
    from coordinator import config as ccfg

    cfg = ccfg.load(config_path)
    check_id(username, "broker username")
    password = secrets.token_urlsafe(18)
    set_password(Path(passwd_file), username, password)
    remove_acl_user(Path(acl_file), username)
    with open(acl_file, "a") as f:
        f.write("\n" + coordinator_acl(Topics(cfg.federation), username))
    raw = tomlfile.read(config_path)
    raw["broker"] = {**raw.get("broker", {}), "username": username, "password": password}
    tomlfile.write(config_path, raw)
    return json.dumps({"username": username, "password": password, "config": str(config_path)})


def remove_device(
    cfg: CoordinatorConfig, device_id: str, *, passwd_file: str | None = None, acl_file: str | None = None
) -> str:
    """Revoke a device: its key (the coordinator then rejects its updates as from an unknown device),
    its broker password and its ACL block. Returns what was removed, as JSON."""
    check_id(device_id, "device id")
    store = open_store(cfg.database)
    try:
        key = store.remove_device(device_id)
    finally:
        store.close()
    password = delete_password(Path(passwd_file), device_id) if passwd_file else False
    acl = remove_acl_user(Path(acl_file), device_id) if acl_file else False
    if not (key or password or acl):
        raise ConfigError(f"device {device_id!r} is not registered (no key, password or ACL entry found)")
    return json.dumps({"device_id": device_id, "key": key, "password": password, "acl": acl})


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
