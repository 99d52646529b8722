"""CPU per million packets on the file path, split by process: the reading process (parse + count, its
threads) and the detector worker (observe + its pipe reads), by getrusage around CaptureEngine.load_file.

On a shared machine wall time moves with the load; CPU seconds per packet move much less, so this
compares two versions of the code in the same minutes (run it from each checkout in turn).

    python benchmarks/file_cpu.py FILE.pcap [--runs 3]     # e.g. the mix of file_scan_mix.py (mixgen.py)
    python benchmarks/file_cpu.py FILE.pcap --whole         # also `python packet_processor.py summary FILE`:
                                                            # its CPU (worker included) and wall, start-up included
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))  # the checkout it is run from
sys.path.insert(1, str(Path(__file__).resolve().parent))

from targets import machine


def cpu(usage: resource.struct_rusage) -> float:
    """User + system seconds."""
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--whole", action="store_true", help="also time the command-line summary as a whole process")
    args = ap.parse_args()
    from packet_processor import CaptureEngine

    print(f"machine: {machine()}; code: {Path.cwd()}")
    CaptureEngine().load_file(args.file)  # warm: the compiled helpers are built and cached
    for _ in range(args.runs):
        engine = CaptureEngine()
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        out = engine.load_file(args.file)
        wall = time.perf_counter() - t
        me2, kids2 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        m = out["packets"] / 1e6
        print(f"  reader {(cpu(me2) - cpu(me)) / m:.3f} s CPU per million packets, detector worker "
              f"{(cpu(kids2) - cpu(kids)) / m:.3f}; wall {out['packets'] / wall:,.0f} packets/s, "
              f"{len(out['alerts'])} alerts")
    for _ in range(args.runs if args.whole else 0):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run([sys.executable, "packet_processor.py", "summary", args.file], check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t
        m = out["packets"] / 1e6
        print(f"  whole `summary` process: {(cpu(resource.getrusage(resource.RUSAGE_CHILDREN)) - cpu(before)) / m:.3f}"
              f" s CPU per million packets (its worker included), wall {wall:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
