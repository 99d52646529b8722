"""File ingest: packets/s into the engine's full state (buffer, counters, bins, top tables) vs tshark.

Generates two mixed pcaps (IPv4/IPv6, TCP/UDP/ICMP/ARP, VLAN, several sizes): one whose packets
belong to 20,000 flows, as on a real link, and one where nearly every packet is a new flow (the
worst case for per-flow state). Loads each through CaptureEngine.load_file, runs
`tshark -T fields` on the same file in the same run, and checks that the per-class counts agree.

    python benchmarks/file_ingest.py              # 1,000,000 packets
    python benchmarks/file_ingest.py --short      # 20,000 packets (CI)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from common import make_mixed_pcap, tshark_classes

import native
from packet_processor import CaptureEngine


def one_file(n: int, flows: int, tmp: str) -> bool:
    """Generate one file, load it into the engine and run tshark on it; print both rates. True if counts agree."""
    path = os.path.join(tmp, f"mixed-{flows}.pcap")
    make_mixed_pcap(path, n, flows=flows)
    size_mb = os.path.getsize(path) / 1e6
    engine = CaptureEngine()
    t = time.perf_counter()
    summary = engine.load_file(path)
    ours = time.perf_counter() - t
    t = time.perf_counter()
    want = tshark_classes(path)
    theirs = time.perf_counter() - t
    os.unlink(path)
    assert summary["error"] is None and summary["packets"] == n
    same = summary["transport_counts"] == want
    kind = f"{flows:,} flows" if flows else "nearly every packet a new flow"
    print(f"file: {n:,} packets, {size_mb:.0f} MB, {kind}")
    print(f"  engine (full state, detectors on): {n / ours:>12,.0f} packets/s  ({ours:.2f} s)")
    print(f"  tshark -T fields:                  {n / theirs:>12,.0f} packets/s  ({theirs:.2f} s)")
    print(f"  ratio: {theirs / ours:.1f}x tshark")
    print(f"  counts equal tshark's: {same}  {summary['transport_counts']}")
    return same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", action="store_true", help="20,000 packets")
    ap.add_argument("--packets", type=int, default=None)
    args = ap.parse_args()
    n = args.packets or (20_000 if args.short else 1_000_000)
    print(f"compiled helpers: {'on' if native.available() else 'off'}")
    with tempfile.TemporaryDirectory() as tmp:
        ok = [one_file(n, flows, tmp) for flows in (20_000, 0)]
    print(f"counts equal tshark's: {all(ok)}")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    raise SystemExit(main())
