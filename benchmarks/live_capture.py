"""Live capture: the highest loss-free rate on lo for our engine, tcpdump and the seed's way (Scapy sniff).

A small C sender (benchmarks/udp_sender.c, compiled here with the system's cc) sends 60-byte UDP
frames to 127.0.0.1 at rising rates, pinned to the second core; each capturer runs on the first.
Loss = (sent - counted) / sent, against what the sender reports it sent. A rate is "held" when
every run loses at most 0.1 %. For our engine the kernel drop counter is compared with the true
loss, and --refresh runs the dashboard's refresh work every 2 s inside the capturing process.

    python benchmarks/live_capture.py                 # full ladder, 3 runs of 10 s per rate (root)
    python benchmarks/live_capture.py --short         # one run of 2 s at two rates (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHON = sys.executable
LADDERS = {
    "engine": [25_000, 50_000, 100_000, 200_000, 300_000, 400_000, 500_000, 600_000, 800_000, 1_000_000],
    "tcpdump": [25_000, 50_000, 100_000, 200_000, 300_000, 400_000, 500_000, 600_000, 800_000, 1_000_000],
    "seed": [250, 500, 1_000, 2_000, 4_000, 8_000],
}
LOSS_FREE = 0.001
PAYLOAD = 18  # 14 + 20 + 8 + 18 = 60-byte frames


def build_sender(tmp: str) -> str:
    """Compile the C sender; the benchmark downloads nothing."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise SystemExit("needs a C compiler (apt-get install gcc)")
    out = os.path.join(tmp, "udp_sender")
    subprocess.run([cc, "-O2", "-o", out, str(HERE / "udp_sender.c")], check=True)
    return out


def child_engine(port: int, seconds: float, refresh: bool) -> None:
    """Run in a child process: our engine on lo, optionally with the page's refresh work every 2 s."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    from packet_processor import CaptureEngine, Source

    os.sched_setaffinity(0, {0})
    engine = CaptureEngine()
    if not engine.start(Source("live", iface="lo", bpf=f"udp dst port {port}")):
        print(json.dumps({"error": engine.status().error}), flush=True)
        return
    stop = threading.Event()
    refreshes = []
    if refresh:
        from refresh import refresh_work

        def refresher() -> None:
            while not stop.wait(2.0):
                t = time.perf_counter()
                refresh_work(engine.snapshot())
                refreshes.append(time.perf_counter() - t)

        threading.Thread(target=refresher, daemon=True).start()
    print("ready", flush=True)
    sys.stdin.readline()  # the parent says when the sender is done
    time.sleep(0.5)  # let the last ring block time out into the engine
    stop.set()
    engine.stop()
    t = engine.snapshot().totals
    print(json.dumps({"counted": t["packets"], "dropped": t["dropped"], "refreshes": len(refreshes),
                      "refresh_ms_max": max(refreshes, default=0) * 1e3}), flush=True)


def child_seed(port: int) -> None:
    """Run in a child process: the seed's way, Scapy sniff() with full dissection of every packet."""
    from scapy.all import AsyncSniffer, conf

    os.sched_setaffinity(0, {0})
    seen = [0]

    def handle(pkt) -> None:
        pkt.summary()  # the seed dissected and described every packet
        seen[0] += 1

    # lo shows each packet twice to a raw socket; Scapy's L2socket (unlike sniff's default L2listen)
    # skips the outgoing copy, so each packet counts once, as for the others.
    sock = conf.L2socket(iface="lo", filter=f"udp dst port {port}")
    sniffer = AsyncSniffer(opened_socket=sock, prn=handle, store=False)
    sniffer.start()
    time.sleep(1.0)
    print("ready", flush=True)
    sys.stdin.readline()
    time.sleep(1.0)
    sniffer.stop()
    print(json.dumps({"counted": seen[0], "dropped": None}), flush=True)


def start_capturer(tool: str, port: int, refresh: bool) -> subprocess.Popen:
    if tool == "tcpdump":
        proc = subprocess.Popen(["taskset", "-c", "0", "tcpdump", "-i", "lo", "-n", "-B", "65536", "-w", "/dev/null",
                                 f"udp dst port {port}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        while "listening on" not in proc.stderr.readline():
            pass
        return proc
    args = [PYTHON, __file__, "--child", tool, "--port", str(port)] + (["--refresh"] if refresh else [])
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        raise SystemExit(f"{tool} did not start: {line.strip()}")
    return proc


def finish_capturer(tool: str, proc: subprocess.Popen) -> dict:
    if tool == "tcpdump":
        time.sleep(2.0)  # libpcap hands over a partly filled buffer after its 1 s timeout
        proc.terminate()
        _, err = proc.communicate(timeout=30)
        got = {"counted": None, "dropped": None}
        for line in err.splitlines():
            if line.endswith("packets captured"):
                got["counted"] = int(line.split()[0])
            if line.endswith("packets dropped by kernel"):
                got["dropped"] = int(line.split()[0])
        return got
    out, _ = proc.communicate("stop\n", timeout=60)
    return json.loads(out.strip().splitlines()[-1])


def one_run(sender: str, tool: str, rate: int, seconds: float, refresh: bool) -> dict:
    """Capture while the sender sends `rate` packets/s for `seconds`; returns sent, counted, loss."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a bound port, so no ICMP errors come back
    sink.bind(("127.0.0.1", 0))
    port = sink.getsockname()[1]
    proc = start_capturer(tool, port, refresh)
    try:
        sent = int(subprocess.run([sender, str(port), str(rate), str(seconds), str(PAYLOAD), "1"],
                                  capture_output=True, text=True, check=True).stdout)
        got = finish_capturer(tool, proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        sink.close()
    counted = got.get("counted") or 0
    return {**got, "sent": sent, "loss": (sent - counted) / sent if sent else 0.0}


def ladder(sender: str, tool: str, rates: list[int], seconds: float, runs: int, refresh: bool) -> tuple[int, list]:
    """Climb the rates until one loses more than 0.1 % in any run; return the last held rate and the log."""
    held, log = 0, []
    for rate in rates:
        results = [one_run(sender, tool, rate, seconds, refresh) for _ in range(runs)]
        if min(r["sent"] for r in results) < 0.98 * rate * seconds:
            print(f"  {tool:8} {rate:>8,}/s  the sender's ceiling: it sent only "
                  f"{min(r['sent'] for r in results) / seconds:,.0f}/s; stopping here", flush=True)
            break
        log.append((rate, results))
        worst = max(r["loss"] for r in results)
        print(f"  {tool:8} {rate:>8,}/s  worst loss {worst * 100:6.3f} %  "
              + "  ".join(f"sent {r['sent']:,} counted {r['counted']:,} dropped {r.get('dropped')}" for r in results),
              flush=True)
        if worst > LOSS_FREE:
            break
        held = rate
    return held, log


def forced_loss(sender: str, rate: int, seconds: float) -> str:
    """Our engine with a deliberately tiny kernel ring (256 KiB), so packets are lost: does the drop
    counter account for every one of them?"""
    saved = {k: os.environ.get(k) for k in ("NTM_RING_BLOCKS", "NTM_RING_BLOCK_KB")}
    os.environ.update({"NTM_RING_BLOCKS": "4", "NTM_RING_BLOCK_KB": "64"})
    try:
        return drop_accuracy([(rate, [one_run(sender, "engine", rate, seconds, False)])])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def drop_accuracy(log: list) -> str:
    """How well the engine's kernel drop counter matched the true loss, on the lossy runs."""
    lines = []
    for rate, results in log:
        for r in results:
            lost = r["sent"] - r["counted"]
            if lost > 0 and r.get("dropped") is not None:
                err = abs(r["dropped"] - lost) / lost
                lines.append(f"{rate:,}/s: lost {lost:,}, counter said {r['dropped']:,} ({err * 100:.1f} % off)")
    return "; ".join(lines) or "no run lost packets"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", action="store_true", help="one 2-second run at two low rates per tool")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--refresh", action="store_true", help="also measure the engine with page refreshes every 2 s")
    ap.add_argument("--tools", default="engine,tcpdump,seed")
    ap.add_argument("--child", choices=["engine", "seed"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "engine":
        child_engine(args.port, args.seconds, args.refresh)
        return 0
    if args.child == "seed":
        child_seed(args.port)
        return 0
    if os.geteuid() != 0:
        raise SystemExit("live capture needs root (or CAP_NET_RAW)")
    seconds, runs = (2.0, 1) if args.short else (args.seconds, args.runs)
    with tempfile.TemporaryDirectory() as tmp:
        sender = build_sender(tmp)
        held = {}
        variants = [(t, False) for t in args.tools.split(",")]
        if args.refresh:
            variants.append(("engine", True))
        for tool, refresh in variants:
            rates = LADDERS[tool][:2] if args.short else LADDERS[tool]
            name = tool + (" + refresh" if refresh else "")
            print(f"{name}: {runs} run(s) of {seconds:g} s per rate", flush=True)
            held[name], log = ladder(sender, tool, rates, seconds, runs, refresh)
            if tool == "engine" and not refresh:
                print(f"  drop counter: {drop_accuracy(log)}")
                print(f"  drop counter with a 256 KiB ring: {forced_loss(sender, rates[-1], seconds)}", flush=True)
    print("\nhighest loss-free rate (<= 0.1 % loss):")
    for name, rate in held.items():
        print(f"  {name:18} {rate:>9,} packets/s")
    ours, dump, seed = held.get("engine", 0), held.get("tcpdump", 0), held.get("seed", 0)
    if dump:
        print(f"engine / tcpdump: {ours / dump:.2f}")
    if seed:
        print(f"engine / seed:    {ours / seed:.0f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
