"""Capture files for the investigate tests, built with Scapy, and independent counts of them with tshark."""

from __future__ import annotations

import random
import subprocess

from conftest import need

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
HOSTS = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.2.0.9", "192.168.7.20"]
SERVER = "10.9.9.9"
SPIKER = "10.1.0.3"


def mixed_packets(seconds: int = 60, spike_from: int = 50, seed: int = 15, spike_pps: int = 40,
                  spread: bool = False) -> list:
    """A minute of mixed traffic from five hosts to one server (TCP, UDP, ICMP, one IPv6 pair, ARP);
    from `spike_from` on, SPIKER sends `spike_pps` extra UDP packets a second to port 5353 (`spread`:
    to random ports, so that only the host explains the rise)."""
    from scapy.all import ARP, ICMP, IP, TCP, UDP, Ether, IPv6

    rng = random.Random(seed)
    ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")  # no ARP look-up for a MAC
    out = []
    for sec in range(seconds):
        for i in range(12):
            src = rng.choice(HOSTS)
            kind = rng.random()
            base = ETH / IP(src=src, dst=SERVER)
            if kind < 0.5:
                p = base / TCP(sport=rng.randint(30000, 60000), dport=rng.choice([443, 80, 22]), flags="A")
            elif kind < 0.8:
                p = base / UDP(sport=rng.randint(30000, 60000), dport=rng.choice([53, 123]))
            elif kind < 0.9:
                p = base / ICMP()
            elif kind < 0.95:
                p = ETH / IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=5000, dport=5001)
            else:
                p = ETH / ARP(psrc=src, pdst=SERVER)
            p = p / (b"x" * rng.randint(0, 300))
            p.time = T0 + sec + i / 12 + rng.random() / 50
            out.append(p)
        if sec >= spike_from:
            for i in range(spike_pps):
                dport = rng.randint(1024, 65000) if spread else 5353
                p = ETH / IP(src=SPIKER, dst=SERVER) / UDP(sport=40000 + i, dport=dport) / (b"s" * 100)
                p.time = T0 + sec + (i + 0.5) / (spike_pps + 1)
                out.append(p)
    out.sort(key=lambda p: float(p.time))
    return out


def write_mixed(path, **kw) -> str:
    """mixed_packets written as a pcap; the path as text."""
    from scapy.all import wrpcap

    wrpcap(str(path), mixed_packets(**kw))
    return str(path)


def tshark_count(path: str, display_filter: str) -> tuple[int, int]:
    """(packets, wire bytes) that tshark's display filter keeps: the independent count."""
    need(subprocess.run(["which", "tshark"], capture_output=True).returncode == 0, "tshark is not installed")
    out = subprocess.run(["tshark", "-r", path, "-Y", display_filter, "-T", "fields", "-e", "frame.len"],
                         capture_output=True, text=True, check=True).stdout.split()
    return len(out), sum(int(x) for x in out)
