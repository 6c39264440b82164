"""Fuzzing the decoders and the coordinator's ingest in-process: generated and mutated messages.

The only acceptable outcomes are a decoded message or a ProtocolError with a one-line reason, and
for the coordinator an ack with a reason; anything else is a crash of whichever program decodes
it (issue 10). Per target, Hypothesis draws CASES/4 messages (generated field by field, or real
payloads mutated, shrinking to the simplest failure) and a seeded mutation corpus adds CASES more.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignfed import protocol
from alignfed.errors import ProtocolError
from tests.fuzz.payloads import (
    CASES,
    DERANDOMIZE,
    GUARD,
    Seeds,
    corpus,
    json_messages,
    mutated,
    reason_key,
    seeds,
    signed_updates,
    small_seeds,
    tensor_messages,
)

SEEDS = small_seeds()
FUZZ = settings(
    max_examples=max(CASES // 4, 10),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
    derandomize=DERANDOMIZE,
)
LIMIT = 1 << 22
KEY = bytes(range(32))


def outcome(decode: Callable[[bytes], Any], payload: bytes) -> str:
    try:
        decode(payload)
    except ProtocolError as exc:
        reason = str(exc)
        assert reason and "\n" not in reason and len(reason) < 1000, reason
        assert not GUARD.match(reason), f"no check caught this; the last guard did: {reason}"
        return "rejected: " + reason_key(reason)
    return "decoded"


DECODERS: dict[str, Callable[[bytes], Any]] = {
    "decode_update": lambda p: protocol.decode_update(p, LIMIT),
    "decode_global": lambda p: protocol.decode_global(p, LIMIT),
    "decode_ack": protocol.decode_ack,
    "decode_status": protocol.decode_status,
}


def record(tally: dict[str, Counter[str]], target: str, answer: str) -> None:
    t = tally[target]
    t["cases"] += 1
    t[answer] += 1


@FUZZ
@given(case=st.one_of(mutated(SEEDS.updates + SEEDS.globals), tensor_messages("update"), tensor_messages("global")))
def test_tensor_decoders_answer_every_generated_message(
    case: tuple[str, bytes], tally: dict[str, Counter[str]]
) -> None:
    for name in ("decode_update", "decode_global"):
        record(tally, f"in-process {name} (hypothesis)", outcome(DECODERS[name], case[1]))


@FUZZ
@given(case=st.one_of(mutated(SEEDS.acks + SEEDS.statuses), json_messages("ack"), json_messages("status")))
def test_json_decoders_answer_every_generated_message(case: tuple[str, bytes], tally: dict[str, Counter[str]]) -> None:
    for name in ("decode_ack", "decode_status"):
        record(tally, f"in-process {name} (hypothesis)", outcome(DECODERS[name], case[1]))


def test_decoders_answer_every_mutated_real_payload(tally: dict[str, Counter[str]]) -> None:
    pools = {
        "decode_update": SEEDS.updates,
        "decode_global": SEEDS.globals,
        "decode_ack": SEEDS.acks,
        "decode_status": SEEDS.statuses,
    }
    everything = [p for pool in pools.values() for p in pool]
    for name, pool in pools.items():
        # mostly its own kind, a quarter of everything else (a global where an ack belongs, ...)
        cases = corpus(pool, CASES - CASES // 4, seed=1) + corpus(everything, CASES // 4, seed=2)
        for _how, payload in cases:
            record(tally, f"in-process {name} (mutations)", outcome(DECODERS[name], payload))


# -- the coordinator's ingest, in-process ---------------------------------------------------------------


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Iterator[Any]:
    from alignfed import tomlfile
    from coordinator import config as ccfg
    from coordinator.service import Coordinator

    tmp = tmp_path_factory.mktemp("fuzz-coordinator")
    path = tomlfile.write(
        tmp / "c.toml",
        {"federation": "f", "bundle": str(tiny_bundle), "database": str(tmp / "c.sqlite"),
         "broker": {"url": "mqtt://127.0.0.1:1"}, "strategy": {"name": "fedbuff", "k": 4}},
    )  # fmt: skip
    c = Coordinator(ccfg.load(path))
    c.store.add_device("dev-1", KEY.hex(), "x86-laptop")
    yield c
    c.store.close()


@pytest.fixture(scope="module")
def federation_seeds(coordinator: Any) -> Seeds:
    c = coordinator
    return seeds("dev-1", KEY, c.bundle, c.manifest.delta_shapes(), c.current.tensors)


def answer(coordinator: Any, payload: bytes) -> str:
    ack = coordinator.handle_update("dev-1", payload)
    assert ack.reason and not ack.reason.startswith("internal error"), ack.reason
    assert not GUARD.match(ack.reason.removeprefix("malformed: ")), ack.reason
    coordinator.aggregate_step()
    assert coordinator.aggregation_failures == 0
    return ("accepted: " if ack.accepted else "rejected: ") + reason_key(ack.reason)


@FUZZ
@given(data=st.data())
def test_the_coordinator_answers_every_generated_update(
    data: st.DataObject, coordinator: Any, federation_seeds: Seeds, tally: dict[str, Counter[str]]
) -> None:
    c = coordinator
    signed = signed_updates("dev-1", KEY, c.bundle, c.manifest.delta_shapes(), c.manifest.lora.rank)
    _how, payload = data.draw(st.one_of(mutated(federation_seeds.updates), tensor_messages("update"), signed))
    record(tally, "in-process coordinator handle_update (hypothesis)", answer(c, payload))


def test_the_coordinator_answers_every_mutated_update(
    coordinator: Any, federation_seeds: Seeds, tally: dict[str, Counter[str]]
) -> None:
    for _how, payload in corpus(federation_seeds.updates, CASES, seed=3):
        record(tally, "in-process coordinator handle_update (mutations)", answer(coordinator, payload))
