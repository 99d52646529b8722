"""The fleet view: many sensors' history in ClickHouse on one page (no local capture).

    streamlit run dashboard.py -- --clickhouse HOST:PORT [--cluster NAME]

A sensor picker (all, or one), a grid of per-sensor sparklines (packets/s, bit/s, alerts) that marks a
sensor without a flush for STALE_FLUSHES x FLEET_FLUSH_S as stale, and the single-host page's range
panels (history_page: metrics, protocols, timeline, top talkers and ports, conversations, alerts,
downloads) drawn from ClickHouse for the chosen sensors and time range: Live (the last minutes, per
second) or a historical range. Credentials come as the sensor takes them (CLICKHOUSE_USER,
CLICKHOUSE_PASSWORD_FILE; TLS with CLICKHOUSE_SECURE and CLICKHOUSE_CA_CERTS), never the command line.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import ipaddress
import logging
import time
import types
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import tzinfo
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

import config
import history_page
import investigate_page as inv
import visualizations as viz
from store.base import TimeRange
from store.clickhouse import ClickHouseStore

log = logging.getLogger(__name__)

ALL = "All sensors"
LIVE_S = 300  # the Live range: the last five minutes, per second
STALE_FLUSHES = 3  # a sensor with no flush for this many FLEET_FLUSH_S intervals is stale
GRID_COLUMNS = 3
GRID_POINTS = 300  # most bins in a sparkline
RANGES: dict[str, int | None] = {"Live (5 min)": LIVE_S, "15 min": 900, "1 h": 3600, "6 h": 6 * 3600,
                                 "24 h": 86_400, "7 days": 7 * 86_400, history_page.CUSTOM: None}


_MARKDOWN = str.maketrans({c: "\\" + c for c in "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"})  # a name is text


WHO_ADDRESSES = 500  # top sources and destinations summed per country and per network
# Top tables asked at least this long (ordered by the count, then the key: a shorter list is its head).
ASKED_TOP = {"top_addrs": WHO_ADDRESSES + 1, "top_ports": 20}


class SensorView:
    """A store whose every range question is asked for one sensor (or all): what history_page draws from."""

    def __init__(self, store: ClickHouseStore, sensor: str | None) -> None:
        self.store = store
        self.sensor = sensor
        self.conversations_note: tuple[str, int] | None = None  # (by, most unlisted) when last approximate
        self._answers: dict[tuple, Any] = {}  # this page run's answers (the view lives for one run)
        self.failed = False  # a question failed this run (its panel shows the error): the page keeps refreshing

    @property
    def path(self) -> str:
        """The store's address, and the sensor shown."""
        return f"{self.store.path} · {'sensor ' + inv.plain(self.sensor) if self.sensor else 'all sensors'}"

    def _r(self, r: TimeRange) -> TimeRange:
        return dataclasses.replace(r, sensor=self.sensor)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if name not in ("totals", "series", "top_addrs", "top_ports", "top_conversations", "caps", "alerts",
                        "extent", "rows", "vlans", "vlans_by"):
            return attr
        if name == "rows":
            return lambda table, r, *a, **k: attr(table, self._r(r), *a, **k)
        if name == "top_conversations":  # never the full grouping of a day's conversations: bounds, marked
            attr = self._top_conversations
        return lambda r, *a, **k: self._asked(name, attr, self._r(r), *a, **k)

    def ahead(self, pool: Any, name: str, r: TimeRange, *a: Any, **k: Any) -> None:
        """Ask a question now on `pool` (its own connection); the page's later ask waits for the answer."""
        call = self._top_conversations if name == "top_conversations" else getattr(self.store, name)
        self._asked(name, call, self._r(r), *a, pool=pool, **k)

    def _asked(self, name: str, call, r: TimeRange, *a: Any, pool: Any = None, **k: Any) -> Any:
        """A question's answer, asked once per view (one page run): the summary and the panels ask the
        same top tables, caps and alerts, and each is a Distributed query. With `pool`: asked there."""
        try:
            return self._answer(name, call, r, *a, pool=pool, **k)
        except Exception:  # the panel that asked shows it; the page must still schedule its refresh
            self.failed = True
            raise

    def _answer(self, name: str, call, r: TimeRange, *a: Any, pool: Any = None, **k: Any) -> Any:
        bound = inspect.signature(call).bind(r, *a, **k)
        bound.apply_defaults()  # top_ports(r, "tcp") and top_ports(r, "tcp", "packets") are one question
        n = bound.arguments.get("n") if name in ASKED_TOP else None
        if n is not None:  # the panels' top 10 is the head of the who panel's longer list: one query
            bound.arguments["n"] = max(int(n), ASKED_TOP[name])
        key = (name, repr(sorted(bound.arguments.items())))
        if key not in self._answers:
            self._answers[key] = pool.submit(_owned, self.store, call, *bound.args, **bound.kwargs) \
                if pool is not None else call(*bound.args, **bound.kwargs)
        if pool is not None:
            return None
        got = self._answers[key]
        if isinstance(got, Future):
            got = self._answers[key] = got.result()
        got = got.head(n) if n is not None else got
        return got.copy() if isinstance(got, pd.DataFrame) else got


    def cancel(self) -> None:
        """Drop this run's questions still waiting in the pool (a running one ends on its own connection)."""
        for got in self._answers.values():
            if isinstance(got, Future):
                got.cancel()

    def _top_conversations(self, r: TimeRange, by: str = "bytes", n: int = 20) -> pd.DataFrame:
        """The store's top conversations, exact when its shortcut proves them, else marked approximate."""
        df = self.store.top_conversations(self._r(r), by, n, exact=False)
        approximate = df.attrs.get("method") == "approximate"
        self.conversations_note = (by, int(df.attrs["unlisted_max"])) if approximate else None
        return df


def _owned(store: ClickHouseStore, call, *a: Any, **k: Any) -> Any:
    """A call whose reads go through this (pool) thread's own connection."""
    with store.own_connection():
        return call(*a, **k)




def ask_ahead(view: SensorView, pool: ThreadPoolExecutor, since: int, until: int, filtering: bool,
              by: str) -> None:
    """Start the page's slowest range questions on `pool` (the page asks them later and waits for them):
    top conversations, the VLAN chart's sums, the timeline, the totals and top tables of the summary."""
    from store.history import bin_width, time_range

    r = time_range(since, until)
    view.ahead(pool, "top_conversations", r, by, 20)
    if not filtering:
        view.ahead(pool, "vlans", r)
        view.ahead(pool, "series", r, bin_width(since, until), history_page.DIR_COLS)
    view.ahead(pool, "totals", r)
    for kind, of in {("src", "packets"), ("src", "bytes"), ("dst", "packets"), ("dst", by)}:
        view.ahead(pool, "top_addrs", r, kind, of)
    for proto in ("tcp", "udp"):
        view.ahead(pool, "top_ports", r, proto)


def fleet_store(address: str, cluster: str | None) -> ClickHouseStore:
    """One ClickHouse connection per page process and settings, shared by every tab."""
    return _store(address, cluster, config.get("CLICKHOUSE_DATABASE"), bool(config.get("CLICKHOUSE_SECURE")),
                  config.get("CLICKHOUSE_CA_CERTS"))


@st.cache_resource(show_spinner=False)
def _store(address: str, cluster: str | None, database: str, secure: bool, ca_certs: str) -> ClickHouseStore:
    """The store (cached per address and settings; it serialises its queries under its lock)."""
    # Not opened here: the page's first read opens it (bounded by CLICKHOUSE_QUERY_TIMEOUT_S), so a server
    # that does not answer costs one timeout per run, and its error is the page's state.
    return ClickHouseStore(address, cluster=cluster, database=database, secure=secure, ca_certs=ca_certs or None)


def page(address: str, cluster: str | None, tz: tzinfo | None) -> None:
    """The whole fleet page (called by dashboard.page() when --clickhouse is given).

    A read that fails anywhere is the page's error state, never an exception, and the page keeps
    refreshing (Live at REFRESH_S, otherwise every 5 x REFRESH_S while it fails): it recovers by itself
    when the server is back."""
    from streamlit_autorefresh import st_autorefresh

    st.title("Network Traffic Monitor · fleet")
    for key in KEPT:  # a run that failed before drawing these widgets must not reset them (Streamlit would)
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]
    store = fleet_store(address, cluster)
    live = st.session_state.get("fleet_range", next(iter(RANGES))) == next(iter(RANGES))
    failed = False
    try:
        live, failed = fleet_view(store, tz)
    except Unreadable as exc:  # unreachable, wrong password, bad TLS, a server gone mid-run: a message
        failed = True
        log.warning("fleet page: %s", exc)
        st.error(inv.plain(f"ClickHouse cannot be read: {exc}"))  # the server quotes the query (URL values)
        st.caption(f"Store: {store.path}. The page tries again at the next refresh.")
    if failed or (live and st.session_state.get("fleet_auto_refresh", True)):
        scale = 1 if live else 5
        st_autorefresh(interval=int(config.get("REFRESH_S") * 1000 * scale), key="fleet_tick")


KEPT = ("fleet_range", "range_from", "range_to", "hist_top_by", "hist_pie_by")  # choices that outlive an outage


class Unreadable(RuntimeError):
    """A read the fleet page needs failed (its text says why)."""


def _read(store: ClickHouseStore, call, *a: Any) -> Any:
    """A store read whose failure is the page's state (Unreadable), whatever the driver raised."""
    try:
        return call(*a)
    except Exception as exc:  # the server went away or hung: the page says so and refreshes
        raise Unreadable(str(exc) or store.status().message or type(exc).__name__) from exc


def fleet_view(store: ClickHouseStore, tz: tzinfo | None) -> tuple[bool, bool]:
    """The page's controls, grid and panels; whether the Live range is shown, and whether a panel's read
    failed (the panel shows it; the page refreshes). Raises Unreadable when the page cannot be drawn."""
    now = time.time()
    sensors = _read(store, sensor_table, store, now)
    names = sensors["sensor"].tolist()
    left, right = st.columns([1, 3])
    choice = sensor_picker(left, names)
    with right:
        span = fleet_range(now)
    live = st.session_state.get("fleet_range") == next(iter(RANGES))
    st.caption(f"ClickHouse {store.server_version} at {store.path} · {len(names)} sensors · "
               f"{'live: the last ' + str(LIVE_S // 60) + ' minutes, per second' if live else 'historical range'}")
    if span is None:
        return live, False
    since, until = span
    losses = _read(store, store.losses, TimeRange(since, until))
    grid = st.container()  # drawn below, while the pool reads the view's slowest questions
    st.header(inv.plain(choice) if choice != ALL else "All sensors")  # a name (or the URL's) is text
    st.caption(loss_text(losses, None if choice == ALL else choice))
    view = SensorView(store, None if choice == ALL else choice)
    lo, hi = inv.history_span(since, until, tz)  # chips, filter errors, and from/to narrowing the range
    engine = types.SimpleNamespace(store=view)
    filtering = bool(traffic_filters(tz))
    pool = store.read_pool()  # the store's one bounded pool: every run and tab shares its connections
    try:
        ask_ahead(view, pool, lo, hi, filtering, st.session_state.get("hist_top_by", "packets"))
        with grid:
            sensor_grid(store, sensors, since, until, tz, losses)
        got = (own_end_filter(view, lo, hi, tz) or inv.history_filter(engine, lo, hi, tz)) if filtering else None
        history_page.history_view(engine, lo, hi, tz, got, select=functools.partial(clickable, tz=tz))
        if filtering:
            inv.history_filtered(engine, lo, hi, tz, got)  # the conversations history_filter read: once
        fleet_panels(view, lo, hi, tz, got, sensors)
        failed = view.failed or bool(got and got.get("error"))
    finally:  # a question not started yet (a run cut short, or never asked) is dropped from the shared pool
        view.cancel()
    if view.conversations_note:
        by, most = view.conversations_note
        st.caption(f"Top conversations are approximate for this range: too many conversations of similar size to "
                   f"prove the top 20 from each hour's largest. Each {by} figure shows the part that is certain "
                   f"(≥ N); a conversation not "
                   f"listed has at most {most:,} {by}.")
    return live, failed


def own_end_filter(view: SensorView, since: int, until: int, tz: tzinfo | None) -> dict[str, Any] | None:
    """src= alone (or dst= alone, any number of them): the matching traffic from the per-minute top sources
    (destinations), which keep each address at its own end, so src= never counts a packet sent to it.
    None for other filters (history_filter: the stored conversations, either end; they keep no direction)."""
    from store.history import approximation, bin_width, time_range

    conds = traffic_filters(tz)
    kinds = {c.key for c in conds}
    if kinds not in ({"src"}, {"dst"}):
        return None
    kind = kinds.pop()
    labels = inv.plain(", ".join(c.label() for c in conds))
    r = view._r(time_range(since, until))
    try:
        nets = [ipaddress.ip_network(c.text.strip("[]"), strict=False) for c in conds]
        df = view.store.addr_minutes(r, kind, nets=nets)  # matched in SQL: a /8 is too many addresses to list
        capped = approximation(view, time_range(since, until)).get(kind)
    except Exception as exc:  # a store that cannot answer: the totals say they are unfiltered
        log.exception("fleet src/dst filter failed")
        return {"error": inv.plain(f"{type(exc).__name__}: {exc}"), "labels": labels}
    lo, hi = r.first_minute, until - until % 60 + 59  # the whole minutes the range touches
    width = max(60, bin_width(lo, hi))
    ends = "sources" if kind == "src" else "destinations"
    notes = [f"per minute, from the stored top {ends} (each address at its own end: {kind}= counts the packets "
             f"whose {'source' if kind == 'src' else 'destination'} it is), the whole minutes "
             f"{viz.time_texts([lo])[0]} – {viz.time_texts([hi])[0]} UTC; the protocol mix is not kept per address"]
    if capped:
        notes.append(f"approximate: {capped['minutes_capped']:,} minutes held more than STORE_TOP_MAX {ends} "
                     f"({capped['packets_left_out']:,} packets of those left out are not counted)")
    return {"packets": int(df["packets"].sum()) if len(df) else 0, "bytes": int(df["bytes"].sum()) if len(df) else 0,
            "span_s": hi - lo + 1, "transport_counts": {}, "transport_bytes": {},
            "series": inv._binned(df["minute"], df[["packets", "bytes"]], lo, hi, width), "bin_s": width,
            "exact": not capped, "note": inv.plain("; ".join(notes)),
            "labels": labels, "keep_alerts": functools.partial(inv._keep_alerts, conds)}


def sensor_picker(where: Any, names: list[str]) -> str:
    """The sensor picker, tied to the URL's sensor= (a link opens that sensor; a pick writes it; removing the
    chip shows all sensors again). A sensor= naming no sensor of this database is said, and shown (empty)."""
    wanted = list(dict.fromkeys(st.query_params.get_all("sensor")))
    if len(wanted) > 1:
        st.error(inv.plain(f"Several sensor= values ({', '.join(wanted)}): a packet comes from one sensor, so "
                           f"the page shows the last one, {wanted[-1]}."))
    chosen = wanted[-1] if wanted else ALL
    if chosen != ALL and chosen not in names:
        st.warning(inv.plain(f"sensor={chosen}: no sensor of this name has written to this database within "
                             "RETENTION_DAYS; its view is empty."))
        names = [*names, chosen]
    st.session_state["fleet_sensor"] = chosen  # the URL decides; the picker's change rewrites the URL first
    return where.selectbox("Sensor", [ALL, *names], key="fleet_sensor", on_change=_picked)


def _picked() -> None:
    choice = st.session_state.get("fleet_sensor", ALL)
    kept = tuple(p for p in inv.spec() if p[0] != "sensor")
    inv.set_spec(kept if choice == ALL else (*kept, ("sensor", choice)))


def traffic_filters(tz: tzinfo | None) -> list:
    """The URL's filters that select traffic within the chosen sensor and range (not sensor=, from=, to=)."""
    from investigate import filters as flt

    conds, _ = flt.parse(inv.spec(), tz)
    return [c for c in conds if c.key not in ("sensor", "from", "to")]


# A chart of the page -> the investigate page's name for it (which filters a click on it means).
CHART_KINDS = {"hist_pie": "pie", "hist_timeline": "timeline", "hist_top_src": "top_src", "hist_top_dst": "top_dst",
               "hist_ports": "ports", "fleet_vlans": "vlans", "fleet_who_src": "who_src",
               "fleet_who_dst": "who_dst", "fleet_countries": "who_countries", "fleet_networks": "who_networks"}


def clickable(key: str, obj: Any, tz: tzinfo | None) -> dict[str, Any]:
    """st.plotly_chart / st.dataframe keywords that turn a click on chart `key` (or a conversation row) into
    filters in the URL, as on the single-host page (investigate_page's mapping of labels to filters)."""
    if key == "hist_conversations":
        st.session_state["_fleet_conversations"] = [
            {k: r[k] for k in ("a", "b", "a_port", "b_port", "proto")} for r in obj]
        return {"on_select": _on_conversation, "selection_mode": "single-row"}
    kind = CHART_KINDS.get(key)
    if kind is None:
        return {}
    if kind == "timeline":  # a drag selects a time span (whole height) instead of zooming
        obj.layout.dragmode, obj.layout.selectdirection = "select", "h"
        mode: tuple[str, ...] = ("box",)
    else:
        st.session_state.setdefault(inv.LABELS_KEY, {})[key] = [inv.trace_labels(t) for t in obj.data]
        mode = ("points",)
    return {"on_select": functools.partial(_on_select, key, kind, tz), "selection_mode": mode}


def _on_select(key: str, kind: str, tz: tzinfo | None) -> None:
    selection = (st.session_state.get(key) or {}).get("selection") or {}
    labels = st.session_state.get(inv.LABELS_KEY, {}).get(key, [])
    inv.apply(inv.selection_filters(kind, selection, labels, tz))


def _on_conversation() -> None:
    picked = ((st.session_state.get("hist_conversations") or {}).get("selection") or {}).get("rows") or []
    rows = st.session_state.get("_fleet_conversations") or []
    if not picked or picked[0] >= len(rows):
        return
    keep = tuple(p for p in inv.spec() if p[0] not in ("host", "port", "proto", "src", "dst"))
    inv.set_spec(keep + tuple(inv.conversation_filters(rows[picked[0]])))


def fleet_range(now: float) -> tuple[int, int] | None:
    """The time-range control: (since, until) epoch seconds, inclusive; None when a custom range is bad."""
    choice = st.radio("Time range", list(RANGES), horizontal=True, key="fleet_range",
                      help="Live: the last minutes, per second, refreshed. The others: the fleet's history.")
    if choice == history_page.CUSTOM:
        return history_page._custom_range(now)
    until = int(now)
    return until - int(RANGES[choice] or 0) + 1, until


def sensor_table(store: ClickHouseStore, now: float) -> pd.DataFrame:
    """Every sensor with its last flush, how long ago, and whether it is stale.

    How long ago is the servers' clock alone (now on the server minus the time a server took the
    sensor's last write): a sensor whose clock is off, or a page whose clock is, marks nothing wrongly.
    Only a sensor with no write since schema version 6 falls back to its own clock against the page's."""
    df = store.sensors(since=int(now - float(config.get("RETENTION_DAYS")) * 86400))
    stale_s = STALE_FLUSHES * float(config.get("FLEET_FLUSH_S"))
    if not len(df):
        return pd.DataFrame(columns=["sensor", "last_flush", "last_period", "age_s", "stale"])
    df = df.copy()
    fallback = now - df["last_flush"].astype(float)
    server = pd.to_numeric(df["server_age_s"], errors="coerce") if "server_age_s" in df else fallback * float("nan")
    df["age_s"] = server.where(server.notna(), fallback).clip(lower=0)
    df["stale"] = df["age_s"] > stale_s
    return df


def loss_text(losses: pd.DataFrame, sensor: str | None) -> str:
    """What a sensor (or, with None, every sensor) lost in the range: ring, NIC, detectors."""
    rows = losses[losses["sensor"] == sensor] if sensor is not None else losses
    total = {c: int(rows[c].sum()) if len(rows) else 0 for c in
             ("ring_dropped", "nic_dropped", "detect_skipped_packets", "detect_skipped_batches",
              "history_skipped_packets")}
    # The NIC's counter belongs to the interface, not the sensor: sensors sharing one each report it.
    nic = (f"NIC dropped {total['nic_dropped']:,}" if sensor is not None or len(rows) < 2 else
           f"NIC dropped {total['nic_dropped']:,} (summed over sensors: sensors sharing an interface each count "
           "its drops)")
    text = (f"ring dropped {total['ring_dropped']:,}, {nic}, detectors skipped "
            f"{total['detect_skipped_packets']:,} ({total['detect_skipped_batches']:,} batches)")
    if total["history_skipped_packets"]:
        text += f", history skipped {total['history_skipped_packets']:,} (not in these totals)"
    return text


def sensor_grid(store: ClickHouseStore, sensors: pd.DataFrame, since: int, until: int, tz: tzinfo | None,
                losses: pd.DataFrame) -> None:
    """One card per sensor: its state (ok, stale, silent), totals and sparklines of the range."""
    from store.history import bin_width

    st.subheader("Sensors")
    if not len(sensors):
        st.info("No sensor has written to this ClickHouse database yet (start one with "
                "`packet_processor.py sensor --clickhouse ...`).")
        return
    width = bin_width(since, until, GRID_POINTS)
    per = _read(store, store.sensor_series, TimeRange(since, until), width)
    alerts = _read(store, store.alerts, TimeRange(since, until))
    cols = st.columns(GRID_COLUMNS)
    for i, row in enumerate(sensors.itertuples(index=False)):
        name = str(row.sensor)
        mine = per[per["sensor"] == name]
        fired = alerts[alerts["sensor"] == name] if len(alerts) else alerts
        with cols[i % GRID_COLUMNS].container(border=True, key=f"fleet_card_{i}"):
            sensor_card(name, row, mine, fired, since, until, width, tz)
            st.caption(loss_text(losses, name))


def sensor_card(name: str, row: Any, series: pd.DataFrame, alerts: pd.DataFrame, since: int, until: int,
                width: int, tz: tzinfo | None) -> None:
    """A sensor's card: name and state, packets and alerts in the range, and its sparklines."""
    packets = int(series["packets"].sum()) if len(series) else 0
    if row.stale:
        state = f"⚠️ stale: no flush for {row.age_s:,.0f} s"
    elif not packets:
        state = "silent: no traffic in this range"
    else:
        state = "ok"
    st.markdown(f"**{name.translate(_MARKDOWN)}** · {state}")
    st.caption(f"{packets:,} packets · {len(alerts):,} alerts · last flush "
               f"{viz.time_texts([float(row.last_flush)], tz)[0]}")
    st.plotly_chart(sparklines(series, alerts, since, until, width), key=f"fleet_spark_{name}",
                    config={"displayModeBar": False})


def sparklines(series: pd.DataFrame, alerts: pd.DataFrame, since: int, until: int, width: int) -> go.Figure:
    """Packets/s, bit/s and alerts started per bin, on the range's whole grid (quiet bins as 0)."""
    import numpy as np

    grid = np.arange(since // width * width, until + 1, width, dtype=np.int64)
    full = pd.DataFrame({"t": grid}).merge(series[["t", "packets", "bytes"]].astype("int64"), on="t",
                                           how="left").fillna(0)
    started = np.zeros(len(grid), np.int64)
    if len(alerts):
        idx = np.searchsorted(grid, (alerts["first_ts"].astype(float) // width * width).to_numpy(), side="right") - 1
        np.add.at(started, idx[(idx >= 0) & (idx < len(grid))], 1)
    x = pd.to_datetime(full["t"], unit="s", utc=True)
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.04)
    fig.add_trace(go.Scatter(x=x, y=full["packets"] / width, name="packets/s", mode="lines"), row=1, col=1)
    fig.add_trace(go.Scatter(x=x, y=full["bytes"] * 8 / width, name="bit/s", mode="lines"), row=2, col=1)
    fig.add_trace(go.Bar(x=x, y=started, name="alerts"), row=3, col=1)
    fig.update_layout(height=170, margin={"l": 4, "r": 4, "t": 4, "b": 4}, showlegend=False)
    fig.update_yaxes(title_text=None, tickfont={"size": 9})
    fig.update_xaxes(showticklabels=False)
    return fig


# -- the single-host page's other panels, from what the fleet stores -----------------------------------

RECENT_TEXT = ("**Recent packets:** the fleet does not store packets. Each sensor ships, every FLEET_FLUSH_S, "
               "per-second totals (packets, bytes, per protocol and direction), per-minute top talkers, ports "
               "and conversations (at most STORE_TOP_MAX / STORE_CONV_MAX a minute), its alerts and its "
               "losses — that is what every panel here is drawn from. For packets, open that sensor's own "
               "dashboard, or capture there.")


def fleet_panels(view: SensorView, since: int, until: int, tz: tzinfo | None, got: dict[str, Any] | None = None,
                 sensors: pd.DataFrame | None = None) -> None:
    """The VLANs, 'who is on the other end' and recent packets panels of the single-host page, as the
    fleet can draw them; each says what it is counted from. `got`: history_filter's answer (its matching
    conversations are the VLAN chart's, read once); `sensors`: the sensor table (whose names are this host)."""
    for name, draw in (("VLANs", functools.partial(vlan_panel, got=got)),
                       ("Who is on the other end", functools.partial(who_panel, sensors=sensors))):
        try:
            draw(view, since, until, tz)
        except Exception as exc:  # a store that cannot answer is a message, never a broken page
            log.exception("fleet %s panel failed", name)
            view.failed = True
            st.error(inv.plain(f"{name} cannot be read: {type(exc).__name__}: {exc}"))
    st.markdown(RECENT_TEXT)


def vlan_totals(df: pd.DataFrame) -> pd.DataFrame:
    """Packets and bytes per 802.1Q VLAN id of stored conversation rows (untagged, id 0, left out)."""
    tagged = df[(df["vlan"] > 0) & (df["vlan"] < 4095)] if len(df) else df
    if not len(tagged):
        return pd.DataFrame(columns=["vlan", "packets", "bytes"])
    out = tagged.groupby("vlan")[["packets", "bytes"]].sum().reset_index()
    return out.astype("int64").sort_values(["packets", "vlan"], ascending=[False, True], ignore_index=True)


def vlan_figure(totals: pd.DataFrame, by: str) -> go.Figure:
    """Bars 'VLAN N' (a click filters vlan=N), largest 20."""
    title = "VLANs (stored conversations, per minute)"
    rows = totals.sort_values([by, "vlan"], ascending=[False, True]).head(20).iloc[::-1]
    if not len(rows):
        return go.Figure(layout={**viz.LAYOUT, "title": {"text": title}, "annotations": [
            {"text": "no tagged traffic stored", "showarrow": False}], "xaxis": {"visible": False},
            "yaxis": {"visible": False}})
    bar = go.Bar(x=rows[by].tolist(), y=[f"VLAN {int(v)}" for v in rows["vlan"]], orientation="h",
                 marker={"color": "#e377c2"}, hovertemplate="%{y}: %{x:,} " + by + "<extra></extra>")
    return go.Figure(data=[bar], layout={**viz.LAYOUT, "title": {"text": title}, "uirevision": title,
                                         "yaxis": {"type": "category"}})


# The conversation columns a filter key needs to be matched on (conversation_mask).
_MASK_COLUMNS = {"port": ("a_port", "b_port"), "proto": ("proto",), "vlan": ()}


def filtered_vlans(view: SensorView, r: TimeRange, conds: list,
                   got: dict[str, Any] | None) -> tuple[pd.DataFrame, bool]:
    """(per VLAN and the columns the filters need, the matching conversations; whether a read was cut).

    The conversations history_filter read for the totals when it did (no second read); else (a protocol
    filter, counted from the per-second rows) summed in SQL per VLAN and the filters' columns, then matched."""
    if got and "conversations" in got:
        df, cut = got["conversations"]
        return df, bool(cut)
    cols = tuple(dict.fromkeys(c for cond in conds for c in _MASK_COLUMNS.get(cond.key, ("a", "b"))))
    df = view.vlans_by(r, cols)
    return (df[inv.conversation_mask(df, conds)] if len(df) else df), False


def vlan_panel(view: SensorView, since: int, until: int, tz: tzinfo | None, got: dict[str, Any] | None = None) -> None:
    """Packets per VLAN from the stored per-minute conversations (the per-second rows carry no VLAN)."""
    from store.history import approximation, time_range

    r = time_range(since, until)
    conds = traffic_filters(tz)
    cut = False
    if conds:  # the stored conversations that match the URL's filters, as the filtered totals count them
        df, cut = filtered_vlans(view, r, conds, got)
    else:  # summed by the store (whole hours from the hourly rows): no rows to read
        df = view.vlans(r)
    by = st.session_state.get("hist_top_by", "packets")
    fig = vlan_figure(vlan_totals(df), by)
    st.subheader("VLANs")
    st.plotly_chart(fig, key="fleet_vlans", **clickable("fleet_vlans", fig, tz))
    notes = ["The fleet stores VLAN ids only with its per-minute conversations (the per-second rows carry none): "
             "IP traffic only, whole minutes of the range; untagged traffic is not drawn"
             + ("; only the conversations matching the filters" if conds else "")]
    if {c.key for c in conds} & {"src", "dst"}:  # the totals above count src= / dst= at their own end only
        notes.append("src= / dst= match either end here (a stored conversation keeps no direction), while the "
                     "totals above count only the packets sent from (to) them: these bars can add up to more")
    if capped := approximation(view, r).get("conv"):
        notes.append(f"approximate: {capped['minutes_capped']:,} minutes held more than STORE_CONV_MAX "
                     f"conversations ({capped['packets_left_out']:,} packets left out)")
    if cut:
        notes.append(f"approximate: only the first {inv.HISTORY_CONV_ROWS:,} stored conversation rows were read")
    st.caption("; ".join(notes) + ". A click on a bar filters the page to that VLAN.")


def who_panel(view: SensorView, since: int, until: int, tz: tzinfo | None,
              sensors: pd.DataFrame | None = None) -> None:
    """Names, countries, networks (AS) and services of the range's top talkers, ports and conversations."""
    import enrich_page
    from store.history import approximation, time_range

    if not enrich_page.enabled():
        return
    shown = [view.sensor] if view.sensor else ([] if sensors is None else sensors["sensor"].astype(str).tolist())
    en = SiteNames(enrich_page.enricher(), all(is_this_host(s) for s in shown))
    by = st.session_state.get("hist_top_by", "packets")
    r = time_range(since, until)
    src_all = history_page._addrs(view.top_addrs(r, "src", by, WHO_ADDRESSES + 1))
    dst_all = history_page._addrs(view.top_addrs(r, "dst", by, WHO_ADDRESSES + 1))
    cut = len(src_all) > WHO_ADDRESSES or len(dst_all) > WHO_ADDRESSES
    src_all, dst_all = src_all[:WHO_ADDRESSES], dst_all[:WHO_ADDRESSES]
    st.subheader("Who is on the other end")
    if traffic_filters(tz):
        st.caption("These views are all traffic of the range (of the chosen sensor): the fleet keeps its top "
                   "talkers, ports and conversations per minute without the other fields, so the filters "
                   "narrow the totals, charts and tables above, not these.")
    tabs = st.tabs(["Top talkers", "Conversations", "Top countries", "Top networks (AS)", "Services",
                    "Recent packets"])
    src, dst = enrich_page.who_rows(en, src_all[:10]), enrich_page.who_rows(en, dst_all[:10])
    with tabs[0]:
        a, b = st.columns(2)
        for where, key, fig in ((a, "fleet_who_src", viz.who_bar(src, "Top sources: who", by)),
                                (b, "fleet_who_dst", viz.who_bar(dst, "Top destinations: who", by))):
            where.plotly_chart(fig, key=key, **clickable(key, fig, tz))
        st.dataframe(enrich_page.talkers_frame(src, dst, by), hide_index=True, key="fleet_who_talkers")
    with tabs[1]:
        st.dataframe(conversations_who(en, view, since, until, by), hide_index=True, key="fleet_who_conv")
        if view.conversations_note:
            of, most = view.conversations_note
            st.caption(f"Approximate: a count shown as ≥ N is a lower bound (the part that is certain); a "
                       f"conversation not listed has at most {most:,} {of}.")
    note = ends_note(cut, approximation(view, r))
    for tab, key, title, rows in ((tabs[2], "fleet_countries", "Top countries", en.by_country(src_all, dst_all)),
                                  (tabs[3], "fleet_networks", "Top networks (AS)", en.by_network(src_all, dst_all))):
        with tab:
            fig = enrich_page.ends_bar(rows, title, by)
            st.plotly_chart(fig, key=key, **clickable(key, fig, tz))
            st.caption(inv.plain(note) + " A click on a bar filters the page to that country or network.")
    with tabs[4]:
        st.dataframe(services_frame(en, view, r, by), hide_index=True, key="fleet_who_services")
        st.caption("Top destination ports of the range with their service names (per-minute top tables).")
    with tabs[5]:
        st.markdown(RECENT_TEXT)
    st.caption(inv.plain(enrich_page.enrich_note(en)) + " Local processes are not shown: they belong to each "
               "sensor's host, which the fleet does not ask. " + PRIVATE_NAMES_RULE)
    st.caption("AS data: [IP Geolocation by DB-IP](https://db-ip.com), RouteViews and NRO, CC BY 4.0.")


PRIVATE_NAMES_RULE = ("Names: a private, link-local or loopback address (not globally routable) seen by a sensor "
                      "other than this host is not looked up: the dashboard's resolver would answer for its own "
                      "site's addresses, not the sensor's. A sensor is this host when its name is this host's "
                      "name.")
NOT_LOOKED_UP = "(another site's private address: not looked up)"


def is_this_host(sensor: str) -> bool:
    """Whether a sensor's name is this host's (short or full) name: its private addresses are ours."""
    import socket

    return sensor in {socket.gethostname(), socket.gethostname().split(".")[0], socket.getfqdn()}


class SiteNames:
    """The enricher, but names of addresses that are not globally routable only for this host's own sensors."""

    def __init__(self, en: Any, local: bool) -> None:
        self._en, self._local = en, local

    def __getattr__(self, name: str) -> Any:
        return getattr(self._en, name)

    def name_text(self, addr: str) -> str:
        """The host name, or NOT_LOOKED_UP for another site's private address (never asked for)."""
        import ipaddress

        if not self._local and addr:
            try:
                if not ipaddress.ip_address(addr.strip("[]")).is_global:
                    return NOT_LOOKED_UP
            except ValueError:
                pass
        return self._en.name_text(addr)


def ends_note(cut: bool, approx: dict[str, dict[str, int]]) -> str:
    """What the countries and networks views sum, and when that is approximate."""
    note = ("Per end, over the range's stored per-minute top sources and destinations of all its traffic: 'sent' "
            "counts the packets whose source address is there, 'received' those whose destination is.")
    why = []
    if cut:
        why.append(f"only the busiest {WHO_ADDRESSES:,} sources and {WHO_ADDRESSES:,} destinations are summed")
    if any(k in approx for k in ("src", "dst")):
        why.append("some minutes held more addresses than STORE_TOP_MAX (their smallest were left out)")
    return note + (" Approximate: " + "; ".join(why) + "." if why else " Exact: every stored address is summed.")


def conversations_who(en: Any, view: SensorView, since: int, until: int, by: str) -> pd.DataFrame:
    """The range's top conversations with names, countries, AS and services (no processes: see the note)."""
    from enrich_page import who
    from store.history import conversations

    out = []
    for r in conversations(view, since, until, n=20, by=by):
        wa, wb = who(en, r["a"]), who(en, r["b"])
        proto = str(r["proto"]).lower()
        if r.get("approx"):  # the store's bounds: what is certain ("≥ N"), as the conversations table shows
            r = {**r, "packets": viz.count_text(r["packets"], r["packets_error"]),
                 "bytes": viz.count_text(r["bytes"], r["bytes_error"])}
        out.append({"A": r["a"], "A name": wa["name"], "A country": wa["country"], "A AS": wa["AS"],
                    "A port": en.services.label(r["a_port"], proto), "B": r["b"], "B name": wb["name"],
                    "B country": wb["country"], "B AS": wb["AS"], "B port": en.services.label(r["b_port"], proto),
                    "protocol": r["proto"], "packets": r["packets"], "bytes": r["bytes"]})
    return pd.DataFrame(out, columns=["A", "A name", "A country", "A AS", "A port", "B", "B name", "B country",
                                      "B AS", "B port", "protocol", "packets", "bytes"])


def services_frame(en: Any, view: SensorView, r: TimeRange, by: str) -> pd.DataFrame:
    """Top TCP and UDP destination ports with their service names, most `by` first."""
    rows = [{"protocol": proto.upper(), "port": int(p), "service": en.services.name(int(p), proto) or "",
             "packets": int(n), "bytes": int(b)}
            for proto in ("tcp", "udp") for p, n, b in history_page._ports(view.top_ports(r, proto, by, 20))]
    df = pd.DataFrame(rows, columns=["protocol", "port", "service", "packets", "bytes"])
    return df.sort_values([by, "protocol", "port"], ascending=[False, True, True], ignore_index=True)
