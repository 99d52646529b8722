"""Baselines (issue 15): what appeared after a baseline, with first-seen times; saved by name in the store."""

from __future__ import annotations

import numpy as np
from invhelp import HOSTS, T0, mixed_packets

from investigate import baseline as bl


def capture_rows(tmp_path):
    """A minute of mixed traffic, then from T0+40 a new host talking to a new service (tcp/8443)."""
    from scapy.all import IP, TCP, Ether, wrpcap

    from packet_processor import CaptureEngine, stop_all

    pkts = mixed_packets(seconds=60, spike_from=999)
    for i in range(10):
        p = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.1.0.77", dst=HOSTS[0]) / \
            TCP(sport=50000 + i, dport=8443, flags="S")
        p.time = T0 + 40.25 + i
        pkts.append(p)
    pkts.sort(key=lambda p: float(p.time))
    path = tmp_path / "baseline.pcap"
    wrpcap(str(path), pkts)
    engine = CaptureEngine()
    try:
        engine.load_file(str(path))
        return engine.snapshot().packets
    finally:
        stop_all()


def test_new_since_a_baseline_names_the_new_host_and_service_with_first_seen(tmp_path):
    rows = capture_rows(tmp_path)
    before = rows[rows["ts"] < T0 + 30]
    base = bl.make(before, whole=True)
    assert set(base["hosts"]) >= set(HOSTS) and "10.1.0.77" not in base["hosts"]
    new = bl.diff(base, rows)
    assert new["hosts"] == [("10.1.0.77", T0 + 40.25)]
    assert new["services"] == [("tcp/8443", T0 + 40.25)]
    total = int(np.bincount(rows["cls"], minlength=6)[0])
    assert next(m for m in new["mix"] if m["protocol"] == "tcp")["now %"] == round(100 * total / len(rows), 1)
    assert bl.diff(bl.make(rows, whole=True), rows)["hosts"] == []  # nothing is new against itself


def test_the_page_saves_a_named_baseline_in_the_store_and_lists_what_is_new(monkeypatch, tmp_path):
    """Save 'quiet' over one capture, load a second with a new host and service: the page lists them with
    their first-seen times, and the baseline is still there for a new viewer."""
    import streamlit as st
    from scapy.all import wrpcap
    from test_dashboard import app, metric, run_until

    from packet_processor import Source, engines, stop_all

    rows_path = tmp_path / "quiet.pcap"
    wrpcap(str(rows_path), mixed_packets(seconds=20, spike_from=999))
    capture_rows(tmp_path)  # writes tmp_path/baseline.pcap: the same traffic and, from T0+40, the new host
    stop_all()
    st.cache_resource.clear()
    monkeypatch.setenv("NTM_STORE", str(tmp_path / "h.duckdb"))
    monkeypatch.setenv("NTM_PCAP", str(rows_path))
    try:
        at = run_until(app(), lambda a: metric(a, "Status").value == "finished", 60)
        at.text_input(key="baseline_name").input("quiet").run()
        at.button(key="baseline_save").click().run()
        assert any("Baseline quiet saved" in s.value for s in at.success)
        engine = next(e for e in engines() if e.source and e.source.path == str(rows_path))
        engine.start(Source("file", path=str(tmp_path / "baseline.pcap")))
        at = run_until(app(), lambda a: metric(a, "Status").value == "finished", 60)
        assert not any("new host" in d.value.columns for d in at.dataframe)  # computed when asked only
        at.button(key="baseline_compare").click().run()
        hosts = next(d.value for d in at.dataframe if "new host" in d.value.columns)
        assert hosts["new host"].tolist() == ["10.1.0.77"]
        services = next(d.value for d in at.dataframe if "new service" in d.value.columns)
        assert services["new service"].tolist() == ["tcp/8443"]
        assert at.selectbox(key="baseline_pick").value == "quiet"
    finally:
        stop_all()
        st.cache_resource.clear()
