"""One interface for every store: open (and migrate), write a batch, query a range, prune, close.

The schema is explicit and versioned here, in one place, for every backend. Rows are tagged with
the ``sensor`` (default: the host name) and ``iface`` that produced them and with an ``origin``
("live", or "import:<id>" for an imported capture file); times are epoch seconds. Every row also
carries a ``seg``: the rollup rewrites the rows of a still-open minute by writing its segment again,
and a backend replaces the earlier rows of each segment listed in ``StoreBatch.replaces`` in the
same transaction, so a minute written partially and then whole is never counted twice.

Query shapes are kept to what ClickHouse 18.16 can run too (sum/min/max with GROUP BY over a time
range, ORDER BY ... LIMIT): a backend supplies ``_query`` and the dialect's integer division.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from analysis.headers import CLASSES, DIRECTIONS

if TYPE_CHECKING:  # pandas loads where a frame is made: `summary` and a live capture never need it
    import pandas as pd

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: the `documents` table (exclusion rules, baselines: small named JSON documents)

# Columns of the per-second table after the common prefix (sensor, iface, origin, seg).
SECOND_VALUES = (["packets", "bytes", "bytes_captured", "malformed"] + [f"pk_{c}" for c in CLASSES]
                 + [f"by_{c}" for c in CLASSES] + [f"pk_{d}" for d in DIRECTIONS] + [f"by_{d}" for d in DIRECTIONS])
PREFIX = (("sensor", "VARCHAR"), ("iface", "VARCHAR"), ("origin", "VARCHAR"), ("seg", "BIGINT"))

# table -> columns after PREFIX (alerts and origins have their own shape).
TABLES: dict[str, tuple[tuple[str, str], ...]] = {
    "seconds": (("ts", "BIGINT"), *((c, "BIGINT") for c in SECOND_VALUES),
                ("min_ts", "DOUBLE"), ("max_ts", "DOUBLE")),
    "conversations": (("minute", "BIGINT"), ("a", "VARCHAR"), ("b", "VARCHAR"), ("a_port", "INTEGER"),
                      ("b_port", "INTEGER"), ("proto", "SMALLINT"), ("vlan", "INTEGER"), ("packets", "BIGINT"),
                      ("bytes", "BIGINT"), ("first_us", "BIGINT"), ("last_us", "BIGINT")),  # after `minute`
    "top_addrs": (("minute", "BIGINT"), ("kind", "VARCHAR"), ("addr", "VARCHAR"), ("packets", "BIGINT"),
                  ("bytes", "BIGINT")),
    "top_ports": (("minute", "BIGINT"), ("proto", "VARCHAR"), ("port", "INTEGER"), ("packets", "BIGINT"),
                  ("bytes", "BIGINT")),
    # One row per minute and table kind whose table was capped: what was left out, and the most
    # any one left-out key could have had (summed over the cuts), which bounds a top-N's error.
    "caps": (("minute", "BIGINT"), ("kind", "VARCHAR"), ("dropped_keys", "BIGINT"), ("dropped_packets", "BIGINT"),
             ("dropped_bytes", "BIGINT"), ("bound_packets", "BIGINT"), ("bound_bytes", "BIGINT")),
}
# The same per-period tables per hour (`minute` is then the hour's first second). The rollup writes
# an hour's rows once, when the hour closes; until then the hour is listed in `open_hours` (one row
# per hour segment, written with the hour's first minute rows and deleted in the transaction that
# writes its hour rows). A query takes each whole hour not listed there from these tables (up to 60
# times fewer rows), and listed hours and the ragged ends of a range from the per-minute tables,
# so an hour left open by a killed process is still answered whole, from its minutes.
HOURLY = ("conversations", "top_addrs", "top_ports", "caps")
for _name in HOURLY:
    TABLES[f"{_name}_1h"] = TABLES[_name]
TABLES["open_hours"] = (("hour", "BIGINT"),)

ALERT_COLUMNS = (("sensor", "VARCHAR"), ("iface", "VARCHAR"), ("origin", "VARCHAR"), ("detector", "VARCHAR"),
                 ("severity", "VARCHAR"), ("source", "VARCHAR"), ("target", "VARCHAR"), ("first_ts", "DOUBLE"),
                 ("last_ts", "DOUBLE"), ("count", "BIGINT"), ("evidence", "VARCHAR"))
ORIGIN_COLUMNS = (("origin", "VARCHAR"), ("kind", "VARCHAR"), ("label", "VARCHAR"), ("created", "DOUBLE"),
                  ("sensor", "VARCHAR"))
DOC_COLUMNS = (("kind", "VARCHAR"), ("name", "VARCHAR"), ("body", "VARCHAR"), ("updated", "DOUBLE"))
DOC_BYTES_MAX = 1_000_000  # one document's JSON text: rules and baselines are small; bound what a page can store
ALERT_KEYS = ("detector", "severity", "source", "target", "first_ts", "last_ts", "count", "evidence")


def doc_text(kind: str, name: str, body: dict) -> str:
    """The JSON text of a document, after checking its kind, name and size (ValueError with the reason)."""
    if not isinstance(kind, str) or not kind.strip() or not isinstance(name, str) or not name.strip():
        raise ValueError(f"a document needs a kind and a name (got {kind!r}, {name!r})")
    if not isinstance(body, dict):
        raise ValueError(f"a document's body is a JSON object, not {type(body).__name__}")
    text = json.dumps(body, sort_keys=True, allow_nan=False)
    if len(text) > DOC_BYTES_MAX:
        raise ValueError(f"document {kind}/{name} is {len(text)} bytes, more than {DOC_BYTES_MAX}")
    return text


def doc_rows(df: pd.DataFrame) -> list[dict]:
    """Documents as dicts (name, body, updated) from rows with those columns (body as JSON text), by name."""
    out = [{"name": str(r["name"]), "body": json.loads(r["body"]), "updated": float(r["updated"])}
           for _, r in df.iterrows()]
    return sorted(out, key=lambda d: d["name"])


def columns(table: str) -> list[str]:
    """The column names of a table, in order."""
    if table == "alerts":
        return [c for c, _ in ALERT_COLUMNS]
    if table == "origins":
        return [c for c, _ in ORIGIN_COLUMNS]
    return [c for c, _ in PREFIX] + [c for c, _ in TABLES[table]]


def empty_frame(table: str) -> pd.DataFrame:
    """An empty DataFrame with the table's columns."""
    import pandas as pd

    return pd.DataFrame({c: [] for c in columns(table)})


@dataclass(frozen=True)
class TimeRange:
    """Capture-time seconds `since`..`until`, both inclusive; `sensor` None means every sensor."""

    since: int = 0
    until: int = 2 ** 62
    sensor: str | None = None

    @property
    def first_minute(self) -> int:
        """Epoch second of the minute holding `since` (per-minute tables cover whole minutes)."""
        return self.since - self.since % 60

    def full_hours(self) -> tuple[int, int]:
        """[h0, h1): the whole clock hours inside the range (h0 == h1 when there is none)."""
        h0 = -(-self.first_minute // 3600) * 3600
        h1 = (min(self.until, 2 ** 61) + 1) // 3600 * 3600
        return (h0, h1) if h1 > h0 else (0, 0)

    def params(self) -> dict[str, Any]:
        """Query parameters for the range."""
        return {"since": int(self.since), "until": int(self.until), "m0": int(self.first_minute),
                "sensor": self.sensor or ""}


@dataclass
class StoreBatch:
    """Rows for one write, one DataFrame per table (columns as in `columns(table)`).

    `replaces`: segments whose rows already in the store are replaced by this batch's rows of the
    same segment (the still-open minute, written again as it grows). `origins`: origin rows to add.
    `frames["open_hours"]` lists hours opened; `hours_done` the hour segments whose hour rows are in
    this batch (their `open_hours` rows are deleted).
    """

    frames: dict[str, pd.DataFrame] = field(default_factory=dict)
    replaces: tuple[int, ...] = ()
    alerts: pd.DataFrame | None = None
    origins: tuple[tuple[str, str, str, float, str], ...] = ()
    hours_done: tuple[int, ...] = ()  # hour segments whose `open_hours` row this batch deletes
    # (segment, first second of its minute) of segments `replaces` lists without rows here (a closed
    # minute's delta segments): a store that files replacements by time files each at its own minute.
    periods: tuple[tuple[int, int], ...] = ()

    def packets(self, exclude: set[int] | frozenset[int] = frozenset()) -> int:
        """Packets counted by this batch's per-second rows, leaving out the segments in `exclude`."""
        sec = self.frames.get("seconds")
        if sec is None or not len(sec):
            return 0
        if exclude:
            sec = sec[~sec["seg"].isin(list(exclude))]
        return int(sec["packets"].sum())

    def segments(self) -> set[int]:
        """The segments this batch writes."""
        sec = self.frames.get("seconds")
        return set() if sec is None else set(sec["seg"].tolist())

    def rows(self) -> int:
        """Rows in the batch, every table."""
        n = sum(len(f) for f in self.frames.values())
        return n + (0 if self.alerts is None else len(self.alerts))


@dataclass(frozen=True)
class StoreStatus:
    """What the page shows about the store: its state, the last error and what was written or lost."""

    state: str  # closed, ok, error, in_use
    path: str = ""
    message: str | None = None
    moved_aside: str | None = None  # where a corrupt or newer store was moved, once
    batches_written: int = 0
    rows_written: int = 0
    batches_failed: int = 0  # write attempts that failed (their batch waits in `pending`)
    pending: int = 0  # batches kept in memory to retry
    batches_dropped: int = 0  # batches given up on (pending overflowed): history lacks them
    packets_dropped: int = 0  # packets in those batches
    last_write_wall: float | None = None


class Store(ABC):
    """A history store: batched writes, range queries, pruning. Writes never raise; errors are state."""

    def __init__(self, pending_max: int = 60, clock=time.time) -> None:
        self.clock = clock
        self._lock = threading.RLock()
        self._pending: deque[StoreBatch] = deque()
        self._write_error: str | None = None  # the last failed write's message, until the waiting batches are written
        self._pending_max = pending_max
        self._counts = {"batches_written": 0, "rows_written": 0, "batches_failed": 0, "batches_dropped": 0,
                        "packets_dropped": 0}
        self._state = "closed"
        self._message: str | None = None
        self._moved_aside: str | None = None
        self._last_write: float | None = None
        self._last_seg = 0

    # -- lifecycle ---------------------------------------------------------------------

    @abstractmethod
    def open(self) -> bool:
        """Connect, create or migrate the schema; False (the reason in status()) when it cannot."""

    @abstractmethod
    def close(self) -> None:
        """Flush what the backend buffers and release the store; safe to call twice."""

    @property
    @abstractmethod
    def path(self) -> str:
        """Where the store is (a file, or a server address)."""

    def status(self) -> StoreStatus:
        """The store's state for the page and the CLI."""
        with self._lock:
            state, message = self._state, self._message
            if state == "ok" and self._write_error and self._pending:
                # Reopened after a failed write, but the waiting batches are not written yet: still an error.
                state, message = "error", self._write_error
            return StoreStatus(state, self.path, message, self._moved_aside, pending=len(self._pending),
                               last_write_wall=self._last_write, **self._counts)

    def allocate_segment(self) -> int:
        """A segment id never used before in this store (increasing, so recent segments are found fast)."""
        with self._lock:
            self._last_seg = max(self._last_seg + 1, time.time_ns() // 1000)
            return self._last_seg

    # -- writes ------------------------------------------------------------------------

    def write(self, batch: StoreBatch) -> bool:
        """Write a batch in one transaction, after any earlier batches that failed; False if it waits."""
        with self._lock:
            self._pending.append(batch)
            if self._drain():
                return True
            self._counts["batches_failed"] += 1
            self._give_up_pending(self._pending_max)
            return False

    def _give_up_pending(self, keep: int = 0) -> None:
        """Drop the oldest waiting batches beyond `keep`, counting the packets history loses with them."""
        with self._lock:
            while len(self._pending) > keep:
                lost = self._pending.popleft()
                # A segment written again by a later batch still waiting is not lost: that batch has it whole.
                later = {s for b in self._pending for s in b.segments()}
                packets = lost.packets(exclude=later)
                self._counts["batches_dropped"] += 1
                self._counts["packets_dropped"] += packets
                log.error("store: a batch was given up after failed writes; %d packets lost from history", packets)

    def _drain(self) -> bool:
        """Write the waiting batches in order; False at the first that fails (it stays first)."""
        while self._pending:
            if not self._ready():
                return False
            head = self._pending[0]
            try:
                self._write(head)
            except Exception as exc:  # any backend failure is state: the capture goes on
                self._failed(exc)
                self._write_error = self._message
                return False
            self._pending.popleft()
            self._counts["batches_written"] += 1
            self._counts["rows_written"] += head.rows()
            self._last_write = time.time()
        self._write_error = None
        return True

    def _ready(self) -> bool:
        """Whether the backend can take a write now (reopening it after a failure)."""
        return self._state == "ok" or self.open()

    @abstractmethod
    def _write(self, batch: StoreBatch) -> None:
        """Apply one batch atomically; raise on failure."""

    @abstractmethod
    def _failed(self, exc: Exception) -> None:
        """Record a failed write as the store's error state (and drop a broken connection)."""

    # -- retention ---------------------------------------------------------------------

    @abstractmethod
    def prune(self, retention_days: float | None = None, now: float | None = None) -> int:
        """Delete live rows older than the retention by capture time; imported rows stay. Rows deleted."""

    @abstractmethod
    def remove_origin(self, origin: str) -> int:
        """Delete every row of one origin (an imported file). Rows deleted."""

    # -- documents (exclusion rules, baselines) ------------------------------------------

    @abstractmethod
    def put_doc(self, kind: str, name: str, body: dict) -> None:
        """Save (or replace) the named document of a kind; raises ValueError (bad input) or OSError (store down)."""

    @abstractmethod
    def docs(self, kind: str) -> list[dict]:
        """Every document of a kind, by name: dicts with name, body and updated (wall time); OSError when down."""

    @abstractmethod
    def delete_doc(self, kind: str, name: str) -> bool:
        """Remove a named document; False when there was none; OSError when the store is down."""

    # -- queries -----------------------------------------------------------------------

    @abstractmethod
    def _query(self, sql: str, params: dict[str, Any]) -> pd.DataFrame:
        """Run one read query (named parameters written $name) and return its rows."""

    def _where(self, r: TimeRange, time_col: str) -> str:
        """The range condition on `time_col` (seconds: since..until; minutes: those overlapping it)."""
        low = "$since" if time_col == "ts" else "$m0"
        cond = f"{time_col} >= {low} AND {time_col} <= $until"
        return cond + (" AND sensor = $sensor" if r.sensor else "")

    def _source(self, table: str, r: TimeRange, cols: str, cond: str = "TRUE") -> str:
        """A subquery over the range's rows of a per-period table (the parts of `_ranges`); each part a
        plain time range, so row groups outside it are skipped."""
        sensor = " AND sensor = $sensor" if r.sensor else ""
        parts = [f"SELECT {cols} FROM {t} WHERE {rng} AND {cond}{sensor}" for t, rng in self._ranges(table, r)]
        return "(" + " UNION ALL ".join(parts) + ")"

    def _ranges(self, table: str, r: TimeRange) -> list[tuple[str, str]]:
        """(table, time condition) parts of the range: whole closed hours from `<table>_1h`, open hours and
        the minutes around the whole hours from `table` (empty parts left out: in a cluster each part is one
        more Distributed query)."""
        h0, h1 = r.full_hours()
        if h0 == h1:
            return [(table, "minute >= $m0 AND minute <= $until")]
        ranges = []
        if r.first_minute < h0:
            ranges.append((table, f"minute >= $m0 AND minute < {h0}"))
        if h1 <= r.until:
            ranges.append((table, f"minute >= {h1} AND minute <= $until"))
        start = h0
        for hour in self._open_hours(r, h0, h1):
            if hour > start:
                ranges.append((f"{table}_1h", f"minute >= {start} AND minute < {hour}"))
            ranges.append((table, f"minute >= {hour} AND minute < {hour + 3600}"))
            start = hour + 3600
        if start < h1:
            ranges.append((f"{table}_1h", f"minute >= {start} AND minute < {h1}"))
        return ranges

    def _open_hours(self, r: TimeRange, h0: int, h1: int) -> list[int]:
        """Hours in [h0, h1) some writer has not closed (their minutes answer for them)."""
        sensor = " AND sensor = $sensor" if r.sensor else ""
        df = self._query(f"SELECT DISTINCT hour FROM open_hours WHERE hour >= {h0} AND hour < {h1}{sensor} "
                         f"ORDER BY hour", r.params())
        return [int(h) for h in df["hour"]]

    def totals(self, r: TimeRange) -> dict[str, Any]:
        """Sums of every per-second column over the range, with the first and last packet times."""
        sums = ", ".join(f"{self._sum(c)} AS {c}" for c in SECOND_VALUES)
        df = self._query(f"SELECT {sums}, min(min_ts) AS min_ts, max(max_ts) AS max_ts, count(DISTINCT ts) AS secs "
                         f"FROM seconds WHERE {self._where(r, 'ts')}", r.params())
        import pandas as pd

        row = df.iloc[0] if len(df) else {}
        out = {c: int(row[c]) if c in row and pd.notna(row[c]) else 0 for c in SECOND_VALUES}
        for c in ("min_ts", "max_ts"):
            out[c] = float(row[c]) if c in row and pd.notna(row[c]) else None
        return out

    def series(self, r: TimeRange, bin_s: int = 1, cols: tuple[str, ...] = tuple(SECOND_VALUES)) -> pd.DataFrame:
        """Per-bin sums (bin start `t` in epoch seconds, then `cols`), bins without traffic left out."""
        sums = ", ".join(f"{self._sum(c)} AS {c}" for c in cols)
        bucket = self._bucket("ts", int(bin_s))
        return self._query(f"SELECT {bucket} AS t, {sums} FROM seconds WHERE {self._where(r, 'ts')} "
                           f"GROUP BY t ORDER BY t", r.params())

    def _sum(self, col: str) -> str:
        """SQL for an exact integer sum (the dialect's cast to a 64-bit integer)."""
        return f"CAST(sum({col}) AS BIGINT)"

    def _sums(self) -> str:
        return f"{self._sum('packets')} AS packets, {self._sum('bytes')} AS bytes"

    def _bucket(self, col: str, width: int) -> str:
        """SQL for the start of the `width`-second bin holding `col` (the dialect's integer division)."""
        return f"(({col} // {width}) * {width})"

    def top_addrs(self, r: TimeRange, kind: str, by: str = "packets", n: int = 10) -> pd.DataFrame:
        """The n addresses with most packets (or bytes) as sources (kind src) or destinations (dst)."""
        src = self._source("top_addrs", r, "addr, packets, bytes", "kind = $kind")
        return self._query(f"SELECT addr, {self._sums()} FROM {src} GROUP BY addr ORDER BY {by} DESC, addr LIMIT $n",
                           {**r.params(), "kind": kind, "n": int(n)})

    def top_ports(self, r: TimeRange, proto: str, by: str = "packets", n: int = 10) -> pd.DataFrame:
        """The n destination ports of `proto` (tcp, udp) with most packets (or bytes)."""
        src = self._source("top_ports", r, "port, packets, bytes", "proto = $proto")
        return self._query(f"SELECT port, {self._sums()} FROM {src} GROUP BY port ORDER BY {by} DESC, port LIMIT $n",
                           {**r.params(), "proto": proto, "n": int(n)})

    def vlans(self, r: TimeRange) -> pd.DataFrame:
        """Packets and bytes per VLAN id (0: untagged) of the range's stored conversations (IP traffic only)."""
        src = self._source("conversations", r, "vlan, packets, bytes")
        return self._query(f"SELECT vlan, {self._sums()} FROM {src} GROUP BY vlan ORDER BY vlan", r.params())

    def top_conversations(self, r: TimeRange, by: str = "bytes", n: int = 20) -> pd.DataFrame:
        """The n conversations (both directions, per VLAN) with most bytes (or packets) in the range."""
        keys = "a, a_port, b, b_port, proto, vlan"
        times = "minute + first_us / 1000000.0 AS first_ts, minute + last_us / 1000000.0 AS last_ts"
        src = self._source("conversations", r, f"{keys}, packets, bytes, {times}")
        return self._query(f"SELECT {keys}, {self._sums()}, min(first_ts) AS first_ts, max(last_ts) AS last_ts "
                           f"FROM {src} GROUP BY {keys} ORDER BY {by} DESC, a, b, a_port, b_port LIMIT $n",
                           {**r.params(), "n": int(n)})

    def rows(self, table: str, r: TimeRange, limit: int = 1_000_000) -> pd.DataFrame:
        """Raw rows of a per-minute table (conversations, top_addrs, top_ports, caps) in the range."""
        if table not in HOURLY:
            raise ValueError(f"not a per-minute table: {table}")
        return self._query(f"SELECT * FROM {table} WHERE {self._where(r, 'minute')} ORDER BY minute LIMIT $n",
                           {**r.params(), "n": int(limit)})

    def caps(self, r: TimeRange) -> pd.DataFrame:
        """Per table kind: periods capped, keys left out and the error bounds, summed over the range."""
        names = ("dropped_keys", "dropped_packets", "dropped_bytes", "bound_packets", "bound_bytes")
        src = self._source("caps", r, "kind, " + ", ".join(names))
        return self._query("SELECT kind, count(*) AS minutes, " + ", ".join(f"{self._sum(c)} AS {c}" for c in names)
                           + f" FROM {src} GROUP BY kind ORDER BY kind", r.params())

    def alerts(self, r: TimeRange) -> pd.DataFrame:
        """Alerts active at some moment of the range, newest (by last seen) first."""
        cond = "last_ts >= $since AND first_ts < $until + 1" + (" AND sensor = $sensor" if r.sensor else "")
        return self._query(f"SELECT sensor, iface, origin, {', '.join(ALERT_KEYS)} FROM alerts WHERE {cond} "
                           f"ORDER BY last_ts DESC, first_ts DESC, detector, source, target", r.params())

    def origins(self) -> pd.DataFrame:
        """Every origin (live, and each imported file) with its kind, label and creation wall time."""
        return self._query("SELECT * FROM origins ORDER BY created", {})

    def extent(self, r: TimeRange = TimeRange()) -> tuple[int, int] | None:
        """(first, last) second holding traffic in the range, or None when it is empty."""
        df = self._query(f"SELECT min(ts) AS lo, max(ts) AS hi FROM seconds WHERE {self._where(r, 'ts')}",
                         r.params())
        import pandas as pd

        if not len(df) or pd.isna(df.iloc[0]["lo"]):
            return None
        return int(df.iloc[0]["lo"]), int(df.iloc[0]["hi"])
