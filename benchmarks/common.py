"""Helpers shared by the benchmarks: a mixed capture generator, tshark counts, RSS, the C sender."""

from __future__ import annotations

import os
import random
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _templates() -> list[tuple[bytes, int, int, int]]:
    """(frame, offset of the IPv4/IPv6 source address or -1, address length, offset of the ports or -1)."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
    from scapy.layers.l2 import ARP, Dot1Q, Ether

    eth = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
    out = []
    for pad in (0, 100, 500, 1400):
        body = b"x" * pad
        out.append((bytes(eth / IP(src="10.0.0.1", dst="10.1.0.1") / TCP(sport=1, dport=443, flags="A") / body),
                    26, 4, 34))
        out.append((bytes(eth / IP(src="10.0.0.1", dst="10.1.0.1") / UDP(sport=1, dport=53) / body), 26, 4, 34))
        out.append((bytes(eth / IPv6(src="2001:db8::1", dst="2001:db8:1::1") / TCP(sport=1, dport=80) / body),
                    22, 16, 54))
        out.append((bytes(eth / Dot1Q(vlan=7) / IP(src="10.0.0.1", dst="10.1.0.1") / UDP(sport=1, dport=123)
                          / body), 30, 4, 38))
    out.append((bytes(eth / IP(src="10.0.0.1", dst="10.1.0.1") / ICMP()), 26, 4, -1))
    out.append((bytes(eth / IPv6(src="2001:db8::1", dst="2001:db8:1::1") / ICMPv6EchoRequest()), 22, 16, -1))
    out.append((bytes(eth / ARP(psrc="10.0.0.1", pdst="10.0.0.2")), -1, 0, -1))
    return out


def make_mixed_pcap(path: str | os.PathLike, n: int, seed: int = 1, pps: float = 50_000.0, flows: int = 0,
                    public: bool = False) -> None:
    """Write an n-packet pcap mixing IPv4/IPv6, TCP/UDP/ICMP/ARP, VLAN and several sizes.

    flows=0: every packet gets a random host (of 2,000) and source port, so nearly every packet is
    a new flow (the worst case for per-flow state). flows=N: packets belong to N flows, a few
    large and many small (a flow's index is drawn as N * u**3), as on a real link. public=True: the
    IPv4 sources are public addresses (first octet 11..100), so enrichment looks each one up."""
    rng = random.Random(seed)
    pool = [(rng.randrange(1, 2000), rng.randrange(1024, 65535)) for _ in range(flows)]
    templates = _templates()
    hdr = struct.Struct("<IIII")
    t0 = 1_700_000_000.0
    with open(path, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        chunk = []
        for i in range(n):
            frame, a_off, a_len, p_off = templates[rng.randrange(len(templates))]
            f = bytearray(frame)
            if a_off >= 0:
                host, port = pool[int(flows * rng.random() ** 3)] if flows else \
                    (rng.randrange(1, 2000), rng.randrange(1024, 65535))
                f[a_off + a_len - 2:a_off + a_len] = host.to_bytes(2, "big")  # vary the source
                if public and a_len == 4:
                    f[a_off] = 11 + host % 90  # 11.0.x.y .. 100.0.x.y: routed, in the geo and AS databases
                if p_off >= 0:
                    f[p_off:p_off + 2] = port.to_bytes(2, "big")
            ts = t0 + i / pps
            sec = int(ts)
            chunk.append(hdr.pack(sec, int((ts - sec) * 1e6), len(f), len(f)) + bytes(f))
            if len(chunk) >= 10000:
                fh.write(b"".join(chunk))
                chunk = []
        fh.write(b"".join(chunk))


def tshark_classes(path: str | os.PathLike) -> dict[str, int]:
    """Packets per transport class according to tshark -T fields (outer IP header's protocol)."""
    out = subprocess.run(["tshark", "-n", "-r", str(path), "-T", "fields", "-e", "ip.proto", "-e", "ipv6.nxt"],
                         capture_output=True, text=True, check=True).stdout
    counts = {"tcp": 0, "udp": 0, "icmp": 0, "icmpv6": 0, "other_ip": 0, "non_ip": 0}
    names = {"6": "tcp", "17": "udp", "1": "icmp", "58": "icmpv6"}
    for line in out.splitlines():
        v4, v6 = [*line.split("\t"), ""][:2]
        proto = v4.split(",")[0] or v6.split(",")[-1]
        counts[names.get(proto, "other_ip") if proto else "non_ip"] += 1
    return counts


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size of a process (this one by default) in MB."""
    return _status(pid).get("VmRSS", 0) / 1024


def _status(pid: int | str) -> dict[str, int]:
    """The numeric fields of /proc/PID/status (VmRSS in kB, Threads); empty if the process is gone."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "Threads"):
                    out[name] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


def descendants(pid: int) -> list[int]:
    """Every live descendant of a process (children, their children, ...), from /proc's PPid fields."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return sorted(out)


def process_tree() -> list[dict]:
    """This process and its descendants (the detector worker, a broker): pid, name, RSS in MB, threads."""
    me = os.getpid()
    rows = []
    for pid in [me, *descendants(me)]:
        st = _status(pid)
        if not st:
            continue  # it ended between the listing and the read
        try:
            with open(f"/proc/{pid}/comm") as fh:
                name = fh.read().strip()
        except OSError:
            name = "?"
        rows.append({"pid": pid, "name": name, "rss_mb": st.get("VmRSS", 0) / 1024, "threads": st.get("Threads", 0),
                     "self": pid == me})
    return rows


def tree_rss_mb(exclude: int | None = None) -> float:
    """RSS in MB summed over this process and its descendants (the detector worker, a broker), but `exclude`."""
    return sum(r["rss_mb"] for r in process_tree() if r["pid"] != exclude)


def machine() -> str:
    """nproc and the CPU model, for RESULTS.md."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {model}"
