"""The coordinator's dashboard during a real federation (tiny model, Mosquitto, processes):
Debian's Chromium watches the page fill in, then `/metrics` is checked against the store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from alignfed.topics import Topics
from alignfed.transport import BrokerConfig, Transport
from coordinator.store import Store
from demo.local import LocalFederation, lay_out
from tests.support.broker import Mosquitto, free_port
from tests.support.federation import domain_devices, fast_profile, spawn, stop, wait_for

pytestmark = pytest.mark.integration

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ROUNDS = 5


@dataclass
class Run:
    root: Path
    fed: LocalFederation
    url: str
    broker: Mosquitto
    coordinator: subprocess.Popen[bytes]
    edges: list[subprocess.Popen[bytes]]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in self.root.glob("*.log"))

    def start_edges(self) -> None:
        if not self.edges:
            self.edges = [
                spawn("edge", "--config", str(p), log=self.root / f"{d}.log")
                for d, p in self.fed.device_configs.items()
            ]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_bundle: Path) -> Iterator[Run]:
    root = tmp_path_factory.mktemp("dashboard-fed")
    broker = Mosquitto(root / "broker").start()
    profile = fast_profile(root / "fast.toml")
    specs = domain_devices(root, [profile] * 3, ROUNDS)
    port = free_port()
    fed = lay_out(
        root / "fed",
        bundle=tiny_bundle,
        broker_url=broker.url,
        devices=specs,
        strategy={"name": "alignfed", "k": 2, "max_wait_s": 5.0, "tau_max": 8},
        dashboard={"port": port},
    )
    coord = spawn("coordinator", "--config", str(fed.coordinator_config), log=root / "coordinator.log")
    r = Run(root, fed, f"http://127.0.0.1:{port}/", broker, coord, [])

    def up() -> bool:
        try:
            with urllib.request.urlopen(r.url + "api/state", timeout=2) as resp:
                status: int = resp.status  # urlopen is typed as returning Any
                return status == 200
        except OSError:
            return False

    try:
        wait_for(up, 60, "the coordinator's dashboard")
        yield r
    finally:
        stop([*r.edges, coord])
        broker.stop()


def state(r: Run) -> dict[str, Any]:  # the board's JSON snapshot
    with urllib.request.urlopen(r.url + "api/state", timeout=5) as resp:
        return dict(json.loads(resp.read()))


def test_browser_sees_the_federation_live(run: Run, tmp_path: Path) -> None:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("chromium / chromium-driver are not installed; run scripts/setup.sh")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a browser or a driver
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1700"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.get(run.url)
        wait = WebDriverWait(driver, 150, poll_frequency=0.5)
        wait.until(lambda d: d.find_element(By.ID, "feed").text == "live")
        assert driver.find_element(By.ID, "version").text == "0"  # no device has trained yet
        run.start_edges()
        # the version advances and the device list fills in, without reloading the page
        wait.until(lambda d: int(d.find_element(By.ID, "version").text) >= 2)
        # read through the page's own JS: rows are replaced on every snapshot (no stale element handles)
        names = "return Array.from(document.querySelectorAll('#devices tbody tr td:first-child'), e => e.textContent)"
        wait.until(lambda d: sorted(d.execute_script(names)) == ["dev-0", "dev-1", "dev-2"])
        # a chart with points: held-out eval loss per device, drawn by uPlot into a canvas
        wait.until(lambda d: int(d.find_element(By.ID, "chart-loss").get_attribute("data-points") or 0) >= 2)
        points = driver.execute_script("return window.alignfedCharts['chart-loss'].plot.data[0].length")
        assert points >= 2
        assert driver.find_elements(By.CSS_SELECTOR, "#chart-loss canvas")
        wait.until(lambda d: d.execute_script("return document.querySelectorAll('#lineage tbody tr').length") >= 3)
        shot = tmp_path / "dashboard.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("ALIGNFED_ARTIFACTS"):
            out = Path(os.environ["ALIGNFED_ARTIFACTS"])
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, out / "dashboard.png")
    finally:
        driver.quit()


def metrics(r: Run) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(r.url + "metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_match_what_happened(run: Run) -> None:
    run.start_edges()
    # one update the coordinator must refuse: not a safetensors payload at all
    sender = Transport(BrokerConfig(run.broker.url), "intruder", clean_session=True)
    sender.start()
    assert sender.publish(Topics("demo").update("dev-0"), b"\x00garbage")
    sender.stop()
    for e in run.edges:
        assert e.wait(timeout=240) == 0, run.logs()
    store = Store(run.fed.root / "coordinator" / "coordinator.sqlite")
    try:

        def settled() -> bool:
            m = metrics(run)
            return m.get(("alignfed_updates_received_total", ()), 0) >= 3 * ROUNDS + 1

        wait_for(settled, 30, "every update handled")
        time.sleep(1.0)
        m = metrics(run)
        stats = store.stats()
        accepted = sum(s["aggregated"] + s["pending"] for s in stats.values())
        assert accepted == 3 * ROUNDS
        assert m[("alignfed_updates_accepted_total", ())] == accepted
        assert m[("alignfed_updates_rejected_total", (("reason", "malformed"),))] == 1
        assert m[("alignfed_updates_received_total", ())] == accepted + 1
        latest = store.latest_version()
        assert latest is not None and latest >= 2
        assert m[("alignfed_global_version", ())] == latest
        assert m[("alignfed_versions_total", ())] == latest
        assert m[("alignfed_aggregation_seconds_count", ())] == latest
        assert m[("alignfed_alignment_seconds_count", ())] == latest  # every AlignFed aggregation aligns (or not)
        assert m[("alignfed_ingest_queue_depth", ())] == 0
        assert m[("alignfed_buffered_updates", ())] == sum(s["pending"] for s in stats.values())
        assert m[("alignfed_update_bytes_total", ())] >= sum(s["bytes"] for s in stats.values())
        for device, (loss, _) in store.last_eval_losses().items():
            assert m[("alignfed_device_eval_loss", (("device", device),))] == pytest.approx(loss)
            assert ("alignfed_device_staleness", (("device", device),)) in m
        # the daemons ended their rounds and said so: a retained "offline" status (a clean exit sends no will)
        assert m[("alignfed_devices_online", ())] == 0
        s = state(run)
        assert s["totals"]["rejected"] == 1 and s["rejects"][0]["reason"].startswith("malformed")
    finally:
        store.close()
