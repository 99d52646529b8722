"""Top countries and top networks (AS) per end, checked against tshark's reading of a generated capture.

The capture is written to a file (nothing is sent); the reference sums tshark's source and destination
addresses per end with each address's country and AS written out here (well-known facts, not the code)."""

from __future__ import annotations

import shutil
import subprocess
from collections import defaultdict

import pytest
from conftest import need
from enrichhelp import file_snapshot

# address -> (country or range label, network label as the page writes it)
WHO = {"8.8.8.8": ("US", "AS15169 Google LLC"), "2001:4860:4860::8888": ("US", "AS15169 Google LLC"),
       "1.1.1.1": ("AU", "AS13335 Cloudflare, Inc."), "9.9.9.9": ("US", "AS19281 Quad9"),
       "10.0.0.5": ("private", "private"), "192.168.1.9": ("private", "private"), "fd00::5": ("private", "private")}
# (src, dst, payload size, packets)
FLOWS = [("10.0.0.5", "8.8.8.8", 60, 7), ("8.8.8.8", "10.0.0.5", 500, 5), ("192.168.1.9", "1.1.1.1", 90, 4),
         ("1.1.1.1", "192.168.1.9", 1200, 3), ("10.0.0.5", "9.9.9.9", 40, 2), ("9.9.9.9", "1.1.1.1", 300, 1),
         ("fd00::5", "2001:4860:4860::8888", 80, 6), ("2001:4860:4860::8888", "fd00::5", 700, 2)]


def _pcap(path) -> None:
    from scapy.all import IP, UDP, Ether, IPv6, Raw, wrpcap
    pkts, t = [], 1_700_000_000.0
    for src, dst, size, n in FLOWS:
        for i in range(n):
            ip = IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)
            p = Ether() / ip / UDP(sport=40000 + i, dport=53) / Raw(b"x" * size)
            t += 0.001
            p.time = t
            pkts.append(p)
    wrpcap(str(path), pkts)


def _tshark_ends(path) -> dict[str, dict[str, dict[str, int]]]:
    """{'country'|'network': {key: {sent_packets, sent_bytes, received_packets, received_bytes}}} from tshark."""
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-E", "separator=|", "-e", "ip.src",
                          "-e", "ipv6.src", "-e", "ip.dst", "-e", "ipv6.dst", "-e", "frame.len"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    ref: dict[str, dict] = {"country": defaultdict(lambda: defaultdict(int)),
                            "network": defaultdict(lambda: defaultdict(int))}
    for line in out:
        s4, s6, d4, d6, size = line.split("|")
        for end, addr in (("sent", s4 or s6), ("received", d4 or d6)):
            for col, key in zip(("country", "network"), WHO[addr]):
                ref[col][key][f"{end}_packets"] += 1
                ref[col][key][f"{end}_bytes"] += int(size)
    return ref


@pytest.fixture(scope="module")
def snap_and_ref(tmp_path_factory):
    need(shutil.which("tshark") is not None, "tshark is the reference (apt-get install tshark)")
    path = tmp_path_factory.mktemp("ends") / "ends.pcap"
    _pcap(path)
    snap = file_snapshot(path)
    assert snap.totals["packets"] == sum(n for *_, n in FLOWS)
    import enrich
    en = enrich.shared()
    assert en.geo.wait_loaded(120) and en.geo.asn.ready, en.geo.asn.error
    return en, snap, _tshark_ends(path)


def _as_ref(rows: list[dict]) -> dict[str, dict[str, int]]:
    fields = ("sent_packets", "sent_bytes", "received_packets", "received_bytes")
    return {r["key"]: {f: r[f] for f in fields if r[f]} for r in rows}


def test_top_countries_and_networks_per_end_match_tshark(snap_and_ref):
    """Each country's and each network's sent and received packets and bytes equal tshark's per-end sums,
    and the note says per end and exact (every address is in the tables)."""
    from enrich_page import ends_views
    en, snap, ref = snap_and_ref
    for by in ("packets", "bytes"):
        countries, networks, note = ends_views(en, snap, by)
        assert _as_ref(countries) == {k: dict(v) for k, v in ref["country"].items()}
        assert _as_ref(networks) == {k: dict(v) for k, v in ref["network"].items()}
        assert not any(r["approx"] for r in countries + networks)
        assert "Per end" in note and "Exact" in note and "Approximate" not in note


def test_top_countries_cut_tables_are_marked_approximate(snap_and_ref):
    """Summing only the top 2 sources and destinations leaves traffic out: every figure is marked approximate,
    in the note and in the chart's title and hover."""
    from enrich_page import ends_bar, ends_views
    en, snap, _ = snap_and_ref
    countries, _, note = ends_views(en, snap, "packets", n=2)
    assert "Approximate" in note and "busiest 2 sources" in note
    assert countries and all(r["approx"] for r in countries)
    fig = ends_bar(countries, "Top countries", "packets")
    assert fig.layout.title.text == "Top countries (approximate)"
    assert [t.name for t in fig.data] == ["sent", "received"] and "≈" in fig.data[0].hovertemplate
