"""One refresh's CPU when every address is new to the page: a flood of new sources, as at each refresh of a scan.

Each variant runs in a fresh process: the first refresh with data (the process's one-time costs: imports inside
functions, first calls), then refreshes of new snapshots with the page's per-address memo emptied (the top
tables' answers and the look-ups cold). Plain = refresh.refresh_work, enriched = refresh.panel_work (the live
tables' columns and the panel's first tab), the same Enricher settings as enrich_cost.py's.

    python benchmarks/refresh_cold.py                   # 4,000 loopback sources, 3 rounds
    python benchmarks/refresh_cold.py --public          # the public-address mix of refresh.py --enrich
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


def measure(variant: str, path: str, calls: int) -> list[float]:
    """In this process: CPU ms of the first refresh with data, then of `calls` cold ones."""
    import refresh

    import enrich_columns as ec
    from packet_processor import CaptureEngine

    en = refresh.enricher()
    work = refresh.panel_work(en) if variant == "enriched" else refresh.refresh_work
    work(CaptureEngine().snapshot())  # an empty page first, as enrich_cost's child did before its warm-up
    engine = CaptureEngine()
    engine.load_file(path)
    out = []
    for _ in range(calls + 1):
        ec._MEMOS.clear()
        snap = engine.snapshot()  # a new snapshot: its tables' top() answers are cold too
        t = time.thread_time()
        work(snap)
        out.append((time.thread_time() - t) * 1e3)
    en.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--public", action="store_true", help="public addresses (refresh.py's mix) instead")
    ap.add_argument("--sources", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--child", nargs=2, metavar=("VARIANT", "PCAP"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(" ".join(f"{v:.1f}" for v in measure(args.child[0], args.child[1], args.calls)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "traffic.pcap")
        if args.public:
            from common import make_mixed_pcap
            make_mixed_pcap(path, 200_000, public=True)
            print("traffic: refresh.py's public-address mix, 200,000 packets")
        else:
            from enrich_cost import sources_pcap
            sources_pcap(path, args.sources, second_octet=1, rounds=10)
            print(f"traffic: {args.sources:,} loopback sources, 10 packets each")
        print("CPU ms of one refresh: the process's first with data, then cold ones (fresh process per line)")
        for r in range(args.rounds):
            for variant in ("plain", "enriched"):
                out = subprocess.run([sys.executable, __file__, "--calls", str(args.calls), "--child", variant, path],
                                     capture_output=True, text=True, check=True).stdout.split()
                first, cold = out[0], out[1:]
                print(f"  round {r + 1} {variant:8} first {first:>6}  cold {' '.join(cold)}", flush=True)


if __name__ == "__main__":
    main()
