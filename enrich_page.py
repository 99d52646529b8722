"""The page's "Who is on the other end" panel (issue 14): names, countries, networks, services, processes, makers.

Shown by default (the ENRICHMENT setting turns it off). Its input is a `Snapshot` (the page may hand it
a filtered one). Nothing here waits on the network: names come from the enricher's cache (a lookup is
only queued), the rest is local tables. st.dataframe shows cell text as text, Plotly labels are escaped
in visualizations.py, and captions go through plain(): a PTR record can hold any text.
"""

from __future__ import annotations

from datetime import tzinfo

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

import config
import enrich_columns as ec
import visualizations as viz
from packet_processor import Snapshot, packets_frame

AGG_ADDRESSES = 2000  # top sources and top destinations summed per country and per network
TABS = ["Top talkers", "Conversations", "Top countries", "Top networks (AS)", "By process",
        "Recent packets", "Alerts"]
TAB_KEY = "who_tab"  # st.session_state[TAB_KEY]: the open tab's label

# Markdown's and Streamlit's special characters escaped, line breaks as spaces: names are data, never markup
# (the same rule as dashboard.plain, which this module cannot import: the page runs when imported).
_MARKDOWN = str.maketrans({**{c: "\\" + c for c in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"},
                           "\n": " ", "\r": " "})


def plain(text: str) -> str:
    """Text shown as itself where Streamlit reads Markdown (captions)."""
    return text.translate(_MARKDOWN)


def enabled() -> bool:
    """Whether the panel is shown (the ENRICHMENT setting)."""
    return bool(config.get("ENRICHMENT"))


def enricher():
    """The process-wide Enricher (reverse DNS pool, geo and AS databases, process table)."""
    import enrich
    return enrich.shared()


def as_label(asn: int | None, org: str | None) -> str:
    """'AS15169 Google LLC', the organisation alone, or ''."""
    if asn is not None:
        return f"AS{asn} {org or ''}".strip()
    return org or ""


def who(en, addr: str) -> dict[str, str]:
    """Name, country and AS of one address, from caches only."""
    g = en.geo.lookup(addr) if addr else None
    return {"name": en.name_text(addr), "country": (g.country if g else None) or "",
            "AS": as_label(g.asn, g.as_org) if g else ""}


def who_rows(en, rows: list[dict]) -> list[dict]:
    """Top-address rows with name, country and AS added (copies)."""
    out = []
    for r in rows:
        addr = str(r.get("address", r.get("addr", "")))  # the engine's key has been both
        w = who(en, addr)
        out.append({**r, "addr": addr, "name": w["name"], "country": w["country"], "as_org": w["AS"]})
    return out


def panel(snap: Snapshot, tz: tzinfo | None) -> None:
    """'Who is on the other end': enriched tables and the countries, networks and process views."""
    if not enabled():
        return
    en = enricher()
    live = ec.is_live(snap)  # a file's packets: no process is named (ec.NOT_LIVE)
    by = st.session_state.get("top_by", "packets")
    st.subheader("Who is on the other end")
    # Only the open tab is computed (Streamlit's lazy tabs: choosing another reruns the page). All seven took
    # ~25 ms of CPU at every rerun of every viewer, in the process whose capture thread waits for the GIL.
    # Each viewer's choice is its own (session state, not the URL).
    tabs = st.tabs(TABS, key=TAB_KEY, on_change="rerun")
    with tabs[0]:
        if is_open(tabs[0]):
            src = who_rows(en, snap.top_addresses("src", by))
            dst = who_rows(en, snap.top_addresses("dst", by))
            a, b = st.columns(2)
            chart(a, viz.who_bar(src, "Top sources: who", by), "who_src", tz)
            chart(b, viz.who_bar(dst, "Top destinations: who", by), "who_dst", tz)
            st.dataframe(talkers_frame(src, dst, by), hide_index=True, key="who_talkers")
    with tabs[1]:
        if is_open(tabs[1]):
            st.dataframe(conversations_who(en, snap.top_conversations(20, by), live), hide_index=True,
                         key="who_conv")
    for i, (title, key) in ((2, ("Top countries", "who_countries")), (3, ("Top networks (AS)", "who_networks"))):
        with tabs[i]:
            if is_open(tabs[i]):
                countries, networks, note = ends_views(en, snap, by, only="country" if i == 2 else "network")
                chart(st, ends_bar(countries if i == 2 else networks, title, by), key, tz)
                st.caption(plain(note + CLICK_NOTE))
    with tabs[4]:
        if is_open(tabs[4]):
            process_view(en, snap, live)
    with tabs[5]:
        if is_open(tabs[5]):
            st.dataframe(recent_who(en, snap.packets[-int(config.get("RECENT_ROWS")):], tz, live), hide_index=True,
                         key="who_recent")
    with tabs[6]:
        if is_open(tabs[6]):
            st.dataframe(alerts_who(en, snap.alerts), hide_index=True, key="who_alerts")
    st.caption(plain(enrich_note(en)))
    # DB-IP's licence (CC BY 4.0) asks pages that show its results for this link; fixed text, not data.
    st.caption("AS data: [IP Geolocation by DB-IP](https://db-ip.com), RouteViews and NRO, CC BY 4.0.")


CLICK_NOTE = (" A click on a bar filters the whole page to the packets with either end in that country or "
              "network (country= / asn= in the URL).")


def is_open(tab) -> bool:
    """Whether a tab of the panel is the one shown (True also where tabs do not track which: all are drawn)."""
    return tab.open is not False


def chart(where, fig: go.Figure, key: str, tz: tzinfo | None) -> None:
    """A bar chart whose clicked bar adds its filter to the page (investigate_page.selectable)."""
    import investigate_page as inv

    where.plotly_chart(fig, key=key, **inv.selectable(key, fig, tz))


FILE_PROCESS_NOTE = ("Not live: the packets come from a file, and the socket table only says which process "
                     "holds a port on this machine now, not who sent a recorded packet, so none is named.")


def process_view(en, snap: Snapshot, live: bool = True) -> None:
    """Per-process packets, bytes and connections: over all traffic of a live capture, else the buffer; a
    file's packets are attributed to no process."""
    if not live:
        st.dataframe(viz.process_table([]), hide_index=True, key="who_process")
        st.caption(FILE_PROCESS_NOTE)
        return
    rows = snap.totals.get("by_process")
    over_all = rows is not None
    if not over_all:
        rows = en.by_process(snap.packets)
    frame = viz.process_table(rows)
    if any(r.get("connections_capped") for r in rows):  # a bounded set stopped growing: at least
        frame["connections"] = [f"≥ {r['connections']:,}" if r.get("connections_capped") else f"{r['connections']:,}"
                                for r in rows]
    st.dataframe(frame, hide_index=True, key="who_process")
    st.caption(plain(process_note(en, snap, over_all)))


def ends_views(en, snap: Snapshot, by: str, n: int = AGG_ADDRESSES,
               only: str | None = None) -> tuple[list[dict], list[dict], str]:
    """(countries, networks, note): per key what its addresses sent and received, over the top `n` sources
    and `n` destinations, and a note that says per end, and approximate when the tables are. only="country"
    or "network": the other list is left empty (the open tab shows one)."""
    src = snap.top_addresses("src", by, n + 1)
    dst = snap.top_addresses("dst", by, n + 1)
    cut = len(src) > n or len(dst) > n
    src, dst = src[:n], dst[:n]
    pruned = any(tuple(t.state[4]) != (0, 0) for t in (snap.src, snap.dst))  # addresses left the tables
    bounded = any(r.get("approx") for r in (*src, *dst))
    note = ("Per end: 'sent' counts the packets whose source address is there, 'received' those whose "
            "destination is; a packet between two of them counts in both bars, once at each end.")
    if cut or pruned or bounded:
        why = []
        if cut or pruned:
            why.append(f"only the busiest {n:,} sources and {n:,} destinations of the top-address tables are "
                       f"summed (the others' traffic is left out)")
        if bounded:
            why.append("some of those counts are upper bounds (Space-Saving: a count may exceed the truth by "
                       "its error bound)")
        note += " Approximate: " + "; ".join(why) + "."
    else:
        note += " Exact: every address seen is in the tables with its exact count."
    countries = en.by_country(src, dst) if only != "network" else []
    networks = en.by_network(src, dst) if only != "country" else []
    for rows in (countries, networks):
        for r in rows:
            r["approx"] = bool(r["approx"] or cut or pruned)
    return countries, networks, note


def ends_bar(rows: list[dict], title: str, by: str, n: int = 15) -> go.Figure:
    """Grouped bars: what each key sent and received (by packets or bytes); '≈' marks an approximate figure."""
    rows = sorted(rows, key=lambda r: -max(r[f"sent_{by}"], r[f"received_{by}"]))[:n][::-1]
    approx = any(r["approx"] for r in rows)
    title = f"{title} (approximate)" if approx else title
    if not rows:
        return go.Figure(layout={**viz.LAYOUT, "title": {"text": title}, "annotations": [
            {"text": "no data yet", "showarrow": False}], "xaxis": {"visible": False}, "yaxis": {"visible": False}})
    keys = [viz.chart_text(str(r["key"])) for r in rows]
    mark = "≈ " if approx else ""
    bars = [{"type": "bar", "name": end, "x": [r[f"{end}_{by}"] for r in rows], "y": keys, "orientation": "h",
             "customdata": [f"{r['addresses']:,} addresses" for r in rows],
             "hovertemplate": f"%{{y}} {end}: {mark}%{{x:,}} {by} (%{{customdata}})<extra></extra>"}
            for end in ("sent", "received")]
    return go.Figure(data=bars, layout={**viz.LAYOUT, "title": {"text": title}, "barmode": "group",
                                        "uirevision": title, "yaxis": {"type": "category"},
                                        "legend": {"orientation": "h"}})


def talkers_frame(src: list[dict], dst: list[dict], by: str) -> pd.DataFrame:
    """The enriched top sources and destinations as one table."""
    rows = [{"side": side, "address": r["addr"], "name": r["name"], "country": r["country"], "AS": r["as_org"],
             by: r[by]} for side, rows in (("source", src), ("destination", dst)) for r in rows]
    return pd.DataFrame(rows, columns=["side", "address", "name", "country", "AS", by])


def conversations_who(en, rows: list[dict], live: bool = True) -> pd.DataFrame:
    """Top conversations with names, countries, services and local processes (NOT_LIVE for a file's)."""
    out = []
    for r in rows:
        wa, wb = who(en, r["a"]), who(en, r["b"])
        proto = str(r["proto"]).lower() if live else "file"  # end_process: a file's packets name no process
        out.append({"A": r["a"], "A name": wa["name"], "A country": wa["country"],
                    "A port": end_port(en, r, "a"),
                    "A process": end_process(en, r["a"], proto, r["a_port"]),
                    "B": r["b"], "B name": wb["name"], "B country": wb["country"], "B AS": wb["AS"],
                    "B port": end_port(en, r, "b"),
                    "B process": end_process(en, r["b"], proto, r["b_port"]),
                    "protocol": r["proto"], "packets": r["packets"], "bytes": r["bytes"]})
    return pd.DataFrame(out)


def end_port(en, r: dict, end: str) -> str:
    """One end's port, with its service name only on the server end (ec.server_end: the lower port)."""
    port = r[f"{end}_port"]
    if port is None or pd.isna(port):
        return ""
    server = ec.server_end(ec._port(r["a_port"]), ec._port(r["b_port"])) == ("src" if end == "a" else "dst")
    return en.services.label(int(port), str(r["proto"]).lower()) if server else str(int(port))


def end_process(en, addr: str, proto: str, port) -> str:
    """The local process of one end ('' for a remote end, 'unknown' for a local one with no owner; proto
    'file': a file's packets, ec.NOT_LIVE for a local end)."""
    if port is None or proto not in ("tcp", "udp", "file") or not en.processes.is_local(addr):
        return ""
    return ec.NOT_LIVE if proto == "file" else en.processes.label(proto, port)


def _frame(rows: np.ndarray, tz: tzinfo | None) -> pd.DataFrame:
    """packets_frame with the time as text for any timestamp (pcapng allows times no calendar holds)."""
    ts = rows["ts"]
    safe = rows
    outside = ~((ts >= viz.TS_MIN) & (ts <= viz.TS_MAX))
    if outside.any():
        safe = rows.copy()
        safe["ts"][outside] = 0.0
    frame = packets_frame(safe, tz)
    frame["time"] = viz.time_texts(ts, tz)
    return frame


def recent_who(en, rows: np.ndarray, tz: tzinfo | None, live: bool = True) -> pd.DataFrame:
    """The newest packets with names, countries, service, local process and device maker."""
    frame = _frame(rows, tz).iloc[::-1]
    proto = frame["protocol"].str.lower()
    dport = frame["dst port"].astype(object).where(frame["dst port"].notna(), None)
    sport = frame["src port"].astype(object).where(frame["src port"].notna(), None)
    makers = [en.oui.maker(bytes(m)) or "" for m in rows["hw_src"][::-1]]
    return pd.DataFrame({
        "time": frame["time"].to_numpy(), "protocol": frame["protocol"].to_numpy(),
        "source": frame["source"].to_numpy(), "source name": [en.name_text(a) for a in frame["source"]],
        "source country": [who(en, a)["country"] for a in frame["source"]],
        "destination": frame["destination"].to_numpy(),
        "destination name": [en.name_text(a) for a in frame["destination"]],
        "destination country": [who(en, a)["country"] for a in frame["destination"]],
        "service": [server_label(en, sp, dp, t, f) for sp, dp, t, f in zip(sport, dport, proto, frame["TCP flags"])],
        "process": [end_process(en, s, t if live else "file", sp) or end_process(en, d, t if live else "file", dp)
                    for s, d, t, sp, dp in zip(frame["source"], frame["destination"], proto, sport, dport)],
        "maker": makers, "size": frame["size"].to_numpy()})


def server_label(en, sport, dport, proto: str, flags) -> str:
    """The service label of the packet's server end (ec.server_end's rule), '' without ports."""
    end = ec.server_end(sport, dport, str(flags or ""))
    return en.services.label(dport if end == "dst" else sport, proto) if end else ""


def alerts_who(en, alerts) -> pd.DataFrame:
    """Alerts with the source's and target's names and countries."""
    rows = []
    for a in alerts:
        ws, wt = who(en, str(a.source)), who(en, str(a.target))
        rows.append({"detector": a.detector, "severity": a.severity, "source": a.source, "source name": ws["name"],
                     "source country": ws["country"], "source AS": ws["AS"], "target": a.target,
                     "target name": wt["name"], "target country": wt["country"], "count": a.count})
    return pd.DataFrame(rows, columns=["detector", "severity", "source", "source name", "source country",
                                       "source AS", "target", "target name", "target country", "count"])


def process_note(en, snap: Snapshot, over_all: bool) -> str:
    """What the by-process view covers, and what it could not attribute."""
    err = f" {en.processes.error}." if en.processes.error else ""
    owners = owners_note(en.processes)
    if not over_all:
        return (f"Over the {len(snap.packets):,} packets in the buffer (per-process totals of all traffic need "
                f"a live capture); {owners}{err}")
    st_ = (snap.totals.get("stages") or {}).get("processes") or {}
    if st_.get("error"):
        err += f" {st_['error']}; the totals stop there."
    skipped = int(st_.get("packets_skipped") or 0)
    lost = f" {skipped:,} packets were skipped while attribution fell behind (not in these totals)." if skipped \
        else ""
    return (f"Over every TCP/UDP packet since the capture started (not only the buffer), each attributed as it "
            f"was counted; {owners}{lost}{err}")


def owners_note(table) -> str:
    """Where owners come from, what 'unknown' means and, said plainly, the ports whose owner this process
    may not see (after the privilege drop psutil lists other users' sockets without a PID)."""
    from enrich.processes import HIDDEN, HIDDEN_NOTE
    text = (f"owners from the socket table re-read every {table.refresh_s:g} s: 'unknown' means the socket "
            f"closed before a read saw it or lives in another network namespace.")
    n = len(table.hidden_ports())
    if n:
        import getpass
        users = ", ".join(f"{u} ({k:,})" for u, k in sorted(table.hidden_users().items()))
        owned = f"; their sockets belong to {users}" if users else ""
        text += f" '{HIDDEN}': {HIDDEN_NOTE.format(n=n, user=getpass.getuser())}{owned}."
    return text


def enrich_note(en) -> str:
    """Where names, countries and networks come from, with each database's date."""
    geo, asn = en.geo, en.geo.asn
    db = f"{geo.source} (dated {geo.date})" if geo.source else ("loading…" if not geo.error else geo.error)
    adb = f"ip-location-db asn {asn.version} (dated {asn.date})" if asn.ready else asn.error or "loading…"
    rdns = "on" if en.names.enabled else "off (no DNS query is sent)"
    s = en.names.stats
    return (f"Country: offline database {db}. AS number and organisation: {adb}. "
            f"Reverse DNS {rdns}: {s.answered:,} answered, {s.failed:,} failed, "
            f"{s.timed_out:,} timed out, {s.dropped_queue_full:,} not asked (queue full); … = lookup queued.")

