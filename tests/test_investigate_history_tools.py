"""Explain, baselines and the threshold back-test over a stored range (issue 15), drawn by the history view
for any store: here the host's own history store; tests/test_investigate_fleet.py shows them on the fleet page.

The file: two minutes of mixed traffic whose second minute carries SPIKER's UDP burst (invhelp), imported
through the page's action; expectations from tshark's reading of the same file and fresh detectors."""

from __future__ import annotations

import pytest
from invhelp import SPIKER
from test_dashboard import fresh as fresh  # the fixture: a new engine per test
from test_dashboard import rendered
from test_investigate_backtest_history import packets_trials, spiky  # noqa: F401  (the module's file)
from test_investigate_history import filtered, history_page_at, per_minute

SPIKE_VALUES = [10, 50, 100]


def tools_on(at, since: int, until: int):
    """The page on [since, until] (from/to in the URL narrow the stored range)."""
    return filtered(at, **{"from": str(since), "to": str(until + 1)})


def explained_share(path: str, host: str, m0: int, m1: int) -> float:
    """tshark's share of the rise from minute m0 to minute m1 carried by conversations with `host` at an end."""
    every = per_minute(path, "ip || ipv6")
    mine = per_minute(path, f"ip.addr=={host}")
    return (mine[m1] - mine[m0]) / (every[m1] - every[m0])


def test_history_explains_the_spiking_host_with_its_share(fresh, tmp_path, spiky):  # noqa: F811
    path, pkts = spiky
    m0 = int(float(pkts[0].time)) // 60 * 60
    at = tools_on(history_page_at(fresh, tmp_path, path), m0 + 60, m0 + 119)
    at.toggle(key="hist_explain").set_value(True).run()
    assert not at.exception
    detail = next(d.value for d in at.dataframe if "share of the change %" in d.value.columns and "by" not in
                  d.value.columns)
    rows = dict(zip(detail["key"], detail["share of the change %"]))
    want = explained_share(path, SPIKER, m0, m0 + 60)
    assert rows[SPIKER] == pytest.approx(100 * want, abs=0.05) and want > 0.5
    assert any("explain" in rendered(s.value) for s in at.success)


def test_history_back_test_and_baseline_over_the_range(fresh, tmp_path, spiky):  # noqa: F811
    path, pkts = spiky
    m0 = int(float(pkts[0].time)) // 60 * 60
    at = history_page_at(fresh, tmp_path, path)
    # Back-test: the spike thresholds over the range's stored seconds = the detectors on the packets.
    want = packets_trials(pkts)
    at.selectbox(key="hbt_setting").set_value("SPIKE_MIN_PPS").run()
    at.text_input(key="hbt_values_SPIKE_MIN_PPS").input(", ".join(map(str, SPIKE_VALUES))).run()
    at.button(key="hbt_run").click().run()
    table = next(d.value for d in at.dataframe if "times raised" in d.value.columns)
    assert table["alerts"].tolist() == [t.rows for t in want] and want[0].rows >= 1
    assert table["times raised"].tolist() == [t.raised for t in want]
    # Baseline: the first minute saved; the second minute's new hosts and services are what it adds.
    at = tools_on(at, m0, m0 + 59)
    at.text_input(key="hist_baseline_name").input("first-minute").run()
    at.button(key="hist_baseline_save").click().run()
    assert any("Baseline first-minute saved" in rendered(s.value) for s in at.success)
    at = tools_on(at, m0 + 60, m0 + 119)
    at.selectbox(key="hist_baseline_pick").set_value("first-minute").run()
    at.button(key="hist_baseline_compare").click().run()
    services = next(d.value for d in at.dataframe if "new service" in d.value.columns)["new service"].tolist()
    assert "udp/5353" in services  # the burst's service, first seen in the second minute
    assert not at.exception
