"""File, scan-heavy mix: the engine on a hostile many-flow capture file, against tshark in the same run.

Generates (benchmarks/mixgen.py, seeded) 1,000,000 frames of scans, short TCP flows, DNS, UDP,
ICMP, IPv6 and 802.1Q, then measures
  - in-process: CaptureEngine.load_file (full state, detectors on), packets/s;
  - whole process: `python packet_processor.py summary FILE`, start-up included;
  - the reference: `tshark -n -r FILE -T fields -e frame.len -e ip.proto -e ipv6.nxt`, whose output
    also gives the per-class counts the engine's must equal.
Targets: >= 1,500,000 packets/s in-process, whole process >= 25x tshark, counts equal.

    python benchmarks/file_scan_mix.py              # 1,000,000 packets
    python benchmarks/file_scan_mix.py --quick      # 50,000 packets, speed reported but not enforced
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mixgen
from targets import ROOT, Verdicts, machine

IN_PROCESS_TARGET = 1_500_000
TSHARK_RATIO_TARGET = 25.0
NAMES = {"6": "tcp", "17": "udp", "1": "icmp", "58": "icmpv6"}


def tshark_fields(path: Path) -> tuple[float, dict[str, int]]:
    """Seconds tshark -T fields takes on the file, and its packets per transport class (outer IP header)."""
    t = time.perf_counter()
    out = subprocess.run(["tshark", "-n", "-r", str(path), "-T", "fields", "-e", "frame.len", "-e", "ip.proto",
                          "-e", "ipv6.nxt"], capture_output=True, text=True, check=True).stdout
    took = time.perf_counter() - t
    counts = dict.fromkeys(("tcp", "udp", "icmp", "icmpv6", "other_ip", "non_ip"), 0)
    for line in out.splitlines():
        _, v4, v6 = [*line.split("\t"), "", ""][:3]
        proto = v4.split(",")[0] or v6.split(",")[-1]
        counts[NAMES.get(proto, "other_ip") if proto else "non_ip"] += 1
    return took, counts


def in_process(path: Path) -> tuple[float, dict]:
    """Seconds CaptureEngine.load_file takes, and its summary."""
    from packet_processor import CaptureEngine

    engine = CaptureEngine()
    t = time.perf_counter()
    summary = engine.load_file(str(path))
    return time.perf_counter() - t, summary


def whole_process(path: Path) -> tuple[float, dict]:
    """Seconds the command-line summary takes, start-up included, and its JSON."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "packet_processor.py", "summary", str(path)], cwd=ROOT,
                         capture_output=True, text=True)
    took = time.perf_counter() - t
    if out.returncode != 0:
        raise SystemExit(f"packet_processor.py summary failed: {out.stderr[-2000:]}")
    return took, json.loads(out.stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", "--short", action="store_true", help="50,000 packets; speed not enforced")
    ap.add_argument("--packets", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    n = args.packets or (50_000 if args.quick else 1_000_000)
    verdicts = Verdicts(enforce=not args.quick)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scan-mix.pcap"
        t = time.perf_counter()
        kinds = mixgen.make_mix(path, n, seed=args.seed)
        print(f"mix: {n:,} frames, {path.stat().st_size / 1e6:.0f} MB, generated in {time.perf_counter() - t:.1f} s,"
              f" seed {args.seed}: {kinds}", flush=True)
        ours, summary = in_process(path)
        whole, cli = whole_process(path)
        theirs, want = tshark_fields(path)
    alerts = sorted({a["detector"] for a in summary["alerts"]})
    print(f"  engine in-process (load_file, detectors on): {n / ours:>12,.0f} packets/s  ({ours:.2f} s)")
    print(f"  python packet_processor.py summary (whole):   {n / whole:>12,.0f} packets/s  ({whole:.2f} s)")
    print(f"  tshark -T fields (reference):                 {n / theirs:>12,.0f} packets/s  ({theirs:.2f} s)")
    print(f"  ratio whole process / tshark: {theirs / whole:.1f}x;  alerts raised: {', '.join(alerts) or 'none'}")
    verdicts.check("counts equal tshark's (in-process and command line)",
                   summary["packets"] == cli["packets"] == n and summary["transport_counts"] == want
                   == cli["transport_counts"], f"tshark {want}, engine {summary['transport_counts']}",
                   correctness=True)
    verdicts.check("the port scans in the mix raise port_scan alerts", "port_scan" in alerts, correctness=True)
    verdicts.check(f"in-process >= {IN_PROCESS_TARGET:,} packets/s", n / ours >= IN_PROCESS_TARGET,
                   f"{n / ours:,.0f}/s")
    verdicts.check(f"whole process >= {TSHARK_RATIO_TARGET:g}x tshark -T fields",
                   theirs / whole >= TSHARK_RATIO_TARGET, f"{theirs / whole:.1f}x")
    return verdicts.exit_status()


if __name__ == "__main__":
    raise SystemExit(main())
