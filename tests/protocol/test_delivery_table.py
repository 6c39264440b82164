"""Issue 10, defect 7: docs/protocol.md's topic table says what the code does."""

from __future__ import annotations

import re
from pathlib import Path

from alignfed import protocol
from alignfed.topics import Topics
from alignfed.transport import BrokerConfig, Transport

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
ROW = re.compile(r"^\| `([^`]+)` \| (\d) \| (yes|no) \|")


def documented() -> dict[str, tuple[int, bool]]:
    rows = (ROW.match(line) for line in DOC.read_text().splitlines())
    return {m[1]: (int(m[2]), m[3] == "yes") for m in rows if m}


def test_the_documented_table_is_the_codes_table() -> None:
    assert documented() == protocol.DELIVERY


def test_status_topics_match_the_last_will_they_carry() -> None:
    """A status topic's will and its ordinary messages share QoS and retain flag."""
    will = Transport(BrokerConfig("mqtt://127.0.0.1:1"), "t", will=("a/b", b"offline"))._client
    assert (will._will_qos, will._will_retain) == protocol.DELIVERY["devices/{id}/status"]
    assert (will._will_qos, will._will_retain) == protocol.DELIVERY["global/status"]


def test_every_topic_in_the_table_is_a_topic_of_the_code() -> None:
    t = Topics("f")
    made = {t.global_adapter, t.global_delta, t.global_status, t.update("{id}"), t.ack("{id}"), t.device_status("{id}")}
    assert {f"{t.root}/{name}" for name in protocol.DELIVERY} == made
