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
import inspect
import logging
import time
import types
from datetime import tzinfo
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

import config
import history_page
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


class SensorView:
    """A store whose every range question is asked for one sensor (or all): what history_page draws from."""

    def __init__(self, store: ClickHouseStore, sensor: str | None) -> None:
        self.store = store
        self.sensor = sensor
        self.conversations_note: tuple[str, int] | None = None  # (by, most unlisted) when last approximate
        self._answers: dict[tuple, Any] = {}  # this page run's answers (the view lives for one run)

    @property
    def path(self) -> str:
        """The store's address, and the sensor shown."""
        return f"{self.store.path} · {'sensor ' + self.sensor if self.sensor else 'all sensors'}"

    def _r(self, r: TimeRange) -> TimeRange:
        return dataclasses.replace(r, sensor=self.sensor)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if name not in ("totals", "series", "top_addrs", "top_ports", "top_conversations", "caps", "alerts",
                        "extent", "rows"):
            return attr
        if name == "rows":
            return lambda table, r, *a, **k: attr(table, self._r(r), *a, **k)
        if name == "top_conversations":  # never the full grouping of a day's conversations: bounds, marked
            return self._top_conversations
        return lambda r, *a, **k: self._asked(name, attr, self._r(r), *a, **k)

    def _asked(self, name: str, call, r: TimeRange, *a: Any, **k: Any) -> Any:
        """A question's answer, asked once per view (one page run): the summary and the panels ask the
        same top tables, caps and alerts, and each is a Distributed query."""
        bound = inspect.signature(call).bind(r, *a, **k)
        bound.apply_defaults()  # top_ports(r, "tcp") and top_ports(r, "tcp", "packets") are one question
        key = (name, repr(sorted(bound.arguments.items())))
        if key not in self._answers:
            self._answers[key] = call(r, *a, **k)
        got = self._answers[key]
        return got.copy() if isinstance(got, pd.DataFrame) else got


    def _top_conversations(self, r: TimeRange, by: str = "bytes", n: int = 20) -> pd.DataFrame:
        """The store's top conversations, exact when its shortcut proves them, else marked approximate."""
        df = self.store.top_conversations(self._r(r), by, n, exact=False)
        approximate = df.attrs.get("method") == "approximate"
        self.conversations_note = (by, int(df.attrs["unlisted_max"])) if approximate else None
        return df


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
    """The whole fleet page (called by dashboard.page() when --clickhouse is given)."""
    from streamlit_autorefresh import st_autorefresh

    st.title("Network Traffic Monitor · fleet")
    store = fleet_store(address, cluster)
    now = time.time()
    try:
        sensors = sensor_table(store, now)
    except Exception as exc:  # unreachable, wrong password, bad TLS: a message, never a broken page
        log.warning("fleet page: %s", exc)
        st.error(f"ClickHouse cannot be read: {store.status().message or exc}")
        st.caption(f"Store: {store.path}. The page tries again at the next refresh.")
        st_autorefresh(interval=int(config.get("REFRESH_S") * 1000 * 5), key="fleet_tick")
        return
    names = sensors["sensor"].tolist()
    left, right = st.columns([1, 3])
    choice = left.selectbox("Sensor", [ALL, *names], key="fleet_sensor")
    with right:
        span = fleet_range(now)
    live = st.session_state.get("fleet_range") == next(iter(RANGES))
    st.caption(f"ClickHouse {store.server_version} at {store.path} · {len(names)} sensors · "
               f"{'live: the last ' + str(LIVE_S // 60) + ' minutes, per second' if live else 'historical range'}")
    if span is None:
        return
    since, until = span
    losses = store.losses(TimeRange(since, until))
    sensor_grid(store, sensors, since, until, tz, losses)
    st.header(choice if choice != ALL else "All sensors")
    st.caption(loss_text(losses, None if choice == ALL else choice))
    view = SensorView(store, None if choice == ALL else choice)
    history_page.history_view(types.SimpleNamespace(store=view), since, until, tz)
    if view.conversations_note:
        by, most = view.conversations_note
        st.caption(f"Top conversations are approximate for this range: too many conversations of similar size to "
                   f"prove the top 20 from each hour's largest. Each {by} figure shows the part that is certain "
                   f"(≥ N); a conversation not "
                   f"listed has at most {most:,} {by}.")
    if live and st.session_state.get("fleet_auto_refresh", True):
        st_autorefresh(interval=int(config.get("REFRESH_S") * 1000), key="fleet_tick")


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
    text = (f"ring dropped {total['ring_dropped']:,}, NIC dropped {total['nic_dropped']:,}, detectors skipped "
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
    per = store.sensor_series(TimeRange(since, until), width)
    alerts = store.alerts(TimeRange(since, until))
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
