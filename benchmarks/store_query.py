"""History store: a 24-hour range query on a synthetic day, the store's size per day, the rollup's speed.

The day: 2,000 packets/s every second and 20,000 conversations per minute, with the per-minute top
tables at their cap (STORE_TOP_MAX sources and destinations, 1,000 TCP and 1,000 UDP ports per
minute), written hour by hour through the store's batched write path. Then:

- `history_summary` over the 24 hours (the CLI's `history`), cold (first query after opening) and
  warm (median of 5), against the issue's target of 300 ms; the same for the downsampled series
  and the day's top conversations;
- the reference: the same top tables computed by pandas from the same rows already in memory;
- the store's size on disk per day;
- the rollup fed 65,536-packet batches of mixed traffic: packets/s (a consumer stage must keep up
  with the 1,000,000 packets/s the capture holds).

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
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import config  # noqa: E402
from analysis.headers import PACKET_DTYPE  # noqa: E402
from store.base import SECOND_VALUES, StoreBatch, columns  # noqa: E402
from store.embedded import EmbeddedStore  # noqa: E402
from store.history import history_summary, series  # noqa: E402
from store.rollup import Rollup  # noqa: E402

PPS = 2000
CONV_PER_MIN = 20_000
DAY0 = 1_767_225_600  # 2026-01-01T00:00:00Z
rng = np.random.default_rng(7)
LOCAL = np.array([f"10.{i // 250}.{i % 250}.{1 + i % 7}" for i in range(5000)], object)
REMOTE = np.array([f"{23 + i % 180}.{(i * 7) % 256}.{(i * 13) % 256}.{i % 251}" for i in range(50_000)], object)


def _prefix(n: int, seg: int) -> dict:
    return {"sensor": np.full(n, "bench", object), "iface": np.full(n, "eth0", object),
            "origin": np.full(n, "live", object), "seg": np.full(n, seg, np.int64)}


def _seconds(t0: int, seg: int, n: int = 60) -> pd.DataFrame:
    ts = t0 + np.arange(n)
    pk = np.full(n, PPS, np.int64)
    by = pk * 700
    d = {**_prefix(n, seg), "ts": ts}
    split = {"tcp": 0.7, "udp": 0.25, "icmp": 0.02, "icmpv6": 0.01, "other_ip": 0.01, "non_ip": 0.01}
    dirs = {"in": 0.5, "out": 0.45, "local": 0.05, "transit": 0.0}
    for c in SECOND_VALUES:
        kind, _, name = c.partition("_")
        share = split.get(name, dirs.get(name, 1.0))
        base = by if kind == "by" or c == "bytes" or c == "bytes_captured" else pk
        d[c] = (base * share).astype(np.int64) if c != "malformed" else np.zeros(n, np.int64)
    d["min_ts"], d["max_ts"] = ts.astype(float), ts + 0.9995
    return pd.DataFrame(d, columns=columns("seconds"))


def _minute_rows(minute: int, seg: int, top_max: int) -> dict[str, pd.DataFrame]:
    n = CONV_PER_MIN
    pk = rng.geometric(1 / 6, n).astype(np.int64)  # mean 6 packets: 2,000/s x 60 s over 20,000 conversations
    conv = pd.DataFrame({**_prefix(n, seg), "minute": minute, "a": LOCAL[rng.integers(0, len(LOCAL), n)],
                         "b": REMOTE[rng.integers(0, len(REMOTE), n)],
                         "a_port": rng.integers(1024, 65535, n).astype(np.int32),
                         "b_port": rng.choice([443, 80, 53, 22, 8080, 123], n).astype(np.int32),
                         "proto": rng.choice([6, 17], n, p=[0.75, 0.25]).astype(np.int16), "vlan": 0,
                         "packets": pk, "bytes": pk * 700, "first_ts": minute + rng.random(n) * 30,
                         "last_ts": minute + 30 + rng.random(n) * 30}, columns=columns("conversations"))
    addrs = []
    for kind, pool in (("src", LOCAL), ("dst", REMOTE)):
        k = min(top_max, len(pool))
        p = np.sort(rng.geometric(1 / 40, k))[::-1].astype(np.int64)
        addrs.append(pd.DataFrame({**_prefix(k, seg), "minute": minute, "kind": kind,
                                   "addr": pool[rng.choice(len(pool), k, replace=False)], "packets": p,
                                   "bytes": p * 700}, columns=columns("top_addrs")))
    ports = []
    for proto in ("tcp", "udp"):
        p = np.sort(rng.geometric(1 / 50, 1000))[::-1].astype(np.int64)
        ports.append(pd.DataFrame({**_prefix(1000, seg), "minute": minute, "proto": proto,
                                   "port": rng.choice(65536, 1000, replace=False).astype(np.int32), "packets": p,
                                   "bytes": p * 700}, columns=columns("top_ports")))
    caps = pd.DataFrame({**_prefix(2, seg), "minute": minute, "kind": ["src", "dst"], "dropped_keys": [3000, 9000],
                         "dropped_packets": [20_000, 40_000], "dropped_bytes": [14_000_000, 28_000_000],
                         "bound_packets": [30, 30], "bound_bytes": [21_000, 21_000]}, columns=columns("caps"))
    return {"conversations": conv, "top_addrs": pd.concat(addrs), "top_ports": pd.concat(ports), "caps": caps}


def write_day(store: EmbeddedStore, hours: int) -> float:
    """Write `hours` of the synthetic day, one batch per hour; the seconds spent writing."""
    top_max = config.get("STORE_TOP_MAX")
    spent = 0.0
    for h in range(hours):
        parts: dict[str, list[pd.DataFrame]] = {"seconds": [], "conversations": [], "top_addrs": [],
                                                "top_ports": [], "caps": []}
        for m in range(60):
            minute = DAY0 + h * 3600 + m * 60
            seg = store.allocate_segment()
            parts["seconds"].append(_seconds(minute, seg))
            for k, v in _minute_rows(minute, seg, top_max).items():
                parts[k].append(v)
        batch = StoreBatch(frames={k: pd.concat(v, ignore_index=True) for k, v in parts.items()})
        t = time.perf_counter()
        assert store.write(batch), store.status()
        spent += time.perf_counter() - t
        print(f"  hour {h + 1:2d}/{hours} written", flush=True)
    return spent


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
    """ms for the same top tables computed by pandas from the rows, loaded beforehand (not timed)."""
    addrs = store._query("SELECT minute, kind, addr, packets, bytes FROM top_addrs", {})
    ports = store._query("SELECT minute, proto, port, packets FROM top_ports", {})
    t = time.perf_counter()
    sel = addrs[(addrs.minute >= since - since % 60) & (addrs.minute <= until)]
    for kind in ("src", "dst"):
        g = sel[sel.kind == kind].groupby("addr")[["packets", "bytes"]].sum()
        g.nlargest(10, "packets")
        g.nlargest(10, "bytes")
    p = ports[(ports.minute >= since - since % 60) & (ports.minute <= until)]
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
    t = time.perf_counter()
    for b in range(batches):
        arr["ts"] = DAY0 + b * 0.0655 + np.arange(n) / 1_000_000  # 1,000,000 packets/s of capture time
        r.add(arr)
        if b % 76 == 75:  # ~5 s of capture time
            r.build()
    r.build(final=True)
    return batches * n / (time.perf_counter() - t)


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
        spent = write_day(store, hours)
        store.close()
        size = os.path.getsize(path) + (os.path.getsize(path + ".wal") if os.path.exists(path + ".wal") else 0)
        store = EmbeddedStore(path, read_only=True)
        store.open()
        since, until = DAY0, DAY0 + hours * 3600 - 1
        cold, warm = timed(lambda: history_summary(store, since, until))
        s = history_summary(store, since, until)
        assert s["packets"] == PPS * hours * 3600, s["packets"]
        scold, swarm = timed(lambda: series(store, since, until))
        ccold, cwarm = timed(lambda: store.top_conversations(__import__("store.base").base.TimeRange(since, until)),
                             repeat=3)
        ref = pandas_reference(store, since, until)
        store.close()
    rate = rollup_rate()
    per_day = size * 24 / hours
    print(f"write: {spent:.1f} s for {hours} h ({spent / hours:.2f} s per hour of traffic)")
    print(f"store size: {size / 1e6:.1f} MB for {hours} h = {per_day / 1e6:.0f} MB per day")
    print(f"history_summary over {hours} h: cold {cold:.0f} ms, warm {warm:.0f} ms (target <= 300 ms)")
    print(f"downsampled series (<= 1,500 points): cold {scold:.0f} ms, warm {swarm:.0f} ms")
    print(f"top 20 conversations over {hours} h ({CONV_PER_MIN * 60 * hours:,} rows): cold {ccold:.0f} ms, "
          f"warm {cwarm:.0f} ms")
    print(f"reference: pandas over the same top-table rows, in memory: {ref:.0f} ms "
          f"(store warm / pandas = {warm / ref:.2f}x)")
    print(f"rollup: {rate:,.0f} packets/s (65,536-packet batches, 20,000-host mix, flush every 5 s of traffic)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
