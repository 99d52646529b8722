"""The per-process attribution stage's work per packet, against the capture thread's own counting of the
same batches (Counters.prepare + apply: the reference, in the same script), and the socket table's read.

Attribution runs in the detector worker process (or a thread of the capturing process); where everything shares
one core its CPU is taken from the capture, so this says how large it is next to what the capture does anyway.
Three traffic shapes:
  one flow      - UDP between two local ports (every packet has two local ends: the most work per packet)
  many flows    - a scan-like flood, every packet a new (port, peer) pair to a local address
  4000 sources  - UDP from 4,000 loopback addresses to one local port (enrich_cost.py --sources 4000): every
                  batch repeats the same 4,000 conversations
each with the compiled grouping and connection sets (native/grouprows.c, native/detect.c) and with their
numpy/Python references, alternated in the same run. Then the CPU of one read of the socket table: sock_diag
(enrich/sockdiag.py) against psutil.net_connections, alternated.

    python benchmarks/attribution_cost.py [--batches 40] [--batch 65536] [--reads 40]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from targets import machine  # noqa: E402

import native  # noqa: E402
from analysis import detect  # noqa: E402
from analysis.counters import Counters  # noqa: E402
from analysis.headers import PACKET_DTYPE, TCP, UDP, V4_PREFIX  # noqa: E402
from enrich import sockdiag  # noqa: E402
from enrich.attribution import ProcessStage  # noqa: E402
from enrich.processes import ProcessTable  # noqa: E402


def batch(kind: str, seed: int, size: int) -> np.ndarray:
    """One batch of records of the given traffic shape."""
    rng = np.random.default_rng(seed)
    a = np.zeros(size, PACKET_DTYPE)
    a["ts"] = 1_700_000_000 + np.arange(size) / 1e6
    a["wire_len"] = a["cap_len"] = 60
    a["ipver"] = 4
    lo = V4_PREFIX + bytes([127, 0, 0, 1])
    if kind == "one flow":
        a["cls"], a["proto"] = UDP, 17
        a["src"] = a["dst"] = lo
        a["sport"], a["dport"] = 40000, 9
    elif kind == "4000 sources":
        a["cls"], a["proto"] = UDP, 17
        sources = np.array([V4_PREFIX + bytes([127, 1, i >> 8, i & 255]) for i in range(1, 4001)], "S16")
        a["src"] = sources[rng.integers(0, 4000, size)]
        a["dst"] = lo
        a["sport"], a["dport"] = 40000, 9
    else:
        a["cls"], a["proto"] = TCP, 6
        peers = rng.integers(0, 1 << 24, size, dtype=np.uint32)
        a["src"] = [V4_PREFIX + bytes([10, (p >> 16) & 255, (p >> 8) & 255, p & 255]) for p in peers.tolist()]
        a["dst"] = lo
        a["sport"] = rng.integers(1024, 65536, size)
        a["dport"] = rng.integers(1, 65536, size)
    return a


@contextlib.contextmanager
def references(on: bool):
    """With on: the numpy grouping and Python connection sets instead of the compiled ones."""
    saved = native.conv_tally, detect._native_tables
    if on:
        native.conv_tally, detect._native_tables = (lambda *a: None), (lambda: False)
    try:
        yield
    finally:
        native.conv_tally, detect._native_tables = saved


def cpu() -> float:
    """This thread's CPU seconds."""
    return time.thread_time()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch", type=int, default=65_536, help="packets per call (the worker gathers 0.25 s)")
    ap.add_argument("--reads", type=int, default=40)
    args = ap.parse_args()
    print(machine())
    table = ProcessTable(refresh_s=1.0)
    table.refresh()  # one read of the real socket table, no thread: the stage only looks owners up
    n = args.batches * args.batch
    for kind in ("one flow", "many flows", "4000 sources"):
        batches = [batch(kind, i, args.batch) for i in range(4)]
        counters = Counters(100_000)
        t = cpu()
        for i in range(args.batches):
            counters.apply(counters.prepare(batches[i % 4]), 900)
        ref = cpu() - t
        costs = {}
        for name, reference in (("compiled", False), ("numpy", True), ("compiled again", False)):
            with references(reference):
                stage = ProcessStage(table, 1 << 20, grace_s=3600)
                stage.tally(batches[0])  # its first call's one-time work
                t = cpu()
                for i in range(args.batches):
                    stage.tally(batches[i % 4])
                costs[name] = cpu() - t
        print(f"{kind:12}  capture counting {n / ref:>11,.0f} packets/s  |  attribution, ns per packet: " +
              "  ".join(f"{k} {v / n * 1e9:.0f}" for k, v in costs.items()) +
              f"  |  attribution / counting: {costs['compiled'] / ref:.2f} (numpy: {costs['numpy'] / ref:.2f})")
    diag, ref_table = ProcessTable(), ProcessTable(use_sock_diag=False)
    diag.refresh()
    ref_table.refresh()
    took = {"sock_diag": 0.0, "psutil": 0.0}
    for _ in range(args.reads):
        for name, t_ in (("sock_diag", diag), ("psutil", ref_table)):
            t = cpu()
            t_.refresh()
            took[name] += cpu() - t
    # A read that names a new socket also reads every fd table (Owners.place): that part alone, as often.
    t = cpu()
    for _ in range(args.reads):
        sockdiag.socket_inodes()
    scan = (cpu() - t) / args.reads
    sockets = len(sockdiag.sockets())
    processes = sum(name.isdigit() for name in os.listdir("/proc"))
    print(f"socket table, CPU per read ({sockets} sockets on this machine, {args.reads} reads each, alternated): " +
          "  ".join(f"{k} {v / args.reads * 1e3:.2f} ms" for k, v in took.items()) +
          f"  (fd-table scans: {diag._diag.scans} of {args.reads + 1} sock_diag reads); one fd-table scan "
          f"({processes} processes): {scan * 1e3:.2f} ms, which a read naming a new socket adds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
