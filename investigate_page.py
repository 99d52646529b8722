"""The Streamlit side of investigating (issue 15): filter chips, brushing and clicking, the URL, the notes.

Each viewer's filters live in its own URL query string (st.query_params is per session), so a link
reproduces the view; the capture stays shared. The numbers come from investigate.filters.view.
"""

from __future__ import annotations

import collections
import functools
import html
import logging
import threading
import time
import urllib.parse
from datetime import tzinfo
from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

import config
import visualizations as viz
from investigate import filters as flt

log = logging.getLogger(__name__)
PROTO_BY_LABEL = dict(zip(viz.PROTOCOLS, viz.CLASS_KEYS))
EXPLAIN_KEY = "explain"  # ?explain=1: the explanation of the from/to span is open (a spike alert's link)
LABELS_KEY = "_inv_labels"  # chart key -> the label lists of its traces, for mapping a clicked point back


def spec() -> flt.Spec:
    """This viewer's filters, from its URL."""
    return flt.from_query(st.query_params)


def set_spec(new: flt.Spec) -> None:
    """Write the filters to this viewer's URL (other query keys stay)."""
    qp = st.query_params
    for key in flt.KEYS:
        if key in qp:
            del qp[key]
    for key, values in flt.to_query(new).items():
        qp[key] = values if len(values) > 1 else values[0]


# dashboard.plain's rule (dashboard.py runs the page when imported): escaped punctuation is never markup.
_MARKDOWN = str.maketrans({**{c: "\\" + c for c in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"}, "\n": " ", "\r": " "})


def plain(text: str) -> str:
    """Text shown as itself in Markdown (values come from the URL, which anyone can write)."""
    return text.translate(_MARKDOWN)


def live_filter(snap, tz: tzinfo | None):
    """Chips, messages and the filtered Snapshot (the snapshot itself when no filter is set)."""
    conds, errors = flt.parse(spec(), tz)
    chips(tz)
    show_errors(errors)
    if any(c.key == "sensor" for c in conds):
        st.info("sensor= selects a sensor in the fleet views; this page shows one capture, so it is not applied here.")
    conds = [c for c in conds if c.key != "sensor"]
    if not conds:
        return snap
    geo_state(conds)
    view = flt.view(snap, conds, config.get("TOP_TABLE_MAX"), config.get("BIN_SECONDS"))
    st.caption(plain(coverage_text(view.totals["filter"], tz)))
    for note in view.totals["filter"].get("notes") or []:
        st.warning(plain(note))
    return view


def geo_state(conds: list) -> None:
    """A country/AS filter while its databases still load matches only range labels (private, loopback):
    said, so that a short count is not taken for the truth."""
    if not any(c.key in flt.GEO_KEYS for c in conds):
        return
    try:
        import enrich

        geo = enrich.shared().geo
    except Exception as exc:  # the filter then matches nothing; the reason is shown
        st.error(plain(f"country/asn filters cannot be applied: the enrichment is unavailable ({exc})."))
        return
    if geo.error or geo.asn.error:
        st.warning(plain(f"country/asn filters: {geo.error or geo.asn.error}; addresses without an answer count "
                         "as 'not in database'."))
    elif not (geo.source and geo.asn.ready):
        st.info("The country and AS databases are still loading: until they are, country/asn filters match only "
                "private, loopback and other range labels, and public addresses count as 'not in database'.")


def show_errors(errors: list[str]) -> None:
    """Each filter that does not apply, and a typed key that is not a filter key, said in red."""
    if msg := st.session_state.pop("_filter_unknown", None):
        st.error(plain(msg))
    for msg in errors:
        st.error(f"Filter ignored: {plain(msg)}")


def rate_span(f: dict[str, Any] | None, end: float | None) -> tuple[float, float] | None:
    """The span a time-filtered view's rates average over: from (or the buffer's start) to to (or the
    capture's end); None without a time filter (the rates then cover the last RATE_WINDOW_S s)."""
    if not f or (f.get("from") is None and f.get("to") is None):
        return None
    lo = f["from"] if f.get("from") is not None else f.get("since")
    if f.get("since") is not None and f.get("from") is not None:
        lo = max(lo, f["since"])  # the buffer holds nothing before its first packet
    hi = f["to"] if f.get("to") is not None else end
    if end is not None and hi is not None and f.get("to") is not None:
        hi = min(hi, end + 1)  # nothing after the capture's last (whole) second
    if lo is None or hi is None:
        return None
    return float(lo), float(hi)


def view_end(snap, end: float | None, window: int) -> float | None:
    """The end of the timeline's window: the capture's, unless a time filter's span ends before that window
    (then the span's last second). A span inside the window leaves it still, so a brush does not move it."""
    f = snap.totals.get("filter") or {}
    if f.get("to") is None or end is None:
        return end
    last = float(-(-f["to"] // 1)) - 1
    return last if last <= end - window else end


def coverage_text(f: dict[str, Any], tz: tzinfo | None) -> str:
    """What the filtered numbers cover: exact over the whole capture, or over the last N buffered packets."""
    matched = f"{f['matched']:,} packets match the filters"
    if f["whole"]:
        return f"{matched}: exact, over the whole capture ({f['buffered']:,} packets, all in the buffer)."
    since = viz.time_texts([f["since"]], tz)[0] if f["since"] is not None else "—"
    return (f"{matched} over the last {f['buffered']:,} buffered packets, since {since} — approximate for the "
            f"whole capture ({f['total']:,} packets; the buffer holds BUFFER_SIZE packets).")


def chips(tz: tzinfo | None) -> None:
    """The filters as removable chips, a box to add one by hand, and Clear."""
    current = spec()
    with st.container(key="filter_chips"):
        cols = st.columns([3, 1]) if current else [st.container()]
        with cols[0]:
            st.text_input("Add a filter", key="filter_add", placeholder="host=10.0.0.1, port=443, proto=udp, "
                          "from=2024-05-01T14:02:00", on_change=_add_typed, args=(tz,),
                          help="Keys: " + ", ".join(flt.KEYS) + ". Several filters combine with AND; the URL "
                               "holds them, so a link reproduces this view.")
        if not current:
            return
        cols[1].button("Clear filters", key="filter_clear", on_click=set_spec, args=((),))
        row = st.columns(min(len(current), 6))
        for i, pair in enumerate(current):
            row[i % len(row)].button(plain(f"✕ {chip_text(pair, tz)}"),  # URL text: never markup
                                     key=f"chip_{i}_{pair[0]}",
                                     on_click=_remove, args=(pair,), help="Remove this filter")


def chip_text(pair: tuple[str, str], tz: tzinfo | None) -> str:
    """A chip's label; times also in the page's zone."""
    key, text = pair
    if key in ("from", "to"):
        try:
            return f"{key} {viz.time_texts([flt.parse_time(text, tz)], tz)[0]}"
        except flt.FilterError:
            pass
    return f"{key} = {text}"


def _remove(pair: tuple[str, str]) -> None:
    set_spec(flt.without(spec(), pair))


def _add_typed(tz: tzinfo | None) -> None:
    text = st.session_state.get("filter_add", "").strip()
    st.session_state["filter_add"] = ""
    new = spec()
    unknown = []
    for part in (p.strip() for p in text.replace(",", " ").split()):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if sep and key not in flt.KEYS:
            unknown.append(part)  # 'prot=udp': said, not silently dropped
        elif sep:
            new = flt.with_filter(new, key, value.strip(), replace=False)
        else:
            new = flt.with_filter(new, "host", part, replace=False)
    if unknown:
        st.session_state["_filter_unknown"] = (f"Not added: {', '.join(unknown)} — unknown filter key "
                                               f"(known: {', '.join(flt.KEYS)}).")
    set_spec(new)


# -- brushing and clicking ------------------------------------------------------------------------


def selectable(key: str, fig, tz: tzinfo | None) -> dict[str, Any]:
    """st.plotly_chart keyword arguments that turn a selection on chart `key` into filters."""
    if key == "pie":  # a sunburst's click comes as one point with its label
        return {"on_select": functools.partial(_on_select, key, tz), "selection_mode": ("points",)}
    if key == "timeline":
        # A drag selects a time span (whole height) instead of zooming; double-click still resets.
        fig.layout.dragmode, fig.layout.selectdirection = "select", "h"
        return {"on_select": functools.partial(_on_select, key, tz), "selection_mode": ("box",)}
    st.session_state.setdefault(LABELS_KEY, {})[key] = [trace_labels(t) for t in fig.data]
    return {"on_select": functools.partial(_on_select, key, tz), "selection_mode": ("points",)}


def trace_labels(trace) -> list:
    """A trace's category labels: a pie's labels, a horizontal bar's y."""
    labels = getattr(trace, "labels", None)
    if labels is None:
        labels = getattr(trace, "y", None)
    return [] if labels is None else list(labels)


def selection_filters(key: str, selection: dict[str, Any], labels: list[list], tz: tzinfo | None) -> list:
    """The (key, text) filters a chart selection means: a timeline box is a time span; a point is a value."""
    if key == "timeline":
        for box in selection.get("box") or []:
            xs = [local_epoch(x, tz) for x in box.get("x") or []]
            if len(xs) >= 2:
                return [("from", f"{min(xs):.6f}".rstrip("0").rstrip(".")),
                        ("to", f"{max(xs):.6f}".rstrip("0").rstrip("."))]
        return []
    out = []
    for p in selection.get("points") or []:
        if key == "pie" and p.get("label"):
            out.extend(label_filters(key, html.unescape(str(p["label"]))))
            continue
        curve, idx = int(p.get("curve_number", 0) or 0), p.get("point_index", p.get("point_number"))
        try:
            label = html.unescape(str(labels[curve][int(idx)]))
        except (IndexError, TypeError, ValueError):
            continue
        out.extend(label_filters(key, label))
    return out


def label_filters(key: str, label: str) -> list[tuple[str, str]]:
    """The filters a clicked label stands for, per chart."""
    if key in ("pie",):
        return [("proto", PROTO_BY_LABEL[label])] if label in PROTO_BY_LABEL else []
    if key in ("top_src", "who_src"):
        return [("src", label)]
    if key in ("top_dst", "who_dst"):
        return [("dst", label)]
    if key == "ports":  # 'tcp/443 https'
        proto, _, rest = label.partition("/")
        return [("proto", proto), ("port", rest.split()[0])] if rest else []
    if key == "vlans":  # 'VLAN 10'
        return [("vlan", label.split()[-1])]
    if key == "who_countries":  # 'US', 'private', 'not in database'
        return [("country", label)]
    if key == "who_networks":  # 'AS15169 Google LLC' -> asn=15169; 'private', an organisation: the label
        first = label.split(" ", 1)[0]
        return [("asn", first[2:] if first[:2] == "AS" and first[2:].isdigit() else label)]
    return []


def local_epoch(x: Any, tz: tzinfo | None) -> float:
    """A timeline x value (naive wall-clock time of the page's zone, as Plotly sends it) as epoch seconds."""
    t = pd.Timestamp(x)
    if t.tzinfo is None:
        t = t.tz_localize(tz if tz is not None else "UTC", ambiguous=True, nonexistent="shift_forward")
    return t.timestamp()


def _on_select(key: str, tz: tzinfo | None) -> None:
    state = st.session_state.get(key)
    selection = (state or {}).get("selection") or {}
    new = selection_filters(key, selection, st.session_state.get(LABELS_KEY, {}).get(key, []), tz)
    apply(new)


def apply(new: list[tuple[str, str]]) -> None:
    """Add filters from a selection: a key set again replaces its value, except host and port from a row."""
    current = spec()
    for k, text in new:
        current = flt.with_filter(current, k, text, replace=True)
    set_spec(current)


def conversation_select(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """st.dataframe keyword arguments that turn a clicked conversation row into its filters."""
    st.session_state["_inv_conversations"] = [
        {k: r[k] for k in ("a", "b", "a_port", "b_port", "proto")} for r in rows]
    return {"on_select": _on_conversation, "selection_mode": "single-row"}


def conversation_filters(row: dict[str, Any]) -> list[tuple[str, str]]:
    """A conversation's filters: both ends, both ports, its protocol (combined with AND)."""
    out = [("host", row["a"]), ("host", row["b"])] if row["a"] != row["b"] else [("host", row["a"])]
    ports = {p for p in (row["a_port"], row["b_port"]) if p is not None}
    out += [("port", str(p)) for p in sorted(ports)]
    proto = str(row["proto"]).lower()
    if proto in flt.CLASSES:
        out.append(("proto", proto))
    return out


def _on_conversation() -> None:
    picked = ((st.session_state.get("conversations") or {}).get("selection") or {}).get("rows") or []
    rows = st.session_state.get("_inv_conversations") or []
    if not picked or picked[0] >= len(rows):
        return
    keep = tuple(p for p in spec() if p[0] not in ("host", "port", "proto", "src", "dst"))
    set_spec(keep + tuple(conversation_filters(rows[picked[0]])))


# -- capture health ---------------------------------------------------------------------------------


def health_panel(snap, wall: float) -> None:
    """Red the moment the page's numbers stop being trustworthy; the readings behind the verdict."""
    from investigate import health

    before = st.session_state.get("_health_prev")
    live = snap.status.source.startswith("interface")
    h = health.assess(snap, wall, before, live)
    if not st.session_state.get("paused"):  # a paused view keeps its moment; rates restart after it
        st.session_state["_health_prev"] = health.sample(snap, wall)
    if h.red:
        st.error("Capture health: the numbers on this page are not trustworthy — "
                 + plain("; ".join(h.reasons)) + ".", icon="🔴")
    title = "Capture health: NOT TRUSTWORTHY" if h.red else "Capture health: OK"
    with st.expander(title, expanded=False, key="inv_health"):
        for name, value in h.readings.items():
            st.markdown(f"**{plain(name)}**: {plain(value)}")
        for note in h.notes:
            st.caption(plain(note))


# -- explain a change, explain an alert ----------------------------------------------------------


def alert_filters(alert, rows=None) -> list[tuple[str, str]]:
    """The filters that show an alert's evidence: its addresses (when they are addresses), its protocol and
    port where it names them, and its span. `rows` (the buffer) settles a vertical scan's protocol."""
    out = []
    for key, text in flt.alert_ends(alert):
        try:
            flt.parse_one(key, str(text))
        except flt.FilterError:
            continue  # 'all traffic', a MAC, 'packets/s': not an address
        out.append((key, str(text)))
    protos, port = flt.alert_traffic(alert)
    if protos is not None and len(protos) > 1 and rows is not None and alert.detector == "port_scan":
        protos = (flt.scan_proto(scan_rows(rows, alert), alert),)
    if port is not None:
        out.append(("port", str(port)))
    if protos is not None and len(protos) == 1:
        out.append(("proto", protos[0]))
    # Detectors stamp whole seconds (a spike's second) or a packet's time: the span ends after the last
    # raise's second and starts at the first evidence packet (the buffer's), else at the first raise's second.
    # A packet's time as the float it is (repr round-trips), so that the packet itself is inside the span.
    # A detector that counts whole seconds (a spike, a flood) has the second as its evidence: kept whole.
    start = repr(evidence_start(alert, rows, out)) if rows is not None and alert.detector not in SECOND_STAMPED \
        else _num(float(int(alert.first_ts)))
    return [*out, ("from", start), ("to", _num(float(int(alert.last_ts)) + 1.0))]


def scan_rows(rows, alert) -> np.ndarray:
    """The packets a scan's protocol is settled over (its whole seconds): of a Window, that span's slice."""
    return rows.span(float(int(alert.first_ts)), float(int(alert.last_ts)) + 1) if isinstance(rows, Window) else rows


ACK = 0x10
SECOND_STAMPED = ("spike", "syn_flood", "icmp_flood", "udp_flood", "reflection")  # raised for a whole second


def evidence_start(alert, rows, pairs: list[tuple[str, str]]) -> float:
    """The capture time of a packet-stamped alert's first evidence packet in the buffer: of its traffic
    (`pairs`: its addresses, protocol, port), the earliest in the second of its first raise, or for a port scan, whose
    attempts are counted over a SCAN_WINDOW_S epoch before it is raised, the earliest probe (a packet with
    no ACK: a SYN, a NULL/FIN/Xmas probe, a UDP datagram) in the window before the raise. Falls back to
    the first raise's whole second when the buffer no longer holds them. `rows`: the buffer or its Window."""
    key = (alert.detector, alert.source, alert.target, alert.first_ts, tuple(pairs))
    with _STARTS_LOCK:  # every session's thread shares the cache
        hit = _STARTS.get(key)
    if hit is not None:
        return hit
    # A past span's packets do not change: one search per alert, kept.
    start = _evidence_start(alert, rows if isinstance(rows, Window) else Window(rows), pairs)
    with _STARTS_LOCK:
        if len(_STARTS) >= _STARTS_MAX:
            _STARTS.clear()
            _SEEN.clear()
        _STARTS[key] = start
        _SEEN.add(key[:4])
    return start  # the value found, not the dict's: another thread may have emptied it since


_STARTS: dict[tuple, float] = {}
_SEEN: set[tuple] = set()  # the alerts of _STARTS
_STARTS_MAX = 4096
_STARTS_LOCK = threading.Lock()


def known(alert) -> bool:
    """Whether an alert's evidence start was found before (its link then costs no pass over the buffer)."""
    with _STARTS_LOCK:
        return (alert.detector, alert.source, alert.target, alert.first_ts) in _SEEN


class Window:
    """The buffer's packets in capture-time order, for many short time-span searches in one rerun: a span is
    two binary searches and a slice, not a pass over the buffer. The buffer is in arrival order, which is
    time order for a live capture; a file's packets can be out of order, and are then sorted once, within
    lo..hi (the spans the rerun will search). `scanned` counts the rows the searches have read."""

    def __init__(self, rows: np.ndarray, lo: float = -np.inf, hi: float = np.inf) -> None:
        ts = rows["ts"]
        if len(ts) > 1 and not (ts[1:] >= ts[:-1]).all():
            rows = rows[(ts >= lo) & (ts <= hi)]
            rows = rows.take(np.argsort(rows["ts"], kind="stable"))
        # Contiguous once: searchsorted would copy a structured array's strided field at every call.
        self.rows, self.ts, self.scanned = rows, np.ascontiguousarray(rows["ts"]), 0

    def span(self, lo: float, hi: float, closed: bool = False) -> np.ndarray:
        """The packets with lo <= ts < hi (ts <= hi when `closed`)."""
        i = int(np.searchsorted(self.ts, lo, side="left"))
        j = int(np.searchsorted(self.ts, hi, side="right" if closed else "left"))
        self.scanned += max(j - i, 0)
        return self.rows[i:j]


def _evidence_start(alert, win: Window, pairs: list[tuple[str, str]]) -> float:
    second = float(int(alert.first_ts))
    conds, _ = flt.parse(pairs)
    if alert.detector == "port_scan":
        rows = win.span(alert.first_ts - float(config.get("SCAN_WINDOW_S")), alert.first_ts, closed=True)
        mine = rows[flt.mask(rows, conds)]
        mine = mine[(mine["cls"] != flt.CLASSES.index("tcp")) | ((mine["tcp_flags"] & ACK) == 0)]
    else:
        rows = win.span(second, second + 1)
        mine = rows[flt.mask(rows, conds)]
    return float(mine["ts"].min()) if len(mine) else second


def evidence_rows(snap, evidence: list[tuple[str, str]], tz: tzinfo | None):
    """The buffered packets an alert's evidence filters keep: what its export holds, row for row."""
    conds, _ = flt.parse(evidence, tz)
    return snap.packets[flt.mask(snap.packets, conds)]


def alert_link(alert, rows=None) -> str:
    """The relative URL of this page filtered to an alert's evidence; a spike's opens its explanation first."""
    pairs = alert_filters(alert, rows) + ([(EXPLAIN_KEY, "1")] if alert.detector == "spike" else [])
    return "?" + urllib.parse.urlencode(pairs)


def _num(x: float) -> str:
    return f"{x:.6f}".rstrip("0").rstrip(".")


def _alert_name(a) -> str:
    return f"{a.detector} · {a.source} → {a.target} · {viz.time_texts([a.last_ts])[0]} UTC"


def alert_tools(snap, tz: tzinfo | None, alerts=None) -> None:
    """Pick an alert (of `alerts`, those the filters keep): a link to the filtered view of its evidence, its
    rows as CSV or pcap, and for a spike, what explains it. `snap` is the whole, unfiltered snapshot: the
    evidence is the alert's rows, whatever this viewer's filters are."""
    from packet_processor import packets_csv
    from store.export import header_pcap

    alerts = snap.alerts if alerts is None else alerts
    if not alerts:
        return
    st.subheader("Investigate an alert")
    names = [_alert_name(a) for a in alerts]
    pick = st.selectbox("Alert", range(len(names)), format_func=lambda i: names[i], key="inv_alert")
    alert = alerts[min(pick or 0, len(alerts) - 1)]
    evidence = alert_filters(alert, snap.packets)
    rows = evidence_rows(snap, evidence, tz)
    link = alert_link(alert, snap.packets)
    st.markdown(f"Evidence: [{plain(', '.join(f'{k}={v}' for k, v in evidence))}]({link}) — "
                f"{len(rows):,} buffered packets.")
    a, b, c = st.columns(3)
    a.button("Show its evidence on this page", key="inv_alert_show", on_click=show_evidence,
             args=(tuple(evidence), alert.detector == "spike"))
    b.download_button("Its packets (CSV)", data=lambda: packets_csv(rows, tz), file_name=f"{alert.detector}.csv",
                      mime="text/csv", key="inv_alert_csv", on_click="ignore")
    c.download_button("Its packets' headers (pcap)", data=lambda: header_pcap(rows), on_click="ignore",
                      file_name=f"{alert.detector}.pcap", mime="application/vnd.tcpdump.pcap", key="inv_alert_pcap")
    if alert.detector == "spike":
        explain_block(snap, alert.first_ts // 1, alert.last_ts // 1 + 1, "alert")


def show_evidence(evidence: flt.Spec, explain: bool) -> None:
    """The page filtered to an alert's evidence (a spike's: with its explanation open)."""
    set_spec(evidence)
    if explain:
        st.query_params[EXPLAIN_KEY] = "1"


def explain_panel(snap, tz: tzinfo | None) -> None:
    """Explain the span selected on the timeline (from/to), within the other filters."""
    conds, _ = flt.parse(spec(), tz)
    lows = [c.value for c in conds if c.key == "from"]
    highs = [c.value for c in conds if c.key == "to"]
    st.subheader("Explain a change")
    if not (lows and highs):
        st.caption("Drag across the timeline to select a span (or pick a spike alert above): the page then ranks "
                   "hosts, networks, ports, protocols and directions by their share of the change against the "
                   "window just before it.")
        return
    others = [c for c in conds if c.key not in ("from", "to", "sensor")]
    rows = snap.packets[flt.mask(snap.packets, others)] if others else snap.packets
    # A spike alert's link (explain=1) opens the explanation of its seconds at once.
    explain_block(rows, max(lows), min(highs), "span", opened=st.query_params.get(EXPLAIN_KEY) == "1")


def as_lookup():
    """An address's AS organisation from the enrichment's offline database, or None when it is not loaded."""
    try:
        import enrich

        geo = enrich.shared().geo
    except Exception:  # enrichment unavailable: the explainer goes without AS
        log.debug("no enrichment for the explainer", exc_info=True)
        return None
    if not geo.source:
        return None

    def of(addr: str) -> str | None:
        g = geo.lookup(addr)
        return g.as_org if g else None
    return of


def explain_block(source, start: float, end: float, key: str, opened: bool = False) -> None:
    """The explanation of [start, end) over a snapshot's or an array's packets, when asked for."""
    from investigate import explain as ex_mod

    rows = source.packets if hasattr(source, "packets") else source
    measure = st.radio("Measure", ["packets/s", "bit/s"], horizontal=True, key=f"explain_measure_{key}")
    if not st.toggle(f"Explain {'this spike' if key == 'alert' else 'the selected span'}", value=opened,
                     key=f"explain_{key}"):
        return
    try:
        ex = ex_mod.explain(rows, float(start), float(end), measure, as_lookup())
    except ValueError as exc:
        st.error(plain(str(exc)))
        return
    st.success(plain(ex.headline))
    if ex.baseline_s < end - start:
        st.caption(plain(f"The buffer holds only {ex.baseline_s:,.1f} s before the span (of {end - start:,.1f} s): "
                         "the baseline is shorter, so the shares are approximate."))
    st.dataframe(pd.DataFrame(ex_mod.leaders(ex)), hide_index=True, key=f"explain_leaders_{key}")
    dim = st.selectbox("Detail by", list(ex.dims), key=f"explain_dim_{key}")
    detail = [{"key": r.key, "share of the change %": round(100 * r.share, 1),
               f"before ({measure})": round(r.before, 1), f"during ({measure})": round(r.during, 1)}
              for r in ex.dims[dim][:20]]
    st.dataframe(pd.DataFrame(detail), hide_index=True, key=f"explain_detail_{key}")


# -- history ------------------------------------------------------------------------------------------


def history_span(since: int, until: int, tz: tzinfo | None) -> tuple[int, int]:
    """The stored range narrowed by the URL's from/to; what the history cannot filter is said, not hidden."""
    conds, errors = flt.parse(spec(), tz)
    chips(tz)
    show_errors(errors)
    lows = [c.value for c in conds if c.key == "from"]
    highs = [c.value for c in conds if c.key == "to"]
    # Stored ranges are whole seconds, both ends included: from rounds down, to (exclusive) up.
    lo = max([since, *[int(v // 1) for v in lows]])
    hi = min([until, *[int(-(-v // 1)) - 1 for v in highs]])
    if lows or highs:
        st.caption(f"from/to narrow the stored range to {viz.time_texts([lo], tz)[0]} – {viz.time_texts([hi], tz)[0]} "
                   "(whole seconds).")
    if hi < lo:
        st.error("from/to lie outside the chosen time range: showing the whole range.")
        return since, until
    return lo, hi


# -- threshold back-test, baselines ------------------------------------------------------------------


def backtest_panel(snap, tz: tzinfo | None, engine=None) -> None:
    """Try other thresholds of a detector over the buffered packets before applying one, with the running
    detectors' other settings (the page's thresholds and switches, not only the config's)."""
    from investigate import backtest as bt

    st.subheader("Threshold back-test")
    overrides, disabled = bt.running(engine)
    setting = st.selectbox("Threshold", list(bt.DETECTOR_OF), key="bt_setting",
                           format_func=lambda s: f"{s} ({bt.DETECTOR_OF[s]}, now {overrides.get(s, config.get(s))})")
    if bt.DETECTOR_OF[setting] in disabled:
        st.caption(plain(f"{bt.DETECTOR_OF[setting]} is switched off now: the back-test shows what it would raise "
                         "if switched on."))
    over = backtest_over(engine, setting)
    default = ", ".join(f"{v:g}" for v in bt.candidates(setting, now=overrides.get(setting)))
    text = st.text_input("Values to try", value=default, key=f"bt_values_{setting}",
                         help="Comma-separated; each runs fresh detectors over the buffered packets in capture order "
                              "(or the spike detector over the stored seconds).")
    job = st.session_state.get("bt_job")
    if st.button("Run the back-test", key="bt_run", disabled=(job is not None and job.running) or over is False):
        try:
            values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
            if over and setting in bt.SCAN_SETTINGS:  # a stored range: a scan bounded by its conversations
                since, until = over
                rows, runner = bt.stored_scan_rows(engine.store, since, until), bt.scan_bound
                cover = scan_cover(since, until, rows, tz)
            elif over and setting in bt.FLOOD_CLASSES:  # a stored range: a flood bounded by its per-second classes
                since, until = over
                rows, runner = bt.stored_class_seconds(engine.store, since, until, setting), bt.flood_bound
                classes = " and ".join(bt.FLOOD_CLASSES[setting])
                cover = (f"the stored seconds from {viz.time_texts([since], tz)[0]} to {viz.time_texts([until], tz)[0]}"
                         f" ({len(rows[0]):,} seconds with traffic, {int(rows[1].sum()):,} {classes} packets). "
                         f"Upper bounds: the store keeps each second's {classes} packets, not per destination, so a "
                         f"flood could only have been raised in the seconds listed (exactly those when one destination "
                         f"receives that traffic), for at most 'alerts' destinations; {bt.FLOOD_CAVEATS}.")
            elif over:  # a stored range: the spike detector over its seconds
                since, until = over
                rows, runner = bt.stored_seconds(engine.store, since, until), bt.run_seconds
                cover = (f"the stored seconds from {viz.time_texts([since], tz)[0]} to {viz.time_texts([until], tz)[0]}"
                         f" ({len(rows[0]):,} seconds with traffic, {int(rows[1].sum()):,} packets).")
            else:
                rows, runner = snap.packets, bt.run
                cover = "the buffered packets: " + coverage_text({**flt.coverage(snap), "matched": len(rows)}, tz)
            st.session_state["bt_job"] = job = bt.Job(rows, setting, values, overrides, disabled, runner)
            st.session_state["bt_cover"] = cover
        except ValueError as exc:
            st.session_state["bt_result"] = (setting, None, f"Back-test not run: {exc}")
    if job is not None and job.running:
        # The page's refresh redraws this line; the script never waits for the thread.
        st.info(plain(f"Back-test of {job.setting} running in the background: {job.tried} of "
                      f"{len(job.values)} values tried."))
    elif job is not None:
        st.session_state.pop("bt_job")
        st.session_state["bt_result"] = (job.setting, None, f"Back-test failed: {job.error}") if job.error else (
            job.setting, trials_frame(job.trials or [], tz), st.session_state.get("bt_cover", ""))
    result = st.session_state.get("bt_result")
    if result and result[0] == setting:
        if result[1] is None:
            st.error(plain(result[2]))
        else:
            st.dataframe(result[1], hide_index=True, key="bt_table")
            st.caption(plain("Over " + result[2]))


BUFFERED = "the buffered packets"
BT_RANGES = {"the stored last 1 h": 3600, "the stored last 6 h": 6 * 3600, "the stored last 24 h": 86_400,
             "the stored last 7 days": 7 * 86_400}


def backtest_over(engine, setting: str) -> tuple[int, int] | bool | None:
    """Where the back-test runs: None for the buffered packets, (since, until) for a stored range, False
    when a stored range is asked for a threshold the store cannot back-test (the page says why)."""
    from investigate import backtest as bt

    if getattr(engine, "store", None) is None:
        st.caption("Over the buffered packets (the history store is off: HISTORY).")
        return None
    pick = st.radio("Over", [BUFFERED, *BT_RANGES], horizontal=True,
                    key="bt_over", help="A stored range: the spike thresholds, and bounds for the floods (see below).")
    st.caption(plain("A stored range: the store keeps each second's packets and bytes, so the spike detector's "
                     f"thresholds ({', '.join(bt.HISTORY_SETTINGS)}) are tried over exactly what it would have seen; "
                     "it keeps each second's packets per protocol, not per destination, so the flood thresholds "
                     f"({', '.join(bt.FLOOD_CLASSES)}) get upper bounds, and the port scan thresholds "
                     f"({', '.join(bt.SCAN_SETTINGS)}) upper bounds from the stored conversations. "
                     "The others need the packets, which the store does not keep: "
                     + "; ".join(f"{d} needs {why}" for d, why in bt.NOT_FROM_HISTORY.items()
                                 if d not in bt.BOUNDED) + "."))
    if pick == BUFFERED:
        return None
    if setting not in (*bt.HISTORY_SETTINGS, *bt.FLOOD_CLASSES, *bt.SCAN_SETTINGS):
        st.warning(plain(f"{setting} cannot be back-tested over a stored range: {bt.DETECTOR_OF[setting]} needs "
                         f"{bt.NOT_FROM_HISTORY[bt.DETECTOR_OF[setting]]}, which the store does not keep. Back-test "
                         "it over the buffered packets."))
        return False
    until = int(time.time())
    return until - BT_RANGES[pick] + 1, until


def trials_frame(trials: list, tz: tzinfo | None) -> pd.DataFrame:
    """One row per value tried: alerts (distinct), times raised, and when the first ones came."""
    rows = []
    for t in trials:
        if hasattr(t, "keys"):  # a scan's bound over a stored range (backtest.ScanBound)
            firsts = t.seconds.tolist()
            rows.append({"value": t.value, "alerts": f"≤ {t.most:,}" if t.exact_rows else f"≈ {t.most:,} (not a bound)",
                         "times raised": "not bounded", "seconds that could raise": "",
                         "keys that could raise": ", ".join(t.keys[:5]),
                         "first at": viz.time_texts(firsts[:1], tz)[0] if firsts else "",
                         "when (first 5)": ", ".join(viz.time_texts(firsts[:5], tz))})
            continue
        if hasattr(t, "most"):  # a flood's bound over a stored range (backtest.Bound)
            firsts = t.seconds.tolist()
            rows.append({"value": t.value, "alerts": f"≤ {t.most:,}", "times raised": "not bounded",
                         "seconds that could raise": len(firsts),
                         "first at": viz.time_texts(firsts[:1], tz)[0] if firsts else "",
                         "when (first 5)": ", ".join(viz.time_texts(firsts[:5], tz))})
            continue
        firsts = [a.first_ts for a in t.alerts]
        rows.append({"value": t.value, "alerts": t.rows, "times raised": t.raised,
                     "first at": viz.time_texts(firsts[:1], tz)[0] if firsts else "",
                     "when (first 5)": ", ".join(viz.time_texts(firsts[:5], tz))})
    cols = ["value", "alerts", "times raised", "first at", "when (first 5)"]
    if any(hasattr(t, "most") for t in trials):
        cols.insert(3, "seconds that could raise")
    if any(hasattr(t, "keys") for t in trials):
        cols.insert(4, "keys that could raise")
    return pd.DataFrame(rows, columns=cols)


def baseline_panel(engine, snap, tz: tzinfo | None) -> None:
    """Save the hosts, services and protocol mix seen so far under a name; list what is new since one."""
    from investigate import baseline as bl

    st.subheader("Baselines")
    store = getattr(engine, "store", None)
    if store is None or not hasattr(store, "put_doc"):
        st.caption("Baselines are kept in the history store, which is off (HISTORY): none can be saved.")
        return
    name_col, save_col = st.columns([3, 1])
    name = name_col.text_input("Baseline name", key="baseline_name", placeholder="e.g. monday-normal")
    if save_col.button("Save baseline", key="baseline_save"):
        _save_baseline(store, name, snap)
    if msg := st.session_state.pop("baseline_msg", None):
        (st.error if msg[0] else st.success)(plain(msg[1]))
    try:
        docs = {d["name"]: d for d in store.docs(bl.KIND)}
    except OSError as exc:
        st.error(plain(f"Baselines cannot be read: {exc}"))
        return
    if not docs:
        st.caption("No baseline saved yet.")
        return
    pick = st.selectbox("New since baseline", sorted(docs), key="baseline_pick")
    body = docs[pick]["body"]
    cache = st.session_state.setdefault("_baseline_diff", bl.DiffCache())
    st.caption(plain(f"Baseline {pick}: {body['packets']:,} packets up to "
                     f"{viz.time_texts([body['until_ts'] or 0], tz)[0]}"
                     + ("" if body.get("whole_capture") else " (the buffer's last packets, not the whole capture)")
                     + "."))
    if body.get("truncated"):
        st.warning(plain(f"This baseline kept only the {bl.MAX_KEYS:,} earliest hosts and services it saw: a "
                         "host or service not in it but seen before it was saved is marked 'not kept', not new."))
    if st.button("Compare with the buffer now", key="baseline_compare",
                 help="Lists what the buffered packets hold that the baseline does not (seconds at 1M packets)."):
        cache.compute(pick, body, snap)
    new, gen = cache.last(pick, body)
    if new is None:
        st.caption("Press 'Compare with the buffer now' to list what is new since this baseline.")
    else:
        baseline_tables(new, body, gen, bl.generation(snap), tz)
    st.button("Delete this baseline", key="baseline_delete", on_click=_delete_baseline, args=(store, pick))


def baseline_tables(new: dict[str, Any], body: dict[str, Any], gen: tuple, now: tuple, tz: tzinfo | None) -> None:
    """New hosts and services with first-seen times, and the protocol mix then and now."""
    st.caption(plain(f"Compared with the {gen[3]:,} buffered packets"
                     + ("." if gen == now else " of an earlier refresh: compare again for the buffer as it is now.")))
    until = body.get("until_ts") or 0.0

    def status(t: float) -> str:
        # A truncated baseline did not keep every key it saw: one seen before it was saved is not new.
        return "not kept in the baseline" if body.get("truncated") and t <= until else "new"
    a, b = st.columns(2)
    a.dataframe(pd.DataFrame({"new host": [h for h, _ in new["hosts"]],
                              "first seen": viz.time_texts([t for _, t in new["hosts"]], tz),
                              "since baseline": [status(t) for _, t in new["hosts"]]}),
                hide_index=True, key="baseline_hosts")
    b.dataframe(pd.DataFrame({"new service": [s for s, _ in new["services"]],
                              "first seen": viz.time_texts([t for _, t in new["services"]], tz),
                              "since baseline": [status(t) for _, t in new["services"]]}),
                hide_index=True, key="baseline_services")
    st.dataframe(pd.DataFrame(new["mix"]), hide_index=True, key="baseline_mix")


def _save_baseline(store, name: str, snap) -> None:
    from investigate import baseline as bl

    name = name.strip()
    if not name:
        st.session_state["baseline_msg"] = (True, "Give the baseline a name first.")
        return
    try:
        store.put_doc(bl.KIND, name, bl.make(snap.packets, flt.coverage(snap)["whole"]))
    except (OSError, ValueError) as exc:
        st.session_state["baseline_msg"] = (True, f"Baseline not saved: {exc}")
        return
    st.session_state["baseline_msg"] = (False, f"Baseline {name} saved ({len(snap.packets):,} packets).")


def _delete_baseline(store, name: str) -> None:
    from investigate import baseline as bl

    try:
        store.delete_doc(bl.KIND, name)
    except OSError as exc:
        st.session_state["baseline_msg"] = (True, f"Baseline not deleted: {exc}")


def tools(engine, snap, tz: tzinfo | None) -> None:
    """The back-test and the baselines, folded away until opened (they work over the whole buffer)."""
    with st.expander("Threshold back-test and baselines", key="inv_tools"):
        backtest_panel(snap, tz, engine)
        baseline_panel(engine, snap, tz)


IP_PROTO = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}


def conversation_mask(df: pd.DataFrame, conds: list) -> pd.Series:
    """Which stored conversation rows (both directions together) match host/src/dst/port/proto/vlan.

    A stored conversation does not keep which end sent which packet: src and dst select a conversation
    with that address at either end, as host does."""
    import ipaddress

    keep = pd.Series(True, index=df.index)
    for c in conds:
        if c.key in flt.ADDRESS_KEYS:
            net = ipaddress.ip_network(c.text.strip("[]"), strict=False)
            inside = {a: _in(a, net) for a in pd.unique(pd.concat([df["a"], df["b"]]))}
            keep &= df["a"].map(inside) | df["b"].map(inside)
        elif c.key == "port":
            keep &= (df["a_port"] == c.value) | (df["b_port"] == c.value)
        elif c.key == "proto":
            name = flt.CLASSES[c.value]
            keep &= (df["proto"] == IP_PROTO[name]) if name in IP_PROTO else (
                ~df["proto"].isin(list(IP_PROTO.values())) if name == "other_ip" else False)
        elif c.key == "vlan":
            keep &= df["vlan"] == c.value
        elif c.key in flt.GEO_KEYS:
            addrs = pd.unique(pd.concat([df["a"], df["b"]]))
            inside = dict(zip(addrs, flt.geo_match_texts(c, [str(a) for a in addrs])))
            keep &= df["a"].map(inside) | df["b"].map(inside)
    return keep.fillna(False).astype(bool)


def _in(addr: str, net) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(addr) in net
    except ValueError:
        return False


HISTORY_CONV_ROWS = 1_000_000  # stored conversation rows read for a filtered range (each minute's up to STORE_CONV_MAX)
CLASS_OF_PROTO = {v: k for k, v in IP_PROTO.items()}


def history_filter(engine, since: int, until: int, tz: tzinfo | None) -> dict[str, Any] | None:
    """The stored range's totals, protocol mix and timeline for the URL's non-time filters, from what the store
    holds: a protocol filter alone from the per-second protocol counts (exact), any other from the per-minute
    stored conversations (IP only, whole minutes). None without such filters."""
    from store.history import time_range

    # At most FILTER_MAX (parse's default), as on the live page; history_span has said what is ignored.
    conds, _ = flt.parse(spec(), tz)
    sensor = next((c.text for c in conds if c.key == "sensor"), None)
    shown = [c for c in conds if c.key not in ("from", "to")]
    conds = [c for c in shown if c.key != "sensor"]
    if not shown or engine.store is None:
        return None
    labels = plain(", ".join(c.label() for c in shown))  # URL text, shown in Markdown: never markup
    r = time_range(since, until, sensor)
    try:
        got = _proto_history(engine.store, r, conds) if all(c.key == "proto" for c in conds) else \
            _conversation_history(engine.store, r, conds)
    except Exception as exc:  # a store that cannot answer is a message; the totals then say they are unfiltered
        log.exception("filtered history query failed")
        return {"error": plain(f"{type(exc).__name__}: {exc}"), "labels": labels}
    return {**got, "labels": labels, "note": plain(got["note"]), "keep_alerts": functools.partial(_keep_alerts, conds)}


def _keep_alerts(conds: list, alerts: pd.DataFrame) -> pd.DataFrame:
    """The stored alerts that concern the filtered traffic (their addresses, seconds, protocol and port)."""
    if not len(alerts) or not conds:
        return alerts
    return alerts[[flt.alert_matches(a, conds) for a in alerts.itertuples(index=False)]]


def _binned(t: pd.Series, values: pd.DataFrame, since: int, until: int, width: int) -> pd.DataFrame:
    """Per-bin sums (t, packets, bytes) over since..until, empty bins as 0."""
    got = values.assign(t=(t.astype("int64") // width) * width).groupby("t")[["packets", "bytes"]].sum()
    grid = np.arange(since // width * width, until + 1, width, dtype=np.int64)
    return pd.DataFrame({"t": grid}).merge(got.reset_index(), on="t", how="left").fillna(0)


def _proto_history(store, r, conds: list) -> dict[str, Any]:
    """A protocol filter alone (or only sensor=): the per-second totals, exact to the second."""
    from store.history import bin_width

    wanted = {flt.CLASSES[c.value] for c in conds}
    t = store.totals(r)
    width = bin_width(r.since, r.until)
    cols = (f"pk_{next(iter(wanted))}", f"by_{next(iter(wanted))}") if wanted else ("packets", "bytes")
    got = store.series(r, width, cols).rename(columns=dict(zip(cols, ("packets", "bytes"))))
    if len(wanted) > 1:  # proto=tcp AND proto=udp: no packet is both
        got = got.iloc[0:0]
    packets, nbytes = (int(t[cols[0]]), int(t[cols[1]])) if len(wanted) <= 1 else (0, 0)
    classes = wanted if wanted else flt.CLASSES
    # The top hosts, ports and conversations come from the stored conversations of that protocol.
    conv = read_conversations(store, r, conds)
    tops, exact = conversation_notes(store, r, conv[1])
    return {"tops": ("; ".join(tops), exact), "conversations": conv,
            "packets": packets, "bytes": nbytes, "span_s": r.until - r.since + 1,
            "transport_counts": {c: int(t[f"pk_{c}"]) for c in classes if len(wanted) <= 1},
            "transport_bytes": {c: int(t[f"by_{c}"]) for c in classes if len(wanted) <= 1},
            "series": _binned(got["t"], got[["packets", "bytes"]], r.since, r.until, width), "bin_s": width,
            "exact": True, "note": "exact, from the stored per-second " + ("protocol counts" if wanted else "totals")
            + (" of that sensor" if r.sensor else "")}


def _conversation_history(store, r, conds: list) -> dict[str, Any]:
    """Any other filter: the stored per-minute conversations that match, summed per minute."""
    from store.history import bin_width

    df, cut = read_conversations(store, r, conds)
    lo, hi = r.first_minute, r.until - r.until % 60 + 59  # the whole minutes the range touches
    width = max(60, bin_width(lo, hi))
    classes = df["proto"].map(lambda p: CLASS_OF_PROTO.get(int(p), "other_ip")) if len(df) else pd.Series([], dtype=str)
    notes, exact = conversation_notes(store, r, cut)
    return {"packets": int(df["packets"].sum()) if len(df) else 0, "bytes": int(df["bytes"].sum()) if len(df) else 0,
            "span_s": hi - lo + 1,
            "transport_counts": df.groupby(classes)["packets"].sum().astype(int).to_dict() if len(df) else {},
            "transport_bytes": df.groupby(classes)["bytes"].sum().astype(int).to_dict() if len(df) else {},
            "series": _binned(df["minute"], df[["packets", "bytes"]], lo, hi, width), "bin_s": width,
            "exact": exact, "note": "; ".join(notes), "conversations": (df, cut), "tops": ("; ".join(notes), exact)}


def conversation_notes(store, r, cut: bool) -> tuple[list[str], bool]:
    """What figures summed from a range's stored conversations are (and whether exact): per minute, IP only,
    whole minutes; approximate when minutes were capped (STORE_CONV_MAX) or the read was cut."""
    from store.history import approximation

    lo, hi = r.first_minute, r.until - r.until % 60 + 59
    capped = approximation(store, r).get("conv")
    notes = ["per minute, from the stored conversations: IP traffic only (ARP and other non-IP traffic has no "
             f"conversations), the whole minutes {viz.time_texts([lo])[0]} – {viz.time_texts([hi])[0]} UTC "
             "(traffic of those minutes outside the chosen seconds counts), and src= / dst= select a conversation "
             "with that address at either end (a stored conversation does not keep which end sent a packet)"]
    if capped:
        notes.append(f"approximate: {capped['minutes_capped']:,} minutes held more than STORE_CONV_MAX "
                     f"conversations, {capped['packets_left_out']:,} packets of the conversations left out are "
                     "not counted")
    if cut:
        notes.append(f"approximate: only the first {HISTORY_CONV_ROWS:,} stored conversation rows were read")
    return notes, not (capped or cut)


def read_conversations(store, r, conds: list) -> tuple[pd.DataFrame, bool]:
    """(the stored conversations of the range that match, whether HISTORY_CONV_ROWS cut the read), cached
    for the reruns (cached_read)."""
    def read() -> tuple[pd.DataFrame, bool]:
        df = store.rows("conversations", r, HISTORY_CONV_ROWS)
        cut = len(df) >= HISTORY_CONV_ROWS
        return (df[conversation_mask(df, conds)] if len(df) else df), cut

    return cached_read(minutes_of(store, r.since, r.until, r.sensor, ", ".join(c.label() for c in conds)), read)


def history_filtered(engine, since: int, until: int, tz: tzinfo | None,
                     got: dict[str, Any] | None = None) -> None:
    """For host/port/proto/vlan/sensor filters on a stored range: the matching stored conversations.
    `got` (history_filter's answer on this rerun) brings them when it read them already: read once."""
    from store.history import time_range

    conds, _ = flt.parse(spec(), tz)  # its messages were shown by history_filter
    conds = [c for c in conds if c.key not in ("from", "to")]
    if not conds or engine.store is None:
        return
    sensor = next((c.text for c in conds if c.key == "sensor"), None)
    try:
        df, cut = (got or {}).get("conversations") or read_conversations(
            engine.store, time_range(since, until, sensor), [c for c in conds if c.key != "sensor"])
    except Exception as exc:  # a store that cannot answer is a message
        log.exception("history conversations query failed")
        st.error(plain(f"History conversations cannot be read: {type(exc).__name__}: {exc}"))
        return
    st.subheader("Filtered: stored conversations")
    st.metric("Packets in matching conversations", f"{int(df['packets'].sum()) if len(df) else 0:,}")
    keys = ["a", "a_port", "b", "b_port", "proto", "vlan"]
    table = (df.groupby(keys, dropna=False)[["packets", "bytes"]].sum().reset_index()
             .sort_values("bytes", ascending=False).head(50)) if len(df) else pd.DataFrame(columns=keys)
    st.dataframe(table, hide_index=True, key="hist_filtered_conv")
    st.caption("From the stored conversations (IP only, kept per minute, whole minutes, at most STORE_CONV_MAX a "
               "minute): approximate when minutes were capped"
               + (f", and here: only the first {HISTORY_CONV_ROWS:,} stored rows were read." if cut else "."))


EVIDENCE_COLUMN = "evidence view"
LINKS_PER_RUN = 50
EVIDENCE_ROWS_PER_RUN = 2_000_000  # rows the new alerts' searches may read a rerun (~80 ms)


def with_links(frame: pd.DataFrame, alerts, rows=None) -> pd.DataFrame:
    """The alerts table with a link per alert to this page filtered to its evidence (a relative URL);
    `rows` (the whole buffer) settle a vertical scan's protocol and each alert's first evidence packet."""
    if not len(frame):
        return frame
    fresh = [rows is not None and a.detector not in SECOND_STAMPED and not known(a) for a in alerts]
    if any(fresh):
        # One time-ordered view of the buffer per rerun: each new alert's search is then a slice of its own
        # seconds. At most LINKS_PER_RUN new alerts and EVIDENCE_ROWS_PER_RUN rows read a rerun (the rest
        # show their first raise's whole second until a later refresh finds their evidence).
        rows = Window(rows, min(a.first_ts for a in alerts) - float(config.get("SCAN_WINDOW_S")) - 1,
                      max(a.last_ts for a in alerts) + 1)
    budget, links = LINKS_PER_RUN, []
    for a, new in zip(alerts, fresh):
        spent = budget <= 0 or (isinstance(rows, Window) and rows.scanned >= EVIDENCE_ROWS_PER_RUN)
        links.append(alert_link(a, None if rows is None or (new and spent) else rows))
        budget -= new
    return frame.assign(**{EVIDENCE_COLUMN: links})


def link_config() -> dict[str, Any]:
    """st.dataframe column_config that shows the evidence links as links."""
    return {EVIDENCE_COLUMN: st.column_config.LinkColumn(EVIDENCE_COLUMN, display_text="open filtered view",
                                                         help="This page filtered to the alert's evidence")}


# -- explain, baselines and back-test over a stored range (any store: the host's history, a fleet view) --------


def history_tools(engine, since: int, until: int, tz: tzinfo | None) -> None:
    """Explain the range against the one before it, baselines from it, and the detectors' thresholds tried
    over it: from what the store keeps (the history view draws this for any store)."""
    store = getattr(engine, "store", None)
    if store is None:
        return
    with st.expander("Explain, baselines and threshold back-test over this range", key="hist_tools"):
        history_explain(store, since, until, tz)
        history_baselines(store, since, until, tz)
        history_backtest(engine, since, until, tz)


def _whole_minutes(since: int, until: int) -> tuple[int, int]:
    """The whole minutes a range touches (the stored conversations are per minute): [lo, hi + 1)."""
    return since - since % 60, until - until % 60 + 60


READ_TTL_S = 30  # a stored read is reused this long by the reruns (the page refreshes every few seconds)
FIXED_TTL_S = 1800  # an explanation of a range the store holds later traffic than (it cannot change)
READ_ROWS_KEPT = 2_000_000  # stored rows the process keeps for all viewers (each read up to CONV_ROWS rows)
_READS: collections.OrderedDict = collections.OrderedDict()  # key -> (when read, answer, rows); oldest use first
_READS_LOCK = threading.Lock()


def tool_filters(tz: tzinfo | None) -> tuple[list, str | None, str]:
    """(the URL's filters that select stored conversations, its sensor=, their text) for the history tools."""
    conds, _ = flt.parse(spec(), tz)  # its messages were shown by history_span
    conds = [c for c in conds if c.key not in ("from", "to")]
    sensor = next((c.text for c in conds if c.key == "sensor"), None)
    conds = [c for c in conds if c.key != "sensor"]
    return conds, sensor, ", ".join(c.label() for c in conds)


def _rows_of(answer: Any) -> int:
    """How many stored rows an answer holds (its frames' rows; 1 for anything else)."""
    parts = answer if isinstance(answer, tuple) else (answer,)
    return max(1, sum(len(p) for p in parts if isinstance(p, pd.DataFrame)))


def cached_read(key: tuple, read: Any, ttl: float = READ_TTL_S) -> Any:
    """read()'s answer, reused for `ttl` s by every viewer's reruns: a stored range's conversations are not
    read again (up to a million rows) at every refresh. One cache for the process, at most READ_ROWS_KEPT
    rows, least recently used dropped first, expired entries dropped."""
    now = time.monotonic()
    with _READS_LOCK:
        for k in [k for k, (t, _, _, life) in _READS.items() if now - t > life]:
            del _READS[k]
        got = _READS.get(key)
        if got is not None:
            _READS.move_to_end(key)
            return got[1]
    answer = read()  # outside the lock: a slow read does not hold up the other viewers
    with _READS_LOCK:
        _READS[key] = (time.monotonic(), answer, _rows_of(answer), ttl)
        _READS.move_to_end(key)
        while len(_READS) > 1 and sum(e[2] for e in _READS.values()) > READ_ROWS_KEPT:
            _READS.popitem(last=False)
    return answer


def minutes_of(store, since: int, until: int, sensor: str | None, what: str) -> tuple:
    """A read's cache key: the stored conversations are per minute, so a range ending now reads the same
    rows (bar the current minute, refreshed after READ_TTL_S) until the clock enters another minute."""
    return (what, store_id(store), since // 60, until // 60, sensor)


def tool_rows(store, since: int, until: int, tz: tzinfo | None) -> tuple[pd.DataFrame, bool]:
    """(the stored conversations of since..until that match the URL's filters, whether the read was cut),
    cached (cached_read): the explain toggle and the baselines do not read them again at every refresh."""
    from investigate import stored

    conds, sensor, text = tool_filters(tz)

    def read() -> tuple[pd.DataFrame, bool]:
        df, cut = stored.read(store, since, until, sensor)
        return (df[conversation_mask(df, conds)] if conds and len(df) else df), cut

    return cached_read(minutes_of(store, since, until, sensor, text), read)


def read_notes(store, since: int, until: int, cut: bool, sensor: str | None = None) -> list[str]:
    """Why figures from the stored conversations of since..until (of one sensor) are approximate (none: exact)."""
    from store.history import approximation, time_range

    capped = approximation(store, time_range(since, until, sensor)).get("conv")
    n = capped["minutes_capped"] if capped else 0
    return ([f"approximate: {n:,} minute{'s' if n != 1 else ''} held more than STORE_CONV_MAX conversations "
             f"({capped['packets_left_out']:,} packets of the conversations left out are not counted)"]
            if capped else []) + ([f"approximate: only the first {HISTORY_CONV_ROWS:,} stored conversation rows "
                                   "were read"] if cut else [])


def filters_note(tz: tzinfo | None) -> str:
    """Which of the URL's filters the history tools applied."""
    _, sensor, text = tool_filters(tz)
    said = [f"filtered to the conversations matching {text} (src= and dst= match either end: a stored "
            "conversation keeps no direction)"] if text else []
    return "; ".join(said + ([f"sensor {sensor}"] if sensor else []))


def history_explain(store, since: int, until: int, tz: tzinfo | None) -> None:
    """What explains the change from the window before the range to the range (stored conversations)."""
    from investigate import explain as ex_mod
    from investigate import stored
    from store.history import time_range

    st.subheader("Explain this range")
    measure = st.radio("Measure", ["packets/s", "bit/s"], horizontal=True, key="hist_explain_measure")
    if not st.toggle("Explain the change against the window just before the range", key="hist_explain"):
        return
    start, end = _whole_minutes(since, until)
    base_start = start - (end - start)
    try:
        sensor = tool_filters(tz)[1]  # the URL's sensor=: where its traffic begins, not the store's
        first = store.extent(time_range(0, start - 1, sensor))
        if first is None:
            st.warning(plain("No baseline data before this range: the store holds no traffic before "
                             f"{viz.time_texts([start], tz)[0]}, so there is nothing to explain a change against."))
            return
        # The store's first traffic: a shorter baseline, as long as the seconds it holds (its first minute may
        # begin at :45; counting it whole would dilute the baseline's rates).
        base_start = max(base_start, first[0])
        # Explaining 100,000 stored conversations takes ~0.5 s: once per range, filters and measure, not a rerun.
        # A range the store holds later traffic than is complete: its explanation does not change.
        done = store.extent(time_range(end, int(time.time()) + 60, sensor)) is not None
        ex, notes = cached_read(("explain", measure, base_start, *minutes_of(store, start, end - 1, *tool_filters(
            tz)[1:])), lambda: _explained(store, base_start, start, end, measure, tz),
            FIXED_TTL_S if done else READ_TTL_S)
    except Exception as exc:  # a store that cannot answer is a message
        log.exception("history explain failed")
        st.error(plain(f"Cannot explain this range: {type(exc).__name__}: {exc}"))
        return
    st.success(plain(ex.headline))
    short = start - base_start < end - start
    st.caption(plain(f"From the stored conversations of {viz.time_texts([start], tz)[0]} – "
                     f"{viz.time_texts([end - 1], tz)[0]} against "
                     + (f"only the {duration_text(start - base_start)} before it (from the store's first "
                        f"traffic, {viz.time_texts([base_start], tz)[0]})" if short else "the same length before it")
                     + " (whole minutes, IP traffic only; a host or network counts the conversations it is an end of, "
                     f"the headline counts each conversation once). A stored range ranks {', '.join(ex.dims)}; "
                     f"not {stored.NOT_STORED}: the live view ranks those"
                     + "".join(f"; {n}" for n in [filters_note(tz), *notes] if n) + "."))
    st.dataframe(pd.DataFrame(ex_mod.leaders(ex)), hide_index=True, key="hist_explain_leaders")
    dim = st.selectbox("Detail by", list(ex.dims), key="hist_explain_dim")
    st.dataframe(pd.DataFrame([{"key": r.key, "share of the change %": round(100 * r.share, 1),
                                f"before ({measure})": round(r.before, 1), f"during ({measure})": round(r.during, 1)}
                               for r in ex.dims[dim][:20]]), hide_index=True, key="hist_explain_detail")


def duration_text(seconds: int) -> str:
    """'12 min 15 s', '3 min', '40 s'."""
    m, s = divmod(int(seconds), 60)
    return " ".join(([f"{m:,} min"] if m else []) + ([f"{s} s"] if s or not m else []))


def _explained(store, base_start: int, start: int, end: int, measure: str, tz: tzinfo | None) -> tuple:
    """(the stored explanation of [start, end) against [base_start, start), why it is approximate)."""
    from investigate import stored

    during, cut_d = tool_rows(store, start, end - 1, tz)
    # The stored rows are per minute: base_start's whole minute is read (it holds no earlier traffic).
    before, cut_b = tool_rows(store, base_start - base_start % 60, start - 1, tz)
    return (stored.explain(before, during, start, end, base_start, measure),
            read_notes(store, base_start - base_start % 60, end - 1, cut_d or cut_b, tool_filters(tz)[1]))


def range_key(since: int, until: int) -> tuple:
    """A range as a result's key: one ending now (the last hour, ...) by its length, as it moves with the
    clock; any other by its seconds. A changed range or filter never matches an older result."""
    moving = until >= int(time.time()) - 5
    return ("ending now", until - since) if moving else (since, until)


def history_baselines(store, since: int, until: int, tz: tzinfo | None) -> None:
    """Save the range's hosts, services and protocol mix as a baseline; list what the range holds that one
    does not (baselines live in the store, as the live page's)."""
    from investigate import baseline as bl
    from investigate import stored

    st.subheader("Baselines")
    if not hasattr(store, "put_doc"):
        st.caption("This store keeps no baselines.")
        return
    name_col, save_col = st.columns([3, 1])
    name = name_col.text_input("Baseline name", key="hist_baseline_name", placeholder="e.g. monday-normal")
    if save_col.button("Save this range as a baseline", key="hist_baseline_save"):
        try:
            if not name.strip():
                raise ValueError("give the baseline a name first")
            df, cut = tool_rows(store, since, until, tz)
            notes = [n for n in [filters_note(tz), *read_notes(store, since, until, cut, tool_filters(tz)[1])] if n]
            store.put_doc(bl.KIND, name.strip(), {**stored.make(df, until), "notes": notes})
            st.success(plain(f"Baseline {name.strip()} saved ({int(df['packets'].sum()):,} packets in "
                             f"{len(df):,} stored conversation rows" + "".join(f"; {n}" for n in notes) + ")."))
        except Exception as exc:  # said, nothing lost
            st.error(plain(f"Baseline not saved: {exc}"))
    try:
        docs = {d["name"]: d["body"] for d in store.docs(bl.KIND)}
    except Exception as exc:
        st.error(plain(f"Baselines cannot be read: {exc}"))
        return
    if not docs:
        st.caption("No baseline saved yet.")
        return
    pick = st.selectbox("Compare this range with baseline", sorted(docs), key="hist_baseline_pick")
    # The diff belongs to the range, the store or sensor, the filters and the baseline.
    key = (range_key(since, until), store_id(store), tool_filters(tz)[1:], pick)
    if st.button("Compare", key="hist_baseline_compare"):
        try:
            df, cut = tool_rows(store, since, until, tz)
            notes = [n for n in [filters_note(tz), *read_notes(store, since, until, cut, tool_filters(tz)[1])] if n]
            st.session_state["hist_baseline_diff"] = (key, stored.diff(docs[pick], df), notes)
        except Exception as exc:
            st.error(plain(f"Cannot compare: {exc}"))
    got = st.session_state.get("hist_baseline_diff")
    if got and got[0] == key:
        baseline_diff_tables(pick, docs[pick], got[1], got[2], tz)


def baseline_diff_tables(pick: str, body: dict[str, Any], new: dict[str, Any], notes: list[str],
                         tz: tzinfo | None) -> None:
    """What a range holds that a baseline does not: hosts, services (first seen), the protocol mix."""
    then = [f"the baseline: {n}" for n in body.get("notes", [])]
    false_new = " A baseline that is approximate may list hosts or services as new that it left out." if any(
        "approximate" in n for n in then) else ""
    st.caption(plain(f"New in this range since baseline {pick} (from the stored conversations: IP only, whole "
                     "minutes" + "".join(f"; {n}" for n in [*notes, *then]) + ")." + false_new))
    a, b = st.columns(2)
    a.dataframe(pd.DataFrame({"new host": [h for h, _ in new["hosts"]],
                              "first seen": viz.time_texts([t for _, t in new["hosts"]], tz)}),
                hide_index=True, key="hist_baseline_hosts")
    b.dataframe(pd.DataFrame({"new service": [s for s, _ in new["services"]],
                              "first seen": viz.time_texts([t for _, t in new["services"]], tz)}),
                hide_index=True, key="hist_baseline_services")
    st.dataframe(pd.DataFrame(new["mix"]), hide_index=True, key="hist_baseline_mix")


def history_backtest(engine, since: int, until: int, tz: tzinfo | None) -> None:
    """The spike thresholds replayed over the range's stored seconds, the floods' and scans' bounded, in a
    background job (the page never waits for it); the others say why they cannot be tried."""
    from investigate import backtest as bt

    st.subheader("Threshold back-test over this range")
    overrides, disabled = bt.running(engine)
    settings = [*bt.HISTORY_SETTINGS, *bt.FLOOD_CLASSES, *bt.SCAN_SETTINGS]
    setting = st.selectbox("Threshold", settings, key="hbt_setting",
                           format_func=lambda s: f"{s} ({bt.DETECTOR_OF[s]}, now {overrides.get(s, config.get(s))})")
    st.caption(plain("The spike thresholds are tried over exactly the stored per-second totals (of the URL's "
                     "sensor=; without it summed over every sensor, which the result then says); the floods get "
                     "upper bounds (the store keeps each second's packets per protocol, not per destination), and "
                     "the port scans upper bounds from the stored conversations, with the running values of the "
                     "other scan thresholds. These cover all of the range's traffic: the URL's host/port/proto "
                     "filters do not narrow them (a detector sees all traffic). "
                     "The others cannot be tried over the store: "
                     + "; ".join(f"{d} needs {why}" for d, why in bt.NOT_FROM_HISTORY.items()
                                 if d not in bt.BOUNDED) + "."))
    default = ", ".join(f"{v:g}" for v in bt.candidates(setting, now=overrides.get(setting)))
    text = st.text_input("Values to try", value=default, key=f"hbt_values_{setting}")
    # A result belongs to the range, the store (a fleet sensor's view is its own store) and the setting: a
    # changed range or sensor never shows an older result under its label.
    key = (range_key(since, until), store_id(engine.store), setting)
    job = st.session_state.get("hbt_job")
    if st.button("Run the back-test over this range", key="hbt_run", disabled=job is not None and job.running):
        try:
            values = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
            store, sensor = engine.store, tool_filters(tz)[1]  # the URL's sensor=: that sensor's seconds only
            if setting in bt.SCAN_SETTINGS:
                load, runner = (lambda: bt.stored_scan_rows(store, since, until, sensor)), bt.scan_bound
            elif setting in bt.FLOOD_CLASSES:
                load, runner = (lambda: bt.stored_class_seconds(store, since, until, setting, sensor)), \
                    bt.flood_bound
            else:
                load, runner = (lambda: bt.stored_seconds(store, since, until, sensor)), bt.run_seconds
            st.session_state["hbt_sensors"] = len(bt.contributing_sensors(store, since, until, sensor))
            st.session_state["hbt_job"] = job = bt.Job(load, setting, values, overrides, disabled, runner)
            st.session_state["hbt_job_key"] = (key, since, until)
            st.session_state.pop("hbt_result", None)  # the new run replaces it: never shown as the new one's
        except ValueError as exc:  # bad values: said
            st.session_state["hbt_result"] = (key, None, f"Back-test not run: {exc}")
    if job is not None and job.running:
        st.info(plain(f"Back-test of {job.setting} running in the background: {job.tried} of "
                      f"{len(job.values)} values tried."))
        job_tick()
    elif job is not None:
        st.session_state.pop("hbt_job")
        done, lo, hi = st.session_state.pop("hbt_job_key", (key, since, until))
        st.session_state["hbt_result"] = (done, None, f"Back-test not run: {job.error}") if job.error else (
            done, trials_frame(job.trials or [], tz),
            hbt_cover(job, lo, hi, tz) + summed_note(st.session_state.pop("hbt_sensors", 1), job.setting))
    result = st.session_state.get("hbt_result")
    if result and result[0] == key:
        if result[1] is None:
            st.error(plain(result[2]))
        else:
            st.dataframe(result[1], hide_index=True, key="hbt_table")
            st.caption(plain(result[2]))


JOB_TICK_MS = 1000  # while a back-test runs, the page reruns this often to show its progress and result


def job_tick() -> None:
    """Rerun the page soon (a timer of its own): the host page does not refresh when paused and the fleet
    page only on live ranges, so a background job's result would wait for the viewer's next click."""
    from streamlit_autorefresh import st_autorefresh

    st_autorefresh(interval=JOB_TICK_MS, key="hbt_tick")


def store_id(store) -> str:
    """Which store (or fleet sensor's view) a result was computed from (a view lives one page run: by its
    path and sensor, not its identity)."""
    return f"{type(store).__name__}:{getattr(store, 'path', '')}:{getattr(store, 'sensor', '')}"


def summed_note(sensors: int, setting: str) -> str:
    """With more than one sensor's traffic in the range: the seconds are their sums, which no detector saw."""
    from investigate import backtest as bt

    if sensors <= 1:
        return ""
    if setting in bt.HISTORY_SETTINGS:
        return (f" Summed over sensors: each second is the sum of {sensors} sensors', which no sensor's detector "
                "saw; these are not what any sensor would raise: pick a sensor (sensor=) for its own.")
    return f" Summed over sensors: each second sums {sensors} sensors', so the bound covers their alerts together."


def hbt_cover(job, since: int, until: int, tz: tzinfo | None) -> str:
    """What a history back-test's figures cover, and what they are."""
    from investigate import backtest as bt

    setting = job.setting
    span = f"from {viz.time_texts([since], tz)[0]} to {viz.time_texts([until], tz)[0]}"
    if setting in bt.SCAN_SETTINGS:
        return "Over " + scan_cover(since, until, job.rows, tz)
    n = len(job.rows[0])
    if setting in bt.FLOOD_CLASSES:
        return (f"Over the {n:,} stored seconds with traffic {span}; upper bounds: a flood could only have been "
                f"raised in the seconds that could raise, for at most 'alerts' destinations; {bt.FLOOD_CAVEATS}.")
    return f"Over the {n:,} stored seconds with traffic {span}."


def scan_cover(since: int, until: int, conv, tz: tzinfo | None) -> str:
    """What a scan threshold's bound over a stored range is, and when it is no bound."""
    df, exact = conv
    return (f"the stored conversations from {viz.time_texts([since], tz)[0]} to {viz.time_texts([until], tz)[0]} "
            f"({len(df):,} rows). Upper bounds: every failed attempt the detector counts is a packet between its "
            "source and target, so a (source, target) pair (SCAN_PORTS, SCAN_STEALTH_PORTS: TCP) or a (source, "
            "service) key (SCAN_HOSTS) could raise a scan only if its conversations over the whole range reach the "
            "value in distinct ports or targets; a stored row keeps no direction, so each end is tried as the "
            "source. 'keys that could raise' lists them, 'first at' and 'when' the times their conversations were "
            "first seen (a raise comes at or after them); how often each would be raised is not bounded."
            + ("" if exact else " Not a bound here: some minutes' conversations were left out (STORE_CONV_MAX, "
                                 "or the rows read were cut), so a scan among them is missed."))
