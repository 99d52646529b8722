"""Fleet ingest into a local 2-shard ClickHouse cluster (Debian's 18.16), and the fleet's 24-hour query.

1. Ingest: N simulated sensors (separate processes), each feeding per-second batches of synthetic
   traffic (PPS packets/s over CONV conversations per minute) through the real `Rollup` and
   shipping a StoreBatch every FLEET_FLUSH_S of traffic time to the cluster with `ClickHouseStore.send`
   (the sensor's path), as fast as they can: rows/s ingested (all sensors), flush latency (send
   time per batch: median, p95, max).
2. Query: the same sensors' day (24 h, or --day-hours) written an hour per batch (or per --day-batch-s),
   then `history_summary` over that range for all sensors (the fleet view's question) and for one, cold
   and warm (median of 3),
   through the Distributed tables; target <= 1 s; then every question the fleet page asks for that range.
   Timing starts once the background merges of the day's burst of writes have settled.

    python benchmarks/fleet_ingest.py [--sensors 20] [--seconds 60] [--pps 500] [--day-pps 20]
    python benchmarks/fleet_ingest.py --skip-ingest --breakdown --day-pps 3 --conv 30 [--elephants 5]
        (each page question timed, run by run: the page-breakdown logs)
    python benchmarks/fleet_ingest.py --skip-ingest --day-hours 1 --day-batch-s 60 (or 2)
        (a shorter "day" written as running sensors ship it: a batch per minute or per FLEET_FLUSH_S)

    python benchmarks/fleet_ingest.py --skip-ingest --breakdown --losses --day-pps 3 --conv 30 --elephants 5
        (the page as it runs, its slowest questions on a thread pool, against the same questions asked one
        after another in the same run; and the losses question over a day of loss rows)

Starts and stops its own cluster with scripts/clickhouse_cluster.sh (always stopped, by PID), or uses one
already running (--running DIR --port P; with --day-written, the day written by an earlier run).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from analysis.headers import PACKET_DTYPE  # noqa: E402
from store.clickhouse import ClickHouseStore  # noqa: E402
from store.history import history_summary  # noqa: E402
from store.rollup import Rollup  # noqa: E402

T0 = 1_767_225_600  # 2026-01-01 00:00 UTC


def traffic(rng: np.random.Generator, t: float, seconds: float, pps: int, conv: int) -> np.ndarray:
    """`seconds` of packets from t: UDP/TCP between 200 local hosts and `conv` remote ends per minute."""
    n = max(1, int(seconds * pps))
    arr = np.zeros(n, PACKET_DTYPE)
    arr["ts"] = t + np.sort(rng.random(n)) * seconds
    arr["wire_len"] = rng.integers(60, 1500, n)
    arr["cap_len"] = arr["wire_len"]
    arr["cls"] = rng.choice([0, 1], n, p=[0.7, 0.3])
    arr["proto"] = np.where(arr["cls"] == 0, 6, 17)
    arr["ipver"] = 4
    arr["ethertype"] = 0x0800
    local = rng.integers(0, 200, n)
    remote = rng.integers(0, conv, n)
    src = np.zeros((n, 16), np.uint8)
    src[:, 10:12] = 0xFF
    src[:, 12] = 10
    src[:, 14] = local // 256
    src[:, 15] = local % 256
    dst = src.copy()
    dst[:, 12] = 100
    dst[:, 13] = remote // 65536
    dst[:, 14] = (remote // 256) % 256
    dst[:, 15] = remote % 256
    arr["src"] = src.view("S16").ravel()
    arr["dst"] = dst.view("S16").ravel()
    arr["sport"] = 30000 + remote % 20000
    arr["dport"] = rng.choice([443, 80, 53, 22, 8080], n)
    arr["direction"] = 1
    return arr


def with_elephants(arr: np.ndarray, rng: np.random.Generator, k: int, salt: int = 0) -> np.ndarray:
    """The same packets with a tenth of them (each of the k) moved onto k fixed conversations of this sensor
    (`salt`): heavy hitters as real links have them (backups, video), the rest many small conversations."""
    if k <= 0:
        return arr
    n = len(arr)
    pick = rng.random(n) < 0.1 * k
    which = rng.integers(0, k, n)
    src = np.zeros((n, 16), np.uint8)
    src[:, 10:12] = 0xFF
    src[:, 12] = 10
    src[:, 14] = salt % 256
    src[:, 15] = 1 + which
    dst = src.copy()
    dst[:, 12] = 100
    dst[:, 13] = 250
    arr["src"] = np.where(pick, src.view("S16").ravel(), arr["src"])
    arr["dst"] = np.where(pick, dst.view("S16").ravel(), arr["dst"])
    arr["sport"] = np.where(pick, 40000 + which, arr["sport"])
    arr["dport"] = np.where(pick, 443, arr["dport"])
    arr["cls"] = np.where(pick, 0, arr["cls"])
    arr["proto"] = np.where(pick, 6, arr["proto"])
    return arr


def ingest_worker(args: tuple) -> dict:
    """One sensor: `seconds` of traffic, one batch per flush interval, sent as the sensor sends them."""
    address, name, seconds, pps, conv, flush_s, db, deltas = args
    store = ClickHouseStore(address, cluster="fleet", database=db, sensor=name)
    if not store.open():
        return {"error": store.status().message}
    shipped: list = []

    class Outbox:
        def allocate_segment(self) -> int:
            return store.allocate_segment()

        def write(self, batch) -> bool:
            shipped.append(batch)
            return True

    r = Rollup(Outbox(), sensor=name, iface="eth0", flush_s=1e9, deltas=deltas)
    rng = np.random.default_rng(abs(hash(name)) % 2 ** 32)
    lat, rows = [], 0
    start = time.perf_counter()
    for s in range(0, seconds, int(flush_s)):
        for k in range(int(flush_s)):
            r.add(traffic(rng, T0 + s + k, 1.0, pps, conv))
        r.flush(final=s + flush_s >= seconds)
        for b in shipped:
            t = time.perf_counter()
            ok = store.send(b)
            lat.append(time.perf_counter() - t)
            rows += b.rows() if ok else 0
        shipped.clear()
    wall = time.perf_counter() - start
    store.close()
    return {"rows": rows, "lat": lat, "wall": wall}


def day_worker(args: tuple) -> dict:
    """One sensor's day (the query phase's data): an hour per batch, or, with batch_s < 3600, a batch per
    batch_s seconds of traffic through one rollup, as a running sensor ships it (each batch the minutes it
    changed, whole); rows written, batches and their send times."""
    address, name, pps, conv, db, elephants, hours, batch_s, deltas = args
    store = ClickHouseStore(address, cluster="fleet", database=db, sensor=name)
    store.open()
    rng = np.random.default_rng(abs(hash(name)) % 2 ** 32)
    span = round(hours * 3600)
    rows, lat = 0, []
    step = 3600 if batch_s >= 3600 else int(batch_s)
    r = Rollup(store, sensor=name, iface="eth0", flush_s=1e9, deltas=deltas)
    for s in range(0, span, step):
        if step == 3600:  # an hour per batch: a fresh rollup each hour, closed at once
            r = Rollup(store, sensor=name, iface="eth0", flush_s=1e9)
        seconds = min(step, span - s)
        r.add(with_elephants(traffic(rng, T0 + s, float(seconds), pps, conv), rng, elephants, int(name[-2:])))
        batch = r.build(final=step == 3600 or s + step >= span)
        if batch is None:
            continue
        t = time.perf_counter()
        ok = store.send(batch)
        lat.append(time.perf_counter() - t)
        rows += batch.rows() if ok else 0
    store.close()
    return {"rows": rows, "lat": lat}


def wait_for_merges(base: int, limit_s: float = 600.0) -> float:
    """Seconds until neither shard runs a merge (the day's burst of writes compacting), at most limit_s."""
    from clickhouse_driver import Client

    t = time.perf_counter()
    clients = [Client("127.0.0.1", port=base + k) for k in (0, 1)]
    while time.perf_counter() - t < limit_s:
        if not any(c.execute("SELECT count() FROM system.merges")[0][0] for c in clients):
            break
        time.sleep(2)
    for c in clients:
        c.disconnect()
    return time.perf_counter() - t


def page_questions(store: ClickHouseStore, since: int, until: int) -> list[tuple[str, object]]:
    """Every question the fleet page asks for a range over all sensors, in its order (fleet_page.py +
    history_page.py), each as (name, call); top conversations as the page asks them (SensorView: the
    exact shortcut, else marked bounds). One SensorView per call, as one page run has: the panels' questions
    that the summary already asked are answered from the view."""
    from fleet_page import SensorView
    from store.base import TimeRange
    from store.history import approximation, bin_width, conversations

    r = TimeRange(since, until)
    view = SensorView(store, None)
    return [("sensors", store.sensors),
            ("sensor grid series", lambda: store.sensor_series(r, bin_width(since, until, 300))),
            ("sensor grid alerts", lambda: store.alerts(r)),
            ("history_summary", lambda: history_summary(view, since, until)),
            ("timeline", lambda: view.series(r, bin_width(since, until), ("packets", "bytes"))),
            ("top talkers (src, dst)", lambda: [view.top_addrs(r, k, "packets") for k in ("src", "dst")]),
            ("top ports (tcp, udp)", lambda: [view.top_ports(r, p, "packets") for p in ("tcp", "udp")]),
            ("top conversations (page)", lambda: conversations(view, since, until, n=20, by="packets")),
            ("caps", lambda: approximation(view, r)),
            ("alerts table", lambda: view.alerts(r)),
            ("VLAN chart", lambda: view.vlans(r)),
            ("who: top 501 sources, destinations", lambda: [view.top_addrs(r, k, "packets", 501)
                                                           for k in ("src", "dst")]),
            ("who: top ports (20)", lambda: [view.top_ports(r, p, "packets", 20) for p in ("tcp", "udp")])]


def page_run(store: ClickHouseStore, since: int, until: int, threads: int | None = None) -> list[tuple[str, float]]:
    """The page's questions as fleet_page.fleet_view asks them: its slowest ones started on a thread pool
    (fleet_page.ask_ahead, each thread on its own connection), the rest asked in page order on this thread
    (each waiting for a started answer); (question, seconds this thread spent on it), in order."""
    from concurrent.futures import ThreadPoolExecutor

    import fleet_page
    from fleet_page import SensorView
    from history_page import DIR_COLS
    from store.base import TimeRange
    from store.history import approximation, bin_width, conversations

    r = TimeRange(since, until)
    view = SensorView(store, None)
    pool = ThreadPoolExecutor(threads) if threads else store.read_pool()  # the page's: the store's one pool
    out = []
    try:
        out.append(("sensors", timed(store.sensors)))
        out.append(("losses", timed(lambda: store.losses(r))))
        out.append(("start the pool's questions", timed(lambda: fleet_page.ask_ahead(view, pool, since, until, False,
                                                                                   "packets"))))
        for name, call in [("sensor grid series", lambda: store.sensor_series(r, bin_width(since, until, 300))),
                           ("sensor grid alerts", lambda: store.alerts(r)),
                           ("history_summary", lambda: history_summary(view, since, until)),
                           ("timeline", lambda: view.series(r, bin_width(since, until), DIR_COLS)),
                           ("top talkers, ports", lambda: [view.top_addrs(r, k, "packets") for k in ("src", "dst")]),
                           ("top conversations (page)", lambda: conversations(view, since, until, n=20, by="packets")),
                           ("caps, alerts table", lambda: (approximation(view, r), view.alerts(r))),
                           ("VLAN chart", lambda: view.vlans(r)),
                           ("who: top 501 sources, destinations, top 20 ports",
                            lambda: [view.top_addrs(r, k, "packets", 501) for k in ("src", "dst")]
                            + [view.top_ports(r, p, "packets", 20) for p in ("tcp", "udp")]),
                           ("who: conversations", lambda: conversations(view, since, until, n=20, by="packets"))]:
            out.append((name, timed(call)))
    finally:
        if threads:
            pool.shutdown(wait=True)
    return out


def page_breakdown(store: ClickHouseStore, since: int, until: int, runs: int = 3) -> None:
    """Each page question's time, run by run (run 0 cold), the whole page's as it runs (a pool for the
    slowest questions) and, as the reference in the same run, every question asked one after another;
    the losses question alone; then the exact top conversations."""
    from store.base import TimeRange

    for run in range(runs):
        total = 0.0
        for name, took in page_run(store, since, until):
            total += took
            print(f"run {run} {name}: {took:.3f} s")
        print(f"run {run} the whole page (as it runs): {total:.2f} s")
        serial = sum(timed(call) for _, call in page_questions(store, since, until))
        print(f"run {run} reference, the same questions one after another (one connection): {serial:.2f} s")
    r = TimeRange(since, until)
    lost = [timed(lambda: store.losses(r)) for _ in range(3)]
    got = store.losses(r)
    print(f"losses over the range (per sensor, {len(got)} sensors): {', '.join(f'{t:.3f}' for t in lost)} s; "
          f"ring dropped {int(got['ring_dropped'].sum()):,}, NIC dropped {int(got['nic_dropped'].sum()):,}")
    r = TimeRange(since, until)
    for by in ("bytes", "packets"):
        df = store.top_conversations(r, by, 20, exact=False)
        print(f"top 20 conversations by {by} as the page asks: {df.attrs.get('method')}"
              + (f", a conversation not listed has at most {df.attrs['unlisted_max']:,} {by}"
                 if df.attrs.get("method") == "approximate" else ""))
    t = time.perf_counter()
    df = store.top_conversations(r, "bytes", 20, exact=True)
    print(f"top 20 conversations by bytes, exact (the CLI's history): {df.attrs.get('method')} in "
          f"{time.perf_counter() - t:.2f} s")


def loss_rows(port: int, names: list[str], hours: float, flush_s: float = 2.0, db: str = "day") -> int:
    """Each sensor's loss rows for the day, as a sensor that loses packets at every flush ships them (one
    row per FLEET_FLUSH_S, the worst case: a row is written only when a counter grew): ring drops +1 and
    NIC drops +1 every 10th flush per row; written with INSERT ... SELECT (fast). Rows written."""
    from clickhouse_driver import Client

    c = Client("127.0.0.1", port=port)
    n = int(hours * 3600 / flush_s)
    for name in names:
        c.execute(f"INSERT INTO {db}.run_losses_d (sensor, iface, run, received, ts, ring_dropped, nic_dropped, "
                  f"detect_skipped_packets, detect_skipped_batches, history_skipped_packets, prev_ring_dropped, "
                  f"prev_nic_dropped, prev_detect_skipped_packets, prev_detect_skipped_batches, "
                  f"prev_history_skipped_packets) SELECT '{name}', 'eth0', 'run-1', {T0} + toInt64(number * "
                  f"{flush_s}), {T0} + toInt64(number * {flush_s}), toInt64(number + 1), toInt64(intDiv(number + 1, "
                  f"10)), 0, 0, 0, toInt64(number), toInt64(intDiv(number, 10)), 0, 0, 0 FROM numbers({n})",
                  settings={"insert_distributed_sync": 1})
    c.disconnect()
    return n * len(names)


def delta_commits(port: int, per_minute: int, db: str = "day") -> int:
    """The commit rows a day shipped in deltas leaves besides its whole minutes: for each committed segment
    of the day (each sensor's minutes, and its hours), `per_minute` delta segments (a 2 s flush makes one per
    flush, ~30 a minute) named as the rollup names them (store.rollup.delta_segment), each committed at its
    flush and again by its minute's close (a newer version, no rows). Only the visibility lookup's rows are
    modelled, not the hidden delta rows themselves. Written with INSERT ... SELECT (fast); rows written."""
    from clickhouse_driver import Client

    from store.rollup import DELTA_SLOTS

    c = Client("127.0.0.1", port=port)
    base = c.execute(f"SELECT count() FROM {db}.commits_max_d WHERE seg >= 0")[0][0]
    for ver in ("ver - 1", "ver"):  # the delta's own commit, then its close's (the segment's rows hidden)
        c.execute(f"INSERT INTO {db}.commits_max_d (sensor, period, seg, ver) SELECT sensor, period, "
                  f"-(seg * {DELTA_SLOTS} + k + 1), {ver} FROM {db}.commits_max_d ARRAY JOIN range({per_minute}) "
                  f"AS k WHERE seg >= 0", settings={"insert_distributed_sync": 1})
    c.disconnect()
    return 2 * base * per_minute


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sensors", type=int, default=20)
    ap.add_argument("--seconds", type=int, default=60, help="traffic seconds each sensor ships in the ingest phase")
    ap.add_argument("--pps", type=int, default=500)
    ap.add_argument("--conv", type=int, default=2000, help="remote ends per sensor (conversations per minute)")
    ap.add_argument("--day-pps", type=int, default=20, help="packets/s of each sensor's synthetic day")
    ap.add_argument("--flush-s", type=float, default=2.0)
    ap.add_argument("--skip-day", action="store_true")
    ap.add_argument("--day-hours", type=float, default=24.0, help="hours of each sensor's day (the query range)")
    ap.add_argument("--day-batch-s", type=float, default=3600.0,
                    help="seconds of traffic per batch of the day: 3600 an hour per batch (fast to write); "
                         "FLEET_FLUSH_S (2) or 60 as running sensors ship it")
    ap.add_argument("--port", type=int, default=19700, help="shard 1's native port (shard 2: the next)")
    ap.add_argument("--running", default=None, metavar="DIR",
                    help="use the cluster already running from DIR on --port (not started or stopped here)")
    ap.add_argument("--day-written", action="store_true", help="the day is in the database already: query only")
    ap.add_argument("--whole-minutes", action="store_true",
                    help="ship each open minute whole at every flush (the rollup before deltas: the reference)")
    ap.add_argument("--day-db", default="day", help="database of the day (a fresh one per written day)")
    ap.add_argument("--losses", action="store_true",
                    help="write each sensor's loss rows for the day (one per FLEET_FLUSH_S) before the queries")
    ap.add_argument("--delta-segments", type=int, default=0, metavar="N",
                    help="before the queries, add the commit rows of N closed delta segments per sensor and minute "
                         "(30: a day shipped every 2 s) to a day written an hour per batch")
    ap.add_argument("--skip-ingest", action="store_true", help="only the day and its queries")
    ap.add_argument("--breakdown", action="store_true", help="time each question of the fleet page (3 runs)")
    ap.add_argument("--elephants", type=int, default=0,
                    help="per sensor, conversations carrying a tenth of its packets each (heavy hitters)")
    a = ap.parse_args()
    script = ROOT / "scripts" / "clickhouse_cluster.sh"
    folder = tempfile.mkdtemp(prefix="ntm-fleet-bench-")
    base = a.port
    if not a.running:
        subprocess.run([str(script), "start", folder, str(base)], check=True, capture_output=True)
    address = f"127.0.0.1:{base}"
    try:
        probe = ClickHouseStore(address, database="bench")
        version = probe.server_version if probe.open() else "unreachable"
        probe.close()
        names = [f"sensor-{i:02d}" for i in range(a.sensors)]
        ClickHouseStore(address, cluster="fleet", database="bench").open()  # schema once, before the workers
        res, wall = [], 1.0
        if not a.skip_ingest:
            with mp.get_context("spawn").Pool(a.sensors) as pool:
                t = time.perf_counter()
                res = pool.map(ingest_worker, [(address, n, a.seconds, a.pps, a.conv, a.flush_s, "bench",
                                                not a.whole_minutes) for n in names])
                wall = time.perf_counter() - t
        errors = [r["error"] for r in res if "error" in r]
        lat = sorted(x for r in res if "lat" in r for x in r["lat"])
        rows = sum(r.get("rows", 0) for r in res)
        print(f"ClickHouse {version} (2 shards, one machine); load average {os.getloadavg()}")
        print(f"{a.sensors} sensor processes x {a.seconds if res else 0} s of "
              f"traffic at {a.pps} pkt/s, flush every {a.flush_s} s of traffic; errors: {errors or 'none'}")
        if res:
            print(f"ingest: {rows} rows in {wall:.1f} s = {rows / wall:,.0f} rows/s; "
                  f"{a.sensors * a.seconds / wall:,.1f} sensor-seconds of traffic per second of wall time")
        if lat:
            print(f"flush latency (send per batch): median {statistics.median(lat) * 1000:.0f} ms, "
                  f"p95 {lat[int(0.95 * (len(lat) - 1))] * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms "
                  f"over {len(lat)} batches")
        if not a.skip_day and a.day_written:
            print(f"day: written before (database day, {a.sensors} sensors x {a.day_hours:g} h)")
        elif not a.skip_day:
            ClickHouseStore(address, cluster="fleet", database=a.day_db).open()
            t = time.perf_counter()
            with mp.get_context("spawn").Pool(min(a.sensors, 4)) as pool:
                days = pool.map(day_worker, [(address, n, a.day_pps, a.conv, a.day_db, a.elephants, a.day_hours,
                                              a.day_batch_s, not a.whole_minutes) for n in names])
            took = time.perf_counter() - t
            day_rows = sum(d["rows"] for d in days)
            day_lat = sorted(x for d in days for x in d["lat"])
            print(f"day: {a.sensors} sensors x {a.day_hours:g} h at {a.day_pps} pkt/s, a batch per "
                  f"{a.day_batch_s:g} s of traffic, 4 writer processes: {day_rows:,} rows in {len(day_lat):,} "
                  f"batches written in {took:.0f} s = {day_rows / took:,.0f} rows/s, "
                  f"{a.sensors * a.day_hours * 3600 / took:,.0f} sensor-seconds of traffic per wall second; "
                  f"send per batch median {statistics.median(day_lat) * 1000:.0f} ms, "
                  f"p95 {day_lat[int(0.95 * (len(day_lat) - 1))] * 1000:.0f} ms, max {day_lat[-1] * 1000:.0f} ms")
            settled = wait_for_merges(base)
            print(f"background merges after the day's writes settled in {settled:.0f} s")
        if a.skip_day:
            return 0
        q = ClickHouseStore(f"127.0.0.1:{base + 1}", cluster="fleet", database=a.day_db)
        q.open()
        if a.losses:
            t = time.perf_counter()
            n = loss_rows(base, names, a.day_hours, a.flush_s, a.day_db)
            print(f"loss rows: {n:,} (one per sensor and FLEET_FLUSH_S of the day) written in "
                  f"{time.perf_counter() - t:.0f} s; expected losses: ring {len(names) * n // len(names):,}, "
                  f"NIC {len(names) * (n // len(names) // 10):,}")
        if a.delta_segments:
            t = time.perf_counter()
            n = delta_commits(base, a.delta_segments, a.day_db)
            settled = wait_for_merges(base)
            print(f"delta commit rows: {n:,} ({a.delta_segments} closed delta segments per sensor and minute, two "
                  f"versions each; also for the hour segments) written in {time.perf_counter() - t:.0f} s (merges "
                  f"settled in {settled:.0f} s)")
        since, until = T0, T0 + round(a.day_hours * 3600) - 1
        cold = timed(lambda: history_summary(q, since, until))
        warm = statistics.median(timed(lambda: history_summary(q, since, until)) for _ in range(3))
        one = statistics.median(timed(lambda: history_summary(q, since, until, names[0])) for _ in range(3))
        total = history_summary(q, since, until)["packets"]
        print(f"{a.day_hours:g} h x {a.sensors} sensors history_summary (all sensors, via Distributed): "
              f"cold {cold:.2f} s, "
              f"warm {warm:.2f} s (target <= 1 s); one sensor warm {one:.2f} s; packets {total:,} "
              f"(expected {a.sensors * round(a.day_hours * 3600) * a.day_pps:,})")
        if a.breakdown:
            page_breakdown(q, since, until)
        else:
            page = statistics.median(sum(t for _, t in page_run(q, since, until)) for _ in range(3))
            print(f"the fleet page's whole {a.day_hours:g} h x {a.sensors} sensors view (sensor grid, summary, "
                  f"timeline, "
                  f"top talkers and ports, conversations, caps, alerts): warm {page:.2f} s")
        q.close()
    finally:
        if not a.running:
            subprocess.run([str(script), "stop", folder], capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
