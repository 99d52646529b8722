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
