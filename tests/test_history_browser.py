"""History in a real Chromium: the import action (two files at once), the time-range control, and
the downloads (CSV, Parquet, the header pcap) read back and compared with what the page shows."""

from __future__ import annotations

import io
import subprocess
import time

import pandas as pd
import pytest
from conftest import need, wait_for
from pcapgen import pcap_bytes
from test_browser import CHROME_ARGS, CHROMIUM, MARKER, assert_no_marker, dashboard, module_failed, open_page, packets

pytestmark = [pytest.mark.browser]


def _frames(t0: float, n: int, dport: int) -> list[tuple[float, bytes]]:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    return [(t0 + i * 0.5, bytes(Ether() / IP(src="10.7.0.1", dst="10.7.0.2") / UDP(sport=5000, dport=dport)
                                 / MARKER)) for i in range(n)]


def _download(page, name: str) -> bytes:
    """Click a download button and return the file; once more if an auto-refresh redrew the button
    under the click (a deferred download is made at the click, by the server)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    button = page.get_by_role("button", name=name, exact=True)
    for attempt in range(3):
        # The live and the history view both have a "seconds (CSV)"; while a rerun that switches
        # views is still running, Streamlit keeps the old view's (stale) elements on the page.
        assert wait_for(lambda: button.count() == 1, 30), f"{button.count()} buttons named {name!r}"
        button.wait_for(state="visible", timeout=30_000)
        try:
            with page.expect_download(timeout=45_000) as got:
                button.click()
            with open(got.value.path(), "rb") as fh:
                return fh.read()
        except PlaywrightTimeout:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def test_browser_import_range_and_downloads(tmp_path):
    from playwright.sync_api import sync_playwright

    need(bool(subprocess.run(["which", "tshark"], capture_output=True).stdout), "tshark is not installed")
    now = time.time()
    files = []
    for i, n in enumerate((30, 45)):
        path = tmp_path / f"part{i}.pcap"
        path.write_bytes(pcap_bytes(_frames(now - 1200 + i * 120, n, 7000 + i)))
        files.append(str(path))
    start = tmp_path / "start.pcap"
    start.write_bytes(pcap_bytes(_frames(now - 60, 12, 7100)))
    store = tmp_path / "h.duckdb"
    with dashboard(["--pcap", str(start)], tmp_path / "server.log", STORE=str(store)) as url, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROME_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 2400}, accept_downloads=True)
        open_page(page, url)
        assert wait_for(lambda: packets(page) == 12, 15)
        # Live downloads: the buffer's headers as a pcap tshark reads, no payload in it.
        pcap = _download(page, "Buffered packets' headers (pcap, no payload)")
        assert_no_marker(pcap)
        (tmp_path / "headers.pcap").write_bytes(pcap)
        out = subprocess.run(["tshark", "-r", str(tmp_path / "headers.pcap"), "-T", "fields", "-e", "ip.src",
                              "-e", "ip.dst", "-e", "udp.dstport"], capture_output=True, text=True, check=True)
        assert out.stdout.splitlines() == ["10.7.0.1\t10.7.0.2\t7100"] * 12
        live = pd.read_parquet(io.BytesIO(_download(page, "packets (Parquet)")))
        assert len(live) == packets(page)
        # Import two files at once through the page.
        page.get_by_text("Import capture files into the history").click()
        page.locator('[data-testid="stMain"] input[type="file"]').set_input_files(files)
        page.wait_for_timeout(1500)
        page.get_by_role("button", name="Import", exact=True).click()
        assert wait_for(lambda: page.get_by_text("Imported 2 files, 75 packets").count() > 0, 90), \
            page.inner_text("body")[-2000:]
        # The last hour, from the store: the imported packets (a file source is never recorded twice).
        for attempt in range(2):
            radio = page.locator('[data-testid="stRadio"]').filter(has_text="Time range")
            radio.get_by_text("1 h", exact=True).click()
            assert wait_for(lambda: packets(page) == 75, 15), page.inner_text("body")[-2000:]
            # The axis title is drawn by Plotly after the metrics: give the chart time to render.
            if wait_for(lambda: "bin width 5 s" in page.content(), 20):
                break
            # On a loaded machine Chromium may fail to fetch a chart's script (the server's answer is
            # late or its idle connection closed under the request); the document keeps that failure,
            # so only a reload recovers. Anything else is a real failure.
            assert attempt == 0 and module_failed(page), page.inner_text("body")[-2000:]
            page.reload()
            page.wait_for_selector('[data-testid="stMetric"]', timeout=60_000)
        sec = pd.read_csv(io.BytesIO(_download(page, "seconds (CSV)")))
        assert int(sec["packets"].sum()) == 75 and int(sec["pk_udp"].sum()) == 75
        conv = pd.read_parquet(io.BytesIO(_download(page, "conversations (Parquet)")))
        assert sorted(conv["packets"].tolist()) == [30, 45] and set(conv["b_port"]) == {7000, 7001}
        assert page.locator('[data-testid="stException"]').count() == 0
        assert_no_marker(page.content())
        browser.close()
    assert_no_marker((tmp_path / "server.log").read_bytes())
