"""Refresh cost: the server-side work of one dashboard refresh with the buffer full.

Builds what dashboard.py builds on each rerun (snapshot, every figure, the tables) and serialises
it as Streamlit sends it (figure JSON, Arrow tables), then reports the median time. The reference
in the same run is the same page drawn with plotly.express, as the seed drew it.

    python benchmarks/refresh.py            # 10,000 and 1,000,000-packet buffers
    python benchmarks/refresh.py --short    # small sizes, a few seconds (CI)
    python benchmarks/refresh.py --enrich   # ENRICHMENT off vs the live tables' columns vs columns + panel
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time

import numpy as np
from common import make_mixed_pcap

import config
import enrich_columns as ec
import visualizations as viz
from investigate import filters as flt
from packet_processor import CaptureEngine, Snapshot, packets_frame


def refresh_work(snap: Snapshot, rows: int = 100, en=None) -> int:
    """Everything one rerun of the page computes and sends; returns the bytes it would send. `en`: an
    Enricher, for the page with ENRICHMENT on (dashboard.py's columns on its own tables)."""
    import pyarrow as pa

    end = snap.totals["last_ts"]
    look = ec.Lookups(en) if en is not None else None
    src, dst = snap.top_addresses("src"), snap.top_addresses("dst")
    figs = [
        viz.protocol_pie(snap.totals["transport_counts"], "packets"),
        viz.timeline(viz.timeline_frame(snap.bins, 60, end)),
        viz.top_bar(src, "Top 10 sources", "packets", look and ec.hover_notes(look, src)),
        viz.top_bar(dst, "Top 10 destinations", "packets", look and ec.hover_notes(look, dst)),
        viz.ports_bar(snap.top_ports("tcp"), snap.top_ports("udp")),
        viz.size_histogram(snap.packets["wire_len"]),
    ]
    recent_rows = snap.packets[-rows:]
    conv, frame = snap.top_conversations(20), packets_frame(recent_rows)
    tables = [viz.conversations_table(conv), viz.alerts_table(snap.alerts)]
    if look is None:
        tables.append(viz.recent_table(frame, rows))
    else:
        frame["row"] = np.arange(len(frame))
        recent = viz.recent_table(frame, rows)
        tables = [ec.conversations(look, tables[0], conv), ec.alerts(look, tables[1]),
                  ec.recent(look, recent.drop(columns=["row"]), ec.shown_macs(recent_rows, recent["row"])),
                  ec.talkers_table(look, src, dst, "packets")]
    sent = sum(len(f.to_json()) for f in figs)
    sent += sum(pa.Table.from_pandas(t).nbytes for t in tables)
    return sent


def panel_work(en, tab: str = "Top talkers"):
    """The page with ENRICHMENT on: its tables' columns and the panel's open tab (`tab`; the first one unless a
    viewer chose another: enrich_page.panel draws only the open one), or every tab ("all", as the page did
    before its tabs were lazy). Over a file, the by-process view walks the whole buffer."""
    import pyarrow as pa

    import enrich_page as ep

    def talkers(snap: Snapshot) -> tuple[list, list]:
        src, dst = ep.who_rows(en, snap.top_addresses("src")), ep.who_rows(en, snap.top_addresses("dst"))
        return [viz.who_bar(src, "Top sources: who"), viz.who_bar(dst, "Top destinations: who")], \
            [ep.talkers_frame(src, dst, "packets")]

    def ends(i: int):
        def view(snap: Snapshot) -> tuple[list, list]:
            rows = ep.ends_views(en, snap, "packets", only=("country", "network")[i])[i]
            return [ep.ends_bar(rows, ("Top countries", "Top networks (AS)")[i], "packets")], []
        return view

    def both_ends(snap: Snapshot) -> tuple[list, list]:  # "all": the page summed both in one call
        countries, networks, _ = ep.ends_views(en, snap, "packets")
        return [ep.ends_bar(countries, "Top countries", "packets"),
                ep.ends_bar(networks, "Top networks (AS)", "packets")], []

    def process(snap: Snapshot) -> tuple[list, list]:
        procs = snap.totals.get("by_process")
        if procs is None and not ec.is_live(snap):  # a file's packets: the page names no process
            return [], [viz.process_table([])]
        return [], [viz.process_table(procs if procs is not None else en.by_process(snap.packets))]

    views = {"Top talkers": talkers,
             "Conversations": lambda snap: ([], [ep.conversations_who(en, snap.top_conversations(20))]),
             "Top countries": ends(0), "Top networks (AS)": ends(1), "By process": process,
             "Recent packets": lambda snap: ([], [ep.recent_who(en, snap.packets[-100:], None)]),
             "Alerts": lambda snap: ([], [ep.alerts_who(en, snap.alerts)])}
    drawn = [v for k, v in views.items() if k not in ("Top countries", "Top networks (AS)")] + [both_ends] \
        if tab == "all" else [views[tab]]

    def work(snap: Snapshot) -> int:
        sent = refresh_work(snap, en=en)
        for view in drawn:
            figs, tables = view(snap)
            sent += sum(len(f.to_json()) for f in figs) + sum(pa.Table.from_pandas(t).nbytes for t in tables)
        return sent
    return work


def enricher():
    """An Enricher as the page builds it (databases loaded, process table running), reverse DNS on towards
    127.0.0.1 so every name is asked (and answered as a failure, cached) without leaving the machine."""
    from enrich import Enricher

    en = Enricher(reverse_dns=True, dns_server="127.0.0.1", rdns_timeout_s=0.5)
    en.start()
    en.geo.wait_loaded(120)
    deadline = time.monotonic() + 120
    while not en.geo.asn.ready and not en.geo.asn.error and time.monotonic() < deadline:
        time.sleep(0.1)
    return en


def settle(en, limit_s: float = 120.0) -> None:
    """Wait until every queued reverse-DNS lookup has its (cached) answer: the timed refreshes read caches."""
    s, deadline = en.names.stats, time.monotonic() + limit_s
    while time.monotonic() < deadline and s.answered + s.failed + s.timed_out < s.queued:
        time.sleep(0.2)


def enrich_main(sizes: list[int], repeat: int) -> None:
    """ENRICHMENT off, the live tables' columns, and the columns plus the panel, over public addresses."""
    en = enricher()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "public.pcap")
        make_mixed_pcap(path, max(sizes), public=True)
        print(f"{'buffer':>10} {'off ms':>8} {'columns ms':>11} {'columns+panel ms':>17}  (median of {repeat})")
        for size in sizes:
            engine = CaptureEngine(buffer_size=size)
            engine.load_file(path)
            on = functools.partial(refresh_work, en=en)
            for fn in (on, panel_work(en)):  # warm: the first look-ups queue names and fill the caches
                fn(engine.snapshot())
            settle(en)
            off = timed(refresh_work, engine, repeat)
            cols = timed(on, engine, repeat)
            both = timed(panel_work(en), engine, repeat)
            print(f"{size:>10,} {off * 1e3:>8.1f} {cols * 1e3:>11.1f} {both * 1e3:>17.1f}")
        s = en.names.stats
        print(f"reverse DNS: {s.queued:,} queued, {s.sent:,} sent, {s.failed:,} failed, "
              f"{s.dropped_queue_full:,} not asked (queue full)")
    en.stop()


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
    ap.add_argument("--enrich", action="store_true", help="only the enrichment comparison")
    args = ap.parse_args()
    sizes = [2_000, 20_000] if args.short else [10_000, 1_000_000]
    repeat = 3 if args.short else 10
    if args.enrich:
        return enrich_main(sizes, repeat)
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
