"""Live many-flow mix: the generated hostile mix replayed onto lo with tcpreplay, engine vs tcpdump.

benchmarks/mixgen.py writes a seeded mix (default 1,500,000 frames: scans, short TCP flows, DNS,
UDP, ICMP, IPv6, 802.1Q) whose every address is loopback; Debian's tcpreplay replays it onto lo
(`--preload-pcap --pps R`) while our engine (detectors on, in this process) and tcpdump capture
the same replay with the same filter.

What is compared: each replayed frame once. On lo every frame passes the packet taps twice
(outgoing, then incoming); libpcap (tcpdump) skips the outgoing copy and so does our engine (its
socket filter rejects lo's PACKET_OUTGOING), so both should count exactly tcpreplay's "Actual"
packets. The filter `ether src 02:6e:74:6d:00:01` (the mix's own source MAC) keeps other programs'
traffic on lo out of both counts; the kernel drops the replayed frames after the taps (they are
addressed to another MAC), so they provoke no replies. On lo the kernel moves 802.1Q tags out of
the frame before any capturer sees it: the tagged frames still count, as frames.

Target: the engine counts >= 99.9 % of the replayed frames at 400,000 packets/s, or at the
highest rate tcpreplay reaches here (said so in the output).

    python benchmarks/live_mix.py                  # 1,500,000 frames at 400,000/s (root, tcpreplay, tcpdump)
    python benchmarks/live_mix.py --quick          # 200,000 frames; the target is reported, not enforced
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import mixgen
from targets import Tcpdump, Verdicts, machine

TARGET = 0.999
PIN = os.environ.get("BENCH_PIN_SENDER", "") == "1"
BPF = f"ether src {mixgen.SRC_MAC_TEXT}"


def tcpreplay(path: Path, pps: int) -> dict[str, float]:
    """Replay the file onto lo; tcpreplay's own figures (sent, failed, rate)."""
    cmd = ["tcpreplay", "--preload-pcap", f"--pps={pps}", "-i", "lo", str(path)]
    if PIN and shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        cmd = ["taskset", "-c", "1", *cmd]  # the sender on the second core, as the other live benchmarks
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"tcpreplay failed: {out.stderr.strip() or out.stdout.strip()}")
    text = out.stdout + out.stderr

    def num(pattern: str) -> float:
        m = re.search(pattern, text)
        return float(m.group(1).replace(",", "")) if m else 0.0

    return {"sent": num(r"Actual: (\d+) packets"), "failed": num(r"Failed packets:\s+(\d+)"),
            "pps": num(r"Rated: [\d.]+ Bps, [\d.]+ Mbps, ([\d.]+) pps"), "seconds": num(r"sent in ([\d.]+) seconds")}


def replay_once(path: Path, pps: int, limit: float) -> tuple[dict, dict, tuple[int, int]]:
    """One replay with both capturers on; (tcpreplay's figures, engine totals, tcpdump's counts)."""
    from packet_processor import CaptureEngine, Source

    engine = CaptureEngine()
    dump = Tcpdump("lo", BPF)
    try:
        if not engine.start(Source("live", iface="lo", bpf=BPF)):
            raise SystemExit(f"engine did not start: {engine.status().error}")
        time.sleep(0.5)
        sent = tcpreplay(path, pps)
        ended = time.monotonic()
        ref = dump.finish()  # its 1.5 s wait also lets the engine take its last ring blocks
        caught_up = wait_caught_up(engine, int(sent["sent"]), ended, limit)
        time.sleep(0.5)  # anything counted twice or foreign would show now
        totals = engine.snapshot().totals
        totals["caught_up_s"] = caught_up
    finally:
        dump.kill()
        engine.stop()
    return sent, totals, ref


def wait_caught_up(engine, replayed: int, ended: float, limit: float) -> float | None:
    """Seconds after the replay's end until counted + dropped reach the frames replayed; None if not within limit."""
    while True:
        t = engine.snapshot().totals
        if t["packets"] + t["dropped"] >= replayed:
            return time.monotonic() - ended
        if time.monotonic() - ended > limit:
            return None
        time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", "--short", action="store_true", help="200,000 frames; the target is not enforced")
    ap.add_argument("--packets", type=int, default=None)
    ap.add_argument("--pps", type=int, default=400_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--wait", type=float, default=30.0, help="seconds the engine may take to catch up after the "
                    "replay before what it has not counted or dropped is reported as missing")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("live capture needs root")
    missing = [p for p in ("tcpreplay", "tcpdump") if shutil.which(p) is None]
    if missing:
        raise SystemExit(f"needs {', '.join(missing)} (scripts/setup.sh --test installs them)")
    n = args.packets or (200_000 if args.quick else 1_500_000)
    verdicts = Verdicts(enforce=not args.quick)
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mix.pcap"
        kinds = mixgen.make_mix(path, n, seed=args.seed)
        print(f"mix: {n:,} frames, {path.stat().st_size / 1e6:.0f} MB, seed {args.seed}: {kinds}")
        print(f"replay: tcpreplay --preload-pcap --pps={args.pps} -i lo; capture filter {BPF!r}", flush=True)
        sent, totals, (ref, ref_dropped) = replay_once(path, args.pps, args.wait)
    replayed = int(sent["sent"])
    counted, dropped = totals["packets"], totals["dropped"]
    print(f"  tcpreplay: {replayed:,} frames sent ({int(sent['failed']):,} failed) in {sent['seconds']:.2f} s, "
          f"{sent['pps']:,.0f} packets/s")
    if sent["pps"] < 0.98 * args.pps:
        print(f"  note: tcpreplay reached only {sent['pps']:,.0f} of the asked {args.pps:,} packets/s here; "
              "the target applies at the rate it reached")
    late = totals["caught_up_s"]
    print(f"  engine (detectors on): {counted:,} counted = {counted / replayed:.4%}, {dropped:,} dropped by the "
          "kernel; " + (f"counted + dropped = the replay {late:.2f} s after its end (checked after tcpdump's "
                        "1.5 s wait)" if late is not None else
                        f"{replayed - counted - dropped:,} neither counted nor dropped {args.wait:g} s after it"))
    print(f"  tcpdump (reference):   {ref:,} counted = {ref / replayed:.4%}, {ref_dropped:,} dropped")
    if totals.get("stages"):
        print(f"  stages: {totals['stages']}")
    verdicts.check("nothing counted twice, nothing foreign: engine count <= frames replayed",
                   counted <= replayed and ref <= replayed, f"{counted:,}, tcpdump {ref:,}, of {replayed:,}",
                   correctness=True)
    verdicts.check("every frame the engine missed is counted as dropped (counted + dropped >= replayed)",
                   counted + dropped >= replayed, f"{counted + dropped:,} of {replayed:,}", correctness=True)
    verdicts.check(f"engine counts >= {TARGET:.1%} of the replay at {sent['pps']:,.0f} packets/s",
                   counted >= TARGET * replayed, f"{counted / replayed:.4%}")
    return verdicts.exit_status()


if __name__ == "__main__":
    raise SystemExit(main())
