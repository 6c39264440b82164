"""A site Mosquitto bridged to a root Mosquitto (the `connection` block of mosquitto.conf)."""

from __future__ import annotations

from pathlib import Path

from alignfed.topics import Topics
from tests.support.broker import Mosquitto


def bridge_lines(name: str, root_port: int, topics: Topics, site_id: str) -> list[str]:
    """Global versions and the site's acks come down; the site's own updates go up; nothing else."""
    return [
        f"connection {name}",
        f"address 127.0.0.1:{root_port}",
        f"remote_clientid bridge-{name}",
        "cleansession false",  # a persistent session at the root: QoS 1 messages wait out a broken link
        "restart_timeout 1 5",
        f"topic {topics.root}/global/# in 1",
        f"topic {topics.update(site_id)} out 1",
        f"topic {topics.ack(site_id)} in 1",
    ]


class BridgedMosquitto(Mosquitto):
    """A Mosquitto whose config ends with extra lines (a bridge `connection` block)."""

    def __init__(self, workdir: Path, extra: list[str]) -> None:
        super().__init__(workdir)
        self.extra = extra

    def _write_conf(self) -> Path:
        conf = super()._write_conf()
        conf.write_text(conf.read_text() + "\n".join(self.extra) + "\n")
        return conf
