"""A real Chromium (Debian's, driven by Playwright) against `streamlit run dashboard.py` while traffic flows on lo."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, need, wait_for

pytestmark = [pytest.mark.browser, pytest.mark.live]

CHROMIUM = "/usr/bin/chromium"
CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "test-artifacts"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, wait, then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def server(root_only) -> Iterator[str]:
    """The dashboard on its own port, capturing lo."""
    need(os.path.exists(CHROMIUM), "Debian's chromium is not installed (apt-get install chromium)")
    port = free_port()
    env = {**os.environ, "NTM_REFRESH_S": "2"}
    proc = subprocess.Popen([str(ROOT / ".venv/bin/streamlit"), "run", "dashboard.py", "--server.port", str(port),
                             "--server.headless", "true", "--", "--iface", "lo"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=1).status == 200:
                    break
            except OSError:
                time.sleep(0.3)
        else:
            pytest.fail("the dashboard did not start")
        yield url
    finally:
        stop_process(proc)


@pytest.fixture
def traffic() -> Iterator[None]:
    """UDP datagrams to a local port (about 50/s) and pings on lo, until the test ends (at most 120 s)."""
    stop = threading.Event()
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    dest = rx.getsockname()

    def send() -> None:
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        end = time.monotonic() + 120
        while not stop.is_set() and time.monotonic() < end:
            tx.sendto(b"x" * 100, dest)
            stop.wait(0.02)
        tx.close()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    ping = subprocess.Popen(["ping", "-i", "0.2", "-w", "120", "127.0.0.1"], stdout=subprocess.DEVNULL)
    yield
    stop.set()
    sender.join(2)
    stop_process(ping)
    rx.close()


def packets(page) -> int:
    value = page.locator('[data-testid="stMetric"]', has_text="Packets").first
    return int(value.locator('[data-testid="stMetricValue"]').inner_text().replace(",", ""))


def pie_labels(page) -> list[str]:
    return page.evaluate("""() => [...document.querySelectorAll('.slicetext')]
                             .map(t => t.textContent)""")


def test_browser_live_refresh_filter_and_screenshot(server, traffic):
    need(shutil.which("ping") is not None, "ping (iputils-ping) is not installed")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROME_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 2400})
        page.goto(server)
        page.wait_for_selector('[data-testid="stMetric"]', timeout=30_000)
        assert wait_for(lambda: packets(page) > 0, 15)
        first = packets(page)
        # Two auto-refreshes (every 2 s) without any click: the total must rise by itself.
        assert wait_for(lambda: packets(page) > first, 6), "the page did not refresh by itself"
        page.get_by_role("button", name="Refresh now").click()
        page.wait_for_timeout(1000)
        assert packets(page) > first
        assert wait_for(lambda: any(t.startswith("UDP") for t in pie_labels(page)), 10), pie_labels(page)
        page.wait_for_timeout(2500)
        shot = ARTIFACTS / "screenshot.png"
        page.screenshot(path=str(shot), full_page=True)

        # A port scan on lo shows up as an alert without any click.
        if shutil.which("nmap"):
            subprocess.run(["nmap", "-n", "-Pn", "-sS", "-p", "1-50", "--max-retries", "0", "127.0.0.1"],
                           capture_output=True, timeout=60, check=True)
            assert wait_for(lambda: page.get_by_text("port_scan").count() > 0, 10), "no alert on the page"
        elif os.environ.get("CI"):
            pytest.fail("nmap is required in CI")

        page.get_by_label("BPF filter").fill("icmp")
        page.get_by_label("BPF filter").press("Enter")
        page.wait_for_timeout(500)
        page.get_by_role("button", name="Start").click()
        # The new capture sees only pings: the pie turns into one ICMP slice.
        assert wait_for(lambda: pie_labels(page) and all(t.startswith("ICMP") for t in pie_labels(page)), 15), \
            pie_labels(page)
        assert page.locator('[data-testid="stException"]').count() == 0
        page.screenshot(path=str(ARTIFACTS / "screenshot-icmp-only.png"), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        shutil.copy(shot, Path(ROOT / "docs" / "screenshot.png"))
