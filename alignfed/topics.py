"""MQTT topic templates under `alignfed/{federation}/` and their parsing (DESIGN.md section 4)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from alignfed.errors import ConfigError

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_id(value: str, what: str) -> str:
    """Federation and device ids become topic levels: no '/', '+', '#', spaces; 1–64 chars."""
    if not _ID.match(value):
        raise ConfigError(
            f"{what} {value!r} is not valid: expected 1-64 characters from A-Z a-z 0-9 _ . - "
            "starting with a letter or digit"
        )
    return value


@dataclass(frozen=True, slots=True)
class Topics:
    federation: str

    def __post_init__(self) -> None:
        check_id(self.federation, "federation id")

    @property
    def root(self) -> str:
        return f"alignfed/{self.federation}"

    @property
    def global_adapter(self) -> str:
        return f"{self.root}/global/adapter"

    @property
    def global_delta(self) -> str:
        """The newest version as a quantized delta of the one before (retained; alignfed.downlink)."""
        return f"{self.root}/global/delta"

    @property
    def global_status(self) -> str:
        return f"{self.root}/global/status"

    def update(self, device_id: str) -> str:
        return f"{self.root}/devices/{device_id}/update"

    def ack(self, device_id: str) -> str:
        return f"{self.root}/devices/{device_id}/ack"

    def device_status(self, device_id: str) -> str:
        return f"{self.root}/devices/{device_id}/status"

    @property
    def all_updates(self) -> str:
        """Subscription filter for every device's updates."""
        return f"{self.root}/devices/+/update"

    @property
    def all_device_status(self) -> str:
        return f"{self.root}/devices/+/status"

    def device_of(self, topic: str) -> str | None:
        """`alignfed/f/devices/dev-1/update` -> 'dev-1'; None if the topic is not a device topic."""
        prefix = f"{self.root}/devices/"
        if not topic.startswith(prefix):
            return None
        rest = topic[len(prefix) :].split("/")
        if len(rest) != 2 or not _ID.match(rest[0]):
            return None
        return rest[0]
