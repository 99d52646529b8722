"""Detectors in a worker process against detectors in a thread (and inline, the old way), on hostile traffic.

Two workloads, each run with DETECTORS_PROCESS on and off in fresh processes:
- file: a generated scan-heavy mix (SYN probes from many sources to random ports, RST answers,
  DNS-like UDP, pings; every packet of its own seeded generator) through `load_file`: packets/s of
  the whole load, detectors included (a file waits for its detectors, so both modes analyse all);
- live (root): `nmap -sS -p- -T5 -g 45678 127.0.0.1` captured on lo with filter `tcp port 45678`:
  packets counted and dropped, how long after the burst the capture had counted everything, when
  the port-scan alert appeared, and how many packets the detector stage skipped.

    python benchmarks/stage_modes.py [--packets N] [--runs R] [--no-live]
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scan_mix(path: str, n: int, seed: int = 11, net: tuple[int, int] = (10, 1),
             dnet: tuple[int, int] = (10, 2)) -> None:
    """A pcap of n frames: 60 % TCP SYN probes from 5,000 sources to random ports of 200 hosts, 25 % RST
    answers, 10 % DNS-like UDP, 5 % ICMP echo; timestamps 20 us apart."""
    rng = np.random.default_rng(seed)
    kind = rng.choice(4, n, p=[0.6, 0.25, 0.1, 0.05])
    src = rng.integers(0, 5000, n)
    dst = rng.integers(0, 200, n)
    port = rng.integers(1, 65536, n)
    sport = rng.integers(1024, 65536, n)
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)]
    eth = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00"
    for i in range(n):
        s = bytes((*net, src[i] >> 8, src[i] & 255))
        d = bytes((*dnet, 0, dst[i]))
        k = kind[i]
        if k == 0:
            l4 = struct.pack(">HHIIBBHHH", sport[i], port[i], i, 0, 0x50, 0x02, 1024, 0, 0)
            proto, a, b = 6, s, d
        elif k == 1:
            l4 = struct.pack(">HHIIBBHHH", port[i], sport[i], 0, i + 1, 0x50, 0x14, 0, 0, 0)
            proto, a, b = 6, d, s
        elif k == 2:
            l4 = struct.pack(">HHHH", sport[i], 53, 20, 0) + b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
            proto, a, b = 17, s, d
        else:
            l4 = struct.pack(">BBHHH", 8, 0, 0, 1, i & 0xFFFF) + b"\x00" * 8
            proto, a, b = 1, s, d
        ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), i & 0xFFFF, 0, 64, proto, 0, a, b)
        frame = eth + ip + l4
        ts = 1_700_000_000 + i * 20e-6
        sec = int(ts)
        out.append(struct.pack("<IIII", sec, int((ts - sec) * 1e6), len(frame), len(frame)) + frame)
    with open(path, "wb") as f:
        f.write(b"".join(out))


FILE_RUN = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from packet_processor import CaptureEngine
t = time.perf_counter()
out = CaptureEngine().load_file(sys.argv[2])
took = time.perf_counter() - t
print(json.dumps({"s": took, "packets": out["packets"], "alerts": len(out["alerts"]),
                  "stage": out["stages"].get("detectors")}))
"""

# Live-like: the file's batches parsed beforehand, then counted as the live capture thread counts them
# (a detector stage that cannot keep up skips batches): the rate of counting alone, and what the
# detectors analysed, while they run in a worker process or in a thread that competes for the GIL.
INGEST_RUN = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
import config
from packet_processor import CaptureEngine, FileReader, LocalMatcher, parse_batch, parse_nets
eng = CaptureEngine()
matcher = LocalMatcher(nets=parse_nets(config.get("LOCAL_NETS")))
batches = [parse_batch(raw, matcher) for raw in FileReader(sys.argv[2]).batches(8192)]
eng._gen += 1
eng._stage = eng._new_stage(eng._gen)
eng._stage.yield_to_capture()  # as for a live capture (CaptureEngine.start): SCHED_IDLE, niced
time.sleep(1.0)  # the worker is up
t = time.perf_counter()
for arr in batches:
    eng._ingest(arr, eng._gen)
took = time.perf_counter() - t
st = eng.snapshot().totals["stages"]["detectors"]
eng.stop()
print(json.dumps({"s": took, "packets": eng.snapshot().totals["packets"], "stage": st}))
"""

REPLAY_RUN = """
import json, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from packet_processor import CaptureEngine, Source
eng = CaptureEngine()
assert eng.start(Source("live", iface="lo", bpf="net 127.77.0.0/16")), eng.status().error
time.sleep(1.0)
out = subprocess.run(["tcpreplay", "-i", "lo", "--preload-pcap", "--pps", sys.argv[3], sys.argv[2]],
                     capture_output=True, text=True, check=True)
time.sleep(3.0)
t = eng.snapshot().totals
eng.stop()
rate = [l for l in out.stdout.splitlines() if "Rated:" in l]
print(json.dumps({"counted": t["packets"], "dropped": t["dropped"], "stage": t["stages"].get("detectors"),
                  "rated": rate[0].strip() if rate else ""}))
"""

LIVE_RUN = """
import json, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
from packet_processor import CaptureEngine, Source
eng = CaptureEngine()
assert eng.start(Source("live", iface="lo", bpf="tcp port 45678")), eng.status().error
time.sleep(1.0)
subprocess.run(["nmap", "-sS", "-p-", "-T5", "-n", "-Pn", "-g", "45678", "127.0.0.1"], capture_output=True, check=True)
end = time.monotonic()
done = alert = None
last = -1
while time.monotonic() < end + 20:
    snap = eng.snapshot()
    n = snap.totals["packets"] + snap.totals["dropped"]
    if alert is None and any(a.detector == "port_scan" for a in snap.alerts):
        alert = time.monotonic() - end
    if n == last and done is None and n > 130000:
        done = time.monotonic() - end - 0.05
    last = n
    if done is not None and alert is not None:
        break
    time.sleep(0.05)
t = eng.snapshot().totals
eng.stop()
print(json.dumps({"counted": t["packets"], "dropped": t["dropped"], "finished_after_s": done,
                  "alert_after_s": alert, "stage": t["stages"].get("detectors")}))
"""


def run(script: str, args: list[str], process: bool) -> dict:
    env = dict(os.environ, NTM_DETECTORS_PROCESS="1" if process else "0")
    out = subprocess.run([sys.executable, "-c", script, ROOT, *args], env=env, capture_output=True, text=True,
                         timeout=600)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-live", action="store_true")
    ap.add_argument("--no-file", action="store_true")
    ap.add_argument("--pps", type=int, default=200_000, help="tcpreplay rate for the replayed scan mix")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "scan_mix.pcap")
        scan_mix(path, args.packets)
        for process in (True, False):
            for _ in range(0 if args.no_file else args.runs):
                r = run(FILE_RUN, [path], process)
                print(f"file  {'process' if process else 'thread '}  {r['packets'] / r['s']:>10,.0f} packets/s  "
                      f"({r['s']:.2f} s, {r['alerts']} alerts, stage {r['stage']})", flush=True)
        for process in (True, False):
            for _ in range(args.runs):
                r = run(INGEST_RUN, [path], process)
                st = r["stage"]
                print(f"count {'process' if process else 'thread '}  {r['packets'] / r['s']:>10,.0f} packets/s counted "
                      f"(8,192-packet batches, as live); detectors skipped {st['packets_skipped']:,} of "
                      f"{st['packets_in']:,}", flush=True)
    if args.no_live or os.geteuid() != 0:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "scan_mix_lo.pcap")
        scan_mix(path, args.packets, net=(127, 77), dnet=(127, 77))
        for process in (True, False):
            for _ in range(args.runs):
                r = run(REPLAY_RUN, [path, str(args.pps)], process)
                st = r["stage"]
                print(f"replay {'process' if process else 'thread '} {args.packets:,} at {args.pps:,}/s: counted "
                      f"{r['counted']:,} dropped {r['dropped']:,} ({100 * r['counted'] / args.packets:.1f} % counted); "
                      f"detectors skipped {st['packets_skipped']:,} of {st['packets_in']:,}; {r['rated']}",
                      flush=True)
    for process in (True, False):
        for _ in range(args.runs):
            r = run(LIVE_RUN, [], process)
            print(f"live  {'process' if process else 'thread '}  counted {r['counted']:,} dropped {r['dropped']:,} "
                  f"finished {r['finished_after_s']} s after the burst, alert after {r['alert_after_s']} s, "
                  f"stage {r['stage']}", flush=True)


if __name__ == "__main__":
    main()
