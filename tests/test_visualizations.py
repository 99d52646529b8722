"""Figures and tables from known data: traces, values, colours, and capture-time axes."""

from __future__ import annotations

from datetime import UTC

import numpy as np
import pandas as pd
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

import visualizations as viz
from packet_processor import CaptureEngine, packets_frame

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
T0 = 1_700_000_000.0  # 2023-11-14


def engine_with_traffic() -> CaptureEngine:
    eng = CaptureEngine()
    recs = []
    pkts = [ETH / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=443)] * 6 + \
           [ETH / IP(src="10.0.0.3", dst="10.0.0.2") / UDP(sport=5000, dport=53)] * 3 + \
           [ETH / IP(src="10.0.0.2", dst="10.0.0.1") / ICMP()] * 2 + \
           [ETH / ARP(psrc="10.0.0.1", pdst="10.0.0.2")]
    for i, p in enumerate(pkts):
        d = bytes(p)
        recs.append((T0 + i * 0.25, d, len(d), 1))
    eng.ingest_records(recs)
    return eng


def test_pie_values_equal_the_engine_counters():
    snap = engine_with_traffic().snapshot()
    fig = viz.protocol_pie(snap.totals["transport_counts"], "packets")
    pie = fig.data[0]
    assert list(pie.labels) == ["TCP", "UDP", "ICMP", "ARP/other"]  # empty classes left out
    assert list(pie.values) == [6, 3, 2, 1]
    # Each engine class to its own label: six different counts, so a swapped pair cannot pass.
    every = viz.protocol_pie({"tcp": 1, "udp": 2, "icmp": 3, "icmpv6": 4, "other_ip": 5, "non_ip": 6}).data[0]
    assert dict(zip(every.labels, every.values)) == {"TCP": 1, "UDP": 2, "ICMP": 3, "ICMPv6": 4, "Other IP": 5,
                                                     "ARP/other": 6}
    assert list(pie.marker.colors) == ["#1f77b4", "#ff7f0e", "#2ca02c", "#7f7f7f"]  # the same in every chart
    by_bytes = viz.protocol_pie(snap.totals["transport_bytes"], "bytes").data[0]
    assert sum(by_bytes.values) == snap.totals["bytes"]
    assert fig.layout.uirevision == "pie"


def test_timeline_x_axis_is_capture_time_not_1970():
    snap = engine_with_traffic().snapshot()
    frame = viz.timeline_frame(snap.bins, 60, end=T0 + 3, tz=UTC)
    fig = viz.timeline(frame)
    x = pd.to_datetime(fig.data[0].x)
    assert x[-1] == pd.Timestamp(int(T0 + 3), unit="s")  # plotly keeps the wall time of the given zone
    assert x.min().year == 2023 and len(x) == 60
    # Packets per second: 4 in each of the three seconds T0..T0+2 (12 frames, 0.25 s apart).
    pk = sum(np.asarray(t.y) for t in fig.data if t.yaxis == "y" and t.stackgroup == "pk")
    assert pk[-4:].tolist() == [4, 4, 4, 0]
    names = {t.name for t in fig.data}
    assert names <= set(viz.DIRECTIONS)
    bits = sum(np.asarray(t.y) for t in fig.data if t.stackgroup == "by")
    assert bits.sum() == snap.totals["bytes"] * 8
    assert fig.layout.uirevision == "timeline"


def test_timeline_window_fills_gaps_with_zero():
    bins = np.array([[100, 5, 0, 0, 0, 500, 0, 0, 0] + [0] * 6, [103, 1, 1, 0, 0, 60, 60, 0, 0] + [0] * 6])
    frame = viz.timeline_frame(bins, 5, end=103)
    assert frame["pk_in"].tolist() == [0, 5, 0, 0, 1]
    assert frame["by_out"].tolist() == [0, 0, 0, 0, 60]


def test_top_bars_ports_and_sizes():
    snap = engine_with_traffic().snapshot()
    top = viz.top_bar(snap.top_addresses("src", "packets"), "Top 10 sources")
    assert list(top.data[0].y) == ["10.0.0.2", "10.0.0.3", "10.0.0.1"]  # largest at the top
    assert list(top.data[0].x) == [2, 3, 6]
    ports = viz.ports_bar(snap.top_ports("tcp"), snap.top_ports("udp"))
    labels = {t.name: list(t.y) for t in ports.data}
    assert labels == {"TCP": ["tcp/443 https"], "UDP": ["udp/53 domain"]}
    sizes = viz.size_histogram(snap.packets["wire_len"])
    assert sum(sizes.data[0].y) == len(snap.packets)


def test_empty_figures_say_so():
    fig = viz.protocol_pie({}, "packets")
    assert not fig.data and "no data yet" in fig.layout.annotations[0].text
    assert not viz.timeline(viz.timeline_frame(np.zeros((0, 15), np.int64), 60, None)).data


def test_conversations_and_recent_tables():
    eng = engine_with_traffic()
    snap = eng.snapshot()
    conv = viz.conversations_table(snap.top_conversations(), tz=UTC)
    assert conv.iloc[0]["packets"] == 6 and conv.iloc[0]["protocol"] == "TCP"
    assert {conv.iloc[0]["endpoint A"], conv.iloc[0]["endpoint B"]} == {"10.0.0.1:40000", "10.0.0.2:443"}
    assert conv.iloc[0]["first seen"] == "2023-11-14 22:13:20.000"
    frame = packets_frame(snap.packets, UTC)
    recent = viz.recent_table(frame, 5)
    assert recent.iloc[0]["protocol"] == "ARP" and len(recent) == 5
    assert recent.iloc[0]["time"] == "2023-11-14 22:13:22.750"
    assert viz.recent_table(frame, 100, "53")["protocol"].tolist() == ["UDP"] * 3
    assert len(viz.recent_table(frame, 100, "icmp")) == 2
    assert len(viz.recent_table(frame, 100, "10.0.0.3")) == 3
    assert str(frame["src port"].dtype) == "Int32"  # missing ports stay integers, not floats


def test_text_from_traffic_is_escaped_in_chart_labels():
    crafted = '<a href="https://evil.example">x</a><b>bold</b>'
    fig = viz.top_bar([{"addr": crafted, "packets": 3, "bytes": 9}], "Top 10 sources")
    label = fig.data[0].y[0]
    assert "<" not in label and ">" not in label
    assert label == '&lt;a href="https://evil.example"&gt;x&lt;/a&gt;&lt;b&gt;bold&lt;/b&gt;'


def test_times_beyond_the_calendar_are_text_not_a_crash():
    from zoneinfo import ZoneInfo

    far = 2 ** 64 / 1e6 - 10  # a pcapng microsecond timestamp ~584,000 years after 1970
    texts = viz.time_texts([T0, far, float("inf"), T0 + 0.25], ZoneInfo("Europe/Berlin"))
    assert texts.tolist() == ["2023-11-14 23:13:20.000", "1.84467e+13 s since 1970 (outside the calendar)",
                              "inf s since 1970 (outside the calendar)", "2023-11-14 23:13:20.250"]
    year_5000 = 95_617_584_000.0  # 5000-01-01 00:00:00 UTC: far, but a calendar still holds it
    assert viz.time_texts([year_5000]).tolist() == ["5000-01-01 00:00:00.000"]
    rows = [{"a": "10.0.0.1", "a_port": 1, "b": "10.0.0.2", "b_port": 2, "proto": "UDP", "packets": 2, "bytes": 9,
             "first_ts": T0, "last_ts": far}]
    assert viz.conversations_table(rows, UTC)["last seen"].tolist() == [texts[1]]
    bins = np.array([[int(T0), 1, 0, 0, 0, 60, 0, 0, 0], [int(far), 1, 0, 0, 0, 60, 0, 0, 0]], dtype=np.int64)
    assert viz.timeline_frame(bins, 60, far).empty  # a window no time axis can show
    frame = viz.timeline_frame(bins, 60, T0 + 1)
    assert len(frame) == 60 and frame["pk_in"].sum() == 1
    fig = viz.timeline(frame, alerts=[T0, far])
    assert len(fig.layout.shapes) == 1  # the far alert has no place on the axis; the other keeps its mark


def test_approximate_counts_are_marked_with_their_lower_bound():
    rows = [{"addr": "10.0.0.1", "packets": 1250, "bytes": 9000, "error": 50},
            {"addr": "10.0.0.2", "packets": 700, "bytes": 800}]
    bar = viz.top_bar(rows, "Top 10 sources").data[0]
    assert list(bar.y) == ["10.0.0.2", "10.0.0.1"] and list(bar.text) == ["", "≥ 1,200"]
    assert list(bar.customdata) == ["700 packets",
                                    "between 1,200 and 1,250 packets (approximate: the table is full)"]
    conv = [{"a": "10.0.0.1", "a_port": None, "b": "10.0.0.2", "b_port": None, "proto": "ICMP", "packets": 1250,
             "bytes": 9000, "error": 50, "first_ts": T0, "last_ts": T0},
            {"a": "10.0.0.3", "a_port": None, "b": "10.0.0.2", "b_port": None, "proto": "ICMP", "packets": 999,
             "bytes": 1234, "first_ts": T0, "last_ts": T0}]
    table = viz.conversations_table(conv, UTC, by="packets")
    assert table["packets"].tolist() == ["≥ 1,200", "999"] and table["bytes"].tolist() == [9000, 1234]
    exact = viz.conversations_table([{**conv[1]}], UTC, by="packets")
    assert exact["packets"].tolist() == [999]  # no error anywhere: the column stays numeric


def test_vlan_bar_counts_tagged_packets_only():
    fig = viz.vlan_bar(np.array([0, 100, 100, 7, 0, 100, 4095, -1], dtype=np.int16))
    assert dict(zip(fig.data[0].y, fig.data[0].x)) == {"VLAN 100": 3, "VLAN 7": 1}
    assert not viz.vlan_bar(np.zeros(5, np.int16)).data


def test_an_unknown_time_is_said_plainly():
    """NaN (a first/last-seen time an approximate fleet row does not know) reads 'unknown', not 1970."""
    out = viz.time_texts([float("nan"), 0.0, 1e300])
    assert out[0] == "unknown"
    assert out[1].startswith("1970-01-01 00:00:00.000")
    assert out[2].endswith("(outside the calendar)")
