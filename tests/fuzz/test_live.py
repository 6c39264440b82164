"""Fuzzing a running coordinator and a running edge daemon through a real Mosquitto.

Issue 10, defect 1 and the live half of the fuzzing: a retained hostile global adapter must cost
the device one log line per start and nothing else; a storm of mutated globals and acks must not
stop it from finishing its round; every update a fuzzer publishes must be answered with an ack
that carries a reason, and the coordinator must still be serving afterwards.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from alignfed import manifest as mf
from alignfed import protocol, tomlfile
from alignfed.adapter import initial_adapter
from alignfed.corpora import DOMAINS, write_domain
from alignfed.topics import Topics
from alignfed.transport import BrokerConfig, Transport
from demo.local import DeviceSpec, LocalFederation, lay_out
from tests.fuzz.payloads import CASES, DERANDOMIZE, GUARD, Seeds, corpus, reason_key, seeds, signed_updates
from tests.support.broker import Mosquitto
from tests.support.federation import fast_profile, spawn, wait_for
from tests.support.hostile import HOSTILE_JSON_MESSAGES, HOSTILE_TENSOR_MESSAGES

pytestmark = pytest.mark.integration

FED = "fuzz"
WINDOW = 1000  # messages a fuzzer may have outstanding; Mosquitto queues 10,000 per client here
REJECTED_GLOBAL = re.compile(
    r"ERROR edge.daemon: (ignoring (?!malformed ack).*|global adapter v-?\d+ is for bundle .*)$", re.M
)
REJECTED_ACK = re.compile(r"ERROR edge.daemon: ignoring malformed ack: (.*)$", re.M)


def federation(tmp_path: Path, broker: Mosquitto, bundle: Path, **extra: object) -> LocalFederation:
    profile = fast_profile(tmp_path / "p.toml", local_steps=2)
    spec = DeviceSpec("dev-f", str(profile), write_domain(tmp_path / "d.jsonl", DOMAINS[0], 12, seed=0), extra=extra)
    return lay_out(tmp_path / "fed", bundle=bundle, broker_url=broker.url, devices=[spec], federation=FED,
                   strategy={"name": "fedbuff", "k": 2})  # fmt: skip


def real_seeds(fed: LocalFederation, bundle: Path) -> Seeds:
    m = mf.load(bundle)
    key = bytes.fromhex(str(tomlfile.read(fed.device_configs["dev-f"])["key"]))
    return seeds("dev-f", key, mf.bundle_digest(m), m.delta_shapes(), initial_adapter(bundle, m))


def client(broker: Mosquitto, name: str) -> Transport:
    t = Transport(BrokerConfig(broker.url), name, clean_session=True)
    t.start()
    return t


def stop(p: subprocess.Popen[bytes]) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=20)


def settle(log: Path, pattern: re.Pattern[str], timeout: float) -> int:
    """The number of matching log lines once no new one has come for a second."""
    deadline, last, seen_at = time.monotonic() + timeout, -1, time.monotonic()
    while time.monotonic() < deadline:
        n = len(pattern.findall(log.read_text(errors="replace")))
        if n != last:
            last, seen_at = n, time.monotonic()
        elif time.monotonic() - seen_at > 1.0:
            return n
        time.sleep(0.2)
    return last


def test_device_survives_hostile_retained_globals_and_a_storm_of_bad_messages(
    tmp_path: Path, broker: Mosquitto, tiny_bundle: Path, tally: dict[str, Counter[str]]
) -> None:
    fed = federation(tmp_path, broker, tiny_bundle, max_rounds=1)
    topics = Topics(FED)
    fuzzer = client(broker, "fuzzer-device")
    hostile = HOSTILE_TENSOR_MESSAGES["shape 1e400"]
    assert fuzzer.publish(topics.global_adapter, hostile, retain=True)
    config = str(fed.device_configs["dev-f"])
    edge, coord = None, None
    clock = time.monotonic()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        nonlocal clock
        phases[name] = time.monotonic() - clock
        clock = time.monotonic()

    def start_edge(log: Path) -> subprocess.Popen[bytes]:
        p = spawn("edge", "--config", config, log=log)
        wait_for(lambda: REJECTED_GLOBAL.search(log.read_text(errors="replace")), 60, "the reject line")
        return p

    try:
        # 1. the retained hostile global at boot: one line, no exit (step 4 starts it once more)
        log = tmp_path / "edge-1.log"
        edge = start_edge(log)
        time.sleep(1.0)
        assert edge.poll() is None and len(REJECTED_GLOBAL.findall(log.read_text())) == 1, log.read_text()
        phase("start")

        # 2. the storm, while the device waits for a good global: hostile and mutated globals (of
        # another bundle, so none is taken for a good one) and acks
        s = real_seeds(fed, tiny_bundle)
        other = seeds(
            "dev-f",
            b"k",
            "00" * 32,
            mf.load(tiny_bundle).delta_shapes(),
            initial_adapter(tiny_bundle, mf.load(tiny_bundle)),
        )
        globals_ = list(HOSTILE_TENSOR_MESSAGES.values()) + [p for _, p in corpus(other.globals, CASES, seed=11) if p]
        acks = list(HOSTILE_JSON_MESSAGES.values()) + [p for _, p in corpus(s.acks + s.globals, CASES, seed=12)]
        # in windows, as real senders are paced: the broker queues at most max_queued_messages
        # for a slow client and drops the rest
        for start in range(0, max(len(globals_), len(acks)), WINDOW // 2):
            for p in globals_[start : start + WINDOW // 2]:
                assert fuzzer.publish(topics.global_adapter, p)
            for p in acks[start : start + WINDOW // 2]:
                assert fuzzer.publish(topics.ack("dev-f"), p)
            done = 1 + min(len(globals_), start + WINDOW // 2)  # + the retained one
            wait_for(lambda done=done: len(REJECTED_GLOBAL.findall(log.read_text(errors="replace"))) >= done,
                     120, f"{done} globals handled")  # fmt: skip
        settle(log, REJECTED_GLOBAL, 120)
        phase("storm")
        assert edge.poll() is None, log.read_text()[-3000:]
        text = log.read_text(errors="replace")
        assert "Traceback" not in text and not GUARD.search(text), text[-3000:]
        assert len(REJECTED_GLOBAL.findall(text)) == 1 + len(globals_)  # one line per bad global, nothing more
        t = tally["live edge daemon: global/adapter"]
        t["cases"] += len(globals_) + 2  # + the retained one, met at both starts
        t[
            "rejected (one log line): " + reason_key(REJECTED_GLOBAL.findall((tmp_path / "edge-1.log").read_text())[0])
        ] += 1
        for line in REJECTED_GLOBAL.findall(text):
            t["rejected (one log line): " + reason_key(line)] += 1
        t["crashes"] += 0
        a = tally["live edge daemon: devices/dev-f/ack"]
        a["cases"] += len(acks)
        bad_acks = REJECTED_ACK.findall(text)
        for line in bad_acks:
            a["rejected (one log line): " + reason_key(line)] += 1
        a["decoded; no such update in the outbox: ignored"] += len(acks) - len(bad_acks)

        # 3. it still works: the coordinator's global arrives, the round is trained and answered
        coord = spawn("coordinator", "--config", str(fed.coordinator_config), log=tmp_path / "coordinator.log")
        assert edge.wait(timeout=120) == 0, log.read_text()[-3000:]
        phase("round")
        summary = log.read_text().strip().splitlines()[-1]
        assert re.search(r"published 1, acked 1, rejected 0", summary), summary

        # 4. the last good global is kept: a hostile retained global and delta, a restart, and the
        # device trains from the stored good global without waiting for another (holding one, it
        # fetches no snapshot: it meets the hostile retained delta, refuses it, and goes on)
        for topic in (topics.global_adapter, topics.global_delta):
            assert fuzzer.publish(topic, HOSTILE_TENSOR_MESSAGES["nested 100000 deep (list)"], retain=True)
        log = tmp_path / "edge-3.log"
        edge = spawn("edge", "--config", config, log=log)
        assert edge.wait(timeout=120) == 0, log.read_text()[-3000:]
        phase("restart on the stored global")
        text = log.read_text()
        # once per delivery (the resubscribe replays the retained delta); v1 may come first, from the
        # persistent session's queue
        lines = REJECTED_GLOBAL.findall(text)
        assert lines and all(re.match(r"ignoring malformed global delta \(keeping v[01]\): ", x) for x in lines), text[
            -3000:
        ]
        assert len({x.split("): ", 1)[1] for x in lines}) == 1, lines
        assert re.search(r"published 2, acked 2, rejected 0", text.strip().splitlines()[-1]), text[-500:]
        t["cases"] += 1
        t["rejected (one log line): " + reason_key(REJECTED_GLOBAL.findall(text)[0])] += 1
        tally["live edge daemon: seconds per phase"].update({k: round(v) for k, v in phases.items()})
    finally:
        for proc in (edge, coord):
            if proc is not None:
                stop(proc)
        fuzzer.stop()


def generated(s: Seeds, key: bytes, bundle: str, shapes: dict[str, tuple[int, int]], rank: int, n: int) -> list[bytes]:
    """n signed updates drawn by Hypothesis (valid, or with one field ingest must refuse)."""
    out: list[bytes] = []

    @settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=DERANDOMIZE)  # fmt: skip
    @given(signed_updates("dev-f", key, bundle, shapes, rank))
    def collect(case: tuple[str, bytes]) -> None:
        out.append(case[1])

    collect()
    return out


def test_coordinator_answers_every_update_with_a_reason_over_mqtt(
    tmp_path: Path, broker: Mosquitto, tiny_bundle: Path, tally: dict[str, Counter[str]]
) -> None:
    from coordinator.store import Store

    fed = federation(tmp_path, broker, tiny_bundle)
    topics = Topics(FED)
    s = real_seeds(fed, tiny_bundle)
    m = mf.load(tiny_bundle)
    key = bytes.fromhex(str(tomlfile.read(fed.device_configs["dev-f"])["key"]))
    payloads = [p for _, p in corpus(s.updates, CASES, seed=21)]
    payloads += generated(s, key, mf.bundle_digest(m), m.delta_shapes(), m.lora.rank, max(CASES // 4, 10))
    payloads += list(HOSTILE_TENSOR_MESSAGES.values())
    log = tmp_path / "coordinator.log"
    coord = spawn("coordinator", "--config", str(fed.coordinator_config), log=log)
    fuzzer = Transport(BrokerConfig(broker.url), "fuzzer-coordinator", clean_session=True)
    fuzzer.subscribe(topics.ack("dev-f"))
    fuzzer.subscribe(topics.global_status)
    fuzzer.start()
    try:
        wait_for(lambda: (m_ := fuzzer.get(timeout=0.2)) is not None and m_.topic == topics.global_status, 60,
                 "the coordinator to come up")  # fmt: skip
        started = time.monotonic()
        acks: list[protocol.Ack] = []
        deadline = time.monotonic() + 60 + len(payloads) * 0.05

        def collect(until: int) -> None:
            while len(acks) < until and time.monotonic() < deadline:
                msg = fuzzer.get(timeout=1.0)
                if msg is not None and msg.topic == topics.ack("dev-f"):
                    acks.append(protocol.decode_ack(msg.payload))

        for i, p in enumerate(payloads):
            collect(i - WINDOW)  # at most WINDOW unanswered, as a device's max_outbox paces it
            assert fuzzer.publish(topics.update("dev-f"), p)
        collect(len(payloads))
        seconds = time.monotonic() - started
        assert len(acks) == len(payloads), f"{len(payloads) - len(acks)} updates were not answered"
        assert coord.poll() is None, log.read_text()[-3000:]
        text = log.read_text(errors="replace")
        assert "Traceback" not in text and "internal error" not in text, text[-3000:]
        t = tally["live coordinator: devices/dev-f/update"]
        t["cases"] += len(payloads)
        t["crashes"] += 0
        for ack in acks:
            assert ack.reason and not GUARD.match(ack.reason.removeprefix("malformed: ")), ack.reason
            t[("accepted: " if ack.accepted else "rejected: ") + reason_key(ack.reason)] += 1
        t[f"answered in {seconds:.1f} s"] += 0
        accepted = {a.update_id for a in acks if a.accepted}
        store = Store(tmp_path / "fed" / "coordinator" / "coordinator.sqlite")
        stats = store.stats().get("dev-f", {})
        assert stats.get("pending", 0) + stats.get("aggregated", 0) == len(accepted)  # each counted once
        store.close()
    finally:
        stop(coord)
        fuzzer.stop()
