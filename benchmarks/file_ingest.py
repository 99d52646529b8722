"""File ingest: packets/s into the engine's full state (buffer, counters, bins, top tables) vs tshark.

Generates a mixed pcap (IPv4/IPv6, TCP/UDP/ICMP/ARP, VLAN, several sizes), loads it through
CaptureEngine.load_file, runs `tshark -T fields` on the same file in the same run, and checks
that the per-class counts agree.

    python benchmarks/file_ingest.py              # 1,000,000 packets
    python benchmarks/file_ingest.py --short      # 20,000 packets (CI)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from common import make_mixed_pcap, tshark_classes

from packet_processor import CaptureEngine


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", action="store_true", help="20,000 packets")
    ap.add_argument("--packets", type=int, default=None)
    args = ap.parse_args()
    n = args.packets or (20_000 if args.short else 1_000_000)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mixed.pcap")
        make_mixed_pcap(path, n)
        size_mb = os.path.getsize(path) / 1e6
        engine = CaptureEngine()
        t = time.perf_counter()
        summary = engine.load_file(path)
        ours = time.perf_counter() - t
        t = time.perf_counter()
        want = tshark_classes(path)
        theirs = time.perf_counter() - t
    assert summary["error"] is None and summary["packets"] == n
    same = summary["transport_counts"] == want
    print(f"file: {n:,} packets, {size_mb:.0f} MB")
    print(f"engine (full state): {n / ours:>12,.0f} packets/s  ({ours:.2f} s)")
    print(f"tshark -T fields:    {n / theirs:>12,.0f} packets/s  ({theirs:.2f} s)")
    print(f"ratio: {theirs / ours:.1f}x tshark")
    print(f"counts equal tshark's: {same}  {summary['transport_counts']}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
