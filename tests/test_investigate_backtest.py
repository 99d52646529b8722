"""Threshold back-test (issue 15): the alerts each candidate threshold would raise over the buffered packets
equal what the engine's detectors raise when the same traffic is replayed with that threshold (NTM_<SETTING>)."""

from __future__ import annotations

import pytest
from invhelp import write_mixed
from scapy.all import IP, TCP, Ether, wrpcap

from investigate import backtest as bt
from packet_processor import CaptureEngine, stop_all

T0 = 1_700_000_000.0
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
BACK = Ether(src="02:00:00:00:00:02", dst="02:00:00:00:00:01")


def scans(path) -> str:
    """Three SYN scans of 40, 90 and 200 ports (each refused with a RST), on different targets, plus
    ordinary connections that are answered."""
    pkts = []
    for n, (scanner, target, ports) in enumerate((("10.5.0.1", "10.9.0.1", 40), ("10.5.0.2", "10.9.0.2", 90),
                                                  ("10.5.0.3", "10.9.0.3", 200))):
        for i in range(ports):
            t = T0 + n * 20 + i * 0.01
            syn = ETH / IP(src=scanner, dst=target) / TCP(sport=40000 + n, dport=1 + i, flags="S")
            rst = BACK / IP(src=target, dst=scanner) / TCP(sport=1 + i, dport=40000 + n, flags="RA")
            syn.time, rst.time = t, t + 0.001
            pkts += [syn, rst]
    for i in range(50):
        t = T0 + i * 1.1
        syn = ETH / IP(src="10.6.0.1", dst="10.9.0.9") / TCP(sport=50000 + i, dport=443, flags="S")
        ack = BACK / IP(src="10.9.0.9", dst="10.6.0.1") / TCP(sport=443, dport=50000 + i, flags="SA")
        syn.time, ack.time = t, t + 0.002
        pkts += [syn, ack]
    pkts.sort(key=lambda p: float(p.time))
    wrpcap(str(path), pkts)
    return str(path)


def engine_alerts(monkeypatch, path: str, setting: str, value, **others) -> list[tuple]:
    """The engine's own alerts of the setting's detector, replaying the file with NTM_<SETTING>=value
    (and NTM_<OTHER>=v for each other setting given)."""
    env = {setting: value, **others}
    for name, v in env.items():
        monkeypatch.setenv(f"NTM_{name}", str(v))
    engine = CaptureEngine()
    try:
        engine.load_file(path)
        return shape(a for a in engine.snapshot().alerts if a.detector == bt.DETECTOR_OF[setting])
    finally:
        stop_all()
        for name in env:
            monkeypatch.delenv(f"NTM_{name}")


def shape(alerts) -> list[tuple]:
    return sorted((a.source, a.target, a.count, a.first_ts, a.last_ts, a.evidence) for a in alerts)


def buffered(path: str):
    engine = CaptureEngine()
    try:
        engine.load_file(path)
        return engine.snapshot().packets
    finally:
        stop_all()


@pytest.mark.parametrize("setting, values, make", [
    ("SCAN_PORTS", [10, 30, 60, 120, 250], scans),
    ("SPIKE_MIN_PPS", [50, 150, 170, 400],
     lambda p: write_mixed(p, seconds=70, spike_from=64, spike_pps=150, spread=True)),
])
def test_backtest_counts_equal_the_engine_replayed_with_each_threshold(monkeypatch, tmp_path, setting, values, make):
    path = make(tmp_path / "traffic.pcap")
    rows = buffered(path)
    trials = bt.backtest(rows, setting, values)
    assert [t.value for t in trials] == values
    for trial in trials:
        assert shape(trial.alerts) == engine_alerts(monkeypatch, path, setting, trial.value), trial.value
    counts = [t.rows for t in trials]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1] == 0, counts  # a threshold matters


def test_candidates_and_bad_settings():
    assert bt.candidates("SCAN_PORTS") == [4, 8, 15, 30, 60]  # the default, 15, halved and doubled twice
    assert bt.candidates("SCAN_PORTS", now=30) == [8, 15, 30, 60, 120]  # around the value in use
    with pytest.raises(ValueError, match="LOG_LEVEL is not a detector threshold"):
        bt.run(buffered_empty(), "LOG_LEVEL", 1)


def buffered_empty():
    import numpy as np

    from analysis.headers import PACKET_DTYPE

    return np.zeros(0, PACKET_DTYPE)


def page_backtest(monkeypatch, path: str, live: dict | None = None):
    """The page's back-test table for SPIKE_MIN_PPS 50 and 400 (`live`: thresholds set on the page first)."""
    import streamlit as st
    from test_dashboard import app, metric, run_until

    from packet_processor import engines

    stop_all()
    st.cache_resource.clear()
    monkeypatch.setenv("NTM_PCAP", path)
    try:
        at = run_until(app(), lambda a: metric(a, "Status").value == "finished", 60)
        if live:
            next(e for e in engines() if e.source and e.source.path == path).controls.set_detectors(live, set())
        at.selectbox(key="bt_setting").set_value("SPIKE_MIN_PPS").run()
        at.text_input(key="bt_values_SPIKE_MIN_PPS").input("50, 400").run()
        at.button(key="bt_run").click().run()  # the back-test runs in its own thread; the page reruns
        at = run_until(at, lambda a: any("times raised" in d.value.columns for d in a.dataframe), 60)
        assert not at.exception
        return next(d.value for d in at.dataframe if "times raised" in d.value.columns)
    finally:
        stop_all()
        st.cache_resource.clear()


def spike_file(tmp_path) -> str:
    return write_mixed(tmp_path / "spike.pcap", seconds=70, spike_from=64, spike_pps=150, spread=True)


def test_the_page_runs_the_backtest_over_its_buffer(monkeypatch, tmp_path):
    path = spike_file(tmp_path)
    table = page_backtest(monkeypatch, path)
    want = [engine_alerts(monkeypatch, path, "SPIKE_MIN_PPS", v) for v in (50, 400)]  # the engine, replayed
    assert table["value"].tolist() == [50, 400]
    assert table["alerts"].tolist() == [len(w) for w in want] and want[0]
    assert table["times raised"].tolist() == [sum(a[2] for a in w) for w in want]


def test_the_page_backtest_uses_the_thresholds_set_on_the_page(monkeypatch, tmp_path):
    """A threshold changed on the page (AlertControls) is part of every trial, as the running detectors use it."""
    path = spike_file(tmp_path)
    table = page_backtest(monkeypatch, path, {"SPIKE_SIGMAS": 40.0})
    want = [engine_alerts(monkeypatch, path, "SPIKE_MIN_PPS", v, SPIKE_SIGMAS=40.0) for v in (50, 400)]
    config_only = engine_alerts(monkeypatch, path, "SPIKE_MIN_PPS", 50)
    assert sum(a[2] for a in want[0]) != sum(a[2] for a in config_only)  # the page's threshold matters here
    assert table["alerts"].tolist() == [len(w) for w in want]
    assert table["times raised"].tolist() == [sum(a[2] for a in w) for w in want]
