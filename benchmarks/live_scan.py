"""Live scan and flood: a real nmap -p- burst on lo and an hping3 random-source SYN flood into a namespace.

While our engine captures (in this process, polled through its public snapshot()) and tcpdump
captures the same interface with the same filter (the reference, in the same run):
  1. `nmap -n -Pn -sS -p- -T5 -g PORT 127.0.0.1` on lo (~131,000 packets in about a second). The
     probes leave from one source port, so the filter `tcp port PORT` takes exactly the scan from
     a lo that other programs share; `--filter tcp` measures plain `tcp` instead.
  2. `hping3 --flood -S --rand-source -p 80 HOST` for a fixed time into a namespace host (a veth
     pair this script creates and deletes; the engine captures on the host side, filter `tcp`).
Targets, per burst: the engine's count equals tcpdump's (or counted + dropped equals it with drops
<= 0.1 %); the port-scan / SYN-flood alert appears within 2 s of the burst's end; the capture has
finished all its work within 1 s of the burst's end (its count reached the final count and every
stage, the detectors among them, has analysed or skipped, and counted as skipped, all it was handed).

    python benchmarks/live_scan.py            # needs root, nmap, hping3, tcpdump
    python benchmarks/live_scan.py --quick    # a 1-5000 port scan and a 0.3 s flood; timing not enforced
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import time
from dataclasses import dataclass, field

from targets import Namespace, Tcpdump, Verdicts, machine

ALERT_WITHIN_S = 2.0
FINISHED_WITHIN_S = 1.0
MAX_DROP = 0.001
POLL_S = 0.1


@dataclass
class Watch:
    """The engine's count, drops and alerts over time, polled through snapshot()."""

    t: list[float] = field(default_factory=list)
    packets: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    backlog: list[int] = field(default_factory=list)  # packets the stages were handed and have not finished
    first_alert: dict[str, float] = field(default_factory=dict)
    stages: dict = field(default_factory=dict)

    def poll(self, engine) -> None:
        snap = engine.snapshot()
        now = time.monotonic()
        self.t.append(now)
        self.packets.append(snap.totals["packets"])
        self.dropped.append(snap.totals["dropped"])
        self.stages = snap.totals.get("stages", {})  # the staged pipeline's per-consumer counters, when present
        self.backlog.append(sum(max(0, st.get("packets_in", 0) - st.get("packets_skipped", 0)
                                    - st.get("packets_analysed", 0)) for st in self.stages.values()))
        for a in snap.alerts:
            self.first_alert.setdefault(a.detector, now)

    def settled_at(self) -> float:
        """When all work was last done: the first poll from which on the count was final and no stage had a backlog."""
        final = self.packets[-1]
        i = len(self.packets) - 1
        while i > 0 and self.packets[i - 1] == final and self.backlog[i - 1] == 0:
            i -= 1
        return self.t[i]


def burst(engine, cmd: list[str], linger: float, stop_after: float | None = None) -> tuple[Watch, float, str]:
    """Run the burst while polling the engine; keep polling `linger` s after it ends. (watch, end, stdout)"""
    watch = Watch()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    started = time.monotonic()
    while proc.poll() is None:
        watch.poll(engine)
        if stop_after is not None and time.monotonic() - started >= stop_after:
            proc.send_signal(2)  # hping3 prints its statistics on SIGINT
            stop_after = None
        time.sleep(POLL_S)
    end = time.monotonic()
    out = proc.stdout.read()
    while time.monotonic() - end < linger:
        watch.poll(engine)
        time.sleep(POLL_S)
    return watch, end, out


def judge(verdicts: Verdicts, name: str, watch: Watch, end: float, ref: int, ref_dropped: int,
          alert: str, sent: int | None = None) -> None:
    """Print the figures and check the three targets for one burst."""
    counted, dropped = watch.packets[-1], watch.dropped[-1]
    settled = watch.settled_at() - end
    seen = watch.first_alert.get(alert)
    after = None if seen is None else max(0.0, seen - end)
    print(f"{name}: engine counted {counted:,} (+{dropped:,} dropped by the kernel); tcpdump {ref:,} "
          f"(+{ref_dropped:,} dropped)" + (f"; sender says it sent {sent:,}" if sent is not None else ""))
    print(f"  engine / tcpdump: {counted / ref if ref else 0:.4f};  all work done {settled:+.2f} s after it;"
          f"  {alert} alert " + ("never" if after is None else f"{after:.2f} s after the burst"))
    if watch.stages:
        print(f"  stages: {watch.stages}")
    exact = counted == ref
    accounted = counted + dropped == ref and dropped <= MAX_DROP * ref
    verdicts.check(f"{name}: engine count = tcpdump's (or counted + dropped = tcpdump's, drops <= 0.1 %)",
                   ref > 0 and (exact or accounted), f"{counted:,} + {dropped:,} vs {ref:,}", correctness=True)
    verdicts.check(f"{name}: {alert} alert within {ALERT_WITHIN_S:g} s of the burst's end",
                   after is not None and after <= ALERT_WITHIN_S,
                   "never" if after is None else f"{after:.2f} s")
    behind = ref - counted - dropped + watch.backlog[-1]
    verdicts.check(f"{name}: capture finished within {FINISHED_WITHIN_S:g} s of the burst's end",
                   settled <= FINISHED_WITHIN_S and behind <= 0,
                   f"{settled:.2f} s" if behind <= 0 else
                   f"never: {behind:,} packets still not counted or not analysed {watch.t[-1] - end:.1f} s after it")


def nmap_burst(verdicts: Verdicts, ports: str, bpf: str | None, linger: float) -> None:
    """The nmap -p- burst on lo against tcpdump on the same filter."""
    from packet_processor import CaptureEngine, Source

    sport = random.randint(40_000, 60_000)
    bpf = bpf or f"tcp port {sport}"
    cmd = ["nmap", "-n", "-Pn", "-sS", f"-p{ports}", "-T5", "-g", str(sport), "127.0.0.1"]
    print(f"\n== {' '.join(cmd)}  (filter {bpf!r} for both capturers)", flush=True)
    engine = CaptureEngine()
    dump = Tcpdump("lo", bpf)
    try:
        if not engine.start(Source("live", iface="lo", bpf=bpf)):
            raise SystemExit(f"engine did not start: {engine.status().error}")
        time.sleep(0.5)
        t = time.monotonic()
        watch, end, _ = burst(engine, cmd, linger)
        print(f"  nmap took {end - t:.2f} s", flush=True)
        ref, ref_dropped = dump.finish()
    finally:
        dump.kill()
        engine.stop()
    judge(verdicts, "nmap -p- on lo", watch, end, ref, ref_dropped, "port_scan")


def hping_burst(verdicts: Verdicts, seconds: float, linger: float) -> None:
    """An hping3 random-source SYN flood into a namespace host, captured on the host's veth."""
    from packet_processor import CaptureEngine, Source

    net = Namespace.create()
    cmd = ["hping3", "--flood", "-S", "--rand-source", "-p", "80", net.ns_ip]
    print(f"\n== {' '.join(cmd)} for {seconds:g} s, captured on {net.host_if} (filter 'tcp')", flush=True)
    engine = CaptureEngine()
    try:
        dump = Tcpdump(net.host_if, "tcp")
        try:
            if not engine.start(Source("live", iface=net.host_if, bpf="tcp")):
                raise SystemExit(f"engine did not start: {engine.status().error}")
            time.sleep(0.5)
            watch, end, out = burst(engine, cmd, linger, stop_after=seconds)
            ref, ref_dropped = dump.finish()
        finally:
            dump.kill()
            engine.stop()
    finally:
        net.delete()
    sent = next((int(ln.split()[0]) for ln in out.splitlines() if "packets transmitted" in ln), None)
    judge(verdicts, "hping3 SYN flood", watch, end, ref, ref_dropped, "syn_flood", sent)
    if sent is not None:
        # hping3's own counter can miss the one packet in flight when SIGINT stops it.
        verdicts.check("hping3 SYN flood: tcpdump saw every packet hping3 says it sent (its counter may be 1 short)",
                       0 <= ref - sent <= 1, f"{ref:,} vs {sent:,}", correctness=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", "--short", action="store_true", help="ports 1-5000 and a 0.3 s flood")
    ap.add_argument("--filter", default=None, help="BPF for the nmap burst (default: tcp port <nmap's source port>)")
    ap.add_argument("--flood-seconds", type=float, default=1.0)
    ap.add_argument("--linger", type=float, default=4.0, help="seconds the engine is watched after each burst")
    ap.add_argument("--only", choices=["nmap", "hping3"], default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("live capture needs root")
    missing = [p for p in ("nmap", "hping3", "tcpdump") if shutil.which(p) is None]
    if missing:
        raise SystemExit(f"needs {', '.join(missing)} (scripts/setup.sh --test installs them)")
    print(f"machine: {machine()}")
    verdicts = Verdicts(enforce=not args.quick)
    if args.only in (None, "nmap"):
        nmap_burst(verdicts, "1-5000" if args.quick else "-", args.filter, args.linger)
    if args.only in (None, "hping3"):
        hping_burst(verdicts, 0.3 if args.quick else args.flood_seconds, args.linger)
    return verdicts.exit_status()


if __name__ == "__main__":
    raise SystemExit(main())
