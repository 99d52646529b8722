"""The fleet page's filters and its other panels (issues 15 and 17), over a real local 2-shard ClickHouse
cluster: two sensors' known traffic goes through the real rollup into the cluster; every expectation is
counted from those packet lists with pandas, never from the store.

The URL's keys (port, proto, src, host, vlan, country, asn, sensor) re-filter the fleet view as they do the
single-host history page; sensor= is the sensor picker; chips remove filters; a clicked bar or conversation
row sets its filters; the VLAN chart, the enrichment views and the recent-packets statement are there.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
from fleethelp import cluster  # noqa: F401  (the module's cluster fixture)
from storehelp import records
from streamlit.testing.v1 import AppTest
from test_dashboard import array, count, rendered

import fleet_page
import investigate_page as inv
from store.clickhouse import ClickHouseStore
from store.rollup import Rollup

APP = "../dashboard.py"
DB = "t_fleet_filters"

# (sensor, cls, src, sport, dst, dport, packets, wire_len, vlan); cls 0 TCP, 1 UDP, 2 ICMP
FLOWS = [("east", 1, "10.5.0.1", 5000, "10.5.0.2", 5353, 40, 120, 10),
         ("east", 0, "10.5.0.3", 40000, "8.8.8.8", 443, 30, 200, 20),
         ("east", 2, "10.5.0.1", -1, "10.5.0.9", -1, 5, 84, 10),
         ("west", 1, "10.6.0.1", 6000, "10.6.0.2", 53, 25, 90, 0),
         ("west", 0, "10.6.0.4", 41000, "1.1.1.1", 443, 15, 300, 30)]


@pytest.fixture(scope="module")
def t0() -> int:
    """Ten minutes before the module's traffic is fed, minute-aligned: inside the page's "1 h" range."""
    return int(time.time()) // 60 * 60 - 600


def packets(t0: int = 0) -> pd.DataFrame:
    """Every packet fed, one row each (the reference the page is checked against), from second t0."""
    rows = []
    for sensor, cls, src, sport, dst, dport, n, size, vlan in FLOWS:
        for k in range(n):
            rows.append({"sensor": sensor, "cls": cls, "src": src, "sport": sport, "dst": dst, "dport": dport,
                         "wire_len": size, "vlan": vlan, "ts": t0 + 5 + k * 1.7 + cls * 0.3})
    return pd.DataFrame(rows)


def want(sensor: str | None = None, **eq) -> int:
    """Packets of the fed traffic matching: sensor, and each key equal (port / host: either end)."""
    df = packets()
    if sensor:
        df = df[df["sensor"] == sensor]
    for key, value in eq.items():
        if key == "port":
            df = df[(df["sport"] == value) | (df["dport"] == value)]
        elif key == "host":
            df = df[(df["src"] == value) | (df["dst"] == value)]
        else:
            df = df[df[key] == value]
    return len(df)


@pytest.fixture(scope="module")
def fed(cluster, t0) -> Iterator[str]:  # noqa: F811
    """The two sensors' traffic written through the real rollup into the cluster; the address to read."""
    df = packets(t0)
    for sensor in ("east", "west"):
        ch = ClickHouseStore(cluster.address(), cluster=cluster.name, database=DB, sensor=sensor)
        assert ch.open(), ch.status().message
        r = Rollup(ch, sensor=sensor, iface="lo", flush_s=3600)
        mine = df[df["sensor"] == sensor].sort_values("ts")
        r.add(records(mine.drop(columns="sensor").to_dict("records")))
        r.flush(final=True)
        ch.close()
    yield cluster.address(2)


@pytest.fixture
def at(fed, monkeypatch) -> AppTest:
    """The fleet page over the fed database, on the "1 h" range."""
    monkeypatch.setenv("NTM_CLICKHOUSE_DATABASE", DB)
    monkeypatch.setattr(sys, "argv", ["dashboard.py", "--clickhouse", fed, "--cluster", "fleet"])
    page = AppTest.from_file(APP, default_timeout=60).run()
    page.radio(key="fleet_range").set_value("1 h").run()
    assert not page.exception, page.exception
    return page


def url(at: AppTest, **params: str) -> AppTest:
    """The page opened with these query keys (all others removed)."""
    for k in list(at.query_params):
        del at.query_params[k]
    for k, v in params.items():
        at.query_params[k] = v
    at.run()
    assert not at.exception, at.exception
    return at


def chips(at: AppTest) -> list[str]:
    return [rendered(b.label) for b in at.button if rendered(b.label).startswith("✕ ")]


def test_url_filters_chips_and_the_sensor_picker(at):
    """port= filters every sensor's totals to exactly its packets, with a chip; sensor= in the URL picks the
    sensor; the picker writes sensor= back; proto= alone is exact per second; removing a chip undoes it."""
    assert count(at) == want() == 115
    url(at, port="443")
    assert count(at) == want(port=443) == 45
    assert chips(at) == ["✕ port = 443"]
    url(at, port="443", sensor="west")
    assert at.selectbox(key="fleet_sensor").value == "west"
    assert count(at) == want("west", port=443) == 15
    sensor_chip = next(b for b in at.button if rendered(b.label) == "✕ sensor = west")
    sensor_chip.click().run()  # the chip removed: all sensors again, in the picker too
    assert at.selectbox(key="fleet_sensor").value == fleet_page.ALL and count(at) == want(port=443)
    at.selectbox(key="fleet_sensor").set_value("east").run()
    assert at.query_params["sensor"] == ["east"] or at.query_params["sensor"] == "east", at.query_params
    assert count(at) == want("east", port=443) == 30
    url(at, proto="udp", sensor="east")
    assert count(at) == want("east", cls=1) == 40
    assert any("exact, from the stored per-second protocol counts of that sensor" in rendered(c.value)
               for c in at.caption)
    url(at, host="10.5.0.1")
    assert count(at) == want(host="10.5.0.1") == 45
    chip = next(b for b in at.button if rendered(b.label) == "✕ host = 10.5.0.1")
    chip.click().run()
    assert count(at) == 115 and "host" not in at.query_params
    url(at, sensor="nosuch")
    assert any("sensor=nosuch" in rendered(w.value) for w in at.warning) and count(at) == 0
    url(at, sensor="*x*")  # the URL's text as the view's header: shown as itself, never Markdown
    assert any(h.value == "\\*x\\*" for h in at.header), [h.value for h in at.header]


def test_a_brushed_span_narrows_the_fleet_totals_to_its_seconds(at, t0):
    """A timeline box selection gives from/to; the page opened with them counts exactly the packets of
    those whole seconds (per-second rows: exact), for all sensors and for one."""
    lo, hi = t0 + 12.4, t0 + 31.6
    x = [pd.Timestamp(v, unit="s").strftime("%Y-%m-%d %H:%M:%S.%f") for v in (lo, hi)]  # naive UTC, as Plotly
    pairs = inv.selection_filters(fleet_page.CHART_KINDS["hist_timeline"], {"box": [{"x": x}]}, [], None)
    assert [k for k, _ in pairs] == ["from", "to"] and abs(float(pairs[0][1]) - lo) < 1e-3
    df = packets(t0)
    sec = np.floor(df["ts"])
    inside = (sec >= np.floor(lo)) & (sec <= np.ceil(hi) - 1)  # whole seconds, both ends (the stored grain)
    url(at, **dict(pairs))
    assert count(at) == int(inside.sum()) and 0 < count(at) < len(df)
    assert sum(c.startswith("✕ from") or c.startswith("✕ to") for c in chips(at)) == 2
    url(at, **dict(pairs), sensor="east")
    assert count(at) == int((inside & (df["sensor"] == "east")).sum())


def click(at: AppTest, key: str, label: str) -> list[tuple[str, str]]:
    """What a click on the bar labelled `label` of fleet chart `key` sets (the labels the page registered)."""
    labels = at.session_state[inv.LABELS_KEY][key]
    curve = next(i for i, ys in enumerate(labels) if label in ys)
    sel = {"points": [{"curve_number": curve, "point_index": labels[curve].index(label)}]}
    return inv.selection_filters(fleet_page.CHART_KINDS[key], sel, labels, None)


def test_clicked_bars_and_conversation_rows_filter_the_fleet_page(at):
    """A top-source bar, a port bar, a VLAN bar and a conversation row each give their filters; the page
    filtered by them shows exactly the matching packets."""
    assert click(at, "hist_top_src", "10.6.0.4") == [("src", "10.6.0.4")]
    url(at, src="10.6.0.4")
    assert count(at) == want(src="10.6.0.4") == 15
    url(at)
    assert click(at, "hist_ports", "udp/53 domain") == [("proto", "udp"), ("port", "53")]
    url(at, proto="udp", port="53")
    assert count(at) == want(cls=1, port=53) == 25
    url(at)
    assert click(at, "fleet_vlans", "VLAN 10") == [("vlan", "10")]
    url(at, vlan="10")
    assert count(at) == want(vlan=10) == 45
    url(at)
    rows = at.session_state["_fleet_conversations"]
    row = next(r for r in rows if r["b"] == "8.8.8.8" or r["a"] == "8.8.8.8")
    pairs = inv.conversation_filters(row)
    assert sorted(pairs) == sorted([("host", "10.5.0.3"), ("host", "8.8.8.8"), ("port", "40000"),
                                    ("port", "443"), ("proto", "tcp")])
    for k in list(at.query_params):
        del at.query_params[k]
    at.query_params["host"] = ["10.5.0.3", "8.8.8.8"]
    at.query_params["port"] = ["40000", "443"]
    at.query_params["proto"] = "tcp"
    at.run()
    assert count(at) == want(src="10.5.0.3", dst="8.8.8.8") == 30


def figures(at: AppTest) -> dict[str, dict]:
    """The page's titled charts by title (the sensor cards' sparklines have none)."""
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    return {s["layout"]["title"]["text"]: s for s in specs if "title" in s["layout"]}


def bars(fig: dict, trace: int = 0) -> dict[str, int]:
    d = fig["data"][trace]
    return dict(zip(d["y"], array(d["x"]).astype(int).tolist()))


def test_vlan_chart_enrichment_views_and_recent_packets_statement(at):
    """The VLAN chart sums each VLAN's packets (untagged left out); the networks and countries views give
    8.8.8.8 to AS15169/US and 1.1.1.1 to AS13335/AU with their received packets; services name the ports;
    the page says the fleet keeps no packets and what it keeps instead."""
    import enrich

    assert enrich.shared().geo.wait_loaded(120)
    at.run()
    df = packets()
    tagged = df[df["vlan"] > 0].groupby("vlan").size()
    figs = figures(at)
    assert bars(figs["VLANs (stored conversations, per minute)"]) == {f"VLAN {v}": int(n) for v, n in tagged.items()}
    nets = next(f for t, f in figs.items() if t.startswith("Top networks (AS)"))
    assert bars(nets, 1)["AS15169 Google LLC"] == want(dst="8.8.8.8") == 30
    assert bars(nets, 1)["AS13335 Cloudflare, Inc."] == want(dst="1.1.1.1") == 15
    countries = next(f for t, f in figs.items() if t.startswith("Top countries"))
    assert bars(countries, 1)["US"] == 30 and bars(countries, 1)["AU"] == 15
    services = next(d.value for d in at.dataframe if "service" in d.value.columns)
    got = {(r.protocol, r.port): (r.service, r.packets) for r in services.itertuples(index=False)}
    assert got[("TCP", 443)] == ("https", want(cls=0, dport=443))
    assert got[("UDP", 53)] == ("domain", 25) and got[("UDP", 5353)] == ("mdns", 40)
    assert any("the fleet does not store packets" in m.value for m in at.markdown)
    url(at, port="443")  # the VLAN chart re-filters with the page
    assert bars(figures(at)["VLANs (stored conversations, per minute)"]) == {"VLAN 20": want(port=443, vlan=20),
                                                                             "VLAN 30": want(port=443, vlan=30)}
    url(at, sensor="west")
    figs = figures(at)
    assert bars(figs["VLANs (stored conversations, per minute)"]) == {"VLAN 30": want("west", vlan=30)}
    assert np.isclose(count(at), want("west"))


@pytest.mark.parametrize("written_at", [7, "7, backfill cut", None])
def test_store_vlans_over_whole_hours_and_minutes_equal_the_traffic_fed(cluster, monkeypatch, written_at):  # noqa: F811
    """Store.vlans (the VLAN chart's unfiltered question) over a range of whole closed hours (their per-VLAN
    sums, vlans_1h) and ragged minutes at both ends (minute rows), in the cluster: each VLAN's packets and
    bytes as fed. Written by a program of schema version 7 (no per-VLAN sums), then opened by this one: the
    migration fills them from the hour rows, with the same answer; also after a backfill cut off when it had
    written one VLAN's sums of each hour (the next open completes the others)."""
    import store.clickhouse as chmod
    from store.base import TimeRange

    if written_at:
        monkeypatch.setattr(chmod, "CH_SCHEMA_VERSION", 7)
    db = f"t_fleet_vlans_{str(written_at or 'now').replace(', backfill ', '_')}"

    h0 = 1_700_006_400  # an hour boundary, long ago
    rng = np.random.default_rng(7)
    n = 3000
    fed = pd.DataFrame({"ts": np.sort(h0 + rng.random(n) * 4 * 3600), "vlan": rng.choice([0, 7, 100, 4000], n),
                        "wire_len": rng.integers(60, 1500, n), "sport": rng.integers(1024, 1100, n)})
    fed["src"], fed["dst"], fed["cls"], fed["dport"] = "10.7.0.1", "10.7.0.2", 1, 53
    ch = ClickHouseStore(cluster.address(), cluster=cluster.name, database=db, sensor="v")
    assert ch.open(), ch.status().message
    roll = Rollup(ch, sensor="v", iface="lo", flush_s=3600)
    for hour in range(4):  # an hour per build, as a sensor closes them
        part = fed[(fed["ts"] >= h0 + 3600 * hour) & (fed["ts"] < h0 + 3600 * (hour + 1))]
        roll.add(records(part.to_dict("records")))
        roll.flush()
    roll.flush(final=True)
    if written_at:
        ch.close()
        monkeypatch.undo()
        assert not cluster.query(f"EXISTS TABLE {db}.vlans_1h")[0][0]
        if written_at != 7:  # the version 8 backfill, cut off after VLAN 0's rows (on each shard)
            create, fill = chmod.vlans_sql(db)
            for shard in (1, 2):
                cluster.query(create, shard=shard)
                cluster.query(fill.replace("WHERE (sensor", "WHERE vlan = 0 AND (sensor"), shard=shard)
            assert sum(cluster.query(f"SELECT count() FROM {db}.vlans_1h", shard=k)[0][0] for k in (1, 2)) > 0
        ch = ClickHouseStore(cluster.address(2), cluster=cluster.name, database=db)
        assert ch.open(), ch.status().message
    assert cluster.query(f"SELECT count() FROM {db}.vlans_1h")[0][0] + \
        cluster.query(f"SELECT count() FROM {db}.vlans_1h", shard=2)[0][0] > 0  # the hours' sums are read
    since, until = h0 + 1500, h0 + 3 * 3600 + 1800 - 1  # cuts the first and the last hour, minute-aligned
    got = ch.vlans(TimeRange(since, until)).astype("int64").set_index("vlan")
    ch.close()
    minute = (np.floor(fed["ts"]) // 60 * 60).astype(np.int64)
    inside = fed[(minute >= since - since % 60) & (minute <= until)]
    want_ = inside.groupby("vlan").agg(packets=("ts", "size"), bytes=("wire_len", "sum")).astype("int64")
    assert got.to_dict("index") == want_.to_dict("index")
    assert 0 < len(inside) < len(fed) and len(got) == 4


# -- the page's own callbacks, its error state, and its other fixes ------------------------------------


def chart_id(at: AppTest, key: str) -> str:
    """The widget id of the page's chart `key` (a chart with on_select is a widget: its id ends with its key)."""
    ids = [c.proto.id for c in at.get("plotly_chart") if c.proto.id.endswith(key)]
    assert len(ids) == 1, f"chart {key} is not selectable (no on_select)"
    return ids[0]


def select(at: AppTest, key: str, selection: dict, widget_id: str | None = None) -> AppTest:
    """A selection on the page's chart (or table) `key`, as the browser sends it: its widget state, so the
    page's own on_select callback turns it into filters (AppTest has no plotly element to click)."""
    ws = at._tree.get_widget_states()
    w = ws.widgets.add()
    w.id = widget_id or chart_id(at, key)
    w.string_value = json.dumps({"selection": selection})
    at = at._run(ws)
    assert not at.exception, at.exception
    return at


def bar_click(at: AppTest, key: str, label: str) -> AppTest:
    """A click on the bar labelled `label` of chart `key` (the labels the page registered for it)."""
    labels = at.session_state[inv.LABELS_KEY][key]
    curve = next(i for i, ys in enumerate(labels) if label in ys)
    i = labels[curve].index(label)
    return select(at, key, {"points": [{"curve_number": curve, "point_number": i, "point_index": i, "y": label}],
                            "point_indices": [i], "box": [], "lasso": []})


def spec(at: AppTest) -> set[tuple[str, str]]:
    from investigate import filters as flt

    return set(flt.from_query(at.query_params))


def test_clicks_go_through_the_pages_callbacks_and_refilter_the_panels(at):
    """A top-source bar, a VLAN bar and a conversation row, clicked as the browser sends them: the page's
    on_select callbacks write the URL, and the totals and the VLAN chart re-filter to exactly their packets."""
    at = bar_click(url(at), "hist_top_src", "10.6.0.4")
    assert spec(at) == {("src", "10.6.0.4")}
    assert count(at) == want(src="10.6.0.4") == 15
    at = bar_click(url(at), "fleet_vlans", "VLAN 10")
    assert spec(at) == {("vlan", "10")} and count(at) == want(vlan=10) == 45
    assert bars(figures(at)["VLANs (stored conversations, per minute)"]) == {"VLAN 10": 45}
    at = url(at)
    rows = at.session_state["_fleet_conversations"]
    i = next(k for k, r in enumerate(rows) if "8.8.8.8" in (r["a"], r["b"]))
    table = next(d for d in at.dataframe if d.proto.id.endswith("hist_conversations"))
    at = select(at, "hist_conversations", {"rows": [i], "columns": []}, table.proto.id)
    assert spec(at) == {("host", "10.5.0.3"), ("host", "8.8.8.8"), ("port", "40000"), ("port", "443"),
                        ("proto", "tcp")}
    assert count(at) == want(src="10.5.0.3", dst="8.8.8.8") == 30


def test_a_brush_on_the_filtered_timeline_sets_from_and_to(at, t0):
    """With a filter set, the timeline (the matching traffic per minute) is still a brush: a box selection
    sets from/to in the URL next to the filter, as on the unfiltered page."""
    at = url(at, port="443")
    lo, hi = t0 + 12.4, t0 + 31.6
    x = [pd.Timestamp(v, unit="s").strftime("%Y-%m-%d %H:%M:%S.%f") for v in (lo, hi)]
    at = select(at, "hist_timeline", {"points": [], "point_indices": [], "box": [{"x": x, "y": [0, 1]}],
                                      "lasso": []})
    got = dict(spec(at))
    assert got["port"] == "443" and set(got) == {"port", "from", "to"}, got
    assert abs(float(got["from"]) - lo) < 1e-3 and abs(float(got["to"]) - hi) < 1e-3


def test_vlan_chart_under_a_protocol_filter_sums_in_sql(at):
    """proto= alone is counted from the per-second rows (no conversations read): the VLAN chart then asks
    the store for its sums per VLAN and protocol; each bar is exactly that protocol's packets there."""
    at = url(at, proto="udp")
    assert want(cls=1, vlan=10) == 40 and want(cls=1, vlan=0) == 25  # untagged (west's UDP): not drawn
    assert bars(figures(at)["VLANs (stored conversations, per minute)"]) == {"VLAN 10": 40}


def test_a_sensor_name_is_text_in_the_history_caption(at):
    """sensor= from the URL (anyone can write it) shows as itself in the history caption's store address."""
    at = url(at, sensor="<b>x</b>*y*")
    caps = [c.value for c in at.caption if "· sensor " in c.value]
    assert caps and all("· sensor \\<b\\>x\\</b\\>\\*y\\*" in c.replace("\\/", "/") for c in caps), caps


def test_clickhouse_gone_is_the_pages_error_and_the_page_recovers(at, cluster, monkeypatch):  # noqa: F811
    """The server the page reads from is stopped: the page shows the error (no exception) and keeps its
    refresh running; started again, the next run shows the exact totals. A failing sensor-grid read alone is
    the page's error too."""
    import streamlit_autorefresh

    ticks: list[int] = []
    monkeypatch.setattr(streamlit_autorefresh, "st_autorefresh", lambda interval, key: ticks.append(interval))
    at = url(at)
    cluster.stop_shard(2)
    try:
        at.run()
        assert not at.exception, at.exception
        assert any("ClickHouse cannot be read" in e.value for e in at.error), [e.value for e in at.error]
        assert ticks, "the page stopped refreshing"
    finally:
        cluster.start_shard(2)
    ticks.clear()
    at.run()
    assert not at.exception and not at.error and count(at) == want() == 115

    def grid_fails(self, r, bin_s, cols=("packets", "bytes")):
        raise OSError("Connection reset by peer")

    monkeypatch.setattr(ClickHouseStore, "sensor_series", grid_fails)
    at.radio(key="fleet_range").set_value(next(iter(fleet_page.RANGES))).run()  # Live: refreshes every REFRESH_S
    assert not at.exception, at.exception
    assert any("Connection reset" in e.value for e in at.error), [e.value for e in at.error]
    assert ticks


def test_another_sites_private_addresses_are_not_looked_up():
    """Names: a private, link-local or loopback address is asked of this host's resolver only for a sensor
    that is this host; a public address always."""
    import socket

    asked: list[str] = []

    class Names:
        def name_text(self, addr: str) -> str:
            asked.append(addr)
            return "name-of-" + addr

    remote = fleet_page.SiteNames(Names(), local=False)
    for addr in ("10.5.0.1", "192.168.1.2", "172.16.0.9", "fe80::1", "127.0.0.1", "fd00::2", "100.64.0.1"):
        assert remote.name_text(addr) == fleet_page.NOT_LOOKED_UP
    assert asked == [] and remote.name_text("8.8.8.8") == "name-of-8.8.8.8" and asked == ["8.8.8.8"]
    assert fleet_page.SiteNames(Names(), local=True).name_text("10.5.0.1") == "name-of-10.5.0.1"
    assert fleet_page.is_this_host(socket.gethostname()) and not fleet_page.is_this_host("east")


def test_who_conversations_show_lower_bounds_when_approximate():
    """An approximate top-conversations answer (bounds): the who panel's counts are '≥ the certain part',
    and its caption says so; an exact one shows plain counts."""
    import types

    class Names:
        def name_text(self, addr: str) -> str:
            return ""

    en = types.SimpleNamespace(name_text=Names().name_text, geo=types.SimpleNamespace(lookup=lambda a: None),
                               services=types.SimpleNamespace(label=lambda p, proto: str(p)))
    # Certain part (lo) and most it may be (upper) per conversation, as the store's bounds give them.
    lo, upper = [700, 500], [900, 650]
    approx = pd.DataFrame({"a": ["10.0.0.1", "10.0.0.2"], "a_port": [1000, 1001], "b": ["8.8.8.8", "1.1.1.1"],
                           "b_port": [443, 443], "proto": [6, 6], "vlan": [0, 0], "packets": upper,
                           "bytes": [9000, 6500], "packets_error": [u - x for u, x in zip(upper, lo)],
                           "bytes_error": [100, 100], "first_ts": np.nan, "last_ts": np.nan})

    class View:
        conversations_note = ("packets", 480)

        def top_conversations(self, r, by, n):
            return approx

    df = fleet_page.conversations_who(en, View(), 0, 59, "packets")
    assert df["packets"].tolist() == ["≥ 700", "≥ 500"] and df["bytes"].tolist() == ["≥ 8,900", "≥ 6,400"]


def test_src_and_dst_match_their_own_end_host_either(at):
    """src= counts the packets an address sent, dst= those it received (the stored top sources and
    destinations keep the ends), host= both; networks too, per sensor too. Exact counts of the fed packets."""
    df = packets()
    assert want(src="10.5.0.1") == count(url(at, src="10.5.0.1")) == 45
    assert want(dst="10.5.0.1") == count(url(at, dst="10.5.0.1")) == 0  # never a destination: either end gave 45
    assert want(host="10.5.0.1") == count(url(at, host="10.5.0.1")) == 45
    assert want(dst="8.8.8.8") == count(url(at, dst="8.8.8.8")) == 30
    east_sent = int(df["src"].str.startswith("10.5.").sum())
    east_got = int(df["dst"].str.startswith("10.5.").sum())
    assert east_sent == count(url(at, src="10.5.0.0/16")) == 75
    assert east_got == count(url(at, dst="10.5.0.0/16")) == 45
    assert count(url(at, dst="10.6.0.2", sensor="west")) == want("west", dst="10.6.0.2") == 25
    assert count(url(at, dst="10.6.0.2", sensor="east")) == 0
    assert any("each address at its own end" in rendered(c.value) for c in at.caption)
    assert any("match either end here" in rendered(c.value) for c in at.caption)  # the VLAN chart says it differs
    assert not any("match either end here" in rendered(c.value) for c in url(at, proto="udp").caption)


def test_reads_on_the_pages_pool_equal_the_shared_connections(fed, t0):
    """The page's pool: each thread reads through its own connection, all at once; the answers are the
    shared connection's (and the traffic fed); idle connections are kept up to READERS_MAX, closed at close."""
    from concurrent.futures import ThreadPoolExecutor

    import store.clickhouse as chmod
    from store.base import TimeRange

    ch = ClickHouseStore(fed, cluster="fleet", database=DB)
    assert ch.open(), ch.status().message
    r = TimeRange(t0 - 60, t0 + 600)

    def ask() -> tuple:
        return (ch.totals(r)["packets"], ch.vlans(r).astype("int64").to_dict("list"),
                ch.top_addrs(r, "src", "packets", 50).to_dict("list"))

    shared = ask()
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda _: fleet_page._owned(ch, ask), range(12)))
    assert shared[0] == want() == 115 and all(g == shared for g in got)
    assert 1 <= len(ch._spare) <= chmod.READERS_MAX
    ch.close()
    assert not ch._spare


def test_a_server_error_quoting_a_markup_sensor_name_is_shown_as_text(at):
    """A sensor= name of Markdown and HTML long enough that ClickHouse refuses the query (max query size)
    and quotes it in its error: the page's error shows the quoted name as text, never as markup."""
    name = "**b** <b>h</b> [l](x) " + "a" * 270_000  # > 256 KiB; the server quotes its start
    url(at, sensor=name)
    shown = [e.value for e in at.error]
    assert any("Max query size exceeded" in v for v in shown), shown  # the server's error is there
    for v in shown:
        assert "**b**" not in v and "<b>" not in v and "[l](x)" not in v, v[:300]
    assert any(inv.plain("**b** <b>h</b>") in v for v in shown), [v[:300] for v in shown]


def test_a_panel_failing_on_a_historical_range_keeps_the_refresh(at, monkeypatch):
    """On a historical range (no Live refresh), a read failing after the sensor grid (the VLAN chart's, the
    summary's top ports): the panel shows the error and the page still schedules its (slower) refresh."""
    import streamlit_autorefresh

    import config

    ticks: list[int] = []
    monkeypatch.setattr(streamlit_autorefresh, "st_autorefresh", lambda interval, key: ticks.append(interval))
    url(at)
    assert not ticks  # "1 h": no refresh while everything answers

    def fails(self, *a, **k):
        raise OSError("Connection reset by peer")

    for name in ("vlans", "top_ports"):
        with monkeypatch.context() as m:
            m.setattr(ClickHouseStore, name, fails)
            at.run()
        assert not at.exception, at.exception
        assert any("Connection reset" in e.value for e in at.error), (name, [e.value for e in at.error])
        assert ticks == [int(config.get("REFRESH_S") * 1000 * 5)], (name, ticks)
        ticks.clear()


def test_a_broad_src_network_is_matched_in_sql_over_many_addresses(cluster):  # noqa: F811
    """src=10.0.0.0/8 over 16,000 stored sources (listing them would pass ClickHouse's 256 KiB query size),
    with sources outside it (11/8, IPv6): the packets and bytes per minute are those fed from inside it;
    an IPv6 network and two networks at once (both must hold the address) too."""
    import ipaddress

    from store.base import TimeRange

    t0 = 1_700_020_800
    rows = [{"ts": t0 + (k % 10) * 60 + 1.5, "src": f"10.{k // 65536}.{k // 256 % 256}.{k % 256}",
             "wire_len": 60 + k % 50} for k in range(16_000)]
    rows += [{"ts": t0 + (k % 10) * 60 + 2.5, "src": f"11.0.{k // 256}.{k % 256}", "wire_len": 70} for k in range(500)]
    rows += [{"ts": t0 + (k % 10) * 60 + 3.5, "src": f"fd00::{k + 1:x}", "dst": "fd00::ffff", "wire_len": 90,
              "cls": 1} for k in range(300)]
    fed = pd.DataFrame(rows)
    ch = ClickHouseStore(cluster.address(), cluster=cluster.name, database="t_fleet_nets", sensor="n")
    assert ch.open(), ch.status().message
    roll = Rollup(ch, sensor="n", iface="lo", flush_s=3600)
    roll.add(records(sorted(rows, key=lambda r: r["ts"])))
    roll.flush(final=True)
    r = TimeRange(t0, t0 + 599, "n")

    def inside(*nets: str) -> tuple[int, int]:
        sel = fed["src"].map(lambda a: all(ipaddress.ip_address(a) in ipaddress.ip_network(n) for n in nets))
        return int(sel.sum()), int(fed.loc[sel, "wire_len"].sum())

    for nets in (("10.0.0.0/8",), ("fd00::/8",), ("10.0.0.0/8", "10.0.0.0/16"), ("10.0.0.0/8", "11.0.0.0/8")):
        df = ch.addr_minutes(r, "src", nets=[ipaddress.ip_network(n) for n in nets])
        assert (int(df["packets"].sum()), int(df["bytes"].sum())) == inside(*nets), nets
    assert inside("10.0.0.0/8")[0] == 16_000 and inside("10.0.0.0/8", "11.0.0.0/8")[0] == 0
    ch.close()


def test_the_read_pool_is_the_stores_bounded_and_never_waits_for_the_store_lock(fed, t0):
    """One pool per store (every page run asks the same one), at most READERS_MAX connections however
    many reads are queued; a pool read takes and returns its connection while the main thread holds the
    store's lock (its own queries); close() ends the pool and its connections."""
    import store.clickhouse as chmod
    from store.base import TimeRange

    ch = ClickHouseStore(fed, cluster="fleet", database=DB)
    assert ch.open(), ch.status().message
    made = []
    connect = ch._connect
    ch._connect = lambda *a: made.append(1) or connect(*a)  # counts the read connections opened
    r = TimeRange(t0 - 60, t0 + 600)
    pool = ch.read_pool()
    assert ch.read_pool() is pool
    answers = [pool.submit(fleet_page._owned, ch, lambda: ch.totals(r)["packets"]) for _ in range(40)]
    assert [f.result(timeout=60) for f in answers] == [want()] * 40
    assert 1 <= len(made) <= chmod.READERS_MAX and len(ch._spare) <= chmod.READERS_MAX
    with ch._lock:  # the main thread in the middle of its own query
        assert pool.submit(fleet_page._owned, ch, lambda: ch.totals(r)["packets"]).result(timeout=30) == want()
    ch.close()
    assert not ch._spare and ch._pool is None
    with pytest.raises(RuntimeError):  # shut down: takes no more reads
        pool.submit(lambda: 1)
