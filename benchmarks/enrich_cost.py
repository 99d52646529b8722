"""Enrichment's cost to live capture: the highest loss-free rate on lo with the page's refresh work every 2 s,
without and with enrichment (the live tables' columns and the panel: names, countries/AS, services,
processes, makers).

Reuses live_capture.py's C sender and ladder: 60-byte UDP frames to 127.0.0.1 at rising rates; a rate is held
when every run loses at most 0.1 %. Both variants run the engine and the page's refresh in the capturing
process (the dashboard's process); "enriched" runs the engine with ENRICHMENT on (per-process attribution
counts every packet, each of these frames having two local ends: in the detector worker process, or with
--thread-stage in a thread of the capturing process, as before 2026-11-27) and its refresh, every 2 s, is the
page's with ENRICHMENT on (refresh.panel_work: the live tables' enrichment columns and enrich_page.panel's
work), with the process table thread running, the geo and AS databases loaded and reverse DNS on (asking
127.0.0.1, where no resolver listens: no query leaves the machine). "plain" runs with ENRICHMENT off: no
attribution stage, no panel.

    python benchmarks/enrich_cost.py            # 1 run of 3 s per rate (quick), the whole ladder (root)
    python benchmarks/enrich_cost.py --seconds 6  # ~3 refreshes per run
    python benchmarks/enrich_cost.py --runs 3 --seconds 10
    python benchmarks/enrich_cost.py --flat-out 3   # the sender as fast as it can, plain/enriched alternating
    python benchmarks/enrich_cost.py --quota 20 --rounds 5 --runs 2   # the capture held to 20 % of a core
    python benchmarks/enrich_cost.py --quota 20 --capturer-only   # the same, its detector worker process not
    python benchmarks/enrich_cost.py --quota 20 --capturer-only --thread-stage   # attribution in a thread
    python benchmarks/enrich_cost.py --threads 2 --rate 100000 --seconds 8   # CPU per thread, plain/enriched
    python benchmarks/enrich_cost.py --quota 15 --capturer-only --pairs 8 --rate 330000 --seconds 13.3 \
        --refresh-s 13.3 --sources 4000   # the same pairs from 4,000 loopback sources (talkers, conversations)
    python benchmarks/enrich_cost.py --quota 15 --pairs 8 --rate 330000 --seconds 13.3 --refresh-s 13.3 \
        --sources 4000 --ports 30000   # the worker in the quota too, a scan-like flood: ports nobody owns
    python benchmarks/enrich_cost.py --quota 20 --capturer-only --pairs 12 --rate 330000 --seconds 6
        # paired runs at one rate above both variants' limits: the share of the offered packets each variant
        # counted, enriched / plain per pair (the capture's sustained capacity), with a 95 % interval

--pairs is the statistic with more power than the worst bisection: a bisection's step is "held or lost", so one
round's noise (±25 % for plain alone) swamps a 5 % difference. Offered a rate above what either variant
holds, the capture counts what it can process and the kernel drops the rest, so the counted share is a
continuous measure of its capacity (the small ring is the same for both). Plain and enriched alternate within
each pair (order swapped every pair), so the machine's drift hits both; the figure is the mean of the pairs'
ratios with its 95 % confidence interval (Student's t), beside the median and the worst pair. At a rate near
the limit instead, the same runs give each variant's loss fraction.

--quota makes the capture the bottleneck: the sender (~330,000/s on this machine) is faster than the engine,
so without it no variant loses a packet and the ladder ends at the sender. The capturing process (engine,
refresh, enricher: every thread, and the detector process) runs, once started, in a cgroup with a CPU
quota (cgroup v2 cpu.max, or v1 cpu.cfs_quota_us where the cpu controller is v1's), created here and
removed at the end, and with a small capture ring (--ring-blocks), the same for both variants; capturer and
sender run at nice -15, so the quota, not the machine's other load, holds the capture back. Each round
bisects the loss-free rate of plain and of enriched, in alternating order (plain first in odd rounds,
enriched first in even ones, so drift in the machine's load hits both), and reports the pair's ratio
enriched / plain; the worst round's ratio is the figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import live_capture  # noqa: E402 - the sender and the ladder

RATES = [50_000, 100_000, 200_000, 400_000, 600_000, 800_000, 1_000_000, 1_200_000, 1_500_000, 2_000_000,
         2_500_000, 3_000_000, 4_000_000, 5_000_000]  # the ladder stops at the sender's ceiling


def sources_pcap(path: str, sources: int, second_octet: int = 3, rounds: int = 2) -> None:
    """A pcap of 60-byte UDP frames from `sources` loopback addresses (127.<second_octet>.0.1 upwards; at least
    one) to 127.0.0.1:9999, `rounds` frames each: traffic shaped like udp_sender.c's --sources runs."""
    import struct

    n = max(1, sources)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        t0 = int(time.time()) - 10
        for i in range(rounds * n):
            src = bytes((127, second_octet, (i % n) // 250, (i % n) % 250 + 1))
            udp = struct.pack("!HHHH", 40000 + i % n, 9999, 8 + 18, 0) + bytes(18)
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i & 0xFFFF, 0, 64, 17, 0, src,
                             bytes((127, 0, 0, 1)))
            frame = bytes(12) + b"\x08\x00" + ip + udp
            fh.write(struct.pack("<IIII", t0, i % 1_000_000, len(frame), len(frame)) + frame)


def warm_snapshot(sources: int):
    """A snapshot of traffic shaped like the run's (UDP from `sources` loopback addresses, at least one, to one
    port), from 127.3.0.1 upwards where the run's come from 127.1.0.1: read from a small pcap file."""
    from packet_processor import CaptureEngine

    with tempfile.NamedTemporaryFile(suffix=".pcap", delete=False) as fh:
        path = fh.name
    try:
        sources_pcap(path, sources)
        engine = CaptureEngine()
        engine.load_file(path)
        return engine.snapshot()
    finally:
        os.unlink(path)


def child(port: int, enriched: bool) -> None:
    """In the capturing process: the engine on lo, the page's refresh every 2 s, optionally enrichment too."""
    from refresh import panel_work, refresh_work

    from packet_processor import CaptureEngine, Source

    os.sched_setaffinity(0, {0})
    os.environ["NTM_ENRICHMENT"] = "1" if enriched else "0"  # the engine's attribution stage with it
    if os.environ.get(THREAD_STAGE_ENV):  # the reference: attribution in a thread of this process, as before
        from analysis.stages import DetectorStage
        DetectorStage.attribute = lambda self, *a, **k: None  # "no worker": the engine falls back to the thread
    en = None
    if enriched and not os.environ.get("ENRICH_COST_STAGE_ONLY"):  # set: the attribution stage alone
        from enrich import Enricher
        en = Enricher(reverse_dns=True, dns_server="127.0.0.1", rdns_timeout_s=1.0)
        en.start()
        en.geo.wait_loaded(60)
    engine = CaptureEngine()
    ports = int(os.environ.get(PORTS_ENV) or 1)  # --ports: the scan-like flood's destination ports
    bpf = f"udp dst port {port}" if ports == 1 else f"udp dst portrange {port}-{port + ports - 1}"
    if not engine.start(Source("live", iface="lo", bpf=bpf)):
        print(json.dumps({"error": engine.status().error}), flush=True)
        return
    stop, times = threading.Event(), []
    # The page with ENRICHMENT on: its tables' columns and the panel's open tab (--tab; the first by default)
    work = panel_work(en, os.environ.get(TAB_ENV) or "Top talkers") if en is not None else refresh_work

    every = float(os.environ.get(REFRESH_ENV) or 2.0)
    running = threading.Event()

    def refresher() -> None:
        # Timed from the run's start, the first at half an interval: a run of N intervals holds exactly N
        # refreshes whatever the start-up took (timed from the thread's start, a 13 s interval fell after
        # a 10 s run, and no run had any).
        running.wait()
        while not stop.wait(every / 2 if not times else every):
            t = time.perf_counter()
            work(engine.snapshot())
            times.append(time.perf_counter() - t)

    # Warm: a running page has drawn many pages with traffic before; its first draws' one-time costs (imports
    # inside functions, first calls with data: ~35 ms more for enriched than plain here) are paid once per
    # process, so the run's one refresh must not pay them. The warm traffic's addresses are not the run's:
    # the run's look-ups stay cold, as a flood of new addresses makes them.
    work(warm_snapshot(int(os.environ.get(SOURCES_ENV) or 0)))
    work(engine.snapshot())
    from capture.heap import settle_once
    settle_once()  # as the page does after its first full draw (dashboard.live_view)
    threading.Thread(target=refresher, daemon=True).start()
    settle()
    gc_times = gc_timer()
    worker = engine._stage.pid() if engine._stage is not None else None
    worker0 = process_cpu(worker)
    threads0 = thread_cpu()
    cpu0 = time.process_time()
    print("ready", flush=True)
    sys.stdin.readline()  # "go": the sender starts
    running.set()
    sys.stdin.readline()  # "stop": the sender is done
    drain(engine)
    threads1 = thread_cpu()
    worker_s = process_cpu(worker) - worker0
    stop.set()
    engine.stop()
    if en is not None:
        en.stop()
    t = engine.snapshot().totals
    attributed = (t["stages"].get("processes") or {}).get("packets_analysed")
    detected = (t["stages"].get("detectors") or {}).get("packets_analysed")
    cpu = time.process_time() - cpu0  # every thread of the capturing process, while the traffic ran
    print(json.dumps({"counted": t["packets"], "dropped": t["dropped"], "refreshes": len(times),
                      "refresh_ms_max": max(times, default=0) * 1e3, "attributed": attributed,
                      "cpu_s": cpu, "worker_cpu_s": round(worker_s, 3), "detected": detected,
                      "batches": (t["stages"].get("detectors") or {}).get("batches_in"),
                      "gc": {g: [n, round(s, 4)] for g, (n, s) in gc_times.items()},
                      "threads": {k: round(v - threads0.get(k, 0.0), 3) for k, v in threads1.items()
                                  if v - threads0.get(k, 0.0) > 0}}), flush=True)


THREAD_STAGE_ENV = "ENRICH_COST_THREAD_STAGE"  # --thread-stage, read by the capturing child
REFRESH_ENV = "ENRICH_COST_REFRESH_S"  # --refresh-s, read by the capturing child
TAB_ENV = "ENRICH_COST_TAB"  # --tab, read by the capturing child
SOURCES_ENV = "ENRICH_COST_SOURCES"  # --sources, read by the capturing child (its warm-up's traffic)
PORTS_ENV = "ENRICH_COST_PORTS"  # --ports, read by the capturing child (its filter)
PORTS_BASE = 20_000  # --ports N: the flood goes to 127.0.0.1:20000 .. 20000+N-1, where nothing listens here
CGROUP_NAME = "ntm_enrich_cost"
PERIOD_US = 10_000  # a short period: the quota's stalls last a few ms, which the capture ring absorbs (--period-ms)
_CGROUP: list[Path] = []  # the quota's cgroup while --quota runs: every capturer starts inside it


class CpuQuota:
    """A cgroup holding the capturing process to `percent` % of one core (created on enter, removed on exit)."""

    def __init__(self, percent: float, period_us: int = PERIOD_US) -> None:
        self.period_us = period_us
        self.quota_us = int(period_us * percent / 100)
        v2 = Path("/sys/fs/cgroup")
        if "cpu" in (v2 / "cgroup.controllers").read_text().split() if (v2 / "cgroup.controllers").exists() else False:
            self.path, self.v2 = v2 / CGROUP_NAME, True
        else:  # a hybrid hierarchy: the cpu controller is cgroup v1's
            self.path, self.v2 = Path("/sys/fs/cgroup/cpu") / CGROUP_NAME, False

    def __enter__(self) -> Path:
        self.path.mkdir(exist_ok=True)
        # The largest weight, against the machine's other work. Its detector worker (exec'd by the capturer, so
        # on the same core) once ran at the capturer's nice and outweighed the cgroup's default weight ~28:1.
        # Since 2026-11-27 a live capture's worker runs SCHED_IDLE (DETECTORS_IDLE): inside the cgroup it
        # runs only when the capture leaves the core (--capturer-only puts it outside the quota instead).
        if self.v2:
            (self.path / "cpu.max").write_text(f"{self.quota_us} {self.period_us}")
            (self.path / "cpu.weight").write_text("10000")
        else:
            (self.path / "cpu.cfs_period_us").write_text(str(self.period_us))
            (self.path / "cpu.cfs_quota_us").write_text(str(self.quota_us))
            (self.path / "cpu.shares").write_text("262144")
        _CGROUP.append(self.path)
        return self.path

    def __exit__(self, *exc) -> None:
        _CGROUP.clear()
        for _ in range(50):  # the last capturer may still be exiting
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)
        print(f"could not remove {self.path}", file=sys.stderr)

    def throttled_s(self) -> float:
        """Seconds the cgroup's tasks were held back by the quota so far (cpu.stat)."""
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        return int(stat.get("throttled_usec", 0)) / 1e6 if self.v2 else int(stat.get("throttled_time", 0)) / 1e9


PRIORITY = -15  # under --quota: the quota is the capture's CPU, not what the machine's other load leaves it


def _ahead() -> None:
    # Runs in the capturer between fork and exec: ahead of the machine's other work (a shared machine's load
    # would otherwise decide the rate; the quota is what holds it back).
    if _CGROUP:
        os.setpriority(os.PRIO_PROCESS, 0, PRIORITY)


_CAPTURER_ONLY: list[bool] = []  # --capturer-only: the detector worker process stays outside the quota
_SOURCES: list[int] = []  # --sources N: udp_sender.c's SOURCES, N loopback source addresses instead of one


def set_ports(ports: int) -> None:
    """--ports: tell the capturing child and timed_run, and say so in the header."""
    os.environ[PORTS_ENV] = str(ports)
    if ports > 1:
        print(f"traffic: a scan-like flood to {ports:,} destination ports in turn (127.0.0.1:{PORTS_BASE} "
              f"upwards, nothing listening): every datagram a new flow until the ports repeat", flush=True)


def build_sender(tmp: str, sources: int) -> str:
    """live_capture's sender (udp_sender.c); with `sources` it sends from that many loopback addresses, one socket
    each, so this process and its children may hold that many more files."""
    if sources:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = sources + 256
        if soft < want:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard),
                                                        hard))
        _SOURCES.append(sources)
        ports = int(os.environ.get(PORTS_ENV) or 1)
        where = "one destination port" if ports <= 1 else f"{ports:,} destination ports"
        print(f"traffic: {sources:,} loopback sources (127.1.0.1 upwards), {where}", flush=True)
    return live_capture.build_sender(tmp)


def _under_quota(pid: int) -> None:
    """Move the capturer and its processes (the detector process), every thread, into the quota's cgroup:
    once it is ready, so its start-up (imports, database loads) is not slowed, only the capture. With
    --capturer-only the capturing process alone (every thread): its detector worker process stays outside,
    as on a machine where the worker has a core of its own."""
    from common import descendants

    for p in [pid] if _CAPTURER_ONLY else [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            (_CGROUP[0] / "cgroup.procs").write_text(str(p))


def gc_timer() -> dict[int, list]:
    """{generation: [collections, seconds]} of the cyclic garbage collector from now on (gc.callbacks): a
    collection holds the GIL throughout, so the capture thread waits for all of it."""
    import gc

    out: dict[int, list] = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
    began: dict[int, float] = {}

    def cb(phase: str, info: dict) -> None:
        g = info["generation"]
        if phase == "start":
            began[g] = time.perf_counter()
        elif g in began:
            out[g][0] += 1
            out[g][1] += time.perf_counter() - began.pop(g)

    gc.callbacks.append(cb)
    return out


def process_cpu(pid: int | None) -> float:
    """CPU seconds (user + system) so far of process `pid` (the detector worker), 0 when there is none."""
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) so far of each thread of this process, by thread name (/proc/self/task)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            with open(f"/proc/self/task/{tid}/comm") as fh:
                comm = fh.read().strip()
        except OSError:  # the thread ended
            continue
        key = names.get(int(tid), comm)
        out[key] = out.get(key, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def settle(idle: float = 0.05, limit_s: float = 30.0) -> None:
    """Wait until this process and its children (the detector process) use under `idle` of a core: under a
    CPU quota the start-up's imports and threads take seconds, and a run must not start inside them."""
    import psutil

    me, end = psutil.Process(), time.monotonic() + limit_s

    def cpu() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in [me, *me.children(recursive=True)] if p.is_running())

    last = cpu()
    while time.monotonic() < end:
        time.sleep(0.5)
        now = cpu()
        if now - last < idle * 0.5:
            return
        last = now


def drain(engine, settle_s: float = 1.0, limit_s: float = 20.0) -> None:
    """Wait until the engine has taken no batch for `settle_s` (under a CPU quota the capture runs behind the
    sender; what the ring still holds is not lost), at most `limit_s`; status() is cheap (no buffer copy)."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        time.sleep(0.25)
        last = engine.status().last_batch_wall
        if last and time.time() - last >= settle_s:
            return


def start_capturer(tool: str, port: int, refresh: bool) -> subprocess.Popen:
    """live_capture's capturer start, pointed at this file's child ('refresh' means enriched here)."""
    args = [sys.executable, __file__, "--child", "--port", str(port)] + (["--enriched"] if refresh else [])
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            preexec_fn=_ahead)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        raise SystemExit(f"capturer did not start: {line.strip()}")
    if _CGROUP:
        _under_quota(proc.pid)
    return proc


def timed_run(sender: str, rate: int, seconds: float, enriched: bool) -> dict:
    """live_capture.one_run, also timing the sender: at a rate it cannot pace, udp_sender still sends
    the whole count, later, so the count alone hides its ceiling."""
    import socket
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a bound port: no ICMP errors; its owner is named
    sink.bind(("127.0.0.1", 0))
    port = sink.getsockname()[1]
    ports = int(os.environ.get(PORTS_ENV) or 1)
    if ports > 1:  # --ports: the flood's first port, not the sink's
        port = PORTS_BASE
    proc = start_capturer("engine", port, enriched)
    try:
        proc.stdin.write("go\n")
        proc.stdin.flush()
        t = time.perf_counter()
        nice = ["nice", "-n", str(PRIORITY)] if _CGROUP else []  # the sender must pace the rate asked
        sources = [str(_SOURCES[0])] if _SOURCES else []  # --sources: the many-source sender's last argument
        if ports > 1:  # --ports: SOURCES then PORTS
            sources = [sources[0] if sources else "0", str(ports)]
        sent = int(subprocess.run([*nice, sender, str(port), str(rate), str(seconds), str(live_capture.PAYLOAD), "1",
                                   *sources], capture_output=True, text=True, check=True).stdout)
        elapsed = time.perf_counter() - t
        got = live_capture.finish_capturer("engine", proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        sink.close()
    counted = got.get("counted") or 0
    return {**got, "sent": sent, "paced": sent / elapsed, "loss": (sent - counted) / sent if sent else 0.0}


def ladder(sender: str, seconds: float, runs: int, enriched: bool) -> tuple[int, list]:
    """Climb the rates until a run loses more than 0.1 %, or the sender cannot pace the rate (< 95 %)."""
    held, log = 0, []
    for rate in RATES:
        results = [timed_run(sender, rate, seconds, enriched) for _ in range(runs)]
        paced = min(r["paced"] for r in results)
        if paced < 0.95 * rate:
            print(f"  {rate:>9,}/s  the sender's ceiling: it paced only {paced:,.0f}/s; stopping here", flush=True)
            break
        log.append((rate, results))
        worst = max(r["loss"] for r in results)
        print(f"  {rate:>9,}/s  worst loss {worst * 100:6.3f} %  " + "  ".join(
            f"sent {r['sent']:,} counted {r['counted']:,} dropped {r.get('dropped')} attributed {r.get('attributed')}"
            for r in results), flush=True)
        if worst > live_capture.LOSS_FREE:
            break
        held = rate
    return held, log


def flat_out(sender: str, pairs: int, packets: int) -> int:
    """Alternating plain/enriched runs at the sender's full speed (it is asked for 50 M/s); each line
    gives the pace it reached, the loss, and for the enriched runs the share the attribution stage took."""
    rate = 50_000_000
    for i in range(pairs):
        for name, enriched in (("plain", False), ("enriched", True)):
            r = timed_run(sender, rate, packets / rate, enriched)
            att = f"  attributed {r['attributed'] / r['counted'] * 100:6.2f} %" if enriched and r["counted"] else ""
            cpu = r["cpu_s"] / max(r["counted"], 1) * 1e6
            print(f"  pair {i + 1} {name:9} paced {r['paced']:>11,.0f}/s  sent {r['sent']:,}  counted "
                  f"{r['counted']:,}  loss {r['loss'] * 100:6.3f} %  drops {r.get('dropped')}  capturing process "
                  f"CPU {cpu:.2f} µs/packet  batches {r.get('batches')}{att}", flush=True)
    return 0


def paced_run(sender: str, rate: int, seconds: float, enriched: bool) -> dict:
    """timed_run, again (up to 3 times) when the loaded sender could not pace the rate: such a run says
    nothing about the capture."""
    for _ in range(3):
        r = timed_run(sender, rate, seconds, enriched)
        if r["paced"] >= 0.95 * rate:
            break
    return r


def bisect(sender: str, seconds: float, low: int, high: int, steps: int, enriched: bool,
           runs: int = 1) -> tuple[int, list]:
    """The highest rate in [low, high] that loses at most 0.1 % in each of `runs` runs (`low` is taken as held
    only if its runs held): each step halves the bracket."""
    held, log = 0, []
    for _ in range(steps):
        rate = (low + high) // 2 if held or log else low
        ok = True
        for _ in range(runs):
            r = paced_run(sender, rate, seconds, enriched)
            ok = r["loss"] <= live_capture.LOSS_FREE and r["paced"] >= 0.95 * rate
            log.append((rate, r))
            print(f"    {'enriched' if enriched else 'plain':8} {rate:>9,}/s  {'held' if ok else 'lost'}  sent "
                  f"{r['sent']:,} counted {r['counted']:,} loss {r['loss'] * 100:.3f} % paced {r['paced']:,.0f}/s "
                  f"attributed {r.get('attributed')} cpu {r['cpu_s'] / max(r['counted'], 1) * 1e6:.2f} µs/packet",
                  flush=True)
            if not ok:
                break
        if ok:
            held, low = rate, rate
        elif not held:
            return 0, log  # even the bottom of the bracket lost: widen it (--low)
        else:
            high = rate
    return held, log


def quota_rounds(sender: str, args) -> int:
    """--quota: rounds of plain/enriched bisections under the same CPU quota, alternating which goes first."""
    ratios = []
    # The default ring (64 x 1 MiB) holds ~500,000 of these frames: a run of a few seconds would fit in it
    # whole and the drain would count it all at any rate. A small ring, the same for both variants, makes a
    # run measure the sustained rate: what the ring holds is a fraction of a second of it.
    os.environ["NTM_RING_BLOCKS"] = str(args.ring_blocks)
    # A background job ignores SIGINT: SIGTERM ends the rounds through the `with`, which removes the cgroup.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    with CpuQuota(args.quota, int(args.period_ms * 1000)) as path:
        print(f"capturing process{' alone' if _CAPTURER_ONLY else ' and its detector worker'} in {path}: "
              f"{args.quota:g} % of one core (period {args.period_ms * 1000:g} µs); "
              f"bisection {args.low:,}..{args.high:,}/s, {args.steps} steps of {args.runs} x {args.seconds:g} s; ring "
              f"{args.ring_blocks} x {os.environ.get('NTM_RING_BLOCK_KB', '1024')} KiB", flush=True)
        for i in range(args.rounds):
            order = (False, True) if i % 2 == 0 else (True, False)
            got = {}
            for enriched in order:
                got[enriched], _ = bisect(sender, args.seconds, args.low, args.high, args.steps, enriched, args.runs)
            ratio = got[True] / got[False] if got[False] else float("nan")
            ratios.append(ratio)
            print(f"  round {i + 1} ({'plain first' if not order[0] else 'enriched first'}): plain "
                  f"{got[False]:,}/s  enriched {got[True]:,}/s  enriched / plain {ratio:.3f}", flush=True)
    # A round where either variant lost at the bracket's bottom (--low) has no ratio: it is shown, not hidden.
    valid = [r for r in ratios if r == r and r > 0]
    worst = f"{min(valid):.3f}" if valid else "none"
    print(f"worst enriched / plain: {worst} over {len(valid)} of {len(ratios)} rounds (rounds: "
          f"{', '.join(f'{r:.3f}' for r in ratios)}; nan or 0: a variant lost at --low); resolution of one "
          f"bisection: {(args.high - args.low) / 2 ** (args.steps - 1):,.0f}/s")
    return 0


def threads(sender: str, pairs: int, rate: int, seconds: float) -> int:
    """Alternating plain/enriched runs at one rate the capture holds (no quota): the capturing process's
    CPU per thread, i.e. where enrichment's cost goes (capture, attribution stage, process table, refresh)."""
    for i in range(pairs):
        for name, enriched in (("plain", False), ("enriched", True)):
            r = timed_run(sender, rate, seconds, enriched)
            each = sorted(r.get("threads", {}).items(), key=lambda kv: -kv[1])
            print(f"  pair {i + 1} {name:9} sent {r['sent']:,} counted {r['counted']:,}  CPU "
                  f"{sum(v for _, v in each):.2f} s: " + "  ".join(f"{k} {v:.2f}" for k, v in each)
                  + "  gc [collections, s] per generation: " + str(r.get("gc")), flush=True)
    return 0


T975 = {1: 12.71, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042}  # Student's t, two-sided 95 %, by degrees of freedom


def interval(values: list[float]) -> tuple[float, float]:
    """(mean, half-width of its two-sided 95 % confidence interval); half-width nan for fewer than 2 values."""
    import statistics

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan")
    df = len(values) - 1
    t = T975.get(df) or T975[max(k for k in T975 if k <= df)]  # rounding df down: a wider interval
    return mean, t * statistics.stdev(values) / len(values) ** 0.5


def pairs(sender: str, args) -> int:
    """--pairs: plain and enriched at one rate, alternating within each pair, under the quota if given."""
    import statistics

    os.environ["NTM_RING_BLOCKS"] = str(args.ring_blocks)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    ratios, share = [], {False: [], True: []}
    # --same: both runs of a pair plain, the second named "enriched" in the statistic: the noise floor (what the
    # pairs show when there is no difference to find).
    names = {False: "plain", True: "plain B" if args.same else "enriched"}
    with contextlib.ExitStack() as stack:
        if args.quota:
            path = stack.enter_context(CpuQuota(args.quota, int(args.period_ms * 1000)))
            print(f"capturing process{' alone' if _CAPTURER_ONLY else ' and its detector worker'} in {path}: "
                  f"{args.quota:g} % of one core, period {args.period_ms:g} ms; ring {args.ring_blocks} blocks",
                  flush=True)
        print(f"{args.pairs} pairs at {args.rate:,}/s, {args.seconds:g} s per run", flush=True)
        for i in range(args.pairs):
            order = (False, True) if i % 2 == 0 else (True, False)
            got = {}
            unpaced = False
            for enriched in order:
                r = paced_run(sender, args.rate, args.seconds, enriched and not args.same)
                got[enriched] = r["counted"] / r["sent"] if r["sent"] else 0.0
                share[enriched].append(got[enriched])
                unpaced |= r["paced"] < 0.95 * args.rate  # offered less than asked: not comparable
                print(f"    pair {i + 1:2} {names[enriched]:8} sent {r['sent']:,} counted "
                      f"{r['counted']:,} ({got[enriched] * 100:.2f} %) dropped {r.get('dropped')} paced "
                      f"{r['paced']:,.0f}/s attributed {r.get('attributed')} detected {r.get('detected')} worker CPU "
                      f"{r.get('worker_cpu_s')} s refreshes {r.get('refreshes')} (max "
                      f"{r.get('refresh_ms_max', 0):.0f} ms) CPU s by thread {r.get('threads')} gc {r.get('gc')}",
                      flush=True)
            ratios.append(got[True] / got[False] if got[False] and not unpaced else float("nan"))
            left = "  (left out: the sender could not pace a run)" if unpaced else ""
            print(f"  pair {i + 1:2}: counted share plain {got[False] * 100:.2f} %  {names[True]} "
                  f"{got[True] * 100:.2f} %  {names[True]} / plain {ratios[-1]:.4f}{left}", flush=True)
    valid = [r for r in ratios if r == r]
    if not valid:
        print("no pair where both runs were paced and plain counted anything")
        return 1
    mean, half = interval(valid)
    print(f"counted share, mean over {len(valid)} pairs: plain {statistics.fmean(share[False]) * 100:.2f} %  "
          f"{names[True]} {statistics.fmean(share[True]) * 100:.2f} %")
    print(f"{names[True]} / plain per pair: mean {mean:.4f} (95 % interval {mean - half:.4f} .. {mean + half:.4f}), "
          f"median {statistics.median(valid):.4f}, worst {min(valid):.4f}, best {max(valid):.4f}")
    return 0


def check_period(args) -> None:
    """Refuse a --period-ms / --quota the cgroup would refuse (period 1 ms..1 s, quota at least 1 ms)."""
    if args.quota and not (1 <= args.period_ms <= 1000 and args.period_ms * args.quota / 100 >= 1):
        raise SystemExit("--period-ms must be 1..1000 and give a quota of at least 1 ms a period (cgroup limits)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--flat-out", type=int, default=0, metavar="PAIRS",
                    help="instead of the ladder: PAIRS of alternating plain/enriched runs, each sending "
                         "--packets as fast as the sender can")
    ap.add_argument("--packets", type=int, default=3_000_000)
    ap.add_argument("--same", action="store_true",
                    help="with --pairs: both runs of each pair plain (an A/A run: the statistic's noise floor)")
    ap.add_argument("--quota", type=float, default=0, metavar="PERCENT",
                    help="instead of the ladder: hold the capturing process to PERCENT %% of one core and "
                         "bisect each variant's loss-free rate, --rounds times")
    ap.add_argument("--threads", type=int, default=0, metavar="PAIRS",
                    help="instead of the ladder: PAIRS of plain/enriched runs at --rate, CPU per thread")
    ap.add_argument("--rate", type=int, default=100_000)
    ap.add_argument("--pairs", type=int, default=0, metavar="N",
                    help="instead of the ladder: N pairs of plain/enriched runs at --rate (under --quota if "
                         "given); the counted share of each, enriched / plain per pair, with a 95 %% interval")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--capturer-only", action="store_true",
                    help="--quota: hold the capturing process alone (not its detector worker process)")
    ap.add_argument("--refresh-s", type=float, default=2.0,
                    help="the page's refresh interval in the capturing process (the dashboard's REFRESH_S: 2 s). "
                         "Under --quota Q a refresh costs 100/Q times more of the capture's CPU than on a whole "
                         "core; 2 x 100/Q keeps the share a whole core would see (e.g. 10 for --quota 20)")
    ap.add_argument("--sources", type=int, default=0, metavar="N",
                    help="send from N loopback addresses (udp_sender.c SOURCES) instead of one: N talkers and "
                         "conversations for the enriched page to draw")
    ap.add_argument("--ports", type=int, default=1, metavar="N",
                    help="send to N destination ports in turn (a scan-like flood of short flows; with --sources, "
                         "from that many addresses)")
    ap.add_argument("--tab", default="Top talkers",
                    help="the enrichment panel's open tab in the enriched page's refresh (the page draws only that "
                         "one), or 'all' (every tab, as before the panel's tabs were lazy)")
    ap.add_argument("--thread-stage", action="store_true",
                    help="enriched runs attribute in a thread of the capturing process (the design before "
                         "2026-11-27's move into the detector worker), for comparison")
    ap.add_argument("--period-ms", type=float, default=PERIOD_US / 1000,
                    help="--quota: the quota's period; the capture runs PERIOD x QUOTA %% of each, then waits. Short "
                         "periods keep the waits within the ring; in long ones the capture's caches stay warm")
    ap.add_argument("--ring-blocks", type=int, default=4, help="--quota: the capture ring's blocks (RING_BLOCKS)")
    ap.add_argument("--low", type=int, default=20_000)
    ap.add_argument("--high", type=int, default=320_000)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--enriched", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.port, args.enriched)
        return 0
    check_period(args)
    if os.geteuid() != 0:
        raise SystemExit("live capture needs root (or CAP_NET_RAW)")
    os.environ[REFRESH_ENV] = str(args.refresh_s)
    os.environ[TAB_ENV] = args.tab
    os.environ[SOURCES_ENV] = str(args.sources)
    set_ports(args.ports)
    print(f"the page's refresh in the capturing process every {args.refresh_s:g} s; enriched: the panel's "
          f"tab {args.tab!r}", flush=True)
    if args.thread_stage:
        os.environ[THREAD_STAGE_ENV] = "1"
        print("enriched: per-process attribution in a thread of the capturing process (--thread-stage)", flush=True)
    held, slowest = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        sender = build_sender(tmp, args.sources)
        if args.flat_out:
            return flat_out(sender, args.flat_out, args.packets)
        if args.capturer_only:
            _CAPTURER_ONLY.append(True)
        if args.pairs:
            return pairs(sender, args)
        if args.quota:
            return quota_rounds(sender, args)
        if args.threads:
            return threads(sender, args.threads, args.rate, args.seconds)
        for name, enriched in (("refresh", False), ("refresh + enrichment", True), ("refresh again", False)):
            print(f"{name}: {args.runs} run(s) of {args.seconds:g} s per rate", flush=True)
            held[name], log = ladder(sender, args.seconds, args.runs, enriched)
            slowest[name] = max((r.get("refresh_ms_max", 0) for _, runs in log for r in runs), default=0)
            if enriched:  # did the attribution stage keep up (every counted packet attributed)?
                for rate, runs in log:
                    share = min((r.get("attributed") or 0) / r["counted"] for r in runs if r["counted"])
                    print(f"  {rate:>9,}/s  attributed to a process (or 'unknown'): {share * 100:.2f} % of counted")
    print("\nhighest loss-free rate (<= 0.1 % loss), and the slowest page refresh (ms) seen on the way:")
    for name, rate in held.items():
        print(f"  {name:22} {rate:>9,} packets/s   refresh max {slowest[name]:7.1f} ms")
    base = max(held["refresh"], held["refresh again"])
    if base:
        print(f"enriched / plain: {held['refresh + enrichment'] / base:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
