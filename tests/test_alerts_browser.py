"""The exclusion rules list in a real Chromium: a rule added on the page silences one of two nmap scanners
on lo (the page counts it as suppressed by the rule, the Alerts metric shows only the other), and the rule
is exported (downloaded), removed and imported again on the page."""

from __future__ import annotations

import json
import time

import pytest
from conftest import wait_for
from notifyhelp import nmap_scan, scan_port
from test_browser import CHROME_ARGS, CHROMIUM, dashboard
from test_history_browser import _download

pytestmark = [pytest.mark.browser, pytest.mark.live]


def metric(page, label: str) -> int:
    value = page.locator('[data-testid="stMetric"]', has_text=label).first
    return int(value.locator('[data-testid="stMetricValue"]').inner_text().replace(",", ""))


def choose(page, label: str, option: str) -> None:
    """Pick an option of a selectbox; the 2 s auto-refresh may close the open list, so try again."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    for attempt in range(5):
        try:
            page.get_by_label(label).click()
            page.get_by_role("option", name=option).click(timeout=3_000)
            return
        except PlaywrightTimeout:
            if attempt == 4:
                raise


def upload(page, path) -> None:
    """Give the rules uploader a file; again if a rerun replaced the input under it."""
    for _ in range(5):
        page.get_by_text("Import rules (an exported JSON file)").wait_for(timeout=30_000)
        page.wait_for_timeout(500)
        page.locator('[data-testid="stMain"] input[type="file"][accept*=".json"]').set_input_files(str(path))
        if wait_for(lambda: path.name in body(page), 5):
            return
    raise AssertionError(body(page)[-2000:])


def body(page) -> str:
    return page.inner_text("body")


def test_browser_rules_list_silences_one_scanner(root_only, tmp_path):
    from playwright.sync_api import sync_playwright

    tmp_path.chmod(0o1777)  # the dashboard, dropped to nobody, creates its store here
    sport = scan_port()
    with dashboard(["--iface", "lo", "--filter", f"tcp port {sport}"], tmp_path / "server.log",
                   STORE=str(tmp_path / "h.duckdb"), ALERTS_MAX="500") as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROME_ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 3000})
        page.goto(url)
        page.wait_for_selector('[data-testid="stMetric"]', timeout=30_000)
        page.get_by_text("Alert rules, detectors and notifications").click()  # the toggle
        page.get_by_label("Rule name").fill("lab scanner")
        page.get_by_label("Source (address or CIDR; empty: any)").fill("127.0.0.5")
        page.get_by_label("Comment (why)").fill("the weekly audit")
        page.get_by_role("button", name="Save rule").click()
        assert wait_for(lambda: "Saved rule lab scanner" in body(page), 20), body(page)[-2000:]
        nmap_scan(sport, "50000-50299", source="127.0.0.5")
        nmap_scan(sport, "50000-50299", source="127.0.0.6")
        assert wait_for(lambda: "1 by rule lab scanner" in body(page), 30), body(page)[-3000:]
        assert wait_for(lambda: metric(page, "Alerts") == 1, 10)  # only 127.0.0.6's scan is raised
        time.sleep(2.5)  # an auto-refresh later, still one
        assert metric(page, "Alerts") == 1
        # Export the rules (the real download), then remove the rule and import the file again.
        exported = json.loads(_download(page, "Export rules (JSON)"))
        assert [(r["name"], r["source"], r["comment"]) for r in exported["rules"]] == \
            [("lab scanner", "127.0.0.5/32", "the weekly audit")]
        (tmp_path / "rules.json").write_text(json.dumps(exported))
        # Remove it on the page (the section stays open after a change).
        choose(page, "Add or edit", "lab scanner")
        page.get_by_role("button", name="Remove rule lab scanner").click()
        assert wait_for(lambda: "Removed rule lab scanner" in body(page), 20), body(page)[-2000:]
        assert wait_for(lambda: "No exclusion rules" in body(page), 10)
        page.get_by_text("Import rules from a file").click()
        upload(page, tmp_path / "rules.json")
        button = page.get_by_role("button", name="Import these rules")
        assert wait_for(lambda: button.count() == 1, 30), body(page)[-3000:]
        button.click()
        assert wait_for(lambda: "Imported 1 rule(s)" in body(page), 20), body(page)[-2000:]
        assert wait_for(lambda: "No exclusion rules" not in body(page), 10)
        assert page.locator('[data-testid="stException"]').count() == 0
        browser.close()
