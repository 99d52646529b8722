"""Review 7 of the investigation work (issue 15): evidence links cost a slice of their own seconds and survive
another session emptying the cache; country/AS filters keep what they looked up across reruns and never
match non-IP frames."""

from __future__ import annotations

import types
import urllib.parse

import numpy as np
import pandas as pd
import pytest

import investigate_page as inv
from analysis.headers import PACKET_DTYPE, LocalMatcher, pack_records
from investigate import filters as flt

T0 = 1_700_000_000.0
HOSTS = 50


def buffer(n: int = 100_000, seconds: int = 100) -> np.ndarray:
    """n IPv4 packets over `seconds`, in time order, from 10.0.0.0 .. 10.0.0.249 in turn."""
    rows = np.zeros(n, PACKET_DTYPE)
    rows["ts"] = T0 + np.arange(n) * (seconds / n)
    v = np.zeros((n, 16), np.uint8)
    v[:, 10:12] = 0xFF
    v[:, 12] = 10
    v[:, 15] = np.arange(n) % 250
    rows["src"] = rows["dst"] = v.view("S16").ravel()
    rows["cls"] = flt.CLASSES.index("udp")
    return rows


def new_hosts(k: int = HOSTS) -> list:
    """k new_host alerts, host 10.0.0.(i+1) raised in second 1 + 2 i (packet-stamped: its link searches)."""
    return [types.SimpleNamespace(detector="new_host", source=f"10.0.0.{i + 1}", target="", severity="low",
                                  first_ts=T0 + 1 + 2 * i + 0.9, last_ts=T0 + 1 + 2 * i + 0.9) for i in range(k)]


def first_packet(rows: np.ndarray, host: int, second: float) -> float:
    """The reference: the earliest packet from 10.0.0.host in that whole second, by brute force."""
    src = np.ascontiguousarray(rows["src"]).view(np.uint8).reshape(-1, 16)
    sel = (src[:, 15] == host) & (src[:, 12] == 10) & (rows["ts"] >= second) & (rows["ts"] < second + 1)
    return float(rows["ts"][sel].min())


@pytest.fixture
def empty_cache(monkeypatch):
    monkeypatch.setattr(inv, "_STARTS", {})
    monkeypatch.setattr(inv, "_SEEN", set())


def links_from(frame: pd.DataFrame) -> list[float]:
    return [float(urllib.parse.parse_qs(u.lstrip("?"))["from"][0]) for u in frame[inv.EVIDENCE_COLUMN]]


@pytest.mark.parametrize("order", ["time", "shuffled"])
def test_new_alerts_links_read_only_their_own_seconds_and_find_the_first_packet(monkeypatch, empty_cache, order):
    rows = buffer()
    if order == "shuffled":  # a file's packets out of capture-time order
        rows = rows[np.random.default_rng(3).permutation(len(rows))]
    read: list[int] = []
    real = flt.mask

    def counting(r, conds, notes=None):
        read.append(len(r))
        return real(r, conds, notes)

    monkeypatch.setattr(flt, "mask", counting)
    alerts = new_hosts()
    got = links_from(inv.with_links(pd.DataFrame({"n": range(len(alerts))}), alerts, rows))
    per_second = len(rows) // 100
    assert read and max(read) <= per_second + 1  # each search: its second's packets, not the buffer
    assert got == [first_packet(rows, i + 1, float(int(a.first_ts))) for i, a in enumerate(alerts)]
    assert all(g > float(int(a.first_ts)) for g, a in zip(got, alerts))  # a packet's time, not the second


def test_a_rerun_reads_a_bounded_number_of_rows(monkeypatch, empty_cache):
    """Past EVIDENCE_ROWS_PER_RUN rows read, the other new alerts keep their whole second until the next rerun."""
    monkeypatch.setattr(inv, "EVIDENCE_ROWS_PER_RUN", 3_000)
    rows, alerts = buffer(), new_hosts()
    frame = pd.DataFrame({"n": range(len(alerts))})
    got = links_from(inv.with_links(frame, alerts, rows))
    searched = sum(g != float(int(a.first_ts)) for g, a in zip(got, alerts))
    assert searched == 3  # 1,000 rows a second: the fourth search starts past the budget
    again = links_from(inv.with_links(frame, alerts, rows))
    assert sum(g != float(int(a.first_ts)) for g, a in zip(again, alerts)) == 6


def test_an_evidence_start_survives_another_session_emptying_the_cache(monkeypatch, empty_cache):
    """Another session's thread can clear the shared cache between this one's store and its read."""

    class Cleared(dict):
        def __setitem__(self, key, value):
            super().__setitem__(key, value)
            self.clear()  # what another thread's clear() at that moment does

    monkeypatch.setattr(inv, "_STARTS", Cleared())
    rows, (alert,) = buffer(), new_hosts(1)
    start = inv.evidence_start(alert, rows, [("src", alert.source)])
    assert start == first_packet(rows, 1, float(int(alert.first_ts)))


# -- country / AS filters ------------------------------------------------------------------------------------


def test_a_country_filter_looks_each_address_up_once_across_reruns(monkeypatch):
    rows = buffer(20_000)
    v = np.ascontiguousarray(rows["dst"]).view(np.uint8).reshape(-1, 16).copy()
    v[:, 12] = 8  # destinations 8.0.0.x: 250 public addresses
    rows["dst"] = v.view("S16").ravel()
    asked: list[str] = []

    def country_of(addr: str) -> str:
        asked.append(addr)
        return "US" if addr.endswith(".7") and addr.startswith("8.") else "private"

    monkeypatch.setattr(flt, "geo_keys", lambda key: country_of)
    monkeypatch.setattr(flt, "geo_keys_many", lambda key: None)  # the single look-ups' path
    monkeypatch.setattr(flt, "geo_version", lambda: ("test", None, "1", None))
    monkeypatch.setattr(flt, "GEO_CACHE", flt.GeoCache())
    conds, _ = flt.parse([("country", "us")])
    first = flt.mask(rows, conds)
    assert len(asked) == 500  # 250 sources, 250 destinations
    assert (first == (v[:, 15] == 7)).all()
    asked.clear()
    assert (flt.mask(rows, conds) == first).all() and asked == []  # the next rerun: no database look-up


def test_while_the_databases_load_nothing_is_kept(monkeypatch):
    """An answer given before the databases are loaded is incomplete: looked up again later."""
    rows = buffer(1_000)
    asked: list[str] = []
    monkeypatch.setattr(flt, "geo_keys", lambda key: lambda a: asked.append(a) or "not in database")
    monkeypatch.setattr(flt, "geo_keys_many", lambda key: None)  # the single look-ups' path
    monkeypatch.setattr(flt, "geo_version", lambda: None)
    monkeypatch.setattr(flt, "GEO_CACHE", flt.GeoCache())
    conds, _ = flt.parse([("country", "US")])
    flt.mask(rows, conds)
    flt.mask(rows, conds)
    assert len(asked) == 2 * 2 * 250


def test_reserved_never_matches_an_arp_or_lldp_frame():
    """A non-IP frame's address fields are zeros ('::', a reserved address): it has no country or network."""
    from scapy.all import ARP, IP, UDP, Ether, Raw

    lldp = Ether(src="02:00:00:00:00:01", dst="01:80:c2:00:00:0e", type=0x88CC) / Raw(b"\x02\x07\x04" + bytes(6))
    arp = Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.0.1", pdst="10.0.0.2")
    reserved = Ether() / IP(src="240.0.0.1", dst="10.0.0.1") / UDP(sport=1, dport=2)  # class E: reserved
    rows = pack_records([(T0 + i, bytes(p), len(p), 1) for i, p in enumerate((lldp, arp, reserved))],
                        LocalMatcher())
    assert list(rows["cls"][:2]) == [flt.CLASSES.index("non_ip")] * 2
    for key in ("country", "asn"):
        conds, _ = flt.parse([(key, "reserved")])
        assert flt.mask(rows, conds).tolist() == [False, False, True], key


def test_the_investigate_cost_benchmark_runs_short():
    """benchmarks/investigate_cost.py cannot rot: its short mode prints each case (speed is not asserted)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "investigate_cost.py"), "--short"],
                         capture_output=True, text=True, timeout=180, cwd=root)
    assert out.returncode == 0, out.stderr
    assert "| 10,000 | evidence links, 50 new alerts |" in out.stdout and "| 10,000 | country=US" in out.stdout
    assert "| 10,000 | asn=15169" in out.stdout


# -- README's evidence spans and the GEO_LOOKUP_MAX note -------------------------------------------------------


def detected(frames, monkeypatch) -> tuple[np.ndarray, list]:
    """The frames as the capture records them, and the alerts fresh detectors raise on them."""
    from analysis.detect import AlertBook, Detectors

    monkeypatch.setenv("NTM_NEW_HOST_LEARN_S", "2")
    rows = pack_records([(t, bytes(p), len(p), 1) for t, p in frames], LocalMatcher())
    book = AlertBook(max_alerts=1000, per_detector=1000)
    Detectors().observe(rows, book)
    return rows, list(book.alerts())


def test_a_new_hosts_and_an_arp_spoofs_evidence_starts_at_their_first_packet(monkeypatch, empty_cache):
    """README: 'a new host's or an ARP spoof's first packet ... in the second of its first raise'; the ARP
    spoof's view holds the ARP packets claiming the address, the spoofed reply among them."""
    from scapy.all import ARP, IP, UDP, Ether

    eth = Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff")
    frames = [(T0 + s, eth / IP(src="10.9.0.5", dst="10.9.0.7") / UDP(sport=1, dport=2)) for s in range(4)]
    frames += [(T0 + 4, eth / ARP(op=2, hwsrc="02:00:00:00:00:aa", psrc="10.9.0.1", pdst="10.9.0.5")),
               (T0 + 5.2, eth / ARP(op=1, hwsrc="02:00:00:00:00:bb", psrc="10.9.0.5", pdst="10.9.0.1")),
               (T0 + 5.4, eth / ARP(op=2, hwsrc="02:66:66:66:66:66", psrc="10.9.0.1", pdst="10.9.0.5")),
               (T0 + 6.1, eth / IP(src="10.9.0.5", dst="10.9.0.7") / UDP(sport=1, dport=2)),
               (T0 + 6.3, eth / IP(src="10.9.0.66", dst="10.9.0.7") / UDP(sport=1, dport=2)),
               (T0 + 6.8, eth / IP(src="10.9.0.66", dst="10.9.0.7") / UDP(sport=3, dport=4))]
    rows, alerts = detected(frames, monkeypatch)
    spoof = next(a for a in alerts if a.detector == "arp_spoof")
    new = next(a for a in alerts if a.detector == "new_host" and a.source == "10.9.0.66")
    for alert, first_ts, want in ((spoof, frames[6][0], 1), (new, frames[8][0], 2)):
        pairs = inv.alert_filters(alert, rows)
        got = dict(pairs)
        assert float(got["from"]) == float(rows["ts"][rows["ts"] >= first_ts - 1e-6].min())  # the packet's time
        assert float(got["to"]) == float(int(alert.last_ts)) + 1
        snap = types.SimpleNamespace(packets=rows)
        assert len(inv.evidence_rows(snap, pairs, None)) == want
        conds, _ = flt.parse(pairs)
        assert flt.alert_matches(alert, conds)  # the evidence view keeps the alert in its table
    spoofed = inv.evidence_rows(types.SimpleNamespace(packets=rows), inv.alert_filters(spoof, rows), None)
    assert bytes(spoofed["hw_src"][0]) == bytes.fromhex("026666666666")


@pytest.mark.parametrize("detector", inv.SECOND_STAMPED)
def test_per_second_detectors_evidence_is_their_whole_seconds(detector, empty_cache):
    """README: 'the whole seconds of a spike, a flood or a reflection, which are counted per second'."""
    rows = buffer(10_000, 10)
    alert = types.SimpleNamespace(detector=detector, source="10.0.0.1", target="10.0.0.2", severity="high",
                                  first_ts=T0 + 3.7, last_ts=T0 + 5.2)
    got = dict(inv.alert_filters(alert, rows))
    assert (float(got["from"]), float(got["to"])) == (T0 + 3, T0 + 6)


def test_past_geo_lookup_max_the_busiest_are_looked_up_and_the_page_says_approximate(monkeypatch):
    rows = buffer(20_000)  # 250 sources, each 80 packets; 10.0.0.0 .. 10.0.0.99 sent one more each
    extra = buffer(100)
    rows = np.concatenate([rows, extra])
    monkeypatch.setattr(flt, "GEO_LOOKUP_MAX", 100)
    monkeypatch.setattr(flt, "geo_keys", lambda key: lambda a: "private")
    monkeypatch.setattr(flt, "geo_keys_many", lambda key: None)  # the single look-ups' path
    monkeypatch.setattr(flt, "geo_version", lambda: None)
    notes: list[str] = []
    conds, _ = flt.parse([("country", "private")])
    got = flt.mask(rows, conds, notes)
    busiest = np.ascontiguousarray(rows["src"]).view(np.uint8).reshape(-1, 16)[:, 15] < 100
    assert (got == busiest).all()  # the others are left out
    assert any("only the 100 busiest of 250 src addresses" in n and "approximate" in n for n in notes)
