"""The detectors alone (analysis.detect.Detectors.observe) on hostile traffic: packets/s per workload.

Workloads, generated here (seeded) straight into PACKET_DTYPE rows, so only the detectors are timed:
- hostile mix: random spoofed sources (IPv4 and IPv6), destinations from a pool of 5,000 and random
  ports; TCP with SYN, SYN-ACK, RST, RST-ACK, FIN, ACK, PSH-ACK; UDP with DNS both ways and random
  ports; ICMP echo requests and replies; a little ARP;
- nmap -p- burst: what `nmap -sS -p- -T5 127.0.0.1` puts on `lo` (~131,000 packets in 0.8 s): a SYN
  to each of the 65,535 ports from one source port, each answered by a RST-ACK, three open ports
  answered by a SYN-ACK and reset by the scanner.
- scan-heavy mix: benchmarks/mixgen.py's mix (the one of file_scan_mix.py and live_mix.py), written to a
  pcap and parsed as a file is.
Batches of 65,536 rows (a capture file's BATCH_SIZE), 8,192 (about one full 1 MiB ring block) and 2,048.
Reference in the same run: the same detectors on their numpy/Python tables (analysis.detect with
NATIVE_TABLES off, the twins of native/detect.c) at 65,536 rows; the figure to reach is the capture's own
rate (issue 11: 1,500,000 packets/s in-process for a file).

    .venv/bin/python benchmarks/detectors.py [--short]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from targets import machine

from analysis import detect
from analysis.detect import AlertBook, Detectors
from analysis.headers import ICMP, NON_IP, PACKET_DTYPE, TCP, UDP

T0 = 1_700_000_000.0
V4 = np.array([0] * 10 + [255, 255], np.uint8)


def v4(rng: np.random.Generator, n: int, first: int | None = None) -> np.ndarray:
    """n IPv4-mapped 16-byte keys, random (within first.0.0.0/8 when `first` is given)."""
    out = np.zeros((n, 16), np.uint8)
    out[:, :12] = V4
    out[:, 12:] = rng.integers(1, 255, (n, 4), dtype=np.uint8)
    if first is not None:
        out[:, 12] = first
    return out


def hostile(n: int, seed: int = 1, pps: float = 300_000.0) -> np.ndarray:
    """A hostile many-flow mix of n packets at `pps` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    arr = np.zeros(n, PACKET_DTYPE)
    arr["ts"] = T0 + np.arange(n) / pps
    arr["wire_len"] = arr["cap_len"] = rng.integers(60, 1514, n)
    kind = rng.choice(6, n, p=[0.40, 0.15, 0.12, 0.08, 0.20, 0.05])  # tcp, dns, udp, icmp, ipv6, arp
    src = v4(rng, n)
    pool = np.concatenate([v4(rng, 2000, 10), v4(rng, 2000)])
    dst = pool[rng.integers(0, len(pool), n)]
    six = kind == 4
    src[six] = rng.integers(0, 256, (int(six.sum()), 16), dtype=np.uint8)
    src[six, 0] = 0x20
    pool6 = rng.integers(0, 256, (1000, 16), dtype=np.uint8)
    pool6[:, 0] = 0xFD
    dst[six] = pool6[rng.integers(0, len(pool6), int(six.sum()))]
    arr["src"] = src.view("S16").ravel()
    arr["dst"] = dst.view("S16").ravel()
    arr["ipver"] = np.where(six, 6, 4)
    arr["sport"] = rng.integers(1, 65536, n)
    arr["dport"] = rng.integers(1, 65536, n)
    flags = np.array([0x02, 0x12, 0x04, 0x14, 0x01, 0x11, 0x10, 0x18], np.uint16)
    arr["tcp_flags"] = flags[rng.integers(0, len(flags), n)]
    tcp = (kind == 0) | (six & (rng.random(n) < 0.6))
    udp = (kind == 1) | (kind == 2) | (six & ~tcp)
    arr["cls"] = np.where(tcp, TCP, np.where(udp, UDP, np.where(kind == 3, ICMP, NON_IP)))
    arr["proto"] = np.where(tcp, 6, np.where(udp, 17, np.where(kind == 3, 1, -1)))
    arr["tcp_flags"][~tcp] = 0
    dns = kind == 1
    query = dns & (rng.random(n) < 0.5)
    arr["dport"][query] = 53
    arr["sport"][dns & ~query] = 53
    icmp = kind == 3
    arr["icmp_type"] = np.where(icmp, np.where(rng.random(n) < 0.5, 8, 0), -1)
    arr["sport"][icmp | (kind == 5)] = -1
    arr["dport"][icmp | (kind == 5)] = -1
    arp = kind == 5
    arr["ethertype"] = np.where(arp, 0x0806, np.where(six, 0x86DD, 0x0800))
    arr["arp_op"] = np.where(arp, rng.integers(1, 3, n), 0)
    arr["hw_src"][arp] = rng.integers(0, 256, (int(arp.sum()), 6), dtype=np.uint8).view("S6").ravel()
    return arr


def nmap_burst(seed: int = 2, seconds: float = 0.8) -> np.ndarray:
    """The packets `nmap -sS -p- -T5 127.0.0.1` shows on `lo`, in time order."""
    rng = np.random.default_rng(seed)
    ports = rng.permutation(np.arange(1, 65536))
    opened = set(ports[:3].tolist())
    lo = np.zeros(16, np.uint8)
    lo[10:12], lo[12], lo[15] = 255, 127, 1
    rows = []
    for p in ports.tolist():
        rows.append((p, 0x02, False))
        rows.append((p, 0x12 if p in opened else 0x14, True))
        if p in opened:
            rows.append((p, 0x04, False))
    n = len(rows)
    arr = np.zeros(n, PACKET_DTYPE)
    arr["ts"] = T0 + np.arange(n) * (seconds / n)
    arr["wire_len"] = arr["cap_len"] = 54
    arr["cls"], arr["proto"], arr["ipver"], arr["ethertype"] = TCP, 6, 4, 0x0800
    arr["src"] = arr["dst"] = lo.view("S16")[0]
    port = np.array([r[0] for r in rows])
    reply = np.array([r[2] for r in rows])
    arr["sport"] = np.where(reply, port, 51234)
    arr["dport"] = np.where(reply, 51234, port)
    arr["tcp_flags"] = [r[1] for r in rows]
    arr["icmp_type"] = arr["icmp_code"] = -1
    return arr


def scan_mix(n: int, seed: int = 1) -> np.ndarray:
    """benchmarks/mixgen.py's scan-heavy mix of n frames, parsed as the engine parses a file."""
    import tempfile

    import mixgen

    from analysis.headers import LocalMatcher, parse_batch
    from capture.sources import FileReader

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mix.pcap"
        mixgen.make_mix(path, n, seed=seed)
        return np.concatenate([parse_batch(b, LocalMatcher()) for b in FileReader(str(path)).batches(65_536)])


def run(arr: np.ndarray, batch: int, limit: float = 600.0,
        compiled: bool = True) -> tuple[float, float, int, AlertBook]:
    """(wall s, CPU s, packets done, book) for the detectors over arr in batches; stops after `limit` s.

    compiled: the tables of native/detect.c, else their numpy/Python references. CPU time is this
    process's: on a machine shared with other work it is the steadier figure."""
    detect.NATIVE_TABLES = compiled
    try:
        det, book = Detectors(), AlertBook()
    finally:
        detect.NATIVE_TABLES = True
    t, c = time.perf_counter(), time.process_time()
    done = 0
    for i in range(0, len(arr), batch):
        det.observe(arr[i:i + batch], book)
        done = min(i + batch, len(arr))
        if time.perf_counter() - t > limit:
            break
    return time.perf_counter() - t, time.process_time() - c, done, book


def main() -> None:
    """Print packets/s of the detectors per workload and batch size."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", action="store_true", help="small sizes, a few seconds")
    ap.add_argument("--limit", type=float, default=600.0, help="stop a workload after this many seconds")
    args = ap.parse_args()
    n = 100_000 if args.short else 1_000_000
    work = {"scan-heavy mix": scan_mix(n), "hostile mix": hostile(n), "nmap -p- burst": nmap_burst()}
    if args.short:
        work["nmap -p- burst"] = work["nmap -p- burst"][:20_000]
    print(f"machine: {machine()}; compiled tables: {detect._native_tables()}")
    for name, arr in work.items():
        for batch, compiled in ((65_536, True), (8_192, True), (2_048, True), (65_536, False)):
            secs, cpu, done, book = run(arr, batch, args.limit, compiled)
            kinds = sorted({a.detector for a in book.alerts()})
            note = "" if done == len(arr) else f" (stopped after {done:,} of {len(arr):,})"
            label = f"{name} batch {batch:,}" + ("" if compiled else " reference")
            print(f"{label:40s}: {done:9,d} packets in {secs:7.3f} s wall, {cpu:7.3f} s CPU = "
                  f"{done / secs:11,.0f} packets/s wall, {done / cpu:11,.0f} per CPU second{note}; "
                  f"alerts: {', '.join(kinds) or 'none'}", flush=True)


if __name__ == "__main__":
    main()
