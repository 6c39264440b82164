"""The coordinator's message handling without a broker: ordering, duplicates, bad input."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import numpy as np
import pytest

from alignfed import protocol, tomlfile
from alignfed.errors import ConfigError
from alignfed.lowrank import Factors
from alignfed.manifest import bundle_digest
from alignfed.manifest import load as load_manifest
from coordinator import config as ccfg
from coordinator.service import Coordinator
from coordinator.strategies.alignfed import AlignFed

KEY = bytes(range(32))


def coordinator(tmp_path: Path, bundle: Path, **strategy: object) -> Coordinator:
    path = tomlfile.write(
        tmp_path / "c.toml",
        {
            "federation": "t",
            "bundle": str(bundle),
            "database": str(tmp_path / "c.sqlite"),
            "broker": {"url": "mqtt://127.0.0.1:1"},
            "strategy": {"name": "fedbuff", "k": 1, **strategy},
            "ingest": {"tau_max": 1},
        },
    )
    c = Coordinator(ccfg.load(path))
    c.store.add_device("dev-1", KEY.hex(), "x86-laptop")
    return c


def update(
    bundle: Path,
    base_version: int,
    scale: float = 0.01,
    eval_loss: float = math.nan,
    samples: int = 4,
    *,
    device_id: str = "dev-1",
    key: bytes = KEY,
) -> bytes:
    m = load_manifest(bundle)
    deltas = {
        lid: Factors(u=np.full((o, 2), scale, np.float32), v=np.full((2, i), scale, np.float32))
        for lid, (o, i) in m.delta_shapes().items()
    }
    msg = protocol.AdapterUpdate(
        device_id,
        uuid.uuid4().hex,
        1,
        base_version,
        bundle_digest(m),
        samples,
        1,
        1.0,
        0.1,
        "x86-laptop",
        0.0,
        deltas,
        eval_loss,
    )
    return protocol.encode_update(msg, key, "int8c", "deflate")


def test_resend_after_the_version_moved_on_is_answered_as_accepted(tmp_path: Path, tiny_bundle: Path) -> None:
    c = coordinator(tmp_path, tiny_bundle)
    first = update(tiny_bundle, 0)
    assert c.handle_update("dev-1", first).accepted
    for _ in range(3):  # k = 1: every update makes a version
        c.maybe_aggregate()
        assert c.handle_update("dev-1", update(tiny_bundle, c.current.version)).accepted
    c.maybe_aggregate()
    assert c.current.version == 4  # the first update is now 4 behind, beyond tau_max = 1
    again = c.handle_update("dev-1", first)  # its ack was lost: the device resends it
    assert again.accepted and again.reason == "duplicate"
    assert c.store.stats()["dev-1"]["aggregated"] == 4  # and nothing was counted twice


def test_a_new_stale_update_is_still_rejected(tmp_path: Path, tiny_bundle: Path) -> None:
    c = coordinator(tmp_path, tiny_bundle)
    for _ in range(2):
        assert c.handle_update("dev-1", update(tiny_bundle, c.current.version)).accepted
        c.maybe_aggregate()
    ack = c.handle_update("dev-1", update(tiny_bundle, 0))
    assert not ack.accepted and ack.reason.startswith("stale")


def test_status_reports_the_worst_held_out_loss(tmp_path: Path, tiny_bundle: Path) -> None:
    c = coordinator(tmp_path, tiny_bundle)
    assert c.status()["worst_device_eval_loss"] is None
    assert c.handle_update("dev-1", update(tiny_bundle, 0, eval_loss=4.5)).accepted
    c.maybe_aggregate()
    assert c.handle_update("dev-1", update(tiny_bundle, 1, eval_loss=4.25)).accepted
    status = c.status()
    assert status["device_eval_loss"] == {"dev-1": {"loss": 4.25, "version": 1}}
    assert status["worst_device_eval_loss"] == 4.25 and status["diverged_devices"] == []
    c.maybe_aggregate()
    assert c.handle_update("dev-1", update(tiny_bundle, 2, eval_loss=math.inf)).accepted  # the model diverged
    status = c.status()
    assert status["device_eval_loss"] == {"dev-1": {"loss": None, "version": 2}}
    assert status["worst_device_eval_loss"] is None and status["diverged_devices"] == ["dev-1"]
    json.dumps(status, allow_nan=False)  # strict JSON


def test_garbage_is_rejected_with_a_reason(tmp_path: Path, tiny_bundle: Path) -> None:
    c = coordinator(tmp_path, tiny_bundle)
    ack = c.handle_update("dev-1", b"\x00" * 64)
    assert not ack.accepted and ack.reason.startswith("malformed")


def test_a_bad_strategy_option_names_the_config_section(tmp_path: Path, tiny_bundle: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"c.toml: unknown field \[strategy\].bogus; expected one of aggregator, clip_norm, clip_relative, "
        r"error_feedback, k,",
    ):
        coordinator(tmp_path, tiny_bundle, bogus=1)


def test_ingest_values_are_typed(tmp_path: Path, tiny_bundle: Path) -> None:
    path = tomlfile.write(
        tmp_path / "c.toml",
        {
            "federation": "t",
            "bundle": str(tiny_bundle),
            "broker": {"url": "mqtt://h:1"},
            "strategy": {"name": "fedbuff", "k": 2},
            "ingest": {"tau_max": "many"},
        },
    )
    with pytest.raises(ConfigError, match=r"\[ingest\].tau_max = 'many'; expected an integer"):
        ccfg.load(path)


def test_fairness_history_survives_a_restart(tmp_path: Path, tiny_bundle: Path) -> None:
    c = coordinator(tmp_path, tiny_bundle)
    for _ in range(3):
        assert c.handle_update("dev-1", update(tiny_bundle, c.current.version)).accepted
        c.maybe_aggregate()
    c.store.close()
    path = tmp_path / "c.toml"
    doc = tomlfile.read(path)
    doc["strategy"] = {"name": "alignfed", "k": 2, "alignment": False}
    tomlfile.write(path, doc)
    restarted = Coordinator(ccfg.load(path))
    assert restarted.current.version == 3
    assert isinstance(restarted.strategy, AlignFed)
    assert restarted.strategy.participation() == ["dev-1"] * 3


def test_hostile_payloads_get_a_malformed_reject_not_an_internal_error(
    tmp_path: Path, tiny_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 10, defect 2: what crashed the decoders is answered `malformed: ...`, with no traceback."""
    from tests.support.hostile import HOSTILE_TENSOR_MESSAGES

    c = coordinator(tmp_path, tiny_bundle)
    for name, payload in HOSTILE_TENSOR_MESSAGES.items():
        ack = c.handle_update("dev-1", payload)
        assert not ack.accepted and ack.reason.startswith("malformed: "), (name, ack.reason)
        assert "\n" not in ack.reason
    assert not any(r.exc_info for r in caplog.records)
    assert c.store.stats() == {}  # nothing stored, nothing buffered


def test_each_update_is_decoded_once(tmp_path: Path, tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resend lookup, validation and buffering all read one decoded form of the message."""
    c = coordinator(tmp_path, tiny_bundle, k=2)
    calls = []
    real = protocol.decode_update

    def counting(payload: bytes, max_bytes: int) -> protocol.Decoded:
        calls.append(len(payload))
        return real(payload, max_bytes)

    monkeypatch.setattr(protocol, "decode_update", counting)
    payload = update(tiny_bundle, 0)
    assert c.handle_update("dev-1", payload).accepted
    assert len(calls) == 1
    again = c.handle_update("dev-1", payload)  # the QoS 1 duplicate: answered from the store
    assert again.accepted and again.reason == "duplicate"
    assert len(calls) == 2
