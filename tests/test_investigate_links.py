"""An alert's evidence link in the alerts table (issue 15): a vertical scan's names its protocol, and the span
starts at the capture time of the first evidence packet, not at the whole second of the first raise."""

from __future__ import annotations

import subprocess
import urllib.parse

import pytest
from invhelp import T0, tshark_count
from test_dashboard import app as _app
from test_dashboard import count, metric, run_until
from test_dashboard import fresh as fresh  # the fixture: a new engine per test

import investigate_page as inv
from packet_processor import engines

SCANNER, TARGET = "10.9.0.5", "10.9.0.7"


@pytest.fixture(scope="module")
def slow_scan(tmp_path_factory) -> str:
    """A TCP SYN scan of 30 ports, one probe every 0.2 s from T0+0.5 (answered with RST), so that the alert is
    raised seconds after the first probe; UDP between the same hosts in the same seconds (not the scan's)."""
    from scapy.all import IP, TCP, UDP, Ether, wrpcap

    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    pkts = []
    for i, port in enumerate(range(200, 230)):
        t = T0 + 0.5 + i * 0.2
        syn = eth / IP(src=SCANNER, dst=TARGET) / TCP(sport=41000, dport=port, flags="S")
        rst = eth / IP(src=TARGET, dst=SCANNER) / TCP(sport=port, dport=41000, flags="RA")
        u = eth / IP(src=SCANNER, dst=TARGET) / UDP(sport=5000, dport=6000)
        syn.time, rst.time, u.time = t, t + 0.001, t + 0.002
        pkts += [syn, rst, u]
    path = tmp_path_factory.mktemp("invlinks") / "slow-scan.pcap"
    wrpcap(str(path), pkts)
    return str(path)


def first_probe(path: str) -> float:
    """tshark's capture time of the scan's first SYN."""
    out = subprocess.run(["tshark", "-r", path, "-Y", f"ip.src=={SCANNER} && tcp.flags.syn==1", "-c", "1",
                          "-T", "fields", "-e", "frame.time_epoch"], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[0])


def test_a_vertical_scans_link_has_its_protocol_and_starts_at_its_first_probe(fresh, slow_scan):
    fresh.setenv("NTM_PCAP", slow_scan)
    fresh.setenv("NTM_BATCH_SIZE", "8")  # the file in small batches, as a live capture delivers it: the
    # detector then raises the scan in a later batch than the one holding its first probe
    at = run_until(_app(), lambda a: metric(a, "Status").value == "finished")
    assert not at.exception
    table = next(d.value for d in at.dataframe if inv.EVIDENCE_COLUMN in d.value.columns)
    row = table[table["detector"] == "port_scan"].iloc[0]
    q = urllib.parse.parse_qs(str(row[inv.EVIDENCE_COLUMN]).lstrip("?"))
    assert q["proto"] == ["tcp"] and q["src"] == [SCANNER] and q["dst"] == [TARGET]
    start = first_probe(slow_scan)
    assert float(q["from"][0]) == start  # the packet's own time (T0 + 0.5), not a whole second
    # This file's engine: engines of earlier tests (other files, the same T0) may still hold port scans.
    raised = next(a.first_ts for e in engines() if e.source and e.source.path == slow_scan
                  for a in e.snapshot().alerts if a.detector == "port_scan")
    assert int(raised) >= start + 1  # raised seconds after the first probe: its whole second would miss probes
    # The link opened: exactly the scan's probes, every one of them (tshark), none of the UDP.
    probes, _ = tshark_count(slow_scan, f"ip.src=={SCANNER} && ip.dst=={TARGET} && tcp")
    assert probes == 30
    opened = _app()
    for k, v in q.items():
        opened.query_params[k] = v
    opened = run_until(opened, lambda a: metric(a, "Status").value == "finished")
    assert count(opened) == probes
    # The same link under 'Investigate an alert'.
    link = next(m.value for m in at.markdown if m.value.startswith("Evidence"))
    assert link.rsplit("](", 1)[1].split(")", 1)[0] == str(row[inv.EVIDENCE_COLUMN])
