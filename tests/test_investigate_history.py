"""Filters over a stored range (issue 15): the history's metrics, protocol mix and timeline follow host/port/proto.

Two minutes of mixed traffic (invhelp) moved to a quarter of an hour ago, imported into a real store through
the page's import action; every expectation is tshark's reading of the same file with a display filter."""

from __future__ import annotations

import io
import subprocess
import time
from collections import Counter

import pytest
from invhelp import SPIKER, T0, mixed_packets, tshark_count
from test_dashboard import app, array, count, figures, metric, rendered
from test_dashboard import fresh as fresh  # the fixture: a new engine per test

import history_page
from packet_processor import engines

MINUTES = 2


@pytest.fixture(scope="module")
def stored_file(tmp_path_factory) -> tuple[str, float]:
    """(pcap path, its first whole minute): the mixed traffic, 2 minutes, starting 15 minutes ago."""
    from scapy.all import wrpcap

    ts0 = float(int(time.time()) // 60 * 60 - 900)
    pkts = mixed_packets(seconds=60 * MINUTES, spike_from=90)
    for p in pkts:
        p.time = float(p.time) - T0 + ts0
    path = tmp_path_factory.mktemp("invhist") / "two-minutes.pcap"
    wrpcap(str(path), pkts)
    return str(path), ts0


def history_page_at(monkeypatch, tmp_path, path: str):
    """The page on the '1 h' range of a store holding `path` (imported through the page's action)."""
    monkeypatch.setenv("NTM_STORE", str(tmp_path / "h.duckdb"))
    monkeypatch.setenv("NTM_PCAP", "")
    monkeypatch.setenv("NTM_INTERFACE", "lo")
    monkeypatch.setenv("NTM_BPF_FILTER", "udp dst port 47331")  # records nothing of its own
    at = app().run()
    engine = next(e for e in engines() if e.store is not None and str(tmp_path) in str(e.store.path))
    with open(path, "rb") as fh:
        data = io.BytesIO(fh.read())
    data.name = "two-minutes.pcap"
    assert not history_page.import_uploads(engine, [data])["errors"]
    at.radio(key="time_range").set_value("1 h").run()
    total, _ = tshark_count(path, "frame")
    assert count(at) == total  # all traffic first
    return at


def per_minute(path: str, display_filter: str) -> Counter:
    """Packets per whole minute (epoch second of its start) that tshark's filter keeps."""
    out = subprocess.run(["tshark", "-r", path, "-Y", display_filter, "-T", "fields", "-e", "frame.time_epoch"],
                         capture_output=True, text=True, check=True).stdout.split()
    return Counter(int(float(t)) // 60 * 60 for t in out)


def timeline_counts(at, bin_s_expected: int | None = None) -> dict[int, float]:
    """The matching timeline's packets per bin (its packets/s times the bin width), by bin start (epoch s)."""
    import pandas as pd

    fig = figures(at)["Matching traffic by capture time"]
    title = fig["layout"]["xaxis2"]["title"]["text"]
    bin_s = int(title.split("bin width ")[1].split(" s")[0])
    if bin_s_expected:
        assert bin_s == bin_s_expected, title
    tr = fig["data"][0]
    xs = [int(pd.Timestamp(x).tz_localize("UTC").timestamp()) for x in tr["x"]]  # the page's zone is UTC here
    return {x: round(float(y) * bin_s) for x, y in zip(xs, array(tr["y"]).tolist()) if y}


def filtered(at, **query: str):
    for k in list(at.query_params):
        del at.query_params[k]
    for k, v in query.items():
        at.query_params[k] = v
    at.run()
    assert not at.exception
    return at


def notes(at) -> str:
    return " ".join(rendered(x.value) for x in [*at.caption, *at.warning])


def test_history_totals_and_timeline_follow_host_port_proto(fresh, tmp_path, stored_file):
    path, ts0 = stored_file
    at = history_page_at(fresh, tmp_path, path)
    # port=53: from the stored conversations, per minute.
    want, want_bytes = tshark_count(path, "tcp.port==53 || udp.port==53")
    at = filtered(at, port="53")
    assert count(at) == want and metric(at, "Bytes").value == f"{want_bytes:,}"
    got = timeline_counts(at, 60)
    assert got == dict(per_minute(path, "tcp.port==53 || udp.port==53")) and set(got) == {ts0, ts0 + 60}
    assert "per minute, from the stored conversations: IP traffic only" in notes(at)
    # host alone: the protocol mix of that host's IP traffic.
    want, _ = tshark_count(path, f"ip.addr=={SPIKER}")
    at = filtered(at, host=SPIKER)
    assert count(at) == want
    pie = figures(at)["Protocols by packets"]["data"][0]
    mix = {name: tshark_count(path, f"ip.addr=={SPIKER} && {name.lower()}")[0] for name in ("TCP", "UDP", "ICMP")}
    assert dict(zip(pie["labels"], array(pie["values"]).tolist())) == mix and all(mix.values())
    # host and proto together (the spiking host's UDP): conversations again.
    flt = f"ip.addr=={SPIKER} && udp"
    want, want_bytes = tshark_count(path, flt)
    at = filtered(at, host=SPIKER, proto="udp")
    assert count(at) == want and metric(at, "Bytes").value == f"{want_bytes:,}"
    assert timeline_counts(at, 60) == dict(per_minute(path, flt))
    rate = metric(at, "Packets/s")  # averaged over the whole minutes the '1 h' range touches
    span = int(rate.proto.help.split("Average over ")[1].split(" s")[0].replace(",", ""))
    assert span % 60 == 0 and 3600 <= span <= 3660 and rate.value == f"{want / span:,.2f}"
    # proto alone: exact, from the stored per-second protocol counts (IPv6 UDP included).
    want, want_bytes = tshark_count(path, "udp")
    at = filtered(at, proto="udp")
    assert count(at) == want and metric(at, "Bytes").value == f"{want_bytes:,}"
    assert sum(timeline_counts(at).values()) == want
    assert "exact, from the stored per-second protocol counts" in notes(at)
    # No filter: all traffic again.
    at = filtered(at)
    assert count(at) == tshark_count(path, "frame")[0]
    assert "Traffic by capture time" in figures(at)


def test_history_sensor_filter_alone_selects_that_sensors_stored_seconds(fresh, tmp_path, stored_file):
    """sensor= alone: the per-second totals of that sensor (exact); a sensor the store never heard of: none."""
    import socket

    import config

    path, _ = stored_file
    at = history_page_at(fresh, tmp_path, path)
    total, total_bytes = tshark_count(path, "frame")
    name = config.get("STORE_SENSOR") or socket.gethostname()
    at = filtered(at, sensor=name)
    assert count(at) == total and metric(at, "Bytes").value == f"{total_bytes:,}"
    assert "exact, from the stored per-second totals of that sensor" in notes(at)
    at = filtered(at, sensor="no-such-sensor")
    assert count(at) == 0


def test_history_alerts_follow_the_filters(fresh, tmp_path):
    """A stored TCP scan 10.9.0.5 -> 10.9.0.7 beside the mixed traffic: the Alerts metric and table keep it
    under host=10.9.0.5 or proto=tcp, and drop it under another host or proto=icmp."""
    from scapy.all import IP, TCP, Ether, wrpcap

    ts0 = float(int(time.time()) // 60 * 60 - 600)
    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    pkts = mixed_packets(seconds=20, spike_from=999)
    for p in pkts:
        p.time = float(p.time) - T0 + ts0
    for i, port in enumerate(range(300, 330)):
        syn = eth / IP(src="10.9.0.5", dst="10.9.0.7") / TCP(sport=42000, dport=port, flags="S")
        rst = eth / IP(src="10.9.0.7", dst="10.9.0.5") / TCP(sport=port, dport=42000, flags="RA")
        syn.time, rst.time = ts0 + 5 + i * 0.1, ts0 + 5 + i * 0.1 + 0.001
        pkts += [syn, rst]
    pkts.sort(key=lambda p: float(p.time))
    path = tmp_path / "scan-and-mix.pcap"
    wrpcap(str(path), pkts)
    at = history_page_at(fresh, tmp_path, str(path))
    alerts = int(metric(at, "Alerts").value)
    assert alerts >= 1

    def scans(a) -> int:
        table = next(d.value for d in a.dataframe if "evidence" in d.value.columns and "detector" in d.value.columns)
        return int((table["detector"] == "port_scan").sum())
    assert scans(at) == 1
    for query, kept in (({"host": "10.9.0.5"}, 1), ({"proto": "tcp"}, 1), ({"host": SPIKER}, 0),
                        ({"proto": "icmp"}, 0)):
        at = filtered(at, **query)
        assert scans(at) == kept, query
        assert int(metric(at, "Alerts").value) <= alerts and (kept == 0 or int(metric(at, "Alerts").value) >= 1)


# -- the top tables follow the filters (from the matching stored conversations) -------------------------------

PUBLIC = [("10.0.0.5", "8.8.8.8", 7), ("8.8.8.8", "10.0.0.5", 5), ("192.168.1.9", "1.1.1.1", 4),
          ("10.0.0.5", "9.9.9.9", 2), ("9.9.9.9", "1.1.1.1", 1), ("fd00::5", "2001:4860:4860::8888", 6)]
US = ("8.8.8.8", "9.9.9.9", "2001:4860:4860::8888")  # test_enrich_ends.WHO: the geo database's answer


def public_file(tmp_path, ts0: float) -> str:
    """A few UDP flows between private and public addresses (written, never sent), inside the stored minutes."""
    from scapy.all import IP, UDP, Ether, IPv6, wrpcap

    pkts, t = [], ts0 + 5
    for src, dst, n in PUBLIC:
        for i in range(n):
            ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
            p = Ether() / ip / UDP(sport=41000 + i, dport=8853) / (b"p" * 40)
            t += 0.01
            p.time = t
            pkts.append(p)
    path = tmp_path / "public.pcap"
    wrpcap(str(path), pkts)
    return str(path)


def packets_of(paths: list[str], display_filter: str) -> list[tuple]:
    """(ends, protocol, ports, wire length) of each IP packet tshark's filter keeps, over the files."""
    fields = ["ip.src", "ip.dst", "ipv6.src", "ipv6.dst", "ip.proto", "ipv6.nxt", "tcp.srcport", "tcp.dstport",
              "udp.srcport", "udp.dstport", "frame.len"]
    out = []
    for path in paths:
        got = subprocess.run(["tshark", "-r", path, "-Y", f"({display_filter}) && (ip || ipv6)", "-T", "fields",
                              "-E", "occurrence=f", "-E", "separator=|", *(x for f in fields for x in ("-e", f))],
                             capture_output=True, text=True, check=True).stdout.splitlines()
        for line in got:
            s4, d4, s6, d6, p4, p6, ts, td, us, ud, n = line.split("|")
            proto = "tcp" if ts else "udp" if us else {"1": "icmp", "58": "icmpv6"}.get(p4 or p6, "other")
            ports = (int(ts), int(td)) if ts else (int(us), int(ud)) if us else None
            out.append(((s4 or s6, d4 or d6), proto, ports, int(n)))
    return out


def expected_tops(pkts: list[tuple]) -> tuple[Counter, Counter, Counter]:
    """Per host (either end), per (protocol, port) (either end) and per conversation, counted packet by packet."""
    hosts, ports, convs = Counter(), Counter(), Counter()
    for (src, dst), proto, pp, _ in pkts:
        for h in {src, dst}:
            hosts[h] += 1
        if pp and proto in ("tcp", "udp"):
            for port in set(pp):
                ports[f"{proto}/{port}"] += 1

        def ep(a, p):
            return a if p is None else (f"[{a}]:{p}" if ":" in a else f"{a}:{p}")
        ends = frozenset({ep(src, pp[0] if pp else None), ep(dst, pp[1] if pp else None)})
        convs[(ends, proto)] += 1
    return hosts, ports, convs


def shown_tops(at) -> tuple[dict, dict, dict]:
    figs = figures(at)
    host = figs["Top 10 hosts in the matching conversations"]["data"]
    hosts = dict(zip(host[0]["y"], array(host[0]["x"]).tolist())) if host and "y" in host[0] else {}
    ports = {}
    for tr in figs["Top ports (either end) of the matching conversations"]["data"]:
        ports.update({label.split()[0]: int(x) for label, x in zip(tr.get("y") or [], array(tr.get("x", [])).tolist())})
    conv = next(d.value for d in at.dataframe if "endpoint A" in d.value.columns)
    convs = {(frozenset({a, b}), p.lower()): int(n) for a, b, p, n in
             zip(conv["endpoint A"], conv["endpoint B"], conv["protocol"], conv["packets"])}
    return hosts, ports, convs


def assert_tops(at, pkts: list[tuple]) -> None:
    """Every shown bar and row is its exact count; the shown ones are the largest (ties aside)."""
    want_hosts, want_ports, want_convs = expected_tops(pkts)
    hosts, ports, convs = shown_tops(at)
    assert hosts and hosts == {h: want_hosts[h] for h in hosts}, (hosts, want_hosts)
    assert sorted(hosts.values(), reverse=True) == [n for _, n in want_hosts.most_common(len(hosts))]
    assert len(hosts) == min(10, len(want_hosts))
    assert ports == {p: want_ports[p] for p in ports}, (ports, want_ports)
    assert sorted(ports.values(), reverse=True) == [n for _, n in want_ports.most_common(len(ports))]
    assert len(ports) == min(10, len(want_ports))
    assert convs == {k: want_convs[k] for k in convs}, (convs, want_convs)
    assert sorted(convs.values(), reverse=True) == [n for _, n in want_convs.most_common(len(convs))]
    assert len(convs) == min(20, len(want_convs))


def test_history_top_talkers_ports_and_conversations_follow_src_port_country(fresh, tmp_path, stored_file):
    import enrich

    path, ts0 = stored_file
    at = history_page_at(fresh, tmp_path, path)
    public = public_file(tmp_path, ts0)
    engine = next(e for e in engines() if e.store is not None and str(tmp_path) in str(e.store.path))
    with open(public, "rb") as fh:
        data = io.BytesIO(fh.read())
    data.name = "public.pcap"
    assert not history_page.import_uploads(engine, [data])["errors"]
    paths = [path, public]
    # src=: the conversations with that address at either end (the store keeps no direction).
    at = filtered(at, src=SPIKER)
    assert_tops(at, packets_of(paths, f"ip.addr=={SPIKER}"))
    hosts, _, convs = shown_tops(at)
    assert SPIKER in hosts and all(any(SPIKER in e for e in ends) for ends, _ in convs)
    # port=
    at = filtered(at, port="53")
    assert_tops(at, packets_of(paths, "tcp.port==53 || udp.port==53"))
    assert "Top hosts, ports and conversations of the matching traffic:" in notes(at)  # exact: nothing capped
    # country= (the databases loaded first: until then no address has a country)
    assert enrich.shared().geo.wait_loaded(120)
    at = filtered(at, country="US")
    us = " || ".join(f"{'ipv6' if ':' in a else 'ip'}.addr=={a}" for a in US)
    assert_tops(at, packets_of(paths, us))
    hosts, _, _ = shown_tops(at)
    assert set(US) <= set(hosts) and count(at) == tshark_count(public, us)[0]
    # proto= alone: its totals from the per-second counts, its top tables from the stored conversations.
    at = filtered(at, proto="tcp")
    assert_tops(at, packets_of(paths, "tcp"))
