"""Issue 10, defect 1: no message, however malformed, gets anything but a ProtocolError out of a decoder."""

from __future__ import annotations

import re

import pytest

from alignfed import protocol
from alignfed.errors import ProtocolError
from tests.support.hostile import HOSTILE_JSON_MESSAGES, HOSTILE_TENSOR_MESSAGES

LIMIT = 1 << 20


@pytest.mark.parametrize("name", sorted(HOSTILE_TENSOR_MESSAGES))
@pytest.mark.parametrize("decoder", ["unpack", "decode_update", "decode_global"])
def test_hostile_tensor_message_is_a_protocol_error(name: str, decoder: str) -> None:
    if decoder == "unpack" and name.startswith(("global with", "update with")):
        pytest.skip("well framed: only the message decoders can refuse its header fields")
    with pytest.raises(ProtocolError) as info:
        getattr(protocol, decoder)(HOSTILE_TENSOR_MESSAGES[name], LIMIT)
    message = str(info.value)
    assert message and "\n" not in message and len(message) < 600, message  # one readable log line


@pytest.mark.parametrize("name", sorted(HOSTILE_JSON_MESSAGES))
@pytest.mark.parametrize("decoder", ["decode_ack", "decode_status"])
def test_hostile_json_message_is_a_protocol_error(name: str, decoder: str) -> None:
    payload = HOSTILE_JSON_MESSAGES[name]
    if decoder == "decode_status" and name.startswith(("global_version", "update_id", "accepted", "missing")):
        pytest.skip("a valid JSON object is a valid status document")
    with pytest.raises(ProtocolError) as info:
        getattr(protocol, decoder)(payload)
    assert "\n" not in str(info.value) and len(str(info.value)) < 600


def test_a_shape_of_1e400_names_the_tensor_and_field() -> None:
    with pytest.raises(ProtocolError, match=r"tensor 'x': shape .* expected a list of integers"):
        protocol.unpack(HOSTILE_TENSOR_MESSAGES["shape 1e400"], LIMIT)


def test_deep_nesting_is_reported_as_such() -> None:
    with pytest.raises(ProtocolError, match="nested too deeply"):
        protocol.unpack(HOSTILE_TENSOR_MESSAGES["nested 100000 deep (list)"], LIMIT)
    with pytest.raises(ProtocolError, match="nested too deeply"):
        protocol.decode_ack(HOSTILE_JSON_MESSAGES["nested 100000 deep"])


def test_header_integers_must_fit_64_bits() -> None:
    with pytest.raises(ProtocolError, match=r"header field 'seq'=.* expected an integer of at most 64 bits"):
        protocol.decode_update(HOSTILE_TENSOR_MESSAGES["update with seq 10**30"], LIMIT)


def test_hostile_messages_fail_in_the_checks_not_in_the_last_guard() -> None:
    """The guard at each decoder catches what the checks missed ("malformed <what>: SomeError: ...");
    none of these may need it."""
    guard = re.compile(r"^malformed [a-z ]+: [A-Za-z]*(Error|Exception|Overflow)\b")
    for name, payload in HOSTILE_TENSOR_MESSAGES.items():
        for decode in (protocol.decode_update, protocol.decode_global):
            with pytest.raises(ProtocolError) as info:
                decode(payload, LIMIT)
            assert not guard.match(str(info.value)), (name, str(info.value))
    for name, payload in HOSTILE_JSON_MESSAGES.items():
        with pytest.raises(ProtocolError) as info:
            protocol.decode_ack(payload)
        assert not guard.match(str(info.value)), (name, str(info.value))
