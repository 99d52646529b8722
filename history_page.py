"""The dashboard's history parts: the time-range control, a stored range's view, the import action
and the downloads. UI only; every question goes through the engine's own store object (DuckDB lets
one process open the file, and this process is the one recording into it)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from datetime import tzinfo
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

import visualizations as viz
from packet_processor import BIN_FIELDS, CaptureEngine, Snapshot, packets_frame

log = logging.getLogger(__name__)

LIVE = "Live"
CUSTOM = "Custom"
RANGES: dict[str, int | None] = {LIVE: None, "15 min": 900, "1 h": 3600, "6 h": 6 * 3600, "24 h": 86_400,
                                 "7 days": 7 * 86_400, CUSTOM: None}
DIRS = ("in", "out", "local", "transit")
DIR_COLS = ("pk_in", "pk_out", "pk_local", "pk_transit", "by_in", "by_out", "by_local", "by_transit")


# -- the range control and the store's state ---------------------------------------------------


def range_control(engine: CaptureEngine, now: float) -> tuple[int, int] | None:
    """The time-range control; None for Live (the buffer), else (since, until) epoch seconds, inclusive."""
    if engine.store is None:
        return None
    choice = st.radio("Time range", list(RANGES), horizontal=True, key="time_range",
                      help="Live: the buffer and counters of this capture. The others: the history store, "
                           "across restarts (RETENTION_DAYS).")
    if choice == LIVE:
        return None
    if choice != CUSTOM:
        until = int(now)
        return until - int(RANGES[choice] or 0) + 1, until
    return _custom_range(now)


def _custom_range(now: float) -> tuple[int, int] | None:
    from store.history import parse_time

    a, b = st.columns(2)
    since_text = a.text_input("From (ISO 8601 or epoch seconds, UTC unless a zone is given)", key="range_from",
                              placeholder="2024-05-01T12:00:00Z")
    until_text = b.text_input("To (inclusive)", key="range_to", placeholder="now")
    try:
        since = parse_time(since_text.strip() or None, int(now) - 3599)
        until = parse_time(until_text.strip() or None, int(now))
    except ValueError as exc:
        st.error(str(exc))
        return None
    if until < since:
        st.error("'To' is before 'From'.")
        return None
    return since, until


def store_banner(state: dict[str, Any] | None) -> None:
    """History's own faults: not recorded (read-only or full disk, in use), moved aside, or lossy."""
    if not state:
        return
    msg = state.get("message") or ""
    if state.get("state") in ("error", "in_use"):
        st.error(f"History is not being written: {msg}. Capture goes on without history; "
                 f"{int(state.get('pending') or 0):,} batches wait in memory to be written, "
                 f"{int(state.get('packets_dropped') or 0):,} packets are lost from history.")
    elif state.get("packets_dropped"):
        st.warning(f"History lacks {int(state['packets_dropped']):,} packets: batches the store could not write.")
    if state.get("moved_aside"):
        st.warning(msg)
    if state.get("state") == "ok":
        st.caption(f"History: {'recording into' if state.get('recording') else 'kept in'} {state.get('path')} "
                   "(choose a time range to see it).")
    if skipped := int(state.get("history_skipped") or 0):
        st.warning(f"The history writer fell behind and skipped {skipped:,} packets: history lacks them "
                   "(the live totals do not).")


# -- a stored range ---------------------------------------------------------------------------


def history_view(engine: CaptureEngine, since: int, until: int, tz: tzinfo | None,
                 filtered: dict[str, Any] | None = None, select: Any = None) -> None:
    """Metrics, protocol mix, timeline, top talkers, ports, conversations and alerts of a stored range;
    `filtered` (investigate_page.history_filter): the metrics, protocol mix and timeline of the matching traffic;
    `select(key, figure or rows)`: the st.plotly_chart / st.dataframe keywords that make a chart or the
    conversations table clickable (the fleet page's filters), or none."""
    try:
        _history_body(engine, since, until, tz, filtered, select or (lambda key, obj: {}))
    except Exception as exc:  # a store that cannot answer is a message, never a broken page
        log.exception("history query failed")
        st.error(__import__("investigate_page").plain(f"History cannot be read: {type(exc).__name__}: {exc}"))


def _history_body(engine: CaptureEngine, since: int, until: int, tz: tzinfo | None,
                  filtered: dict[str, Any] | None, select: Any) -> None:
    from store.history import approximation, history_summary, time_range

    store = engine.store
    summary = history_summary(store, since, until)
    r = time_range(since, until)
    alerts = store.alerts(r)
    if filtered is not None and "error" not in filtered:
        alerts = filtered["keep_alerts"](alerts)
        shown, pie_src = _filtered_metrics(summary, filtered, len(alerts)), filtered
    else:
        shown, pie_src = _metrics(summary, until - since + 1), summary
        if filtered is not None:
            st.error(f"The filters ({filtered['labels']}) cannot be applied to the totals and charts: "
                     f"{filtered['error']}. They show all traffic of the range.")
    st.caption(f"History from {viz.time_texts([since], tz)[0]} to {viz.time_texts([until], tz)[0]} "
               f"(both seconds included) · store {store.path}")
    if not summary["packets"]:
        st.info("The history holds no traffic in this range.")
    elif not shown:
        st.info("No stored traffic of this range matches the filters.")
    left, right = st.columns([1, 2])
    by = left.radio("Pie by", ["packets", "bytes"], horizontal=True, key="hist_pie_by")
    pie = viz.protocol_pie(pie_src["transport_counts" if by == "packets" else "transport_bytes"], by)
    left.plotly_chart(pie, key="hist_pie", **select("hist_pie", pie))
    if filtered is not None and "error" not in filtered:
        line = viz.matching_timeline(filtered["series"], filtered["bin_s"], tz)
        right.plotly_chart(line, key="hist_timeline", **select("hist_timeline", line))  # a brush sets from/to
    else:
        frame, bin_s = range_series(store, since, until)
        line = viz.history_timeline(frame, bin_s, tz)
        right.plotly_chart(line, key="hist_timeline", **select("hist_timeline", line))
    top_by = st.radio("Top talkers by", ["packets", "bytes"], horizontal=True, key="hist_top_by")
    if filtered is not None and "error" not in filtered and "tops" in filtered:
        filtered_tops(filtered, top_by, tz, select)
    else:
        a, b = st.columns(2)
        src = _addrs(store.top_addrs(r, "src", top_by))
        dst = _addrs(store.top_addrs(r, "dst", top_by))
        for where, key, fig in ((a, "hist_top_src", viz.top_bar(src, "Top 10 sources", top_by)),
                                (b, "hist_top_dst", viz.top_bar(dst, "Top 10 destinations", top_by)),
                                (st, "hist_ports", viz.ports_bar(_ports(store.top_ports(r, "tcp", top_by)),
                                                                 _ports(store.top_ports(r, "udp", top_by)), top_by))):
            where.plotly_chart(fig, key=key, **select(key, fig))
        _history_conversations(store, since, until, top_by, tz, select)
    approx = approximation(store, r)
    if approx:
        st.caption("Approximate top tables (per-minute caps STORE_TOP_MAX / STORE_CONV_MAX): "
                   + "; ".join(f"{k}: {v['keys_left_out']:,} keys left out, each ≤ {v['error_bound_packets']:,} "
                               "packets" for k, v in approx.items()))
    if edges := summary["approximate"].get("edges"):
        st.caption(f"Top talkers, ports and conversations are kept per minute: they cover the whole minutes "
                   f"this range cuts, {edges['packets']:,} packets outside its seconds included (the totals "
                   "above are exact).")
    st.subheader("Alerts in this range")
    st.dataframe(viz.history_alerts_table(alerts, tz), hide_index=True, key="hist_alerts")
    import investigate_page

    investigate_page.history_tools(engine, since, until, tz)  # explain, baselines, back-test: any store
    history_downloads(engine, since, until)


def _metrics(summary: dict[str, Any], span: int) -> int:
    """The range's totals as the page's metrics (every stored packet); the packets shown."""
    cols = st.columns(5)
    cols[0].metric("Packets", f"{summary['packets']:,}", help="Every packet stored for this range.")
    cols[1].metric("Bytes", f"{summary['bytes_wire']:,}", help="Bytes on the wire stored for this range.")
    cols[2].metric("Packets/s", f"{summary['packets'] / span:,.2f}", help=f"Average over the {span:,} s of the range.")
    cols[3].metric("Bit/s", f"{summary['bytes_wire'] * 8 / span:,.0f}", help=f"Average over the {span:,} s.")
    cols[4].metric("Alerts", f"{len(summary['alerts']):,}")
    return int(summary["packets"])


def _filtered_metrics(summary: dict[str, Any], f: dict[str, Any], alerts: int) -> int:
    """The matching traffic's totals as the page's metrics, with what they are counted from said (`f`'s
    labels, note and error are Markdown-escaped text: the URL's values are never markup)."""
    span = int(f["span_s"])
    how = f"Matching {f['labels']}: {f['note']}."
    cols = st.columns(5)
    cols[0].metric("Packets", f"{f['packets']:,}", help=f"{how} All traffic: {summary['packets']:,} packets.")
    cols[1].metric("Bytes", f"{f['bytes']:,}", help=f"{how} All traffic: {summary['bytes_wire']:,} bytes.")
    cols[2].metric("Packets/s", f"{f['packets'] / span:,.2f}", help=f"Average over {span:,} s. {how}")
    cols[3].metric("Bit/s", f"{f['bytes'] * 8 / span:,.0f}", help=f"Average over {span:,} s. {how}")
    cols[4].metric("Alerts", f"{alerts:,}", help=f"The range's alerts that concern the matching traffic (of "
                                                 f"{len(summary['alerts']):,}).")
    (st.caption if f["exact"] else st.warning)(
        f"Filtered figures ({f['labels']}) — packets, bytes, rates, protocol mix and timeline: {f['note']}.")
    return int(f["packets"])


def range_series(store, since: int, until: int) -> tuple[pd.DataFrame, int]:
    """(per-bin sums over the whole range, empty bins as 0, bin width): at most ~1,500 bins, so a week
    draws as fast as a minute, and the range's quiet stretches show as quiet."""
    from store.history import bin_width, time_range

    width = bin_width(since, until)
    got = store.series(time_range(since, until), width, DIR_COLS)
    grid = np.arange(since // width * width, until + 1, width, dtype=np.int64)
    full = pd.DataFrame({"t": grid}).merge(got.astype({"t": np.int64}), on="t", how="left").fillna(0)
    return full, width


def _history_conversations(store, since: int, until: int, by: str, tz: tzinfo | None, select: Any) -> None:
    from store.history import conversations

    st.subheader("Top conversations")
    rows = conversations(store, since, until, n=20, by=by)
    st.dataframe(viz.conversations_table(rows, tz, by), hide_index=True, key="hist_conversations",
                 **select("hist_conversations", rows))


# -- the filtered range's top tables, from its matching stored conversations -----------------------------------


def filtered_tops(filtered: dict[str, Any], by: str, tz: tzinfo | None, select: Any) -> None:
    """Top hosts, ports and conversations of the matching traffic, summed from the matching stored per-minute
    conversations (`filtered["conversations"]`: (rows, whether the read was cut)); said where approximate."""
    df, _ = filtered["conversations"]  # a cut read is said in filtered["tops"]
    hosts, tcp, udp, convs = conversation_tops(df, by)
    a, b = st.columns(2)
    fig = viz.top_bar(hosts, "Top 10 hosts in the matching conversations", by)
    a.plotly_chart(fig, key="hist_top_src", **select("hist_top_src", fig))
    fig = viz.ports_bar(tcp, udp, by)
    fig.update_layout(title={"text": "Top ports (either end) of the matching conversations"})
    b.plotly_chart(fig, key="hist_ports", **select("hist_ports", fig))
    st.subheader("Top conversations (matching the filters)")
    st.dataframe(viz.conversations_table(convs, tz, by), hide_index=True, key="hist_conversations",
                 **select("hist_conversations", convs))
    how = ("A host's figures are those of the matching conversations it is an end of (both directions: a stored "
           "conversation does not keep which end sent a packet); a port's, those of the matching conversations "
           "with that port at either end.")
    note, exact = filtered["tops"]
    (st.caption if exact else st.warning)(
        f"Top hosts, ports and conversations of the matching traffic{'' if exact else ' (approximate)'}: {note}. "
        f"{how}")


def conversation_tops(df: pd.DataFrame, by: str, n: int = 10, n_conv: int = 20
                      ) -> tuple[list[dict[str, Any]], list[tuple[int, int, int]], list[tuple[int, int, int]],
                                 list[dict[str, Any]]]:
    """(top hosts, top TCP ports, top UDP ports, top conversations) of stored conversation rows (any minutes),
    by `by`: a host counts the conversations it is an end of, a port those with it at either end, once each."""
    if not len(df):
        return [], [], [], []
    vals = ["packets", "bytes"]
    ends = pd.concat([df[["a", *vals]].rename(columns={"a": "addr"}),
                      df.loc[df["a"] != df["b"], ["b", *vals]].rename(columns={"b": "addr"})])
    host = ends.groupby("addr")[vals].sum().sort_values([by, "addr"], ascending=[False, True]).head(n)
    hosts = [{"addr": str(k), "packets": int(p), "bytes": int(b)}
             for k, p, b in zip(host.index, host["packets"], host["bytes"])]
    ports: dict[int, list[tuple[int, int, int]]] = {}
    for proto in (6, 17):
        mine = df[df["proto"] == proto]
        both = pd.concat([mine[["a_port", *vals]].rename(columns={"a_port": "port"}),
                          mine.loc[mine["a_port"] != mine["b_port"], ["b_port", *vals]].rename(
                              columns={"b_port": "port"})]).dropna(subset=["port"])
        top = both.groupby("port")[vals].sum().sort_values(by, ascending=False).head(n)
        ports[proto] = [(int(p), int(k), int(b)) for p, k, b in zip(top.index, top["packets"], top["bytes"])]
    keys = ["a", "a_port", "b", "b_port", "proto", "vlan"]
    g = (df.groupby(keys, dropna=False).agg(packets=("packets", "sum"), bytes=("bytes", "sum"),
                                            first_us=("first_us", "min"), last_us=("last_us", "max"))
         .reset_index().sort_values([by, "a", "b"], ascending=[False, True, True]).head(n_conv))
    from packet_processor import proto_name

    convs = [{"a": r.a, "a_port": None if pd.isna(r.a_port) else int(r.a_port), "b": r.b,
              "b_port": None if pd.isna(r.b_port) else int(r.b_port), "proto": proto_name(int(r.proto)),
              "vlan": int(r.vlan), "packets": int(r.packets), "bytes": int(r.bytes),
              "first_ts": r.first_us / 1e6, "last_ts": r.last_us / 1e6} for r in g.itertuples(index=False)]
    return hosts, ports[6], ports[17], convs


def _addrs(df: pd.DataFrame) -> list[dict[str, Any]]:
    return [{"addr": str(a), "packets": int(p), "bytes": int(b)}
            for a, p, b in zip(df["addr"], df["packets"], df["bytes"])]


def _ports(df: pd.DataFrame) -> list[tuple[int, int, int]]:
    return [(int(p), int(n), int(b)) for p, n, b in zip(df["port"], df["packets"], df["bytes"])]


# -- downloads ----------------------------------------------------------------------------------


def history_downloads(engine: CaptureEngine, since: int, until: int) -> None:
    """CSV and Parquet of the range's per-second series, conversations and alerts (made at the click)."""
    from store import export

    store = engine.store
    st.subheader("Download this range")
    makers = {"seconds": lambda: export.seconds_frame(store, since, until),
              "conversations": lambda: export.conversations_frame(store, since, until),
              "alerts": lambda: export.alerts_frame(store, since, until)}
    _download_row(makers, f"history-{since}-{until}")


def live_downloads(snap: Snapshot) -> None:
    """CSV and Parquet of what the live view shows (buffer, conversations, alerts, per-second series),
    and the buffered packets' headers as a pcap (no payload: the records hold none)."""
    st.subheader("Download the live view")
    makers = {"packets": lambda: packets_frame(snap.packets), "conversations": lambda: live_conversations(snap),
              "alerts": lambda: live_alerts(snap), "seconds": lambda: live_seconds(snap)}
    _download_row(makers, "live")
    st.download_button("Buffered packets' headers (pcap, no payload)", data=lambda: _header_pcap(snap.packets),
                       file_name="headers.pcap", mime="application/vnd.tcpdump.pcap", key="dl_live_pcap",
                       on_click="ignore",
                       help="One frame per buffered packet, cut after its transport header (snap length 128); "
                            "tshark and Wireshark read it.")


def _download_row(makers: dict[str, Any], stem: str) -> None:
    from store.export import to_csv, to_parquet

    cols = st.columns(len(makers))
    for col, (name, make) in zip(cols, makers.items()):
        col.download_button(f"{name} (CSV)", data=lambda m=make: to_csv(m()), file_name=f"{stem}-{name}.csv",
                            mime="text/csv", key=f"dl_{stem.split('-')[0]}_{name}_csv", on_click="ignore")
        col.download_button(f"{name} (Parquet)", data=lambda m=make: to_parquet(m()),
                            file_name=f"{stem}-{name}.parquet", mime="application/vnd.apache.parquet",
                            key=f"dl_{stem.split('-')[0]}_{name}_parquet", on_click="ignore")


def _header_pcap(rows: np.ndarray) -> bytes:
    from store.export import header_pcap

    return header_pcap(rows)


def live_conversations(snap: Snapshot) -> pd.DataFrame:
    """Every conversation of the live top table (both directions together), most bytes first."""
    rows = snap.top_conversations(1 << 30, "bytes")
    cols = ["a", "a_port", "b", "b_port", "proto", "packets", "bytes", "first_ts", "last_ts", "error"]
    df = pd.DataFrame([{c: r.get(c) for c in cols} for r in rows], columns=cols)
    for c in ("a_port", "b_port"):
        df[c] = df[c].astype("Int32")
    return df


def live_alerts(snap: Snapshot) -> pd.DataFrame:
    """The live alerts with their evidence, newest first."""
    keys = ["detector", "severity", "source", "target", "first_ts", "last_ts", "count", "evidence"]
    return pd.DataFrame([a.as_dict() for a in snap.alerts], columns=keys)


def live_seconds(snap: Snapshot) -> pd.DataFrame:
    """The live per-second counters (the timeline's bins): second `t` and every field."""
    df = pd.DataFrame(np.asarray(snap.bins), columns=["t", *BIN_FIELDS])
    # Every packet has one direction, so the directions' sums are the second's totals (as in the store).
    df.insert(1, "packets", df[[c for c in BIN_FIELDS if c.startswith("pk_") and c[3:] in DIRS]].sum(axis=1))
    df.insert(2, "bytes", df[[f"by_{d}" for d in DIRS]].sum(axis=1))
    df.insert(1, "time", pd.to_datetime(df["t"], unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
    return df


# -- import -----------------------------------------------------------------------------------


def import_action(engine: CaptureEngine) -> None:
    """'Import capture files': several at once, into the history (kept by import time), with progress."""
    if engine.store is None:
        return
    with st.expander("Import capture files into the history"):
        files = st.file_uploader("pcap / pcapng files", accept_multiple_files=True, key="hist_import_files",
                                 type=["pcap", "pcapng", "cap"])
        if st.button("Import", key="hist_import", disabled=not files):
            result = import_uploads(engine, files)
            st.session_state["hist_import_result"] = result
        if result := st.session_state.get("hist_import_result"):
            (st.error if result["errors"] else st.success)(
                f"Imported {result['files']} files, {result['packets']:,} packets"
                + (f"; errors: {json.dumps(result['errors'])}" if result["errors"] else ""))


def import_uploads(engine: CaptureEngine, files: list) -> dict[str, Any]:
    """Write each upload to a private temporary file and import it through the engine's store."""
    from store.cli import import_files

    out: dict[str, Any] = {"files": 0, "packets": 0, "errors": [], "imports": []}
    bar = st.progress(0.0, text="Importing…")
    folder = tempfile.mkdtemp(prefix="ntm-import-")
    try:
        for i, upload in enumerate(files):
            path = os.path.join(folder, f"{i}.pcap")
            with open(path, "wb") as fh:
                upload.seek(0)
                shutil.copyfileobj(upload, fh)
            got = import_files([path], engine.store, labels=[upload.name])
            for key in ("files", "packets"):
                out[key] += got[key]
            out["errors"] += [{**e, "file": upload.name} for e in got["errors"]]
            out["imports"] += [{**e, "file": upload.name} for e in got["imports"]]
            bar.progress((i + 1) / len(files), text=f"Imported {i + 1} of {len(files)}: {upload.name}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return out


def now_wall() -> float:
    """The wall clock (the relative ranges end at it)."""
    return time.time()
