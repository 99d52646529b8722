"""History store: a 24-hour range query on a synthetic day, the store's size per day, the rollup's speed.

The day: 2,000 packets/s and 20,000 conversations per minute (a local host of 5,000 and a remote one
of 50,000, random ports: every minute's conversations are new ones, the hard case for the tables),
fed as packed packet records through the real `Rollup` into an `EmbeddedStore`, one flush per
minute of traffic, for the first hour; the other 23 hours write that hour's batches again, shifted
in time, through the same write path. Then:

- `history_summary` over the 24 hours (the CLI's `history`), cold (first query after opening) and
  warm (median of 5), against the issue's target of 300 ms; the same for the downsampled series
  and the day's top conversations;
- the reference: the same top tables computed by pandas from the same stored rows, already in memory;
- the store's size on disk per day;
- the rollup's own speed (a consumer stage must keep up with the 1,000,000 packets/s the capture holds).

    python benchmarks/store_query.py [--short] [--path FILE]

`--short` writes 1 hour instead of 24 (the test suite runs it so it cannot rot).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import config  # noqa: E402
from analysis.headers import PACKET_DTYPE  # noqa: E402
from store.base import StoreBatch, TimeRange  # noqa: E402
from store.embedded import EmbeddedStore  # noqa: E402
from store.history import history_summary, series  # noqa: E402
from store.rollup import Rollup  # noqa: E402

PPS = 2000
CONV_PER_MIN = 20_000
DAY0 = 1_767_225_600  # 2026-01-01T00:00:00Z
rng = np.random.default_rng(7)
V4 = b"\0" * 10 + b"\xff\xff"
LOCAL_KEYS = np.array([V4 + bytes([10, i // 250, i % 250, 1 + i % 7]) for i in range(5000)], "S16")
REMOTE_KEYS = np.array([V4 + bytes([23 + i % 180, (i * 7) % 256, (i * 13) % 256, i % 251])
                        for i in range(50_000)], "S16")


def _minute_packets(minute: int) -> np.ndarray:
    """One minute of traffic: 2,000 packets/s over 20,000 conversations (local host <-> remote host)."""
    n, k = PPS * 60, CONV_PER_MIN
    local = rng.integers(0, len(LOCAL_KEYS), k)
    remote = rng.integers(0, len(REMOTE_KEYS), k)
    sport = rng.integers(1024, 65535, k)
    dport = rng.choice([443, 80, 53, 22, 8080, 123], k)
    tcp = rng.random(k) < 0.75
    conv = rng.integers(0, k, n)
    out = rng.random(n) < 0.5  # half the packets from the local end
    arr = np.zeros(n, PACKET_DTYPE)
    arr["ts"] = np.sort(minute + rng.random(n) * 60)
    arr["wire_len"] = rng.integers(60, 1400, n)
    arr["cap_len"] = arr["wire_len"]
    arr["cls"] = np.where(tcp[conv], 0, 1)
    arr["ipver"] = 4
    arr["proto"] = np.where(tcp[conv], 6, 17)
    arr["ethertype"] = 0x0800
    arr["src"] = np.where(out, LOCAL_KEYS[local[conv]], REMOTE_KEYS[remote[conv]])
    arr["dst"] = np.where(out, REMOTE_KEYS[remote[conv]], LOCAL_KEYS[local[conv]])
    arr["sport"] = np.where(out, sport[conv], dport[conv])
    arr["dport"] = np.where(out, dport[conv], sport[conv])
    arr["direction"] = np.where(out, 1, 0)
    return arr


def write_day(store: EmbeddedStore, hours: int) -> tuple[float, float]:
    """Write `hours` of the synthetic day; (CPU seconds in the rollup for the first hour, seconds writing).

    The first hour goes through the real Rollup (a flush per minute of traffic, then the hour's
    close); its batches are then written again for each further hour, shifted in time and with new
    segment ids: the same rows and write path, without 24 hours of packet synthesis on a shared machine."""
    r = Rollup(store, sensor="bench", iface="eth0", flush_s=1e9)
    rolled = written = 0.0
    first: list[StoreBatch] = []
    for m in range(60):
        arr = _minute_packets(DAY0 + m * 60)
        t = time.thread_time()  # CPU time of this thread: the machine is shared; the rollup is one thread
        r.add(arr)
        batch = r.build(final=m == 59)
        rolled += time.thread_time() - t
        first.append(batch)
        written += _write(store, batch)
    print("  hour  1 written (through the rollup)", flush=True)
    for h in range(1, hours):
        segs: dict[int, int] = {}
        for batch in first:
            written += _write(store, _shifted(store, batch, h * 3600, segs))
        print(f"  hour {h + 1:2d} written (the first hour's rows, shifted)", flush=True)
    return rolled, written


def _write(store: EmbeddedStore, batch: StoreBatch) -> float:
    t = time.perf_counter()
    assert store.write(batch), store.status()
    return time.perf_counter() - t


def _shifted(store: EmbeddedStore, batch: StoreBatch, dt: int, segs: dict[int, int]) -> StoreBatch:
    """The batch `dt` seconds later, with fresh segment ids (one per original segment)."""
    def seg(old: int) -> int:
        if old not in segs:
            segs[old] = store.allocate_segment()
        return segs[old]

    frames = {}
    for name, df in batch.frames.items():
        df = df.copy()
        for col in ("ts", "minute", "hour", "min_ts", "max_ts"):
            if col in df:
                df[col] = df[col] + dt
        df["seg"] = df["seg"].map(seg).astype(np.int64)
        frames[name] = df
    return StoreBatch(frames=frames, replaces=tuple(seg(x) for x in batch.replaces),
                      hours_done=tuple(seg(x) for x in batch.hours_done))


def timed(fn, repeat: int = 5) -> tuple[float, float]:
    """(first call, median of `repeat` further calls) in ms."""
    t = time.perf_counter()
    fn()
    cold = (time.perf_counter() - t) * 1000
    warm = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        warm.append((time.perf_counter() - t) * 1000)
    return cold, statistics.median(warm)


def pandas_reference(store: EmbeddedStore, since: int, until: int) -> float:
    """ms for the same top tables computed by pandas from the rows the store reads (whole hours: the
    hourly rows), loaded beforehand (not timed)."""
    addrs = store._query("SELECT minute, kind, addr, packets, bytes FROM top_addrs_1h", {})
    ports = store._query("SELECT minute, proto, port, packets FROM top_ports_1h", {})
    t = time.perf_counter()
    sel = addrs[(addrs.minute >= since) & (addrs.minute <= until)]
    for kind in ("src", "dst"):
        g = sel[sel.kind == kind].groupby("addr")[["packets", "bytes"]].sum()
        g.nlargest(10, "packets")
        if kind == "src":
            g.nlargest(10, "bytes")
    p = ports[(ports.minute >= since) & (ports.minute <= until)]
    for proto in ("tcp", "udp"):
        p[p.proto == proto].groupby("port")["packets"].sum().nlargest(10)
    return (time.perf_counter() - t) * 1000


def rollup_rate() -> float:
    """Packets/s of Rollup.add + a flush every 5 s of traffic, 65,536-packet batches, no store."""
    n = 65536
    arr = np.zeros(n, PACKET_DTYPE)
    arr["cls"] = rng.choice([0, 1, 2, 5], n, p=[0.7, 0.25, 0.03, 0.02])
    arr["ipver"] = 4
    arr["proto"] = np.where(arr["cls"] == 0, 6, np.where(arr["cls"] == 1, 17, 1))
    v4 = b"\0" * 10 + b"\xff\xff"
    arr["src"] = [v4 + bytes([10, 0, i % 250, i % 7]) for i in rng.integers(0, 5000, n)]
    arr["dst"] = [v4 + bytes([23 + i % 180, i % 256, (i * 13) % 256, i % 251]) for i in rng.integers(0, 50_000, n)]
    arr["sport"] = rng.integers(1024, 65535, n)
    arr["dport"] = rng.choice([443, 80, 53, 22], n)
    arr["wire_len"] = rng.integers(60, 1500, n)
    arr["cap_len"] = arr["wire_len"]
    arr["direction"] = rng.integers(0, 3, n)
    r = Rollup(None, sensor="bench", flush_s=1e9)
    batches = 40
    t = time.thread_time()
    for b in range(batches):
        arr["ts"] = DAY0 + b * 0.0655 + np.arange(n) / 1_000_000  # 1,000,000 packets/s of capture time
        r.add(arr)
        if b % 76 == 75:  # ~5 s of capture time
            r.build()
    r.build(final=True)
    return batches * n / (time.thread_time() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", action="store_true", help="1 hour instead of 24")
    ap.add_argument("--path", default=None, help="store file (default: a temporary folder)")
    args = ap.parse_args()
    hours = 1 if args.short else 24
    with tempfile.TemporaryDirectory() as tmp:
        path = args.path or os.path.join(tmp, "bench.duckdb")
        store = EmbeddedStore(path)
        assert store.open(), store.status()
        print(f"writing {hours} h: {PPS:,} packets/s, {CONV_PER_MIN:,} conversations/minute, "
              f"top tables at STORE_TOP_MAX={config.get('STORE_TOP_MAX'):,}")
        rolled, spent = write_day(store, hours)
        store.close()
        size = os.path.getsize(path) + (os.path.getsize(path + ".wal") if os.path.exists(path + ".wal") else 0)
        store = EmbeddedStore(path, read_only=True)
        store.open()
        since, until = DAY0, DAY0 + hours * 3600 - 1
        cold, warm = timed(lambda: history_summary(store, since, until))
        s = history_summary(store, since, until)
        assert s["packets"] == PPS * hours * 3600, s["packets"]
        scold, swarm = timed(lambda: series(store, since, until))
        ccold, cwarm = timed(lambda: store.top_conversations(TimeRange(since, until)), repeat=3)
        ref = pandas_reference(store, since, until)
        store.close()
    rate = rollup_rate()  # CPU time as well
    per_day = size * 24 / hours
    print(f"rollup: {rolled:.1f} s of CPU for the first hour ({PPS * 3600 / rolled:,.0f} packets/s per CPU second); "
          f"store writes: {spent:.1f} s (wall) for {hours} h of traffic")
    print(f"store size: {size / 1e6:.1f} MB for {hours} h = {per_day / 1e6:.0f} MB per day")
    print(f"history_summary over {hours} h: cold {cold:.0f} ms, warm {warm:.0f} ms (target <= 300 ms)")
    print(f"downsampled series (<= 1,500 points): cold {scold:.0f} ms, warm {swarm:.0f} ms")
    print(f"top 20 conversations over {hours} h: cold {ccold:.0f} ms, "
          f"warm {cwarm:.0f} ms")
    print(f"reference: pandas over the same top-table rows, in memory: {ref:.0f} ms "
          f"(store warm / pandas = {warm / ref:.2f}x)")
    print(f"rollup: {rate:,.0f} packets/s (65,536-packet batches, 20,000-host mix, flush every 5 s of traffic)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
