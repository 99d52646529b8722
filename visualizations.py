"""Pure chart and table builders: arrays or DataFrames in, Plotly figures or DataFrames out; no Streamlit.

Figures use ``plotly.graph_objects`` (about 1 ms a figure, against ~20 ms for plotly.express),
the same colour for a protocol or a direction in every chart, and a ``uirevision`` so that a
user's zoom and legend choices survive the page's refresh.
"""

from __future__ import annotations

import html
import socket
from collections.abc import Sequence
from datetime import tzinfo
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

PROTOCOLS = ("TCP", "UDP", "ICMP", "ICMPv6", "Other IP", "ARP/other")  # in engine class order
PROTOCOL_COLORS = {
    "TCP": "#1f77b4", "UDP": "#ff7f0e", "ICMP": "#2ca02c", "ICMPv6": "#17becf",
    "Other IP": "#9467bd", "ARP/other": "#7f7f7f",
}
DIRECTIONS = ("in", "out", "local", "transit")
DIRECTION_COLORS = {"in": "#2ca02c", "out": "#1f77b4", "local": "#9467bd", "transit": "#bcbd22"}
CLASS_KEYS = ("tcp", "udp", "icmp", "icmpv6", "other_ip", "non_ip")
SIZE_EDGES = (0, 64, 128, 256, 512, 1024, 1519, 9001, 65536, 1 << 32)
SIZE_LABELS = ("< 64", "64–127", "128–255", "256–511", "512–1023", "1024–1518", "1519–9000 (jumbo)",
               "9001–65535", "≥ 64 KiB (offload)")
LAYOUT = {"margin": {"l": 10, "r": 10, "t": 40, "b": 10}, "height": 320}
# Capture time that a calendar can show: years 1..9999 (Python's datetime), two days inside so that
# no time zone pushes a value over the edge. pcapng allows 64-bit timestamps far beyond it.
TS_MIN, TS_MAX = -62_135_596_800 + 2 * 86_400, 253_402_300_799 - 2 * 86_400
TIME_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


def _figure(data: list[dict], title: str, uirevision: str, **layout: Any) -> go.Figure:
    """A figure from plain trace and layout dicts, built in one go.

    Skipping Plotly's per-property validation halves the cost of a figure; the shapes used
    here are fixed, and the tests and the browser check that they draw.
    """
    full = {**LAYOUT, "title": {"text": title}, "uirevision": uirevision, **layout}
    return go.Figure(data=data, layout=full, _validate=False)


def _empty(title: str, uirevision: str) -> go.Figure:
    return _figure([], title, uirevision,
                   annotations=[{"text": "no data yet", "showarrow": False, "font": {"size": 14}}],
                   xaxis={"visible": False}, yaxis={"visible": False})


def protocol_pie(counts: dict[str, int], by: str = "packets") -> go.Figure:
    """Protocol mix from the engine's whole-capture counters ({tcp: n, udp: n, ...}), as a pie that can be clicked."""
    # Empty classes are left out: Plotly would still print a "0%" label for them.
    shown = [(p, int(counts.get(k, 0))) for p, k in zip(PROTOCOLS, CLASS_KEYS) if counts.get(k, 0)]
    title = f"Protocols by {by}"
    if not shown:
        return _empty(title, "pie")
    # A one-ring sunburst draws as a pie, and unlike a pie a click on its slice reaches Streamlit as a
    # selection (Streamlit reports clicks only for charts whose points have ids): the slice filters the page.
    labels = [p for p, _ in shown]
    pie = {"type": "sunburst", "labels": labels, "ids": labels, "parents": [""] * len(shown),
           "values": [v for _, v in shown], "branchvalues": "total", "sort": False,
           "marker": {"colors": [PROTOCOL_COLORS[p] for p, _ in shown]}, "textinfo": "label+percent root",
           "hovertemplate": "%{label}: %{value:,} " + by + " (%{percentRoot:.1%})<extra></extra>"}
    return _figure([pie], title, "pie")


def timeline_frame(bins: np.ndarray, window_s: int, end: float | None, tz: tzinfo | None = None) -> pd.DataFrame:
    """Per-second rows for the last `window_s` seconds ending at `end` (capture time), gaps filled with 0."""
    cols = ["time", *[f"pk_{d}" for d in DIRECTIONS], *[f"by_{d}" for d in DIRECTIONS]]
    if not len(bins):
        return pd.DataFrame(columns=cols)
    last = int(end) if end is not None else int(bins[-1, 0])
    if not TS_MIN + window_s <= last <= TS_MAX:  # a window no calendar can show: no time axis to draw on
        return pd.DataFrame(columns=cols)
    secs = np.arange(last - window_s + 1, last + 1, dtype=np.int64)
    dense = np.zeros((window_s, 8), np.int64)
    sel = (bins[:, 0] > last - window_s) & (bins[:, 0] <= last)
    dense[bins[sel, 0] - secs[0]] = bins[sel, 1:9]
    # Epoch seconds must be read as seconds: read as nanoseconds they all land in January 1970.
    time_col = pd.to_datetime(secs, unit="s", utc=True)
    if tz is not None:
        time_col = time_col.tz_convert(tz)
    frame = pd.DataFrame(dense, columns=cols[1:])
    frame.insert(0, "time", time_col)
    return frame


def timeline(frame: pd.DataFrame, alerts: Sequence[float] = ()) -> go.Figure:
    """Packets/s and bit/s by capture time, in/out/local/transit stacked."""
    title = "Traffic by capture time"
    if frame.empty:
        return _empty(title, "timeline")
    tz = frame["time"].dt.tz
    # Naive wall-clock times of the chosen zone: what Plotly would draw for a zoned series anyway.
    x = (frame["time"].dt.tz_localize(None) if tz else frame["time"]).to_numpy()
    data = []
    for d in DIRECTIONS:
        pk, by = frame[f"pk_{d}"].to_numpy(), frame[f"by_{d}"].to_numpy()
        if not pk.any():
            continue
        style = {"type": "scatter", "mode": "lines", "x": x, "name": d, "legendgroup": d,
                 "line": {"width": 1, "color": DIRECTION_COLORS[d]}}
        data.append({**style, "y": pk, "stackgroup": "pk", "xaxis": "x", "yaxis": "y"})
        data.append({**style, "y": by * 8, "stackgroup": "by", "xaxis": "x2", "yaxis": "y2", "showlegend": False})
    marks = [pd.Timestamp(ts, unit="s", tz="UTC").tz_convert(tz).tz_localize(None) if tz else
             pd.Timestamp(ts, unit="s") for ts in alerts if TS_MIN <= ts <= TS_MAX]
    shapes = [{"type": "line", "xref": "x", "yref": "paper", "y0": 0, "y1": 1, "x0": t, "x1": t,
               "line": {"color": "red", "dash": "dot"}} for t in marks]
    # Two stacked panels sharing the time axis, laid out by hand (make_subplots costs ~25 ms).
    return _figure(data, title, "timeline", hovermode="x unified", height=420, shapes=shapes,
                   xaxis={"anchor": "y", "matches": "x2", "showticklabels": False},
                   xaxis2={"anchor": "y2"},
                   yaxis={"domain": [0.55, 1.0], "title": {"text": "packets/s"}},
                   yaxis2={"domain": [0.0, 0.45], "title": {"text": "bit/s"}})


def chart_text(text: str) -> str:
    """Text from the traffic as Plotly should show it: Plotly reads <b>, <a href> and the like in
    labels, so markup is escaped and shows as itself (later hostnames come from strangers' DNS)."""
    return html.escape(text, quote=False)


def count_text(value: int, error: int = 0) -> str:
    """A count as the page shows it: exact as '1,234'; from a full top table as '≥ 1,200'.

    A full table counts like Space-Saving (Metwally et al.): an entry's count may include up to
    `error` that belonged to the entries it replaced, so what is certain is the count minus the error.
    """
    return f"{value:,}" if not error else f"≥ {max(0, value - error):,}"


def top_bar(rows: list[dict[str, Any]], title: str, by: str = "packets", notes: list[str] | None = None) -> go.Figure:
    """Horizontal bars of top addresses ([{addr, packets, bytes, error?}], largest first).

    An entry with an `error` (of the `by` count) is approximate: its bar says '≥ N' and its hover
    gives the range; exact entries carry no text. `notes` (one per row: host, country, AS) join the hover.
    """
    if not rows:
        return _empty(title, title)
    rows = rows[::-1]
    errors = [int(r.get("error", 0) or 0) for r in rows]
    hover = [_range_text(r[by], e, by) for r, e in zip(rows, errors)]
    if notes is not None:
        hover = [f"{h}<br>{chart_text(n)}" if n else h for h, n in zip(hover, notes[::-1])]
    bar = {"type": "bar", "x": [r[by] for r in rows], "y": [chart_text(r["addr"]) for r in rows],
           "orientation": "h", "marker": {"color": "#1f77b4"}, "text": [count_text(r[by], e) if e else ""
                                                                         for r, e in zip(rows, errors)],
           "textposition": "auto", "customdata": hover,
           "hovertemplate": "%{y}: %{customdata}<extra></extra>"}
    return _figure([bar], title, title, yaxis={"type": "category"})


def _range_text(value: int, error: int, by: str) -> str:
    if not error:
        return f"{value:,} {by}"
    return f"between {max(0, value - error):,} and {value:,} {by} (approximate: the table is full)"


@lru_cache(maxsize=4096)
def service_name(port: int, proto: str) -> str:
    """The service registered for a port ('https' for tcp/443), or '' when there is none."""
    try:
        return socket.getservbyport(int(port), proto)
    except (OSError, OverflowError):
        return ""


def ports_bar(tcp: list[tuple[int, int, int]], udp: list[tuple[int, int, int]], by: str = "packets",
              n: int = 10) -> go.Figure:
    """Top destination ports (tcp and udp together) with their service names."""
    title = "Top destination ports"
    idx = 1 if by == "packets" else 2
    rows = [("TCP", r) for r in tcp] + [("UDP", r) for r in udp]
    rows.sort(key=lambda pr: -pr[1][idx])
    rows = rows[:n]
    if not rows:
        return _empty(title, "ports")
    data = []
    for proto in ("TCP", "UDP"):
        sel = [r for p, r in rows if p == proto]
        if sel:
            labels = [chart_text(f"{proto.lower()}/{r[0]} {service_name(r[0], proto.lower())}".strip())
                      for r in sel]
            data.append({"type": "bar", "x": [r[idx] for r in sel], "y": labels, "orientation": "h", "name": proto,
                         "marker": {"color": PROTOCOL_COLORS[proto]}})
    order = [chart_text(f"{p.lower()}/{r[0]} {service_name(r[0], p.lower())}".strip()) for p, r in rows][::-1]
    return _figure(data, title, "ports", barmode="stack",
                   yaxis={"type": "category", "categoryorder": "array", "categoryarray": order})


def size_histogram(sizes: np.ndarray) -> go.Figure:
    """Packet sizes (wire length) in the buffer, in the usual Ethernet buckets."""
    title = "Packet sizes (recent buffer)"
    if not len(sizes):
        return _empty(title, "sizes")
    counts, _ = np.histogram(sizes, bins=SIZE_EDGES)
    keep = [i for i, c in enumerate(counts) if c or i < 6]
    bar = {"type": "bar", "x": [SIZE_LABELS[i] for i in keep], "y": [int(counts[i]) for i in keep],
           "marker": {"color": "#8c564b"}, "hovertemplate": "%{x} bytes: %{y:,}<extra></extra>"}
    return _figure([bar], title, "sizes", xaxis={"type": "category"})


def conversations_table(rows: list[dict[str, Any]], tz: tzinfo | None = None, by: str = "bytes") -> pd.DataFrame:
    """Top conversations as a table: endpoints with ports, protocol, packets, bytes, first and last seen.

    When any entry is approximate (an `error` on its `by` count, from a full table), the `by` column
    becomes text, with '≥ N' on the approximate rows.
    """
    cols = ["endpoint A", "endpoint B", "protocol", "packets", "bytes", "first seen", "last seen"]
    if not rows:
        return pd.DataFrame(columns=cols)

    def ep(addr: str, port: int | None) -> str:
        if port is None:
            return addr
        return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"

    frame = pd.DataFrame({
        "endpoint A": [ep(r["a"], r["a_port"]) for r in rows],
        "endpoint B": [ep(r["b"], r["b_port"]) for r in rows],
        "protocol": [r["proto"] for r in rows],
        "packets": [r["packets"] for r in rows],
        "bytes": [r["bytes"] for r in rows],
        "first seen": _times([r["first_ts"] for r in rows], tz),
        "last seen": _times([r["last_ts"] for r in rows], tz),
    })
    errors = [int(r.get("error", 0) or 0) for r in rows]
    if any(errors):
        frame[by] = [count_text(r[by], e) for r, e in zip(rows, errors)]
    return frame


def _times(ts: Sequence[float] | np.ndarray, tz: tzinfo | None) -> pd.Series:
    """Epoch seconds as local time text with milliseconds."""
    return pd.Series(time_texts(ts, tz), dtype=object)


def time_texts(ts: Sequence[float] | np.ndarray, tz: tzinfo | None = None) -> np.ndarray:
    """Epoch seconds as 'YYYY-MM-DD HH:MM:SS.mmm' in zone `tz` (each with that moment's offset, so
    daylight-saving changes are right); a time no calendar can show is given as its seconds instead."""
    ts = np.asarray(ts, dtype=np.float64)
    out = np.empty(len(ts), dtype=object)
    ok = np.isfinite(ts) & (ts >= TS_MIN) & (ts <= TS_MAX)
    if ok.any():
        t = pd.to_datetime(ts[ok], unit="s", utc=True)
        if tz is not None:
            t = t.tz_convert(tz)
        out[ok] = np.asarray(t.strftime(TIME_FORMAT).str[:-3], dtype=object)
    for i in np.flatnonzero(~ok):  # NaN: a time the store does not know (an approximate fleet row)
        out[i] = "unknown" if np.isnan(ts[i]) else f"{ts[i]:.6g} s since 1970 (outside the calendar)"
    return out


def vlan_bar(vlans: np.ndarray) -> go.Figure:
    """Packets per VLAN id in the buffer (802.1Q; untagged packets, id 0 or negative, are left out)."""
    title = "VLANs (recent buffer)"
    tagged = vlans[(vlans > 0) & (vlans < 4095)] if len(vlans) else vlans
    if not len(tagged):
        return _empty(title, "vlans")
    ids, counts = np.unique(tagged, return_counts=True)
    order = np.argsort(-counts, kind="stable")[:20][::-1]
    bar = {"type": "bar", "x": counts[order].tolist(), "y": [f"VLAN {int(v)}" for v in ids[order]],
           "orientation": "h", "marker": {"color": "#e377c2"}, "hovertemplate": "%{y}: %{x:,} packets<extra></extra>"}
    return _figure([bar], title, "vlans", yaxis={"type": "category"})


def recent_table(frame: pd.DataFrame, n: int = 100, text: str = "") -> pd.DataFrame:
    """The newest n packets first, optionally only those whose address, port or protocol matches `text`."""
    view = frame
    text = text.strip()
    if text and len(frame):
        needle = text.lower()
        mask = (frame["source"].str.lower().str.contains(needle, regex=False)
                | frame["destination"].str.lower().str.contains(needle, regex=False)
                | frame["protocol"].str.lower().str.contains(needle, regex=False))
        if needle.isdigit():
            port = int(needle)
            mask |= (frame["src port"] == port).fillna(False) | (frame["dst port"] == port).fillna(False)
        view = frame[mask]
    return view.iloc[::-1].head(n).reset_index(drop=True)


def alerts_table(alerts: Sequence[Any], tz: tzinfo | None = None) -> pd.DataFrame:
    """Alerts (newest first) as a table: when, how bad, what, who, how often, the evidence and the advice."""
    cols = ["last seen", "severity", "detector", "source", "target", "count", "evidence", "what it means", "ack"]
    if not alerts:
        return pd.DataFrame(columns=cols)
    return pd.DataFrame({
        "last seen": _times([a.last_ts for a in alerts], tz),
        "severity": [a.severity for a in alerts],
        "detector": [a.detector for a in alerts],
        "source": [a.source for a in alerts],
        "target": [a.target for a in alerts],
        "count": [a.count for a in alerts],
        "evidence": [a.evidence for a in alerts],
        "what it means": [a.meaning for a in alerts],
        "ack": [a.acknowledged for a in alerts],
    })


# -- history (time ranges from the store) ---------------------------------------------------


def history_timeline(series: pd.DataFrame, bin_s: int, tz: tzinfo | None = None) -> go.Figure:
    """The timeline of a stored range: per-bin sums (bin start `t`, pk_/by_ per direction) drawn as
    average packets/s and bit/s per bin, the bin width named on the time axis."""
    cols = [*[f"pk_{d}" for d in DIRECTIONS], *[f"by_{d}" for d in DIRECTIONS]]
    if series.empty:
        return _empty("Traffic by capture time", "timeline")
    frame = pd.DataFrame({c: series[c].to_numpy(dtype=np.float64) / bin_s for c in cols})
    when = pd.to_datetime(series["t"].to_numpy(dtype=np.int64), unit="s", utc=True)
    frame.insert(0, "time", when.tz_convert(tz) if tz is not None else when)
    fig = timeline(frame)
    width = f"{bin_s} s" if bin_s < 60 else (f"{bin_s // 60} min" if bin_s < 3600 else f"{bin_s / 3600:g} h")
    fig.update_layout(xaxis2={"title": {"text": f"capture time — each point averages {width} (bin width {bin_s} s)"}})
    return fig


def history_alerts_table(alerts: pd.DataFrame, tz: tzinfo | None = None) -> pd.DataFrame:
    """Stored alerts (store.alerts rows, newest first) as the page's alert table, without the live-only columns."""
    cols = ["last seen", "severity", "detector", "source", "target", "count", "evidence"]
    if alerts.empty:
        return pd.DataFrame(columns=cols)
    return pd.DataFrame({
        "last seen": _times(alerts["last_ts"].to_numpy(dtype=np.float64), tz),
        "severity": alerts["severity"].to_numpy(), "detector": alerts["detector"].to_numpy(),
        "source": alerts["source"].to_numpy(), "target": alerts["target"].to_numpy(),
        "count": alerts["count"].to_numpy(), "evidence": alerts["evidence"].to_numpy(),
    })


# ----------------------------------------------------------------------------------------
# Enrichment (issue 14): who is on the other end. Names come from strangers' DNS: Plotly text is escaped.
# ----------------------------------------------------------------------------------------

def who_bar(rows: list[dict[str, Any]], title: str, by: str = "packets") -> go.Figure:
    """Top addresses as bars whose tooltip gives host name, country and AS (rows carry those keys)."""
    if not rows:
        return _empty(title, title)
    rows = rows[::-1]
    hover = [chart_text(f"{r['addr']} {r.get('name') or ''}".strip()) + "<br>"
             + chart_text(f"country: {r.get('country') or '?'} · AS: {r.get('as_org') or '?'}")
             + f"<br>{r[by]:,} {by}" for r in rows]
    bar = {"type": "bar", "x": [r[by] for r in rows], "y": [chart_text(r["addr"]) for r in rows],
           "orientation": "h", "marker": {"color": "#2ca02c"}, "customdata": hover,
           "hovertemplate": "%{customdata}<extra></extra>"}
    return _figure([bar], title, title, yaxis={"type": "category"})


def share_bar(rows: list[dict[str, Any]], title: str, by: str = "packets", n: int = 15) -> go.Figure:
    """Bars of {key, packets, bytes, addresses} rows (countries, networks), largest first."""
    rows = sorted(rows, key=lambda r: -r[by])[:n][::-1]
    if not rows:
        return _empty(title, title)
    bar = {"type": "bar", "x": [r[by] for r in rows], "y": [chart_text(str(r["key"])) for r in rows],
           "orientation": "h", "marker": {"color": "#9467bd"},
           "customdata": [f"{r['addresses']:,} addresses" for r in rows],
           "hovertemplate": "%{y}: %{x:,} " + by + " (%{customdata})<extra></extra>"}
    return _figure([bar], title, title, yaxis={"type": "category"})


def process_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Per-process local traffic as a table."""
    cols = ["process", "pid", "packets", "bytes", "connections"]
    frame = pd.DataFrame(rows, columns=cols)
    frame["pid"] = frame["pid"].astype("Int64")
    return frame


def matching_timeline(series: pd.DataFrame, bin_s: int, tz: tzinfo | None = None) -> go.Figure:
    """The timeline of a stored range's traffic that matches filters: per-bin sums (bin start `t`, packets,
    bytes) drawn as average packets/s and bit/s per bin, the bin width named on the time axis."""
    title = "Matching traffic by capture time"
    if series.empty:
        return _empty(title, "timeline")
    when = pd.to_datetime(series["t"].to_numpy(dtype=np.int64), unit="s", utc=True)
    x = (when.tz_convert(tz) if tz is not None else when).tz_localize(None).to_numpy()
    style = {"type": "scatter", "mode": "lines", "x": x, "name": "matching", "line": {"width": 1, "color": "#d62728"}}
    data = [{**style, "y": series["packets"].to_numpy(dtype=np.float64) / bin_s, "fill": "tozeroy",
             "xaxis": "x", "yaxis": "y"},
            {**style, "y": series["bytes"].to_numpy(dtype=np.float64) * 8 / bin_s, "fill": "tozeroy",
             "xaxis": "x2", "yaxis": "y2", "showlegend": False}]
    width = f"{bin_s} s" if bin_s < 60 else (f"{bin_s // 60} min" if bin_s < 3600 else f"{bin_s / 3600:g} h")
    return _figure(data, title, "timeline", hovermode="x unified", height=420,
                   xaxis={"anchor": "y", "matches": "x2", "showticklabels": False},
                   xaxis2={"anchor": "y2", "title": {"text": f"capture time — each point averages {width} "
                                                              f"(bin width {bin_s} s)"}},
                   yaxis={"domain": [0.55, 1.0], "title": {"text": "packets/s"}},
                   yaxis2={"domain": [0.0, 0.45], "title": {"text": "bit/s"}})
