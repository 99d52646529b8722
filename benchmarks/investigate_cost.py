"""What the investigation page adds to a refresh (issue 15) at 10,000 and 1,000,000 buffered packets:

  evidence links  - the alerts table's links for 50 new packet-stamped alerts (new_host), then for the same
                    alerts again (known); reference in the same run: one alert's search as a mask over the
                    whole buffer, which is what each new alert cost before review 7 (50 of them a rerun)
  country/AS filter - flt.mask for country=US and for asn=15169 over a buffer with 60,000 distinct public
                    sources (10,000 at 10,000 packets): the first rerun after the filter is set and the
                    next ones, with the vectorised look-up (enrich.geo keys_of); reference in the same
                    run: the single look-ups' path (geo_keys, one geoip2fast look-up per new address,
                    then kept across reruns), which is what the first rerun cost before

Targets: a refresh ≤ 50 ms at 10,000 packets and ≤ 500 ms at 1,000,000 (benchmarks/RESULTS.md).

    python benchmarks/investigate_cost.py [--short]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

import enrich  # noqa: E402
import investigate_page as inv  # noqa: E402
from analysis.headers import PACKET_DTYPE  # noqa: E402
from investigate import filters as flt  # noqa: E402

T0 = 1_700_000_000.0
SECONDS = 600


def buffer(n: int, distinct: int, seed: int = 1) -> np.ndarray:
    """n UDP packets over SECONDS in time order, from `distinct` random public IPv4 sources to 10.0.0.1."""
    rng = np.random.default_rng(seed)
    rows = np.zeros(n, PACKET_DTYPE)
    rows["ts"] = T0 + np.arange(n) * (SECONDS / n)
    pool = rng.integers(1 << 24, 223 << 24, distinct, dtype=np.uint32)
    src = np.zeros((n, 16), np.uint8)
    src[:, 10:12] = 0xFF
    src[:, 12:] = pool[rng.integers(0, distinct, n)].byteswap().view(np.uint8).reshape(n, 4)
    src[: len(pool), 12:] = pool.byteswap().view(np.uint8).reshape(-1, 4)  # every source present
    dst = np.zeros((n, 16), np.uint8)
    dst[:, 10:12] = 0xFF
    dst[:, 12:] = (10, 0, 0, 1)
    rows["src"], rows["dst"] = src.view("S16").ravel(), dst.view("S16").ravel()
    rows["cls"] = flt.CLASSES.index("udp")
    return rows


def alerts_of(rows: np.ndarray, k: int = 50) -> list:
    """k new_host alerts, one per source seen in k spread seconds."""
    out = []
    for i in range(k):
        at = int(len(rows) * (i + 0.5) / k)
        addr = flt.addr_text(bytes(rows["src"][at]))
        out.append(types.SimpleNamespace(detector="new_host", source=addr.removeprefix("::ffff:"), target="",
                                         severity="low", first_ts=float(rows["ts"][at]), last_ts=float(rows["ts"][at])))
    return out


def ms(fn, repeat: int, before=None) -> float:
    """Median wall time of fn() in ms (`before` run untimed ahead of each)."""
    times = []
    for _ in range(repeat):
        if before:
            before()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def cpu_ms(fn, repeat: int, before=None) -> float:
    """Median CPU time (this process, all threads) of fn() in ms: steadier than wall time on a shared machine."""
    times = []
    for _ in range(repeat):
        if before:
            before()
        t = time.process_time()
        fn()
        times.append((time.process_time() - t) * 1e3)
    return statistics.median(times)


def forget_links() -> None:
    inv._STARTS.clear()
    inv._SEEN.clear()


def links(n: int, repeat: int) -> None:
    rows = buffer(n, min(60_000, n))
    alerts = alerts_of(rows)
    frame = pd.DataFrame({"n": range(len(alerts))})
    new = ms(lambda: inv.with_links(frame, alerts, rows), repeat, forget_links)
    known = ms(lambda: inv.with_links(frame, alerts, rows), repeat)
    a = alerts[0]
    second = float(int(a.first_ts))
    conds, _ = flt.parse([("src", a.source), ("from", repr(second)), ("to", repr(second + 1))])
    # The way before: each new alert's search was a mask over the whole buffer.
    one = ms(lambda: rows["ts"][flt.mask(rows, conds)].min(), repeat)
    print(f"| {n:,} | evidence links, 50 new alerts | **{new:.2f} ms** | known: {known:.2f} ms | one search over "
          f"the whole buffer {one:.2f} ms (× 50 = {50 * one:.0f} ms, the way before) |")


def geo(n: int, repeat: int) -> None:
    distinct = min(60_000, n)
    rows = buffer(n, distinct)
    many = flt.geo_keys_many
    for pair in (("country", "US"), ("asn", "15169")):
        conds, _ = flt.parse([pair])
        def fresh() -> None:  # nothing kept: the filter's keys and the geo database's own cache
            flt.GEO_CACHE = flt.GeoCache()
            enrich.shared().geo._cache.clear()

        first = ms(lambda: flt.mask(rows, conds), repeat, fresh)  # noqa: B023
        first_cpu = cpu_ms(lambda: flt.mask(rows, conds), repeat, fresh)  # noqa: B023
        nxt = ms(lambda: flt.mask(rows, conds), repeat)  # noqa: B023
        flt.geo_keys_many = lambda key: None  # the reference: one geoip2fast look-up per new address
        try:
            old_first = ms(lambda: flt.mask(rows, conds), max(1, repeat // 2), fresh)  # noqa: B023
            old_cpu = cpu_ms(lambda: flt.mask(rows, conds), max(1, repeat // 2), fresh)  # noqa: B023
            flt.mask(rows, conds)
            old_next = ms(lambda: flt.mask(rows, conds), repeat)  # noqa: B023
        finally:
            flt.geo_keys_many = many
        print(f"| {n:,} | {pair[0]}={pair[1]}, {distinct:,} distinct sources | **{first:.1f} ms** first rerun "
              f"(CPU {first_cpu:.1f} ms), {nxt:.1f} ms next | | single look-ups: first rerun {old_first:.0f} ms "
              f"(CPU {old_cpu:.0f} ms), next {old_next:.1f} ms (× {old_first / first:.1f}) |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--short", "--quick", action="store_true", help="small sizes, a few seconds")
    args = ap.parse_args()
    sizes, repeat = ((10_000,), 2) if args.short else ((10_000, 1_000_000), 5)
    en = enrich.shared()
    if not en.geo.wait_loaded(120):
        print("the geo database did not load: country figures are without it", file=sys.stderr)
    print("| buffer | case | ours | | reference |\n|---|---|---|---|---|")
    for n in sizes:
        links(n, repeat)
        geo(n, repeat)
    enrich.stop_shared()
    return 0


if __name__ == "__main__":
    sys.exit(main())
