"""The dashboard's board, metrics and server on events fed by hand (no broker): what they show."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from alignfed.errors import ConfigError
from dashboard.config import DashboardConfig, parse, parse_address
from dashboard.feed import DeviceStatus, HeldOutLoss, QueueDepth, UpdateReceived, VersionPublished
from dashboard.live import LiveDashboard
from dashboard.metrics import REASONS, reason_label

# one reason per label, as coordinator/ingest.py and the strategies word them
REASON_TEXTS = {
    "malformed": "malformed: truncated safetensors header",
    "bad_signature": "bad signature: HMAC-SHA256 does not match the device key",
    "unknown_device": "unknown device 'x': register it with `alignfed coordinator add-device`",
    "device_mismatch": "device id 'a' in the header does not match topic device 'b'",
    "wrong_bundle": "bundle 0123456789ab… does not match the federation's bundle abcdefabcdef…",
    "future_version": "future version: base version 9 > current 3",
    "unknown_base_version": "unknown base version 2",
    "stale": "stale: base version 1 is 9 behind current 10 (tau_max 8)",
    "duplicate": "duplicate: update u from d is already buffered",
    "non_finite": "non-finite values (NaN/Inf) in layer 0.q",
    "norm_bound": "norm of layer 0.q delta is 1e+04, bound is 100",
    "wrong_layers": "wrong layers: missing ['0.q'], unexpected []",
    "wrong_shape": "wrong shape for layer 0.q: got u [3, 2] v [2, 64], expected u [64, k] v [k, 64] with 1 ≤ k ≤ 8",
    "invalid": "samples=0, local_steps=3; expected both > 0",
    "internal": "internal error: boom",
}


def test_every_reject_reason_has_its_label() -> None:
    assert set(REASON_TEXTS) == {label for label, _ in REASONS}
    for label, text in REASON_TEXTS.items():
        assert reason_label(text) == label, text
    assert reason_label("something new") == "other"


def feed(dash: LiveDashboard) -> None:
    dash.observe(VersionPublished(100.0, 0, -1, "alignfed"))
    dash.observe(DeviceStatus(100.5, "dev-0", "training", 0, "rpi5-8gb"))
    dash.observe(DeviceStatus(100.5, "dev-1", "idle", 0, "rpi4-4gb"))
    dash.observe(UpdateReceived(101.0, "dev-0", True, "accepted", 1000, 0, 2.5, 2.75, 0))
    dash.observe(UpdateReceived(102.0, "dev-1", True, "accepted", 1200, 1, 2.9, 3.0, 0))
    dash.observe(UpdateReceived(103.0, "dev-1", False, REASON_TEXTS["stale"], 1100))
    dash.observe(
        VersionPublished(104.0, 1, 0, "alignfed", ("dev-0", "dev-1"), 5000, 0.25, 0.05, {"0.q": 0.1, "1.q": 0.3}, 0.9)
    )
    dash.observe(HeldOutLoss(105.0, "dev-0", 1, 2.25))
    dash.observe(DeviceStatus(106.0, "dev-1", "offline"))
    dash.observe(QueueDepth(106.5, 2, 1))


def test_board_snapshot_tells_what_happened() -> None:
    dash = LiveDashboard(DashboardConfig(), federation="fed")
    feed(dash)
    s = dash.board.snapshot()
    json.dumps(s, allow_nan=False)  # what the page receives is strict JSON
    assert s["version"] == 1 and [v["version"] for v in s["lineage"]] == [0, 1]
    assert s["lineage"][1]["devices"] == {"dev-0": 1, "dev-1": 1}
    devices = {d["id"]: d for d in s["devices"]}
    assert devices["dev-0"]["online"] is True and devices["dev-1"]["online"] is False
    assert devices["dev-0"]["share"] == pytest.approx(0.5) and devices["dev-1"]["rejected"] == 1
    assert devices["dev-0"]["eval_loss"] == 2.25 and devices["dev-0"]["eval_version"] == 1
    assert s["devices_online"] == 1
    assert s["staleness_histogram"] == {"0": 1, "1": 1}
    assert s["eval_loss"]["dev-0"] == [(101.0, 2.75), (105.0, 2.25)]
    assert s["residuals"] == [(1, pytest.approx(0.2), 0.3)] and s["jain"] == [(1, 0.9)]
    # bytes down: the 5000-byte adapter reached the two devices online at the time
    assert s["totals"] == {"received": 3, "accepted": 2, "rejected": 1, "bytes_up": 3300, "bytes_down": 10000}
    assert s["rejects"] == [{"at": 103.0, "device": "dev-1", "reason": REASON_TEXTS["stale"]}]
    assert s["queue"] == {"queued": 2, "buffered": 1}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_events_and_cap_device_labels() -> None:
    dash = LiveDashboard(DashboardConfig(max_device_labels=1), federation="fed")
    feed(dash)
    m = samples(dash.metrics.exposition().decode())
    assert m[("alignfed_updates_received_total", ())] == 3
    assert m[("alignfed_updates_accepted_total", ())] == 2
    assert m[("alignfed_updates_rejected_total", (("reason", "stale"),))] == 1
    assert m[("alignfed_versions_total", ())] == 1  # version 0 was not made by aggregation
    assert m[("alignfed_global_version", ())] == 1
    assert m[("alignfed_aggregation_seconds_count", ())] == 1 and m[("alignfed_aggregation_seconds_sum", ())] == 0.25
    assert m[("alignfed_alignment_seconds_count", ())] == 1
    assert m[("alignfed_ingest_queue_depth", ())] == 2 and m[("alignfed_buffered_updates", ())] == 1
    assert m[("alignfed_devices_online", ())] == 1
    assert m[("alignfed_device_eval_loss", (("device", "dev-0"),))] == 2.25
    assert m[("alignfed_device_staleness", (("device", "dev-0"),))] == 0
    # the cap: dev-1 got no series of its own, and that was counted
    assert not any(labels == (("device", "dev-1"),) for _, labels in m)
    assert m[("alignfed_device_labels_dropped_total", ())] >= 1


@pytest.fixture
def served() -> Iterator[LiveDashboard]:
    dash = LiveDashboard(DashboardConfig(port=0, username="ops", password="s3cret-pw"), federation="fed")
    dash.start()
    feed(dash)
    yield dash
    dash.stop()


def get(url: str, auth: tuple[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url)
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def test_server_serves_page_state_metrics_behind_basic_auth(served: LiveDashboard) -> None:
    url = served.server.url
    auth = ("ops", "s3cret-pw")
    for path in ("", "api/state", "metrics", "static/app.js"):
        assert get(url + path)[0] == 401
        assert get(url + path, ("ops", "wrong"))[0] == 401
    status, body, headers = get(url, auth)
    assert status == 200 and b"alignfed" in body.lower() and "default-src 'self'" in headers["content-security-policy"]
    assert b"//cdn" not in body and b"http" not in body.split(b"<body>")[1]  # every script is served from here
    status, body, _ = get(url + "static/vendor/uPlot.iife.min.js", auth)
    assert status == 200 and len(body) > 40_000
    state = json.loads(get(url + "api/state", auth)[1])
    assert state["version"] == 1 and "s3cret-pw" not in json.dumps(state)
    assert samples(get(url + "metrics", auth)[1].decode())[("alignfed_updates_received_total", ())] == 3
    req = urllib.request.Request(url + "api/state", method="POST")
    req.add_header("Authorization", "Basic " + base64.b64encode(b"ops:s3cret-pw").decode())
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 405  # read-only


def test_event_stream_pushes_a_new_snapshot(served: LiveDashboard) -> None:
    req = urllib.request.Request(served.server.url + "events")
    req.add_header("Authorization", "Basic " + base64.b64encode(b"ops:s3cret-pw").decode())
    with urllib.request.urlopen(req, timeout=10) as stream:
        first = json.loads(stream.readline().decode().removeprefix("data: "))
        assert stream.readline() == b"\n"
        served.observe(VersionPublished(107.0, 2, 1, "alignfed", ("dev-0",), 5000, 0.1))
        second = json.loads(stream.readline().decode().removeprefix("data: "))
    assert first["version"] == 1 and second["version"] == 2 and second["seq"] > first["seq"]


def test_config_validation_names_field_and_value() -> None:
    assert parse({}, "c.toml") == DashboardConfig()
    assert not parse({"enabled": False}, "w").enabled
    assert parse_address("0.0.0.0:9000").port == 9000 and not parse_address("0.0.0.0:9000").loopback
    assert parse_address(":9001").host == "127.0.0.1"
    for table, words in (
        ({"port": "80"}, "c.toml: [dashboard].port = '80'; expected an integer"),
        ({"port": 70000}, "expected 0-65535"),
        ({"username": "ops"}, "set both username and password"),
        ({"colour": 1}, "c.toml: unknown field [dashboard].colour; expected one of enabled, host"),
    ):
        with pytest.raises(ConfigError, match=None) as err:
            parse(table, "c.toml")
        assert words in str(err.value)
    with pytest.raises(ConfigError):
        parse_address("localhost")


def test_a_port_in_use_is_a_config_error(served: LiveDashboard) -> None:
    port = int(served.server.url.rsplit(":", 1)[1].strip("/"))
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}"):
        LiveDashboard(DashboardConfig(port=port), federation="fed").start()
