"""A real Chromium against `streamlit run dashboard.py`: the enrichment panel, and a hostile PTR name shown as text."""

from __future__ import annotations

import pytest
from conftest import wait_for
from enrichhelp import HOSTILE, dnsmasq
from pcapgen import pcap_bytes
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from test_browser import CHROME_ARGS, CHROMIUM, dashboard, open_page

pytestmark = [pytest.mark.browser]

EVIL = "10.213.0.66"


def test_browser_enrichment_panel_and_hostile_ptr_name(veth, tmp_path):
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    frames = [(1_700_000_000 + i * 0.1, bytes(Ether() / IP(src=EVIL, dst="8.8.8.8") / UDP(sport=4000 + i, dport=53)
                                              / b"q")) for i in range(5)]
    path = tmp_path / "who.pcap"
    path.write_bytes(pcap_bytes(frames))
    with dnsmasq(veth.ns, veth.ns_ip, {EVIL: HOSTILE}), \
            dashboard(["--pcap", str(path)], tmp_path / "server.log", DNS_SERVER=veth.ns_ip) as url, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROME_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 2400})
        open_page(page, url)
        page.get_by_text("Who is on the other end").wait_for(timeout=30_000)  # shown by default
        assert wait_for(lambda: page.get_by_role("tab", name="Top countries").count() == 1, 20)
        for tab in ("Top talkers", "Conversations", "Top countries", "Top networks (AS)", "By process"):
            assert page.get_by_role("tab", name=tab).count() == 1, tab
        chart = page.locator(".js-plotly-plot", has_text="Top sources: who")
        assert wait_for(lambda: chart.count() == 1, 15)

        seen: list[str] = []

        def hover_text() -> str:
            page.wait_for_timeout(1000)  # a refresh later the name is in the cache
            bar = page.locator(".js-plotly-plot", has_text="Top sources: who").locator("g.point path").first
            try:  # the 2 s refresh may redraw the chart under the pointer: try again then
                bar.scroll_into_view_if_needed(timeout=3000)
                box = bar.bounding_box(timeout=3000)
                page.mouse.move(box["x"] + box["width"] / 2 - 3, box["y"] + box["height"] / 2 + 2)
                page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
                page.wait_for_timeout(200)
                seen.append(page.locator(".js-plotly-plot", has_text="Top sources: who").locator(".hoverlayer")
                            .text_content(timeout=2000) or "")
                return seen[-1]
            except PlaywrightError as exc:
                seen.append(str(exc)[:200])
                return ""

        assert wait_for(lambda: "**bold**<b>x</b>" in hover_text(), 60), seen[-3:]  # the markup shows as itself
        assert chart.locator(".hoverlayer tspan[style*='bold']").count() == 0  # and is not applied
        assert page.locator("a[href^='javascript']").count() == 0
        # Only the open tab is drawn: a click on another reruns the page with that one (and not the first).
        page.get_by_role("tab", name="Top countries").click()
        countries = page.locator(".js-plotly-plot", has_text="Top countries")
        assert wait_for(lambda: countries.count() == 1 and chart.count() == 0, 30), page.inner_text("body")[-1500:]
        # The AS database (a 21 MB CSV) loads in the background: the caption says "loading…" until it has.
        assert wait_for(lambda: page.get_by_text("AS number and organisation: ip-location-db asn").count() >= 1,
                        120), page.inner_text("body")[-1500:]
        browser.close()
