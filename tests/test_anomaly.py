"""Detectors on crafted traffic, on a public capture, and on real tools in a test namespace."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import need, run
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether

from packet_processor import CaptureEngine, Source

T0 = 1_700_000_000.0
ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def feed(frames: list) -> CaptureEngine:
    eng = CaptureEngine()
    recs = []
    for i, f in enumerate(frames):
        ts, pkt = f if isinstance(f, tuple) else (T0 + i * 0.001, f)
        d = bytes(pkt)
        recs.append((ts, d, len(d), 1))
    eng.ingest_records(recs)
    return eng


def alerts(eng: CaptureEngine, detector: str | None = None) -> list[dict]:
    return [a for a in eng.summary()["alerts"] if detector is None or a["detector"] == detector]


def test_vertical_scan_refused_ports():
    frames = []
    for port in range(20, 40):
        frames.append(ETH / IP(src="10.9.0.5", dst="10.9.0.7") / TCP(sport=40000, dport=port, flags="S"))
        frames.append(ETH / IP(src="10.9.0.7", dst="10.9.0.5") / TCP(sport=port, dport=40000, flags="RA"))
    found = alerts(feed(frames), "port_scan")
    assert len(found) == 1
    a = found[0]
    assert (a["source"], a["target"], a["severity"]) == ("10.9.0.5", "10.9.0.7", "medium")
    assert "20 ports on 10.9.0.7" in a["evidence"] and "0 answered" in a["evidence"]
    assert a["count"] >= 1 and a["first_ts"] <= a["last_ts"]


def test_horizontal_sweep_unanswered():
    frames = [(T0 + i * 0.01, ETH / IP(src="10.9.0.5", dst=f"10.9.1.{i}") / TCP(sport=41000 + i, dport=22, flags="S"))
              for i in range(1, 13)]
    # Later traffic moves the clock past the 3 s answer timeout.
    frames.append((T0 + 10, ETH / IP(src="10.9.0.8", dst="10.9.0.9") / UDP(sport=53, dport=53)))
    found = alerts(feed(frames), "port_scan")
    assert [(a["source"], a["target"]) for a in found] == [("10.9.0.5", "tcp/22")]
    assert "12 hosts" in found[0]["evidence"]


def test_busy_clients_are_not_scanners():
    frames = []
    for i in range(40):  # a browser opening connections to 40 web servers: all answered
        server, port = f"10.9.2.{i + 1}", 50000 + i
        frames.append(ETH / IP(src="10.9.0.5", dst=server) / TCP(sport=port, dport=443, flags="S"))
        frames.append(ETH / IP(src=server, dst="10.9.0.5") / TCP(sport=443, dport=port, flags="SA"))
        frames.append(ETH / IP(src="10.9.0.5", dst=server) / TCP(sport=port, dport=443, flags="A"))
    for i in range(100):  # DNS-like request/response from many client ports, two queries in flight
        frames.append(ETH / IP(src="10.9.0.5", dst="10.9.0.53") / UDP(sport=30000 + i, dport=53))
        frames.append(ETH / IP(src="10.9.0.5", dst="10.9.0.53") / UDP(sport=31000 + i, dport=53))
        frames.append(ETH / IP(src="10.9.0.53", dst="10.9.0.5") / UDP(sport=53, dport=30000 + i))
        frames.append(ETH / IP(src="10.9.0.53", dst="10.9.0.5") / UDP(sport=53, dport=31000 + i))
    frames.append((T0 + 30, ETH / IP(src="10.9.0.8", dst="10.9.0.9") / UDP(sport=53, dport=53)))
    assert alerts(feed(frames)) == []


def test_arp_spoof_one_row_per_address():
    frames = [ETH / ARP(op=2, hwsrc="02:00:00:00:00:aa", psrc="10.9.0.1", pdst="10.9.0.5")]
    for n in range(3):
        frames.append(ETH / ARP(op=2, hwsrc=f"02:00:00:00:00:b{n}", psrc="10.9.0.1", pdst="10.9.0.5"))
    found = alerts(feed(frames), "arp_spoof")
    assert len(found) == 1 and found[0]["target"] == "10.9.0.1" and found[0]["count"] == 3
    assert found[0]["source"] == "02:00:00:00:00:b2" and "was at 02:00:00:00:00:b1" in found[0]["evidence"]


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith("VmRSS:"))


def test_detector_state_and_memory_stay_bounded(monkeypatch):
    """1,000,000 packets from random spoofed sources (SYNs, UDP probes, ARP claims): state and RSS stay flat."""
    monkeypatch.setenv("NTM_DETECTOR_STATE_MAX", "1000")
    monkeypatch.setenv("NTM_ALERTS_MAX", "50")
    monkeypatch.setenv("NTM_BATCH_SIZE", "4096")
    eng = CaptureEngine(buffer_size=1000)
    syn = bytes(ETH / IP(src="10.0.0.1", dst="10.9.0.7") / TCP(sport=1234, dport=80, flags="S"))
    udp = bytes(ETH / IP(src="10.0.0.1", dst="10.9.0.7") / UDP(sport=1234, dport=53))
    arp = bytes(ETH / ARP(op=2, hwsrc="02:00:00:00:00:01", psrc="10.0.0.1", pdst="10.9.0.7"))
    rss = []
    for chunk in range(5):
        recs = []
        for j in range(200_000):
            i = chunk * 200_000 + j
            src = bytes([10, (i >> 16) & 255, (i >> 8) & 255, i & 255])
            if i % 3 == 0:
                f = syn[:26] + src + syn[30:]
            elif i % 3 == 1:
                f = udp[:26] + src + udp[30:]
            else:
                f = arp[:22] + src[1:] + b"\x02" + arp[28:32] + src + arp[32:]  # a new MAC and IP each time
            recs.append((T0 + i * 1e-4, f, len(f), 1))
        eng.ingest_records(recs)
        rss.append(rss_mb())
    det = eng._detectors
    sizes = det.table_sizes()
    # Every table, inner ones included: at most 6 x DETECTOR_STATE_MAX (a _Unique holds its pairs, up to
    # 4 x, and per key a count and a first time), plus the probes of one batch not yet turned over.
    assert sizes and all(n <= 6 * 1000 + 4096 for n in sizes.values()), sizes
    assert sizes["arp"] <= 1000 and sizes["known_hosts"] <= 1000
    assert len(eng.alerts.alerts()) <= 50
    assert eng.snapshot().totals["packets"] == 1_000_000
    assert rss[-1] - rss[0] < 20, rss  # flat after the first 200,000


def test_public_scan_capture_raises_the_scan_alert(shared_pcaps):
    eng = CaptureEngine()
    found = [a for a in eng.load_file(str(shared_pcaps / "files" / "tcp_scan_arp.pcapng"))["alerts"]
             if a["detector"] == "port_scan"]
    assert [(a["source"], a["target"]) for a in found] == [("192.168.1.178", "192.168.1.2")]


@pytest.mark.live
def test_nmap_syn_scan_in_a_namespace(root_only, veth):
    need(shutil.which("nmap") is not None, "nmap is not installed")
    eng = CaptureEngine()
    try:
        assert eng.start(Source("live", iface=veth.host_if))
        time.sleep(0.3)
        run(["nmap", "-n", "-Pn", "-sS", "-p", "1-200", "--max-retries", "0", veth.ns_ip], timeout=120)
        found = live_alerts(eng, "port_scan", 5)  # within 5 s of the scan
        assert found and (found[0]["source"], found[0]["target"]) == (veth.host_ip, veth.ns_ip)
        assert "answered" in found[0]["evidence"]
    finally:
        eng.stop()


@pytest.mark.live
def test_forged_arp_reply_on_the_veth(root_only, veth):
    from scapy.sendrecv import sendp

    eng = CaptureEngine()
    try:
        assert eng.start(Source("live", iface=veth.host_if))
        run(["ping", "-c", "1", veth.ns_ip])  # the real ARP exchange teaches the detector the true MAC
        time.sleep(0.3)
        forged = Ether(dst="ff:ff:ff:ff:ff:ff", src="02:66:66:66:66:66") / ARP(
            op=2, hwsrc="02:66:66:66:66:66", psrc=veth.ns_ip, hwdst="ff:ff:ff:ff:ff:ff", pdst=veth.ns_ip)
        # Put on the wire of the veth (from the host's end, where the capture listens).
        sendp(forged, iface=veth.host_if, verbose=False)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not alerts(eng, "arp_spoof"):
            time.sleep(0.1)
        found = alerts(eng, "arp_spoof")
        assert found and found[0]["target"] == veth.ns_ip and found[0]["source"] == "02:66:66:66:66:66"
    finally:
        eng.stop()


def test_syn_flood_from_spoofed_sources_but_not_a_busy_server():
    frames = [(T0 + i / 1500, ETH / IP(src=f"10.{i % 7}.{i // 250}.{i % 250 + 1}", dst="10.9.0.7")
               / TCP(sport=1024 + i, dport=80, flags="S")) for i in range(1500)]
    found = alerts(feed(frames), "syn_flood")
    assert len(found) == 1 and found[0]["target"] == "10.9.0.7" and found[0]["severity"] == "high"
    assert "1,500 SYNs" in found[0]["evidence"] and "likely spoofed" in found[0]["evidence"]
    busy = []
    for i in range(1500):  # the same rate, every SYN answered: a busy server, no flood
        busy.append((T0 + i / 1500, ETH / IP(src="10.9.0.5", dst="10.9.0.7") / TCP(sport=1024 + i, dport=80,
                                                                                  flags="S")))
        busy.append((T0 + i / 1500, ETH / IP(src="10.9.0.7", dst="10.9.0.5") / TCP(sport=80, dport=1024 + i,
                                                                                  flags="SA")))
    assert alerts(feed(busy), "syn_flood") == []


def test_icmp_and_udp_floods():
    pings = [(T0 + i / 600, ETH / IP(src="10.9.0.5", dst="10.9.0.7") / ICMP()) for i in range(600)]
    found = alerts(feed(pings), "icmp_flood")
    assert [(a["target"], a["source"]) for a in found] == [("10.9.0.7", "1 source(s)")]
    udp = bytes(ETH / IP(src="10.9.0.5", dst="10.9.0.7") / UDP(sport=5000, dport=9))
    eng = CaptureEngine()
    eng.ingest_records([(T0 + i / 25_000, udp, len(udp), 1) for i in range(25_000)])
    assert [a["target"] for a in alerts(eng, "udp_flood")] == ["10.9.0.7"]


def spike_frames(seconds: int, pps: int, t0: float) -> list:
    pkt = ETH / IP(src="10.9.0.5", dst="10.9.0.7") / UDP(sport=5000, dport=53)
    return [(t0 + s + i / pps, pkt) for s in range(seconds) for i in range(pps)]


def test_spike_after_a_steady_baseline_and_none_when_steady():
    steady = spike_frames(120, 100, T0)
    assert alerts(feed([*steady, (T0 + 125, steady[0][1])]), "spike") == []
    burst = spike_frames(1, 5000, T0 + 120)
    found = alerts(feed(steady + burst + [(T0 + 125, steady[0][1])]), "spike")
    assert {a["target"] for a in found} == {"packets/s", "bit/s"}
    assert any("5,000 packets/s" in a["evidence"] for a in found)


def test_new_local_host_after_learning(monkeypatch):
    monkeypatch.setenv("NTM_NEW_HOST_LEARN_S", "5")
    frames = spike_frames(10, 10, T0)
    frames.append((T0 + 10.5, ETH / IP(src="10.9.0.99", dst="10.9.0.7") / UDP(sport=1, dport=2)))
    frames.append((T0 + 10.6, ETH / IP(src="8.8.8.8", dst="10.9.0.7") / UDP(sport=53, dport=2)))
    frames.append((T0 + 12, frames[0][1]))
    found = alerts(feed(frames), "new_host")
    assert [a["source"] for a in found] == ["10.9.0.99"]


def live_alerts(eng: CaptureEngine, detector: str, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not alerts(eng, detector):
        time.sleep(0.1)
    return alerts(eng, detector)


@pytest.fixture
def live_engine(root_only, veth):
    eng = CaptureEngine()
    assert eng.start(Source("live", iface=veth.host_if)), eng.status().error
    time.sleep(0.3)
    yield eng
    eng.stop()


@pytest.mark.live
def test_nmap_connect_scan(live_engine, veth):
    need(shutil.which("nmap") is not None, "nmap is not installed")
    run(["nmap", "-n", "-Pn", "-sT", "-p", "1-100", veth.ns_ip], timeout=120)
    found = live_alerts(live_engine, "port_scan", 5)
    assert [(a["source"], a["target"]) for a in found] == [(veth.host_ip, veth.ns_ip)]


@pytest.mark.live
def test_nmap_udp_scan(live_engine, veth):
    need(shutil.which("nmap") is not None, "nmap is not installed")
    run(["nmap", "-n", "-Pn", "-sU", "-p", "1000-1019", "--max-retries", "0", veth.ns_ip], timeout=120)
    found = live_alerts(live_engine, "port_scan", 8)  # unanswered probes count after 3 s
    assert [(a["source"], a["target"]) for a in found] == [(veth.host_ip, veth.ns_ip)]
    assert "20 ports" in found[0]["evidence"]


@pytest.mark.live
def test_nmap_horizontal_sweep(live_engine, veth):
    need(shutil.which("nmap") is not None, "nmap is not installed")
    hosts = [f"{veth.prefix}{n}" for n in range(10, 22)]
    for h in hosts:  # twelve hosts inside the namespace, none listening on ssh
        run(["ip", "addr", "add", f"{h}/24", "dev", veth.ns_if], ns=veth.ns)
    run(["nmap", "-n", "-Pn", "-sS", "-p", "22", "--max-retries", "0", *hosts], timeout=120)
    found = live_alerts(live_engine, "port_scan", 5)
    assert (veth.host_ip, "tcp/22") in [(a["source"], a["target"]) for a in found]


@pytest.mark.live
@pytest.mark.parametrize("spoofed", [False, True], ids=["one-source", "rand-source"])
def test_hping3_syn_flood(live_engine, veth, spoofed):
    need(shutil.which("hping3") is not None, "hping3 is not installed")
    cmd = ["hping3", "--syn", "-p", "80", "-i", "u400", "-c", "3000", "-q"] + (["--rand-source"] if spoofed else [])
    run([*cmd, veth.ns_ip], check=False, timeout=60)
    found = live_alerts(live_engine, "syn_flood", 5)
    assert [a["target"] for a in found] == [veth.ns_ip]
    if spoofed:
        assert "likely spoofed" in found[0]["evidence"]


@pytest.mark.live
def test_ordinary_traffic_raises_no_alert(root_only, veth, tmp_path, monkeypatch):
    """curl downloads, DNS-like request/response, pings and many short TCP connections for 35 s: no alert,
    also in the 23 s after the spike detector's warm-up (shortened to 12 s so that the run stays short)."""
    need(shutil.which("curl") is not None, "curl is not installed")
    monkeypatch.setenv("NTM_SPIKE_WARMUP_S", "12")
    live_engine = CaptureEngine()
    assert live_engine.start(Source("live", iface=veth.host_if)), live_engine.status().error
    (tmp_path / "file.bin").write_bytes(b"x" * 200_000)
    server = subprocess.Popen(["ip", "netns", "exec", veth.ns, sys.executable, "-m", "http.server", "8080",
                               "--bind", veth.ns_ip, "--directory", str(tmp_path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    echo = subprocess.Popen(["ip", "netns", "exec", veth.ns, sys.executable, "-c", UDP_ECHO, veth.ns_ip],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ping = subprocess.Popen(["ping", "-i", "0.5", "-w", "45", veth.ns_ip], stdout=subprocess.DEVNULL)
    try:
        time.sleep(1.0)
        end = time.monotonic() + 35
        rounds = 0
        dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dns.settimeout(1.0)
        while time.monotonic() < end:
            subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://{veth.ns_ip}:8080/file.bin"], timeout=10)
            for _ in range(5):  # short connections: connect, request, close
                subprocess.run(["curl", "-s", "-o", "/dev/null", f"http://{veth.ns_ip}:8080/"], timeout=10)
                dns.sendto(b"\x12\x34query", (veth.ns_ip, 5353))
                dns.recv(512)
            rounds += 1
            time.sleep(0.3)
        dns.close()
        time.sleep(4)  # past the unanswered-probe timeout
        assert rounds > 14, rounds
        assert live_engine.snapshot().totals["transport_counts"]["tcp"] > 500
        assert alerts(live_engine) == []
    finally:
        live_engine.stop()
        for proc in (server, echo, ping):
            proc.terminate()
            proc.wait(5)


UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 5353))
s.settimeout(130)
while True:
    data, peer = s.recvfrom(512)
    s.sendto(data[:2] + b"answer", peer)
"""


@pytest.mark.live
def test_live_spike_after_a_steady_baseline(root_only, veth, monkeypatch):
    monkeypatch.setenv("NTM_SPIKE_WARMUP_S", "8")
    eng = CaptureEngine()
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert eng.start(Source("live", iface=veth.host_if, bpf="udp port 9999"))
        time.sleep(0.3)
        end = time.monotonic() + 12
        while time.monotonic() < end:  # a steady 100 packets/s
            for _ in range(10):
                tx.sendto(b"steady", (veth.ns_ip, 9999))
            time.sleep(0.1)
        assert alerts(eng, "spike") == []  # a steady load raises none
        burst_end = time.monotonic() + 1.5
        while time.monotonic() < burst_end:  # then as fast as Python sends: tens of thousands per second
            tx.sendto(b"burst", (veth.ns_ip, 9999))
        for _ in range(20):  # a little steady traffic after, so the burst's second closes
            tx.sendto(b"steady", (veth.ns_ip, 9999))
            time.sleep(0.1)
        found = live_alerts(eng, "spike", 5)
        assert {a["target"] for a in found} >= {"packets/s"}
    finally:
        tx.close()
        eng.stop()


def _arp_per_row(det, rows, book) -> None:
    """The ARP step as one step per packet: the reference the batch version must equal."""
    from analysis.detect import _mac
    from analysis.headers import addr_text

    for ts, ip, mac, op, dst in zip(rows["ts"].tolist(), rows["src"].tolist(), rows["hw_src"].tolist(),
                                    rows["arp_op"].tolist(), rows["dst"].tolist()):
        if not ip or not mac:
            continue
        mac = mac.ljust(6, b"\x00")
        known = det.arp.get(ip)
        det.arp.put(ip, (mac, ts))
        if known is not None and known[0] != mac and op in (1, 2):
            kind = "gratuitous ARP" if ip == dst else ("ARP reply" if op == 2 else "ARP request")
            book.raise_alert("arp_spoof", "high", _mac(mac), addr_text(ip), ts,
                             f"{kind} says {addr_text(ip)} is at {_mac(mac)}; it was at {_mac(known[0])} "
                             f"{ts - known[1]:.0f} s before", "", key=("arp_spoof", "", addr_text(ip)))


def test_arp_batch_step_equals_one_step_per_packet():
    """Random ARP batches (few addresses and MACs, unnamed rows among them): the same state and alerts."""
    import numpy as np

    from analysis.detect import AlertBook, Detectors
    from analysis.headers import NON_IP, PACKET_DTYPE

    rng = np.random.default_rng(7)
    addrs = np.zeros((4, 16), np.uint8)
    addrs[:, 10:12] = 255
    addrs[:, 15] = np.arange(4)
    addrs[0] = 0  # no address: skipped
    macs = np.zeros((3, 6), np.uint8)  # the first MAC is empty: skipped
    macs[1, 0], macs[2, 5] = 1, 7
    raised = 0
    for _ in range(200):
        fast, slow, fast_book, slow_book = Detectors(), Detectors(), AlertBook(), AlertBook()
        for b in range(int(rng.integers(1, 5))):
            n = int(rng.integers(0, 200))
            arr = np.zeros(n, PACKET_DTYPE)
            arr["src"] = addrs[rng.integers(0, 4, n)].view("S16").ravel()
            arr["dst"] = addrs[rng.integers(0, 4, n)].view("S16").ravel()
            arr["hw_src"] = macs[rng.integers(0, 3, n)].view("S6").ravel()
            arr["arp_op"] = rng.integers(1, 4, n)
            arr["ts"] = np.sort(rng.random(n) * 10) + b * 10
            arr["cls"], arr["ethertype"] = NON_IP, 0x0806
            fast._arp(arr, fast_book)
            _arp_per_row(slow, arr, slow_book)
        assert list(fast.arp.items()) == list(slow.arp.items())
        assert [a.as_dict() for a in fast_book.alerts()] == [a.as_dict() for a in slow_book.alerts()]
        raised += len(slow_book.alerts())
    assert raised > 100  # the comparison covered MAC changes, not only quiet batches


def test_multicast_and_broadcast_destinations_are_recognised():
    import ipaddress

    import numpy as np

    from analysis.detect import _group

    group = ["224.0.0.251", "239.255.255.250", "255.255.255.255", "ff02::fb", "ff05::1:3"]
    unicast = ["10.0.0.1", "223.255.255.255", "2001:db8::1", "fe80::1", "::1", "::", "0.0.0.0", "fe02::1"]
    packed = [ipaddress.ip_address(a) for a in group + unicast]
    raw = [(b"\x00" * 10 + b"\xff\xff" + a.packed) if a.version == 4 else a.packed for a in packed]
    got = _group(np.array(raw, dtype="S16")).tolist()
    assert got == [True] * len(group) + [False] * len(unicast)
