"""Memory: RSS above the idle process with a full buffer, and whether it stays flat under load.

1. Buffer: RSS of an idle engine, then after filling a 10,000-packet and a 1,000,000-packet buffer
   (plus the counters and bounded top tables) from a generated mixed capture. Reference in the same
   run: the seed's way of holding the same packets, a list of Scapy packets.
2. Flat: live capture on lo at 50,000 packets/s (C sender) with the dashboard's refresh work every
   2 s; RSS of the process tree (this process and its children: the detector worker, a broker;
   not the sender) is sampled every 10 s and the spread after warm-up is reported (root only).

    python benchmarks/memory.py                   # both buffers, then 30 minutes of load
    python benchmarks/memory.py --short           # small buffers, 20 s of load (CI)
    python benchmarks/memory.py --minutes 5
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import subprocess
import tempfile
import threading
import time

from common import make_mixed_pcap, rss_mb, tree_rss_mb
from live_capture import PAYLOAD, build_sender
from refresh import refresh_work

from packet_processor import CaptureEngine, Source


def buffer_cost(size: int, path: str) -> float:
    """MB of RSS added by an engine whose buffer of `size` packets is full."""
    gc.collect()
    before = rss_mb()
    engine = CaptureEngine(buffer_size=size)
    engine.load_file(path)
    assert len(engine.snapshot().packets) == size
    gc.collect()
    return rss_mb() - before


def scapy_cost(n: int, path: str) -> float:
    """MB of RSS for n packets held as Scapy objects, as the seed held them."""
    from scapy.utils import rdpcap

    gc.collect()
    before = rss_mb()
    pkts = rdpcap(path, count=n)
    for p in pkts:
        p.summary()  # dissected, as the seed did for every packet
    gc.collect()
    used = rss_mb() - before
    del pkts
    return used


def flat_under_load(minutes: float) -> None:
    """Capture 50,000 packets/s on lo with refreshes every 2 s; print RSS samples and their spread."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    port = sink.getsockname()[1]
    engine = CaptureEngine()
    assert engine.start(Source("live", iface="lo", bpf=f"udp dst port {port}")), engine.status().error
    stop = threading.Event()

    def refresher() -> None:
        while not stop.wait(2.0):
            refresh_work(engine.snapshot())

    threading.Thread(target=refresher, daemon=True).start()
    seconds = minutes * 60
    with tempfile.TemporaryDirectory() as tmp:
        sender = subprocess.Popen([build_sender(tmp), str(port), "50000", str(seconds), str(PAYLOAD), "1"],
                                  stdout=subprocess.PIPE, text=True)
        samples = []
        start = time.monotonic()
        while sender.poll() is None:
            time.sleep(min(10.0, max(1.0, seconds / 10)))
            samples.append((time.monotonic() - start, tree_rss_mb(exclude=sender.pid)))
            print(f"  t={samples[-1][0]:6.0f} s  RSS {samples[-1][1]:7.1f} MB  "
                  f"packets {engine.snapshot().totals['packets']:,}", flush=True)
        sent = int(sender.stdout.read())
    stop.set()
    engine.stop()
    t = engine.snapshot().totals
    steady = [m for s, m in samples if s >= seconds * 0.2] or [m for _, m in samples]
    spread = (max(steady) - min(steady)) / min(steady) * 100
    print(f"sent {sent:,}, counted {t['packets']:,}, kernel dropped {t['dropped']:,}")
    print(f"RSS after warm-up: min {min(steady):.1f} MB, max {max(steady):.1f} MB, spread {spread:.1f} %")
    sink.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", action="store_true")
    ap.add_argument("--minutes", type=float, default=None, help="length of the load test (default 30)")
    args = ap.parse_args()
    sizes = [2_000, 20_000] if args.short else [10_000, 1_000_000]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mixed.pcap")
        make_mixed_pcap(path, max(sizes))
        print(f"idle process: {rss_mb():.1f} MB RSS")
        for size in sizes:
            print(f"full {size:>9,}-packet buffer: +{buffer_cost(size, path):6.1f} MB")
        n = sizes[0]
        print(f"reference: {n:,} dissected Scapy packets (the seed's buffer): +{scapy_cost(n, path):6.1f} MB")
    minutes = args.minutes if args.minutes is not None else (20 / 60 if args.short else 30.0)
    if os.geteuid() == 0:
        print(f"live load: 50,000 packets/s on lo for {minutes:g} min with a refresh every 2 s")
        flat_under_load(minutes)
    else:
        print("live load skipped: needs root")


if __name__ == "__main__":
    main()
