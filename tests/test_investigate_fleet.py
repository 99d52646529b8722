"""Explain, baselines and the threshold back-test on the fleet page (issue 15): the history view draws them
for any store, here one sensor's view (fleet_page.SensorView) of a real 2-shard ClickHouse cluster fed by real
sensor processes (tests/test_fleet_page.py's fixture: charlie counted 260 UDP datagrams on lo, alpha 140)."""

from __future__ import annotations

from fleethelp import cluster  # noqa: F401  (the module's cluster fixture)
from streamlit.testing.v1 import AppTest
from test_dashboard import rendered
from test_fleet_page import APP, fleet, page_env  # noqa: F401  (the same sensors, in this module's cluster)
from test_fleet_sensor import ON_SHARD_1


def frame(at, column: str):
    return next(d.value for d in at.dataframe if column in d.value.columns)


def test_fleet_page_explains_baselines_and_back_tests_one_sensors_range(page_env):  # noqa: F811
    counted = page_env["counted"][ON_SHARD_1]
    at = AppTest.from_file(APP, default_timeout=90).run()
    at.selectbox(key="fleet_sensor").set_value(ON_SHARD_1).run()
    at.radio(key="fleet_range").set_value("1 h").run()
    assert not at.exception, at.exception
    # Explain: all of the range's traffic is new against the hour before (the cluster was empty then), and
    # every datagram went from 127.0.0.1 to 127.0.0.1.
    at.toggle(key="hist_explain").set_value(True).run()
    detail = frame(at, "share of the change %")
    detail = detail if "key" in detail.columns else frame(at, "key")
    rows = dict(zip(detail["key"], detail["share of the change %"]))
    assert rows.get("127.0.0.1") == 100.0, rows
    assert any("127.0.0.1" in rendered(s.value) or "udp/" in rendered(s.value) for s in at.success)
    # Back-test: UDP_FLOOD_PPS over the sensor's stored seconds; at 1 a second, at most one raise per datagram.
    at.selectbox(key="hbt_setting").set_value("UDP_FLOOD_PPS").run()
    at.text_input(key="hbt_values_UDP_FLOOD_PPS").input("1, 1000000").run()
    at.button(key="hbt_run").click().run()
    table = frame(at, "seconds that could raise")
    assert table["times raised"].tolist() == [f"≤ {counted:,}", "≤ 0"]
    assert table["seconds that could raise"].tolist()[1] == 0 and table["seconds that could raise"].tolist()[0] >= 1
    # Baseline: saved in ClickHouse from the range; the same range then holds nothing new.
    at.text_input(key="hist_baseline_name").input("charlie-hour").run()
    at.button(key="hist_baseline_save").click().run()
    assert any(f"Baseline charlie-hour saved ({counted:,} packets" in rendered(s.value) for s in at.success), \
        [s.value for s in at.success] + [e.value for e in at.error]
    at.selectbox(key="hist_baseline_pick").set_value("charlie-hour").run()
    at.button(key="hist_baseline_compare").click().run()
    assert frame(at, "new host").empty and frame(at, "new service").empty
    assert not at.exception
