"""The fleet page (`dashboard.py -- --clickhouse HOST:PORT --cluster fleet`) over a real 2-shard cluster fed
by real sensor processes capturing our own UDP traffic on `lo` (distinctive ports in their filters).

Sensor "charlie" keeps running (idle after its traffic: its heartbeats keep it fresh); sensor "alpha" is
stopped, so it stops flushing and the page marks it stale. Through AppTest and a real browser: the
sensor grid, the stale sensor, and one sensor's view whose totals equal what that sensor counted.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import ROOT, need, wait_for
from fleethelp import cluster  # noqa: F401  (the module's cluster fixture)
from streamlit.testing.v1 import AppTest
from test_dashboard import rendered
from test_fleet_sensor import ON_SHARD_1, ON_SHARD_2, SensorProc, ports, send_udp, wait_metric

APP = "../dashboard.py"
DB = "t_page"
ENV = {**os.environ, "NTM_FLEET_FLUSH_S": "0.5", "NTM_LOG_LEVEL": "INFO", "NTM_CLICKHOUSE_DATABASE": DB}


@pytest.fixture(scope="module")
def fleet(cluster, tmp_path_factory) -> Iterator[dict]:  # noqa: F811
    """Two sensors: charlie (running, idle) counted 260 packets; alpha (stopped) counted 140."""
    need(os.geteuid() == 0, "live capture tests need root: run them with sudo")
    tmp = tmp_path_factory.mktemp("fleetpage")
    p1, p2 = ports()
    live = SensorProc(ON_SHARD_1, p1, cluster.address(1), tmp / "sp1", tmp / "charlie.log", ENV)
    gone = SensorProc(ON_SHARD_2, p2, cluster.address(1), tmp / "sp2", tmp / "alpha.log", ENV)
    try:
        send_udp(p1, 260)
        send_udp(p2, 140)
        assert wait_metric(live, "ntm_sensor_sent_packets_total", lambda v: v == 260)
        stopped = gone.finish()
        assert stopped["packets"] == 140 and stopped["packets_sent"] == 140
        counted = {ON_SHARD_1: int(live.metrics()["ntm_sensor_packets_total"]), ON_SHARD_2: stopped["packets"]}
        yield {"address": cluster.address(2), "counted": counted, "ports": (p1, p2), "live": live}
    finally:
        for p in (live, gone):
            if p.proc.poll() is None:
                p.kill()


@pytest.fixture
def page_env(monkeypatch, fleet):
    monkeypatch.setattr(sys, "argv", ["dashboard.py", "--clickhouse", fleet["address"], "--cluster", "fleet"])
    for k in ("NTM_FLEET_FLUSH_S", "NTM_CLICKHOUSE_DATABASE"):
        monkeypatch.setenv(k, ENV[k])
    return fleet


def metric(at: AppTest, label: str) -> int:
    return int(next(m for m in at.metric if m.label == label).value.replace(",", ""))


def texts(at: AppTest) -> str:
    return "\n".join([m.value for m in at.markdown] + [c.value for c in at.caption])


def test_fleet_page_grid_stale_sensor_and_one_sensors_exact_totals(page_env):
    """AppTest: both sensors in the grid, alpha stale and charlie not, and each sensor's view (and all) shows
    exactly the packets that sensor counted; no local capture is started."""
    from packet_processor import engines

    counted = page_env["counted"]
    time.sleep(2.0)  # more than 3 x FLEET_FLUSH_S since alpha's last flush
    at = AppTest.from_file(APP, default_timeout=90).run()
    assert not at.exception, at.exception
    body = texts(at)
    assert f"**{ON_SHARD_2}** · ⚠️ stale" in body, body
    assert f"**{ON_SHARD_1}** · ok" in body, body
    assert metric(at, "Packets") == sum(counted.values())
    at.selectbox(key="fleet_sensor").set_value(ON_SHARD_1).run()
    assert metric(at, "Packets") == counted[ON_SHARD_1]
    at.selectbox(key="fleet_sensor").set_value(ON_SHARD_2).run()
    assert metric(at, "Packets") == counted[ON_SHARD_2]
    at.radio(key="fleet_range").set_value("24 h").run()
    assert metric(at, "Packets") == counted[ON_SHARD_2] and not at.exception
    assert not [e for e in engines() if e.status().state == "running"]  # the fleet page captures nothing


def test_fleet_page_unreachable_clickhouse_is_a_message(monkeypatch):
    """A ClickHouse that does not answer: an error naming it on the page, no exception."""
    monkeypatch.setattr(sys, "argv", ["dashboard.py", "--clickhouse", "127.0.0.1:9", "--cluster", "fleet"])
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert any("ClickHouse cannot be read" in e.value and "127.0.0.1:9" in rendered(e.value) for e in at.error), \
        at.error


@pytest.mark.browser
def test_browser_fleet_page(page_env, tmp_path):
    """A real browser: the grid (two cards, alpha stale), then charlie's view with its exact total."""
    from playwright.sync_api import sync_playwright
    from test_browser import CHROME_ARGS, CHROMIUM, dashboard, packets

    counted = page_env["counted"]
    args = ["--clickhouse", page_env["address"], "--cluster", "fleet"]
    with dashboard(args, tmp_path / "server.log", FLEET_FLUSH_S="0.5", CLICKHOUSE_DATABASE=DB) as url, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROME_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 2400})
        page.goto(url)
        page.wait_for_selector('[data-testid="stMetric"]', timeout=60_000)
        if "Failed to fetch dynamically imported module" in page.inner_text("body"):
            page.reload()  # a loaded machine can time out one of Streamlit's script chunks: once, load again
            page.wait_for_selector('[data-testid="stMetric"]', timeout=60_000)
        assert wait_for(lambda: packets(page) == sum(counted.values()), 30), page.inner_text("body")[-2000:]
        body = page.inner_text("body")
        assert f"{ON_SHARD_2} · ⚠️ stale" in body and f"{ON_SHARD_1} · ok" in body, body[:3000]
        # Plotly's script chunk loads on its own: the charts may appear after the metrics on a cold page.
        assert wait_for(lambda: page.locator('[data-testid="stPlotlyChart"]').count() >= 2, 30)
        page.screenshot(path=str(ROOT / "test-artifacts" / "fleet-page.png"), full_page=True) \
            if (ROOT / "test-artifacts").is_dir() else None
        page.locator('[data-testid="stSelectbox"]').filter(has_text="Sensor").click()
        page.get_by_role("option", name=ON_SHARD_1, exact=True).click()
        assert wait_for(lambda: f"sensor {ON_SHARD_1}" in page.inner_text("body")
                        and packets(page) == counted[ON_SHARD_1], 60), page.inner_text("body")[-2000:]
        assert "Failed to fetch" not in page.inner_text("body")
        assert page.locator('[data-testid="stException"]').count() == 0
        browser.close()
