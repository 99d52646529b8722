"""What privilege separation costs: a capture socket through the broker (SCM_RIGHTS) against opening it in place.

Run as root from the project root:  sudo .venv/bin/python benchmarks/privsep.py [--short]

Prints, per capture socket: socket() in place, the same socket from the broker (request, socket(),
SCM_RIGHTS, reply), and a whole Start's ring set-up (LiveRing on lo with the default 64 MiB ring) for
scale; then the cost of the allow-all seccomp filter that carries no_new_privs to every thread, on a
cheap system call (getppid), before and after it is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from capture import broker  # noqa: E402
from capture.sources import LiveRing  # noqa: E402

SYSCALLS = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from capture import broker
def per_call(n):
    t = time.perf_counter()
    for _ in range(n):
        os.getppid()
    return (time.perf_counter() - t) / n * 1e9
n = int(sys.argv[2])
before = min(per_call(n) for _ in range(5))
broker._no_new_privs_all_threads()
after = min(per_call(n) for _ in range(5))
print(before, after)
"""


def per_socket_us(open_one, n: int) -> float:
    """Best of 5 runs: microseconds to get one socket (closing them, which waits for an RCU grace
    period in the kernel whoever opened the socket, is left out of the time)."""
    best = float("inf")
    for _ in range(5):
        held = []
        t = time.perf_counter()
        for _ in range(n):
            held.append(open_one())
        best = min(best, (time.perf_counter() - t) / n * 1e6)
        for s in held:
            s.close()
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", action="store_true", help="a few iterations, to check the script runs")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root: the broker and AF_PACKET sockets need it", file=sys.stderr)
        return 1
    n = 20 if args.short else 500
    direct = per_socket_us(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0), n)
    b = broker.start_broker(65534, 65534, "WARNING")
    try:
        brokered = per_socket_us(lambda: b.open(socket.SOCK_RAW, "lo"), n)
    finally:
        b.close()
    ring = per_socket_us(lambda: LiveRing("lo"), 5 if args.short else 50)
    out = subprocess.run([sys.executable, "-c", SYSCALLS, str(ROOT), str(10_000 if args.short else 1_000_000)],
                         capture_output=True, text=True, check=True).stdout.split()
    result = {"socket_in_place_us": round(direct, 1), "socket_from_broker_us": round(brokered, 1),
              "live_ring_start_us": round(ring, 1), "getppid_ns_before_seccomp": round(float(out[0]), 1),
              "getppid_ns_after_seccomp": round(float(out[1]), 1)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
