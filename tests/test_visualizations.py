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
    counters = dict(zip(viz.PROTOCOLS, [snap.totals["transport_counts"][k] for k in viz.CLASS_KEYS]))
    assert dict(zip(pie.labels, pie.values)) == {p: n for p, n in counters.items() if n}
    assert list(pie.marker.colors) == [viz.PROTOCOL_COLORS[p] for p in pie.labels]
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
