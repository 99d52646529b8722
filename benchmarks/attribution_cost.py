"""The per-process attribution stage's work per packet, against the capture thread's own counting of the
same batches (Counters.prepare + apply: the reference, in the same script).

The stage runs in its own thread, so with the GIL its cost is CPU taken from the capture thread; this
says how large it is next to what the capture does anyway. Two traffic shapes, 65,536-packet batches:
  one flow      - UDP between two local ports (every packet has two local ends: the most work per packet)
  many flows    - a scan-like flood, every packet a new (port, peer) pair to a local address

    python benchmarks/attribution_cost.py [--batches 40]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analysis.counters import Counters  # noqa: E402
from analysis.headers import PACKET_DTYPE, TCP, UDP, V4_PREFIX  # noqa: E402
from enrich.attribution import ProcessStage  # noqa: E402
from enrich.processes import ProcessTable  # noqa: E402

BATCH = 65_536


def batch(kind: str, seed: int) -> np.ndarray:
    """One batch of records of the given traffic shape."""
    rng = np.random.default_rng(seed)
    a = np.zeros(BATCH, PACKET_DTYPE)
    a["ts"] = 1_700_000_000 + np.arange(BATCH) / 1e6
    a["wire_len"] = a["cap_len"] = 60
    a["ipver"] = 4
    lo = V4_PREFIX + bytes([127, 0, 0, 1])
    if kind == "one flow":
        a["cls"], a["proto"] = UDP, 17
        a["src"] = a["dst"] = lo
        a["sport"], a["dport"] = 40000, 9
    else:
        a["cls"], a["proto"] = TCP, 6
        peers = rng.integers(0, 1 << 24, BATCH, dtype=np.uint32)
        a["src"] = [V4_PREFIX + bytes([10, (p >> 16) & 255, (p >> 8) & 255, p & 255]) for p in peers.tolist()]
        a["dst"] = lo
        a["sport"] = rng.integers(1024, 65536, BATCH)
        a["dport"] = rng.integers(1, 65536, BATCH)
    return a


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=40)
    args = ap.parse_args()
    table = ProcessTable(refresh_s=1.0)
    table.refresh()  # one read of the real socket table, no thread: the stage only looks owners up
    for kind in ("one flow", "many flows"):
        batches = [batch(kind, i) for i in range(4)]
        counters = Counters(100_000)
        stage = ProcessStage(table, 1 << 20, grace_s=3600)
        t = time.perf_counter()
        for i in range(args.batches):
            counters.apply(counters.prepare(batches[i % 4]), 900)
        ref = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(args.batches):
            stage.tally(batches[i % 4])
        cost = time.perf_counter() - t
        n = args.batches * BATCH
        print(f"{kind:10}  capture counting {n / ref:>12,.0f} packets/s   attribution {n / cost:>12,.0f} packets/s"
              f"   attribution / counting time: {cost / ref:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
