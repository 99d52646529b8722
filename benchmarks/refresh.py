"""Refresh cost: the server-side work of one dashboard refresh with the buffer full.

Builds what dashboard.py builds on each rerun (snapshot, every figure, the tables) and serialises
it as Streamlit sends it (figure JSON, Arrow tables), then reports the median time. The reference
in the same run is the same page drawn with plotly.express, as the seed drew it.

    python benchmarks/refresh.py            # 10,000 and 1,000,000-packet buffers
    python benchmarks/refresh.py --short    # small sizes, a few seconds (CI)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from common import make_mixed_pcap

import config
import visualizations as viz
from investigate import filters as flt
from packet_processor import CaptureEngine, Snapshot, packets_frame


def refresh_work(snap: Snapshot, rows: int = 100) -> int:
    """Everything one rerun of the page computes and sends; returns the bytes it would send."""
    import pyarrow as pa

    end = snap.totals["last_ts"]
    figs = [
        viz.protocol_pie(snap.totals["transport_counts"], "packets"),
        viz.timeline(viz.timeline_frame(snap.bins, 60, end)),
        viz.top_bar(snap.top_addresses("src"), "Top 10 sources"),
        viz.top_bar(snap.top_addresses("dst"), "Top 10 destinations"),
        viz.ports_bar(snap.top_ports("tcp"), snap.top_ports("udp")),
        viz.size_histogram(snap.packets["wire_len"]),
    ]
    tables = [viz.conversations_table(snap.top_conversations(20)),
              viz.recent_table(packets_frame(snap.packets[-rows:]), rows)]
    sent = sum(len(f.to_json()) for f in figs)
    sent += sum(pa.Table.from_pandas(t).nbytes for t in tables)
    return sent


def seed_work(snap: Snapshot) -> int:
    """The seed's way: a DataFrame of the whole buffer regrouped and drawn with plotly.express."""
    import plotly.express as px

    df = packets_frame(snap.packets)
    figs = [
        px.pie(df, names="protocol"),
        px.line(df.assign(second=df["ts"].astype("int64")).groupby("second").size().reset_index(name="n"),
                x="second", y="n"),
        px.bar(df.groupby("source").size().nlargest(10).reset_index(name="n"), x="source", y="n"),
    ]
    return sum(len(f.to_json()) for f in figs)


def timed(fn, engine: CaptureEngine, repeat: int) -> float:
    """Median seconds of snapshot + fn(snapshot): the snapshot's copy under the lock is part of the cost."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn(engine.snapshot())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def filter_cases(snap: Snapshot) -> list[tuple[str, list]]:
    """Filters as a viewer sets them: a protocol (most of the buffer), the busiest source (a sliver),
    a brushed span of the middle half with a protocol."""
    busiest = snap.top_addresses("src", "packets", 1)[0]["addr"]
    lo, hi = float(snap.packets["ts"].min()), float(snap.packets["ts"].max())
    span = [("from", str(lo + (hi - lo) / 4)), ("to", str(hi - (hi - lo) / 4)), ("proto", "tcp")]
    return [(name, flt.parse(pairs)[0]) for name, pairs in
            (("proto=udp", [("proto", "udp")]), (f"src={busiest}", [("src", busiest)]), ("span+proto=tcp", span))]


def filtered_work(conds: list):
    """One rerun with filters: the filtered snapshot counted afresh, then the same figures and tables."""
    top, bins = config.get("TOP_TABLE_MAX"), config.get("BIN_SECONDS")
    return lambda snap: refresh_work(flt.view(snap, conds, top, bins))


def baseline_work(cache):
    """One rerun with a saved baseline shown but not asked to compare: the page looks up its last diff
    (investigate_page.baseline_panel); the diff itself runs only on 'Compare' (timed apart, once)."""
    from investigate import baseline as bl

    def work(snap: Snapshot) -> int:
        base = cache.setdefault("base", bl.make(snap.packets[: len(snap.packets) // 2], whole=False))
        cache.setdefault("diffs", bl.DiffCache()).last("b", base)
        return refresh_work(snap)
    return work


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--short", action="store_true", help="small sizes, a few seconds")
    args = ap.parse_args()
    sizes = [2_000, 20_000] if args.short else [10_000, 1_000_000]
    repeat = 3 if args.short else 10
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mixed.pcap")
        make_mixed_pcap(path, max(sizes))
        print(f"{'buffer':>10} {'ours ms':>9} {'seed-style ms':>14} {'speed-up':>9}")
        results = []
        for size in sizes:
            engine = CaptureEngine(buffer_size=size)
            engine.load_file(path)
            assert len(engine.snapshot().packets) == size
            ours = timed(refresh_work, engine, repeat)
            seed = timed(seed_work, engine, max(1, repeat // 3))
            print(f"{size:>10,} {ours * 1e3:>9.1f} {seed * 1e3:>14.1f} {seed / ours:>8.1f}x")
            results.append((size, engine))
        print(f"\n{'buffer':>10} {'filter':>24} {'matched':>10} {'filtered ms':>12}  (snapshot + filter + page)")
        for size, engine in results:
            for name, conds in filter_cases(engine.snapshot()):
                matched = int(flt.mask(engine.snapshot().packets, conds).sum())
                t = timed(filtered_work(conds), engine, repeat)
                print(f"{size:>10,} {name:>24} {matched:>10,} {t * 1e3:>12.1f}")
        print(f"\n{'buffer':>10} {'rerun with a baseline ms':>25} {'Compare (once) ms':>18}")
        for size, engine in results:
            from investigate import baseline as bl

            cache: dict = {}
            t = timed(baseline_work(cache), engine, repeat)
            snap = engine.snapshot()
            start = time.perf_counter()
            bl.DiffCache().compute("b", cache["base"], snap)
            print(f"{size:>10,} {t * 1e3:>25.1f} {(time.perf_counter() - start) * 1e3:>18.1f}")


if __name__ == "__main__":
    main()
