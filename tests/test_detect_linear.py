"""Detectors in bounded, batch-independent state (issue 11.2, issue 12.5-12.8): results, bounds and the alert book."""

from __future__ import annotations

import pickle
import re
import sys
from pathlib import Path

import numpy as np
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from analysis.detect import AlertBook, Detectors
from analysis.headers import LocalMatcher, pack_records

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from detectors import nmap_burst

T0 = 1_700_000_000.0
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def rows(frames: list) -> np.ndarray:
    """PACKET_DTYPE rows of (ts, scapy packet) pairs, as the engine parses them."""
    built = [(ts, bytes(p)) for ts, p in frames]  # Scapy builds each frame once (most of these tests' time)
    return pack_records([(ts, data, len(data), 1) for ts, data in built], LocalMatcher())


def observe(arr: np.ndarray, splits: list[int] | None = None, det: Detectors | None = None,
            book: AlertBook | None = None) -> tuple[Detectors, AlertBook]:
    """Feed arr to one Detectors in batches cut at `splits`."""
    det, book = det or Detectors(), book or AlertBook()
    for part in np.split(arr, splits or []):
        det.observe(part, book)
    return det, book


def found(book: AlertBook, detector: str) -> list[tuple[str, str, str]]:
    """(source, target, evidence) of the book's alerts of one detector, sorted."""
    return sorted((a.source, a.target, a.evidence) for a in book.alerts() if a.detector == detector)


def test_syn_flood_sources_are_counted_over_the_second_whatever_the_batches():
    """The same packets cut into 1, 7, 100 or 1,500 batches give the same counts, sources and verdict."""
    rng = np.random.default_rng(5)
    spoofed = [(T0 + i / 1500, ETH / IP(src=f"10.{i % 7}.{i // 250}.{i % 250 + 1}", dst="10.9.0.7")
                / TCP(sport=1024 + i, dport=80, flags="S")) for i in range(1500)]
    few = [(T0 + 5 + i / 1200, ETH / IP(src=f"10.8.0.{i % 50 + 1}", dst="10.9.0.8")
            / TCP(sport=2000 + i, dport=80, flags="S")) for i in range(1200)]
    arr = rows(spoofed + few)
    results = []
    for n in (1, 7, 100, 1500):
        cuts = sorted(rng.choice(np.arange(1, len(arr)), n - 1, replace=False).tolist())
        results.append(found(observe(arr, cuts)[1], "syn_flood"))
    assert all(r == results[0] for r in results), results
    by_target = {t: (s, e) for s, t, e in results[0]}
    assert by_target["10.9.0.7"][0] == "1500 source(s)"
    assert "1,500 SYNs" in by_target["10.9.0.7"][1] and "likely spoofed" in by_target["10.9.0.7"][1]
    assert by_target["10.9.0.8"][0] == "50 source(s)"  # 50 distinct, whatever the cut: not "spoofed"
    assert "1,200 SYNs" in by_target["10.9.0.8"][1] and "spoofed" not in by_target["10.9.0.8"][1]


def test_nmap_full_port_range_burst_counts_every_port():
    """nmap -sS -p- against one host: 65,532 refused, 3 open: one vertical scan alert with those numbers."""
    arr = nmap_burst()
    for cuts in ([], list(range(2048, len(arr), 2048))):
        _, book = observe(arr, cuts)
        scans = found(book, "port_scan")
        assert [(s, t) for s, t, _ in scans] == [("127.0.0.1", "127.0.0.1")], scans
        assert "65532 ports on 127.0.0.1 failed or went unanswered" in scans[0][2]
        assert "3 answered" in scans[0][2]


def test_probes_pushed_out_of_a_full_table_count_as_unanswered(monkeypatch):
    """A 40-port sweep hidden in 10,000 spoofed SYNs within 1 s, with room for 100 probes: still a scan."""
    monkeypatch.setenv("NTM_DETECTOR_STATE_MAX", "100")
    frames = []
    for i in range(10_000):
        frames.append((T0 + i / 10_000, ETH / IP(src=f"10.{i % 200}.{i // 200}.1", dst="10.9.0.7")
                       / TCP(sport=3000, dport=80, flags="S")))
        if i % 250 == 0:
            frames.append((T0 + i / 10_000, ETH / IP(src="10.9.0.5", dst="10.9.0.7")
                           / TCP(sport=4000, dport=100 + i // 250, flags="S")))
    arr = rows(frames)  # no answer, and the clock never passes the 3 s timeout
    _, book = observe(arr, list(range(512, len(arr), 512)))
    assert ("10.9.0.5", "10.9.0.7") in [(s, t) for s, t, _ in found(book, "port_scan")]


def test_stealth_probes_are_counted_per_epoch_and_the_tables_stay_bounded(monkeypatch):
    """NULL/FIN probes from 5,000 scanners over 2 hours keep every table bounded; probes an epoch apart never add."""
    monkeypatch.setenv("NTM_DETECTOR_STATE_MAX", "200")
    monkeypatch.setenv("NTM_SCAN_WINDOW_S", "300")
    det, book = Detectors(), AlertBook()
    frames = []
    for i in range(5_000):  # each scanner sends 2 FIN probes (under the 3 of SCAN_STEALTH_PORTS)
        src = f"10.{i // 250 % 250}.{i % 250}.9"
        for port in (1, 2):
            frames.append((T0 + i * 1.44, ETH / IP(src=src, dst="10.9.0.7") / TCP(sport=5, dport=port, flags="F")))
    arr = rows(frames)
    biggest: dict[str, int] = {}
    for part in np.split(arr, range(256, len(arr), 256)):
        det.observe(part, book)
        for k, n in det.table_sizes().items():
            biggest[k] = max(biggest.get(k, 0), n)
    assert all(n <= 6 * 200 + 256 for n in biggest.values()), biggest
    assert biggest["stealth_0"] > 0 and biggest["stealth_1"] > 0
    # The third port of the first scanner, one epoch after its first two: no alert (the old tables never aged).
    late = rows([(T0 + 7200 + 600, ETH / IP(src="10.0.0.9", dst="10.9.0.7") / TCP(sport=5, dport=3, flags="F"))])
    det.observe(late, book)
    assert found(book, "port_scan") == []
    # Three ports within one epoch do raise it.
    now = rows([(T0 + 7200 + 601 + k, ETH / IP(src="10.0.0.9", dst="10.9.0.7") / TCP(sport=5, dport=k, flags="F"))
                for k in (1, 2)])
    det.observe(now, book)
    assert [(s, t) for s, t, _ in found(book, "port_scan")] == [("10.0.0.9", "10.9.0.7")]


def test_a_scan_across_an_epoch_boundary_is_still_one_scan():
    """20 refused ports in 10 s, 10 before and 10 after a multiple of SCAN_WINDOW_S: still a vertical scan."""
    edge = (T0 // 300 + 1) * 300  # an epoch boundary of the first series
    frames = []
    for k, port in enumerate(range(20, 40)):
        t = edge - 5 + k * 0.5
        frames.append((t, ETH / IP(src="10.9.0.5", dst="10.9.0.7") / TCP(sport=40000, dport=port, flags="S")))
        frames.append((t + 0.01, ETH / IP(src="10.9.0.7", dst="10.9.0.5") / TCP(sport=port, dport=40000, flags="RA")))
    _, book = observe(rows(frames), [10, 20, 30])
    scans = found(book, "port_scan")
    assert [(s, t) for s, t, _ in scans] == [("10.9.0.5", "10.9.0.7")] and "20 ports" in scans[0][2]


def test_spoofed_local_sources_do_not_make_learned_hosts_new(monkeypatch):
    """After learning, 5,000 spoofed local sources (room for 100) do not evict the learned hosts."""
    monkeypatch.setenv("NTM_NEW_HOST_LEARN_S", "5")
    monkeypatch.setenv("NTM_DETECTOR_STATE_MAX", "100")
    learned = ["10.9.0.5", "10.9.0.6"]
    frames = [(T0 + s + k * 0.1, ETH / IP(src=h, dst="10.9.0.7") / UDP(sport=1, dport=2))
              for s in range(10) for k, h in enumerate(learned)]
    frames += [(T0 + 11 + i / 5000, ETH / IP(src=f"10.50.{i // 250}.{i % 250 + 1}", dst="10.9.0.7")
                / UDP(sport=1, dport=2)) for i in range(5000)]
    frames += [(T0 + 13, ETH / IP(src=h, dst="10.9.0.7") / UDP(sport=1, dport=2)) for h in learned]
    arr = rows(frames)
    _, book = observe(arr, list(range(64, len(arr), 64)))
    sources = {s for s, _, _ in found(book, "new_host")}
    assert sources and not sources & set(learned)
    # The book kept its quota of them and counted the rest as suppressed.
    assert len(sources) + book.suppressed()["new_host"] == 5000


def test_arp_spoofing_survives_500_low_severity_alerts():
    book = AlertBook(max_alerts=500, per_detector=100)
    book.raise_alert("arp_spoof", "high", "02:66:66:66:66:66", "10.9.0.1", T0, "was at ...", "")
    for i in range(600):
        book.raise_alert("new_host", "low", f"10.1.{i // 250}.{i % 250}", "x", T0 + i, "new", "")
    kinds = [a.detector for a in book.alerts()]
    assert "arp_spoof" in kinds and kinds.count("new_host") == 100
    assert book.suppressed() == {"new_host": 500}


def test_a_full_book_never_evicts_a_more_severe_alert():
    """Full of high alerts: medium newcomers are refused (and counted); a high one pushes out the oldest high."""
    book = AlertBook(max_alerts=10, per_detector=10)
    for i in range(10):
        book.raise_alert("syn_flood", "high", "many", f"10.0.0.{i}", T0 + i, "e", "")
    for i in range(5):
        book.raise_alert("port_scan", "medium", "10.1.0.1", f"10.2.0.{i}", T0 + 20 + i, "e", "")
    assert {a.detector for a in book.alerts()} == {"syn_flood"}
    assert book.suppressed() == {"port_scan": 5}
    book.raise_alert("arp_spoof", "high", "mac", "10.9.0.1", T0 + 30, "e", "")
    targets = {a.target for a in book.alerts()}
    assert "10.9.0.1" in targets and "10.0.0.0" not in targets and len(targets) == 10
    assert book.suppressed() == {"port_scan": 5, "syn_flood": 1}
    # A repeat of a kept alert updates its row and is never refused.
    book.raise_alert("syn_flood", "high", "many", "10.0.0.5", T0 + 40, "again", "")
    assert [a.count for a in book.alerts() if a.target == "10.0.0.5"] == [2]
    book.clear()
    assert book.alerts() == [] and book.suppressed() == {}


def test_per_detector_quota_leaves_room_for_the_others():
    book = AlertBook(max_alerts=500, per_detector=100)
    for i in range(300):
        book.raise_alert("port_scan", "medium", "10.1.0.1", f"10.2.{i // 250}.{i % 250}", T0 + i, "e", "")
    book.raise_alert("new_host", "low", "10.3.0.1", "x", T0 + 400, "e", "")
    kinds = [a.detector for a in book.alerts()]
    assert kinds.count("port_scan") == 100 and kinds.count("new_host") == 1
    assert book.suppressed() == {"port_scan": 200}
    # The oldest went: the newest 100 targets are kept.
    assert {a.target for a in book.alerts() if a.detector == "port_scan"} == \
        {f"10.2.{i // 250}.{i % 250}" for i in range(200, 300)}


def test_udp_scan_refused_by_icmp_unreachable_before_the_timeout():
    """20 UDP probes each answered by port unreachable: the alert comes at once, not after 3 s."""
    from scapy.layers.inet import ICMP, IPerror, UDPerror

    frames = []
    for k, port in enumerate(range(1000, 1020)):
        t = T0 + k * 0.01
        frames.append((t, ETH / IP(src="10.9.0.5", dst="10.9.0.7") / UDP(sport=40000, dport=port)))
        frames.append((t + 0.001, ETH / IP(src="10.9.0.7", dst="10.9.0.5") / ICMP(type=3, code=3)
                       / IPerror(src="10.9.0.5", dst="10.9.0.7") / UDPerror(sport=40000, dport=port)))
    arr = rows(frames)
    # One packet per batch: each unreachable names the probe just sent, so all 20 fail at once.
    _, book = observe(arr, list(range(1, len(arr))))
    scans = found(book, "port_scan")
    assert [(s, t) for s, t, _ in scans] == [("10.9.0.5", "10.9.0.7")] and "20 ports" in scans[0][2]
    # In one batch the unreachables (their quoted port is not parsed) fail one probe; the others when they expire.
    later = rows([(T0 + 10, ETH / IP(src="10.9.0.8", dst="10.9.0.9") / UDP(sport=53, dport=53))])
    det, book = observe(arr)
    det.observe(later, book)
    scans = found(book, "port_scan")
    assert [(s, t) for s, t, _ in scans] == [("10.9.0.5", "10.9.0.7")] and "20 ports" in scans[0][2]


def test_detectors_pickle_between_batches():
    """The state can move to a consumer process: a pickled copy carries on exactly as the original."""
    arr = nmap_burst()[:60_000]
    det, book = observe(arr[:30_000])
    copy, copy_book = pickle.loads(pickle.dumps((det, book)))
    det.observe(arr[30_000:], book)
    copy.observe(arr[30_000:], copy_book)
    assert [a.as_dict() for a in book.alerts()] == [a.as_dict() for a in copy_book.alerts()]
    assert det.table_sizes() == copy.table_sizes()


def test_arp_alert_kept_through_a_flood_of_new_hosts_end_to_end(monkeypatch):
    """Through the detectors: a spoofed ARP reply, then thousands of new local hosts; the ARP alert stays."""
    monkeypatch.setenv("NTM_NEW_HOST_LEARN_S", "2")
    frames = [(T0 + s, ETH / IP(src="10.9.0.5", dst="10.9.0.7") / UDP(sport=1, dport=2)) for s in range(4)]
    frames.append((T0 + 4, ETH / ARP(op=2, hwsrc="02:00:00:00:00:aa", psrc="10.9.0.1", pdst="10.9.0.5")))
    frames.append((T0 + 4.1, ETH / ARP(op=2, hwsrc="02:66:66:66:66:66", psrc="10.9.0.1", pdst="10.9.0.5")))
    frames += [(T0 + 5 + i / 1000, ETH / IP(src=f"10.60.{i // 250}.{i % 250 + 1}", dst="10.9.0.7")
                / UDP(sport=1, dport=2)) for i in range(2000)]
    _, book = observe(rows(frames), list(range(100, 2006, 100)))
    assert [t for _, t, _ in found(book, "arp_spoof")] == ["10.9.0.1"]
    assert book.suppressed().get("new_host", 0) > 0


def test_a_busy_proxy_with_many_connections_in_flight_is_no_scanner():
    """A proxy opening 40,000 TCP connections to port 443 of 4,000 servers in 20 s, each SYN answered 500 ms
    later (so a thousand wait at once, across batches of 256): no probe is wrongly pushed out as failed."""
    from analysis.headers import PACKET_DTYPE, TCP

    n = 40_000
    t = T0 + np.arange(n) * (20 / n)
    syn = np.zeros(n, PACKET_DTYPE)
    syn["ts"], syn["cls"], syn["proto"], syn["ipver"] = t, TCP, 6, 4
    client = np.zeros(16, np.uint8)
    client[10:12], client[12:] = 255, (10, 9, 0, 5)
    servers = np.zeros((4000, 16), np.uint8)
    servers[:, 10:12], servers[:, 12], servers[:, 13] = 255, 10, 20
    servers[:, 14], servers[:, 15] = np.arange(4000) // 250, np.arange(4000) % 250 + 1
    dst = servers[np.arange(n) % 4000]
    syn["src"] = client.view("S16")[0]
    syn["dst"] = dst.view("S16").ravel()
    syn["sport"], syn["dport"], syn["tcp_flags"] = 10_000 + np.arange(n) % 50_000, 443, 0x02
    ack = syn.copy()
    ack["ts"] = t + 0.5
    ack["src"], ack["dst"] = syn["dst"], syn["src"]
    ack["sport"], ack["dport"], ack["tcp_flags"] = 443, syn["sport"], 0x12
    arr = np.concatenate((syn, ack))
    arr = arr[np.argsort(arr["ts"], kind="stable")]
    arr = np.concatenate((arr, arr[-1:]))
    arr["ts"][-1] = T0 + 60  # past every timeout
    _, book = observe(arr, list(range(256, len(arr), 256)))
    assert book.alerts() == []


def test_distinct_sources_beyond_the_table_are_a_stated_lower_bound(monkeypatch):
    """1,500 spoofed sources with room for 128 pairs: the evidence says "at least N" with N <= 1,500, the same N
    however the packets are cut."""
    monkeypatch.setenv("NTM_DETECTOR_STATE_MAX", "64")
    frames = [(T0 + i / 1500, ETH / IP(src=f"10.{i % 7}.{i // 250}.{i % 250 + 1}", dst="10.9.0.7")
               / TCP(sport=1024 + i, dport=80, flags="S")) for i in range(1500)]
    arr = rows(frames)
    results = [found(observe(arr, cuts)[1], "syn_flood") for cuts in ([], list(range(100, 1500, 100)))]
    (source, _, evidence), = results[0]
    n = int(re.search(r"from at least (\d+) source", evidence).group(1))
    assert source == f"at least {n} source(s)" and 0 < n <= 128 and "1,500 SYNs" in evidence
    assert results[1] == results[0]
