"""The ClickHouse store: the same `Store` interface as the embedded one, for a fleet of sensors.

Schema and SQL run on ClickHouse 18.16 (Debian's package) and on current releases: MergeTree tables
partitioned by day (an integer day number, no time zone involved), ORDER BY (sensor, time, ...);
retention drops whole day partitions; no TTL, no toIPv4, no Parquet, no lightweight DELETE.

Nothing is counted twice, without DELETE. Every row carries the segment (`seg`) the rollup gave it
and the version (`ver`) of the write attempt that inserted it. After a batch's rows are inserted, one
`commits` row per segment names the version that attempt wrote; a row counts only when its version
is the newest committed version of its (sensor, segment). So:
  * the rollup's rewrite of a still-open minute (a newer version of the same segment) hides the
    older rows, as the embedded store's DELETE of the segment does;
  * a batch re-sent after a lost acknowledgement is first looked up by its batch id in `commits`:
    found, it is not written again; not found, it is written under a new version, and whatever an
    earlier unacknowledged attempt inserted stays invisible (never committed, or superseded);
  * the tables are ReplacingMergeTree(ver) keyed by the row's identity, so background merges drop
    superseded versions (compaction); correctness never depends on a merge having happened.
The commit row is one INSERT into one table on one server (a sensor's rows all live on the shard its
name hashes to), so it is atomic.

Cluster: with `cluster`, the local tables are created on every shard listed in `system.clusters`
(18.16 has no distributed DDL without ZooKeeper) and a `<table>_d` Distributed table over them, sharded
by cityHash64(sensor), on every shard too. Writes go through the Distributed tables synchronously
(insert_distributed_sync), queries through them; the visibility subquery names the local `commits`
table, so each shard answers it for its own sensors.

Reads and connection handshakes wait at most CLICKHOUSE_QUERY_TIMEOUT_S (a server that accepts and never
answers is an error in seconds, and the store's lock is free again); writes and migrations wait `timeout`.
open() changes nothing on a server already at this schema version, so a read-only account (profile
readonly = 1; no query settings are sent except on inserts) reads a current database.

Credentials come from the environment or a file, never the command line: CLICKHOUSE_USER (default
"default"), CLICKHOUSE_PASSWORD_FILE (a file holding the password) or CLICKHOUSE_PASSWORD. TLS: the
`secure` and `ca_certs` options (settings CLICKHOUSE_SECURE, CLICKHOUSE_CA_CERTS) go to clickhouse-driver.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pandas as pd

import config
from store.base import (
    ALERT_COLUMNS,
    ALERT_KEYS,
    DOC_COLUMNS,
    ORIGIN_COLUMNS,
    PREFIX,
    SECOND_VALUES,
    TABLES,
    Store,
    StoreBatch,
    TimeRange,
    columns,
    doc_rows,
    doc_text,
)
from store.rollup import DELTA_SLOTS

log = logging.getLogger(__name__)

_TYPES = {"VARCHAR": "String", "BIGINT": "Int64", "INTEGER": "Int32", "SMALLINT": "Int16", "DOUBLE": "Float64"}
_NULLABLE = {("conversations", "a_port"), ("conversations", "b_port")}
# Row identity within a segment (with sensor, period and seg): what ReplacingMergeTree collapses.
_KEYS = {"seconds": ("ts",), "conversations": ("minute", "a", "b", "ifNull(a_port, -1)", "ifNull(b_port, -1)",
                                                "proto", "vlan"),
         "top_addrs": ("minute", "kind", "addr"), "top_ports": ("minute", "proto", "port"),
         "caps": ("minute", "kind"), "open_hours": ("hour",)}
_PERIOD = {"seconds": "ts", "open_hours": "hour"}  # others: minute
SEG_TABLES = tuple(TABLES)
READERS_MAX = 4  # idle per-thread read connections a store keeps (own_connection)
OPEN_HOURS_TTL_S = 2.0  # how long a range's open hours are remembered (one page run asks them ~10 times)
MINUTES_FROM_S = 3600  # a range with at least this many seconds of whole minutes reads them from seconds_1m
QUERY_TABLES = (*SEG_TABLES, "alerts", "origins")


@dataclass
class IdBatch(StoreBatch):
    """A StoreBatch with the id that makes its write idempotent (the spool keeps it across restarts)."""

    batch_id: str = ""
    # The sensor's loss counters when the batch was made ((iface, *LOSS_COLUMNS)), cumulative
    # since the sensor process started: a row written twice (a re-send) changes no max().
    losses: tuple = ()


def with_id(batch: StoreBatch) -> IdBatch:
    """The batch with a batch id (a new one unless it has one)."""
    if isinstance(batch, IdBatch) and batch.batch_id:
        return batch
    return IdBatch(**{f.name: getattr(batch, f.name) for f in fields(StoreBatch)}, batch_id=uuid.uuid4().hex)


_REMEMBERED: tuple[str, str] | None = None


def remember_credentials() -> None:
    """Read the credentials once, now (a sensor does it as root, before it gives up root and may no
    longer read a password file only root can read); credentials() answers from memory afterwards."""
    global _REMEMBERED
    _REMEMBERED = None
    _REMEMBERED = credentials()


def credentials() -> tuple[str, str]:
    """(user, password) from CLICKHOUSE_USER and CLICKHOUSE_PASSWORD_FILE or CLICKHOUSE_PASSWORD."""
    if _REMEMBERED is not None:
        return _REMEMBERED
    user = os.environ.get("CLICKHOUSE_USER") or "default"
    path = os.environ.get("CLICKHOUSE_PASSWORD_FILE")
    if path:
        with open(path, encoding="utf-8") as f:
            return user, f.read().strip("\r\n")
    return user, os.environ.get("CLICKHOUSE_PASSWORD", "")


def parse_address(address: str, default_port: int = 9000) -> tuple[str, int]:
    """HOST:PORT (or HOST, or [v6]:PORT) -> (host, port)."""
    m = re.fullmatch(r"\[(.+)\](?::(\d+))?|([^:]+)(?::(\d+))?", address.strip())
    if not m:
        raise ValueError(f"not a ClickHouse address: {address!r} (give HOST:PORT)")
    host = m.group(1) or m.group(3)
    port = m.group(2) or m.group(4)
    return host, int(port) if port else default_port


def _col_sql(table: str, name: str, sql_type: str) -> str:
    t = _TYPES[sql_type]
    return f"{name} Nullable({t})" if (table.removesuffix("_1h"), name) in _NULLABLE else f"{name} {t}"


def _layouts() -> dict[str, tuple[str, str]]:
    """(PARTITION BY, ORDER BY) of every versioned table as schema versions 1 and 3 created them."""
    out = {}
    for name in TABLES:
        base = name.removesuffix("_1h")
        period = _PERIOD.get(base, "minute")
        out[name] = (f"intDiv({period}, 86400)",
                     ", ".join(("sensor", period, "seg", *(k for k in _KEYS[base] if k != period))))
    out["alerts"] = ("intDiv(toInt64(last_ts), 86400)", "sensor, origin, detector, source, target, first_ts")
    out["seconds_1m"] = ("intDiv(minute, 86400)", "sensor, minute, seg")
    return out


def create_sql(db: str) -> list[str]:
    """Schema version 1: every local table (run on every shard)."""
    out = [f"CREATE DATABASE IF NOT EXISTS {db}",
           f"CREATE TABLE IF NOT EXISTS {db}.meta (key String, value String) ENGINE = TinyLog"]
    layouts = _layouts()
    for name, cols in TABLES.items():
        body = ", ".join(_col_sql(name, c, t) for c, t in (*PREFIX, *cols))
        part, order = layouts[name]
        out.append(f"CREATE TABLE IF NOT EXISTS {db}.{name} ({body}, ver Int64) ENGINE = ReplacingMergeTree(ver) "
                   f"PARTITION BY {part} ORDER BY ({order})")
    alerts = ", ".join(_col_sql("alerts", c, t) for c, t in ALERT_COLUMNS)
    part, order = layouts["alerts"]
    out.append(f"CREATE TABLE IF NOT EXISTS {db}.alerts ({alerts}, ver Int64) ENGINE = ReplacingMergeTree(ver) "
               f"PARTITION BY {part} ORDER BY ({order})")
    origins = ", ".join(_col_sql("origins", c, t) for c, t in ORIGIN_COLUMNS)
    out.append(f"CREATE TABLE IF NOT EXISTS {db}.origins ({origins}) ENGINE = ReplacingMergeTree(created) "
               f"ORDER BY (sensor, origin)")
    out.append(f"CREATE TABLE IF NOT EXISTS {db}.commits (sensor String, batch String, seg Int64, ver Int64, "
               f"period Int64, alerts UInt8, wall Float64) ENGINE = MergeTree PARTITION BY intDiv(period, 86400) "
               f"ORDER BY (sensor, period, seg, ver)")
    return out


def distributed_sql(db: str, cluster: str, version: int) -> list[str]:
    """A Distributed table `<name>_d` over each local table of schema `version`, sharded by sensor (run on
    every shard)."""
    tables = (*QUERY_TABLES, "seconds_1m", "commits", "commits_max", *(("conv_top_1h",) if version >= 5 else ()),
              *(("losses", "flushes") if version >= 6 else ()), *(("run_losses",) if version >= 7 else ()),
              *(("vlans_1h",) if version >= 8 else ()))
    return [f"CREATE TABLE IF NOT EXISTS {db}.{t}_d AS {db}.{t} ENGINE = Distributed({_quote(cluster)}, {db}, {t}, "
            f"cityHash64(sensor))" for t in tables]


def _quote(name: str) -> str:
    """An identifier in backticks (unquoted, a cluster named dc-2a is a syntax error), escaped as ClickHouse
    reads it. (18.16 refuses cluster names with dots in any form; later releases take them quoted.)"""
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


class ReadOnlySchema(RuntimeError):
    """The database needs a schema change and the account may not make it."""


class WaitTimeout(TimeoutError):
    """ClickHouse did not answer within the timeout in effect; the text names that timeout."""


def _timed_out(exc: BaseException) -> bool:
    """Whether an error is a socket timeout (Python's, or clickhouse-driver's SOCKET_TIMEOUT, code 209)."""
    return isinstance(exc, TimeoutError) or getattr(exc, "code", None) == 209 or \
        "SocketTimeout" in type(exc).__name__


class _OneLine(logging.Filter):
    """clickhouse_driver logs a whole traceback at WARNING for each failed connection attempt; the store
    reports the failure itself (state, one error line): keep the driver's record to one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_driver_logs() -> None:
    """Install the one-line filter on clickhouse_driver's connection logger (once)."""
    logger = logging.getLogger("clickhouse_driver.connection")
    if not any(isinstance(f, _OneLine) for f in logger.filters):
        logger.addFilter(_OneLine())


def minute_sql(db: str) -> list[str]:
    """Schema version 3: per-minute sums of the per-second rows, and the compact visibility table.

    `seconds_1m` holds, per (sensor, minute, segment, version), the sums of that segment's second rows:
    the store writes it with the same version in the same write, so the same visibility rule applies
    and a day reads 1,440 rows per sensor instead of 86,400. `commits_max` holds a batch's commit rows
    too but collapses (ReplacingMergeTree) to one row per (sensor, period, segment) with its newest
    version: the visibility lookup reads that instead of every flush's commit rows. Both are filled
    from what is already there, so a version-1 database answers the same after the migration."""
    body = ", ".join(_col_sql("seconds", c, t) for c, t in (*PREFIX, ("minute", "BIGINT"),
                                                            *((v, "BIGINT") for v in SECOND_VALUES),
                                                            ("min_ts", "DOUBLE"), ("max_ts", "DOUBLE")))
    sums = ", ".join(f"sum({c})" for c in SECOND_VALUES)
    return [f"CREATE TABLE IF NOT EXISTS {db}.seconds_1m ({body}, ver Int64) ENGINE = ReplacingMergeTree(ver) "
            f"PARTITION BY intDiv(minute, 86400) ORDER BY (sensor, minute, seg)",
            f"CREATE TABLE IF NOT EXISTS {db}.commits_max (sensor String, period Int64, seg Int64, ver Int64) "
            f"ENGINE = ReplacingMergeTree(ver) PARTITION BY intDiv(period, 86400) ORDER BY (sensor, period, seg)",
            # Only the (sensor, iface, origin, segment, version, minute) groups not there yet: a repeat
            # (cut off before the version was recorded) adds nothing; each group is one row, whole or absent.
            f"INSERT INTO {db}.seconds_1m SELECT sensor, iface, origin, seg, intDiv(ts, 60) * 60 AS minute, {sums}, "
            f"min(min_ts), max(max_ts), ver FROM {db}.seconds WHERE (sensor, iface, origin, seg, ver, "
            f"intDiv(ts, 60) * 60) NOT IN (SELECT sensor, iface, origin, seg, ver, minute FROM {db}.seconds_1m) "
            f"GROUP BY sensor, iface, origin, seg, ver, minute",
            # commits_max is read with max(ver): a row copied twice changes nothing.
            f"INSERT INTO {db}.commits_max SELECT sensor, period, seg, ver FROM {db}.commits"]


VERSIONED = (*TABLES, "seconds_1m", "alerts")  # the tables whose rows carry a write attempt's `ver`


def version_key_steps(db: str, client) -> list[str]:
    """Schema version 4: `ver` joins the sorting key of every versioned table (run on one shard).

    Under ReplacingMergeTree(ver) keyed without `ver`, a merge kept only a row's newest version, even
    one whose write was cut off before its commit, and so erased the committed rows the visibility rule
    asks for. Keyed with `ver`, a merge collapses only identical rows of one version (a repeated copy),
    and which version counts is the visibility rule's choice alone. ClickHouse cannot change a sorting
    key, so each table is rebuilt: a new table, a swap of names, then a copy of the old rows. Every step
    looks at what is there first, so a migration cut off anywhere completes when it runs again; the
    caller holds the shard's migration lock, so two programs never run it at once."""
    out: list[str] = []
    for name, (part, order) in _layouts().items():
        table, new, old = f"{db}.{name}", f"{db}.{name}_v4", f"{db}.{name}_v3"
        if not _exists(client, db, name) or not _has_ver_key(client, table):
            if _exists(client, db, name):
                client.execute(f"CREATE TABLE IF NOT EXISTS {new} AS {table} ENGINE = ReplacingMergeTree(ver) "
                               f"PARTITION BY {part} ORDER BY ({order}, ver)")
                # Writes in between fail (no table) and are retried by their senders: nothing is lost.
                client.execute(f"RENAME TABLE {table} TO {old}")
            client.execute(f"RENAME TABLE {new} TO {table}")
        if _exists(client, db, f"{name}_v3"):
            _copy_missing(client, table, old, part, order)
            client.execute(f"DROP TABLE {old}")
    return out


def _exists(client, db: str, name: str) -> bool:
    return bool(client.execute("SELECT count() FROM system.tables WHERE database = %(d)s AND name = %(n)s",
                               {"d": db, "n": name})[0][0])


def _has_ver_key(client, table: str) -> bool:
    text = client.execute(f"SHOW CREATE TABLE {table}")[0][0]
    return ", ver)" in text.split("ORDER BY", 1)[-1]


def _copy_missing(client, table: str, old: str, part: str, order: str) -> None:
    """Copy the old table's rows not in the new one yet, a day partition at a time (bounded memory)."""
    key = f"{order}, ver"
    days = client.execute(f"SELECT DISTINCT {part} AS p FROM {old} ORDER BY p")
    for (day,) in days:
        client.execute(f"INSERT INTO {table} SELECT * FROM {old} WHERE {part} = {int(day)} AND ({key}) NOT IN "
                       f"(SELECT {key} FROM {table} WHERE {part} = {int(day)})")


def documents_sql(db: str) -> list[str]:
    """Schema version 2: named JSON documents (exclusion rules, baselines). Versioned rows, no DELETE
    (18.16 has none): the newest `ver` of a (kind, name) wins and a row with deleted = 1 removes it."""
    body = ", ".join(_col_sql("documents", c, t) for c, t in DOC_COLUMNS)
    return [f"CREATE TABLE IF NOT EXISTS {db}.documents ({body}, deleted UInt8, ver Int64) "
            f"ENGINE = ReplacingMergeTree(ver) ORDER BY (kind, name)"]


CONV_TOP_K = 100  # per hour segment: the conversations kept (by bytes, and by packets) as top-N candidates
CONV_SCAN_MAX = 500  # most candidates whose exact totals one query reads (more: the shortcut gives up)
_CONV_KEYS = "a, a_port, b, b_port, proto, vlan"
_CONV_TUPLE = "(a, ifNull(a_port, -1), b, ifNull(b_port, -1), proto, vlan)"


def conv_top_select(db_table: str, where: str = "1") -> str:
    """The `conv_top_1h` rows of the hour rows in `db_table` matching `where`: per hour segment and version,
    the CONV_TOP_K largest conversations by bytes and by packets, each with `rest`, the largest value (of
    its `top_by`) of a conversation of that segment left out (0 when none is)."""
    k = CONV_TOP_K
    row = f"({_CONV_KEYS}, packets, bytes, first_us, last_us)"
    parts = []
    for i, by in enumerate(("bytes", "packets")):
        pos = 8 if by == "bytes" else 7  # the value's place in `row`
        parts.append(
            f"SELECT sensor, iface, origin, seg, minute, '{by}' AS top_by, r.1 AS a, r.2 AS a_port, r.3 AS b, "
            f"r.4 AS b_port, r.5 AS proto, r.6 AS vlan, r.7 AS packets, r.8 AS bytes, r.9 AS first_us, "
            f"r.10 AS last_us, rest, ver FROM (SELECT sensor, iface, origin, seg, minute, ver, "
            f"arrayReverseSort(x -> x.{pos}, groupArray({row})) AS s{i}, arraySlice(s{i}, 1, {k}) AS top{i}, "
            f"if(length(s{i}) > {k}, s{i}[{k + 1}].{pos}, 0) AS rest FROM {db_table} WHERE {where} "
            f"GROUP BY sensor, iface, origin, seg, minute, ver) ARRAY JOIN top{i} AS r")
    return " UNION ALL ".join(parts)


def conv_top_sql(db: str) -> list[str]:
    """Schema version 5: `conv_top_1h`, each closed hour segment's largest conversations (the exact
    top-N shortcut's candidates and bounds), written with the hour rows under the same version (so the
    same visibility rule applies); filled from the hour rows already there."""
    body = ", ".join(_col_sql("conversations", c, t) for c, t in (*PREFIX, *TABLES["conversations"]))
    return [f"CREATE TABLE IF NOT EXISTS {db}.conv_top_1h ({body}, top_by String, rest Int64, ver Int64) "
            f"ENGINE = ReplacingMergeTree(ver) PARTITION BY intDiv(minute, 86400) "
            f"ORDER BY (sensor, minute, seg, top_by, a, b, ifNull(a_port, -1), ifNull(b_port, -1), proto, vlan, ver)",
            f"INSERT INTO {db}.conv_top_1h (sensor, iface, origin, seg, minute, top_by, {_CONV_KEYS}, packets, "
            f"bytes, first_us, last_us, rest, ver) " + conv_top_select(
                f"{db}.conversations_1h", f"(sensor, seg, minute, ver) NOT IN (SELECT sensor, seg, minute, ver "
                f"FROM {db}.conv_top_1h)")]  # only what is not there yet: a migration run again adds nothing


LOSS_COLUMNS = ("run", "ts", "ring_dropped", "nic_dropped", "detect_skipped_packets", "detect_skipped_batches",
                "history_skipped_packets")


def losses_sql(db: str) -> list[str]:
    """Schema version 6: each sensor's loss counters, and the servers' receive time of each flush.

    `losses`: one row per flush whose counters changed, cumulative since the sensor process (`run`)
    started, at the sensor's wall second `ts`: a range's losses are, per run, the largest value up to
    its end minus the largest before its start, so a row sent twice (a re-send after a lost
    acknowledgement, a spool replayed after a restart) counts once. Only identical rows collapse.
    `flushes`: one row per write, `received` filled by the server that takes the insert (its clock,
    not the sensor's): the fleet page's stale marking. Collapses to a sensor's newest row; no day
    partition (one row per sensor once merged)."""
    counters = ", ".join(f"{c} Int64" for c in LOSS_COLUMNS[2:])
    return [f"CREATE TABLE IF NOT EXISTS {db}.losses (sensor String, iface String, run String, ts Int64, {counters}) "
            f"ENGINE = ReplacingMergeTree PARTITION BY intDiv(ts, 86400) ORDER BY (sensor, run, ts, "
            f"{', '.join(LOSS_COLUMNS[2:])})",
            f"CREATE TABLE IF NOT EXISTS {db}.flushes (sensor String, received DateTime DEFAULT now()) "
            f"ENGINE = ReplacingMergeTree(received) ORDER BY sensor"]


LOSS_COUNTERS = LOSS_COLUMNS[2:]
PREV_COLUMNS = tuple(f"prev_{c}" for c in LOSS_COUNTERS)


def run_losses_sql(db: str) -> list[str]:
    """Schema version 7: `run_losses`, the loss rows as `losses` plus when a server received them and the
    counters of the run's previous row (`prev_*`, as the sensor sent them before).

    `received` is the server's clock (a sensor's own clock may be minutes off: its rows would fall outside
    the Live range) and the day partition, so retention drops a row with the day it arrived. A range's
    loss per run is the largest value up to its end minus the last value before its start; when no row
    of the run is left before the start (retention dropped that day, or the run began in the range), the
    smallest `prev_*` within the range is that last value. A row sent twice is the same row (max and min
    unchanged; ReplacingMergeTree merges it away). The version 6 rows are copied with received = their ts
    and prev 0 (what version 6 computed); `losses` stays, unused."""
    counters = ", ".join(f"{c} Int64" for c in (*LOSS_COUNTERS, *PREV_COLUMNS))
    key = ", ".join((*LOSS_COUNTERS, *PREV_COLUMNS))
    cols = f"sensor, iface, run, received, ts, {key}"
    return [f"CREATE TABLE IF NOT EXISTS {db}.run_losses (sensor String, iface String, run String, received Int64, "
            f"ts Int64, {counters}) ENGINE = ReplacingMergeTree PARTITION BY intDiv(received, 86400) "
            f"ORDER BY (sensor, run, ts, {key})",
            f"INSERT INTO {db}.run_losses ({cols}) SELECT sensor, iface, run, ts, ts, "
            f"{', '.join(LOSS_COUNTERS)}, {', '.join('toInt64(0)' for _ in PREV_COLUMNS)} FROM {db}.losses "
            f"WHERE (sensor, run, ts) NOT IN (SELECT sensor, run, ts FROM {db}.run_losses)"]


def vlans_sql(db: str) -> list[str]:
    """Schema version 8: `vlans_1h`, each closed hour segment's packets and bytes per VLAN, written with its
    hour rows under the same version (the same visibility rule): the VLAN chart of a day reads these, not
    every conversation of the day. Filled from the hour rows already there (only what is not there yet, per
    (sensor, segment, hour, VLAN, version): a backfill cut off mid-way is completed by the next, never skipped)."""
    return [f"CREATE TABLE IF NOT EXISTS {db}.vlans_1h (sensor String, iface String, origin String, seg Int64, "
            f"minute Int64, vlan Int32, packets Int64, bytes Int64, ver Int64) ENGINE = ReplacingMergeTree(ver) "
            f"PARTITION BY intDiv(minute, 86400) ORDER BY (sensor, minute, seg, vlan, ver)",
            f"INSERT INTO {db}.vlans_1h SELECT sensor, iface, origin, seg, minute, vlan, sum(packets), sum(bytes), "
            f"ver FROM {db}.conversations_1h WHERE (sensor, seg, minute, vlan, ver) NOT IN (SELECT sensor, seg, "
            f"minute, vlan, ver FROM {db}.vlans_1h) GROUP BY sensor, iface, origin, seg, minute, vlan, ver"]


# version -> statements that bring a database from version-1 to version (on every shard).
MIGRATIONS = {1: create_sql, 2: documents_sql, 3: minute_sql, 5: conv_top_sql, 6: losses_sql, 7: run_losses_sql,
              8: vlans_sql}
# version -> steps that look at a shard's tables first, run there (they return statements to run after).
STEPS = {4: version_key_steps}
MIGRATION_WAIT_S = 60.0  # how long an open waits for another program's migration of a shard before failing
MIGRATION_STALE_S = 900.0  # a migration lock this old was left by a program that died: taken over
# this backend's schema version (the per-minute tables, version keys and hour candidates are ClickHouse's own)
CH_SCHEMA_VERSION = max(*MIGRATIONS, *STEPS)


class ClickHouseStore(Store):
    """History rows in ClickHouse, one server or a cluster; writes never raise, errors are state."""

    def __init__(self, address: str = "127.0.0.1:9000", cluster: str | None = None, database: str | None = None,
                 sensor: str | None = None, secure: bool | None = None, ca_certs: str | None = None,
                 pending_max: int | None = None, connect_timeout: float = 3.0, timeout: float = 30.0,
                 clock=time.time, query_timeout: float | None = None) -> None:
        super().__init__(pending_max if pending_max is not None else config.get("STORE_PENDING_MAX"), clock)
        self.host, self.port = parse_address(address)
        self.cluster = cluster or None
        self.db = database or config.get("CLICKHOUSE_DATABASE")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.db) or (cluster and not re.fullmatch(r"[\w.-]+", cluster)):
            raise ValueError(f"not a database/cluster name: {self.db!r} / {cluster!r}")
        self.sensor = sensor
        self.secure = bool(config.get("CLICKHOUSE_SECURE") if secure is None else secure)
        self.ca_certs = ca_certs if ca_certs is not None else (config.get("CLICKHOUSE_CA_CERTS") or None)
        self.connect_timeout = connect_timeout
        self.timeout = timeout  # writes and migrations (a big batch, an INSERT ... SELECT over a day)
        # Reads and handshakes: a server that accepts and never answers holds the store's lock this long at most.
        self.query_timeout = float(config.get("CLICKHOUSE_QUERY_TIMEOUT_S") if query_timeout is None
                                   else query_timeout)
        self._client = None
        self._ver = 0
        self.server_version = ""
        self.batches_skipped = 0  # batches found already committed (re-sent after a lost acknowledgement)
        self._slow = threading.local()  # .on: this thread's reads wait `timeout` (an exact full grouping)
        self._own = threading.local()  # .client: this thread's own read connection (own_connection)
        self._spare: list = []  # idle read connections of own_connection, at most READERS_MAX
        # Its own lock: a reader taking or returning a connection never waits for the queries the main
        # thread runs under the store's lock.
        self._spare_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None  # read_pool(): READERS_MAX threads, closed with the store
        self._pool_lock = threading.Lock()
        self._hours_seen: dict[tuple, tuple[float, tuple[int, ...]]] = {}  # _open_hours' recent answers
        self._now_sql = "toInt64(now())"  # the receive time of a loss row: the server's clock (tests shift it)

    @property
    def path(self) -> str:
        """The server (and cluster) the store talks to; never the credentials."""
        return f"clickhouse://{self.host}:{self.port}/{self.db}" + (f" cluster {self.cluster}" if self.cluster else "")

    # -- connections ---------------------------------------------------------------------

    def _connect(self, host: str, port: int):
        """A client whose handshake and reads wait at most query_timeout (writes widen it: _long).

        No client-wide settings: a read-only account (profile readonly = 1) refuses any query that sets
        one; the writes through Distributed tables ask for insert_distributed_sync themselves (_exec)."""
        from clickhouse_driver import Client

        quiet_driver_logs()
        user, password = credentials()
        kw: dict[str, Any] = {"secure": self.secure}
        if self.ca_certs:
            kw.update(ca_certs=self.ca_certs, verify=True)
        return Client(host=host, port=port, user=user, password=password, connect_timeout=self.connect_timeout,
                      send_receive_timeout=self.query_timeout, sync_request_timeout=self.connect_timeout,
                      client_name="network-traffic-monitor", **kw)

    @contextmanager
    def _long(self, client, what: str = "the write timeout"):
        """Within: the client waits `timeout` (a write, a migration), not the reads' query_timeout. A
        timeout within is described here, with the limit that was in effect (WaitTimeout)."""
        conn = client.connection
        old = conn.send_receive_timeout
        conn.send_receive_timeout = self.timeout
        if conn.connected and conn.socket is not None:
            conn.socket.settimeout(self.timeout)
        try:
            yield
        except WaitTimeout:
            raise
        except Exception as exc:
            if _timed_out(exc):
                raise WaitTimeout(self._timeout_text(self.timeout, what)) from exc
            raise
        finally:
            conn.send_receive_timeout = old
            if conn.connected and conn.socket is not None:
                conn.socket.settimeout(old)

    def _timeout_text(self, wait_s: float, setting: str) -> str:
        return (f"ClickHouse did not answer within {wait_s:g} s ({self.host}:{self.port}, {setting}): "
                f"the server accepts connections but does not reply (overloaded or hung?)")

    @contextmanager
    def slow_reads(self):
        """Within (this thread): reads wait the write timeout, not CLICKHOUSE_QUERY_TIMEOUT_S (a query
        known to be slow, as history's exact full grouping of a day's conversations)."""
        before = getattr(self._slow, "on", False)
        self._slow.on = True
        try:
            yield
        finally:
            self._slow.on = before

    def _exec(self, client, sql: str, data: Any = None, **kw: Any) -> Any:
        """An INSERT, through the Distributed table synchronously in a cluster (the batch is on its shard
        when this returns, so its commit row can follow)."""
        settings = {"insert_distributed_sync": 1} if self.cluster else None
        return client.execute(sql, data, settings=settings, **kw)

    def open(self) -> bool:
        """Connect, create (or migrate) the schema on every shard; False with a clear reason when it cannot."""
        with self._lock:
            if self._client is not None:
                return True
            client = None
            try:
                client = self._connect(self.host, self.port)
                self.server_version = client.execute("SELECT version()")[0][0]
                self._ensure_schema(client)
                self._init_versions(client)
            except Exception as exc:  # any failure to reach or set up the server is state, never a crash
                if client is not None:
                    client.disconnect()
                return self._set_state("error", self._describe(exc))
            self._client = client
            self._state, self._message = "ok", None
            log.info("store: %s open (ClickHouse %s, schema version %d)", self.path, self.server_version,
                     CH_SCHEMA_VERSION)
            return True

    def _describe(self, exc: BaseException) -> str:
        """A one-line error naming the server and what went wrong (authentication, network, the server's text)."""
        code = getattr(exc, "code", None)
        # The server's text is on the lines after "Code: N." (up to its stack trace): kept, on one line.
        text = " ".join(str(exc).split("Stack trace:")[0].split())[:300] or type(exc).__name__
        where = f"ClickHouse {self.host}:{self.port}"
        if isinstance(exc, WaitTimeout):  # described where it happened, with the limit in effect
            return str(exc)
        if _timed_out(exc):  # outside _long: a read or a handshake
            return self._timeout_text(self.query_timeout, "CLICKHOUSE_QUERY_TIMEOUT_S")
        if isinstance(exc, ReadOnlySchema):
            return f"{where}: {exc}"
        if code in (192, 193, 516):  # UNKNOWN_USER, WRONG_PASSWORD, AUTHENTICATION_FAILED
            return (f"{where}: authentication failed for user {credentials()[0]!r} (check CLICKHOUSE_USER and "
                    f"CLICKHOUSE_PASSWORD_FILE): {text}")
        if self.secure and ("SSL" in text or "certificate" in text.lower()):
            return (f"{where}: TLS failed (is the server's certificate signed by the CA in CLICKHOUSE_CA_CERTS, "
                    f"{self.ca_certs or 'the system CAs'}, and is its port tcp_port_secure?): {text}")
        if isinstance(exc, OSError) or "NetworkError" in type(exc).__name__ or "Timeout" in type(exc).__name__:
            return f"{where} unreachable: {text}"
        return f"{where}: {type(exc).__name__}: {text}"

    def _set_state(self, state: str, message: str) -> bool:
        if (state, message) != (self._state, self._message):
            log.error("store: %s", message)
        self._state, self._message = state, message
        return False

    def shards(self, client=None) -> list[tuple[str, int]]:
        """(host, port) of every server of the cluster: every replica of every shard (each holds its own
        local tables: without ZooKeeper nothing creates them on a replica but this), or the one server."""
        if not self.cluster:
            return [(self.host, self.port)]
        rows = (client or self._client).execute(
            "SELECT shard_num, host_address, port FROM system.clusters WHERE cluster = %(c)s "
            "ORDER BY shard_num, replica_num", {"c": self.cluster})
        if not rows:
            raise ValueError(f"cluster {self.cluster!r} is not in system.clusters of {self.host}:{self.port}")
        return [(str(h), int(p)) for _, h, p in rows]

    def _each_shard(self, client, statements_of) -> None:
        """Run statements on every shard (and on the entry server, which may be no shard at all)."""
        targets = list(dict.fromkeys(self.shards(client)))  # a server listed twice is asked once
        if (self.host, self.port) not in targets:
            targets.append((self.host, self.port))
        for host, port in targets:
            c = client if (host, port) == (self.host, self.port) else self._connect(host, port)
            try:
                for stmt in statements_of(c):
                    with self._long(c):
                        c.execute(*stmt) if isinstance(stmt, tuple) else c.execute(stmt)
            finally:
                if c is not client:
                    c.disconnect()

    def _ensure_schema(self, client) -> None:
        """Every server at this program's schema version, with its Distributed tables. A server already
        there gets no DDL at all (only system.tables and meta are read), so a read-only account opens a
        current database; one that would need a change raises ReadOnlySchema."""
        def statements(c) -> list[str]:
            if self._current(c):
                return []
            try:
                with self._long(c):
                    self._migrate_shard(c)
                    for stmt in self._distributed_ddl():
                        c.execute(stmt)
            except Exception as exc:
                if getattr(exc, "code", None) == 164:  # READONLY: the account may not change anything
                    raise ReadOnlySchema(self._readonly_text(c)) from exc
                raise
            return []

        self._each_shard(client, statements)

    def _distributed_ddl(self) -> list[str]:
        if not self.cluster:
            return []
        # Documents belong to no sensor: spread by their own key; a query reads every shard.
        return [*distributed_sql(self.db, self.cluster, CH_SCHEMA_VERSION),
                f"CREATE TABLE IF NOT EXISTS {self.db}.documents_d AS {self.db}.documents ENGINE = "
                f"Distributed({_quote(self.cluster)}, {self.db}, documents, cityHash64(kind, name))"]

    def _current(self, c) -> bool:
        """Whether this server is at this program's schema version with every Distributed table it needs."""
        if self._check_version(c) != CH_SCHEMA_VERSION:
            return False
        need = {m.group(1) for m in (re.search(r"TABLE IF NOT EXISTS \w+\.(\w+)", d) for d in self._distributed_ddl())
                if m}
        if not need:
            return True
        have = {r[0] for r in c.execute("SELECT name FROM system.tables WHERE database = %(d)s", {"d": self.db})}
        return need <= have

    def _readonly_text(self, c) -> str:
        try:
            version = _schema_version(c, self.db)
        except Exception:  # the message matters more than the number
            version = -1
        found = f"schema version {version}" if version > 0 else "no schema yet"
        return (f"database {self.db} has {found}, this program needs version {CH_SCHEMA_VERSION}, and user "
                f"{credentials()[0]!r} is read-only (profile readonly): open it once with an account that may "
                f"create tables (a sensor does at its start), then read it with this one. Nothing was changed.")

    def _migrate_shard(self, c) -> None:
        """Bring one shard's tables to this program's schema version, under the shard's migration lock."""
        if self._check_version(c) == CH_SCHEMA_VERSION:
            return
        c.execute(f"CREATE DATABASE IF NOT EXISTS {self.db}")
        with migration_lock(c, self.db):
            version = self._check_version(c)  # another program may have migrated while this one waited
            for target in range(version + 1, CH_SCHEMA_VERSION + 1):
                log.info("store: %s: migrating to schema version %d", self.path, target)
                steps = MIGRATIONS[target](self.db) if target in MIGRATIONS else STEPS[target](self.db, c)
                for stmt in steps:
                    c.execute(stmt)
                c.execute(f"INSERT INTO {self.db}.meta (key, value) VALUES", [("schema_version", str(target))])

    def _check_version(self, c) -> int:
        version = _schema_version(c, self.db)
        if version > CH_SCHEMA_VERSION:
            raise RuntimeError(f"database {self.db} has schema version {version}, newer than this program's "
                               f"{CH_SCHEMA_VERSION}: upgrade Network Traffic Monitor (nothing was changed)")
        return version

    def _init_versions(self, client) -> None:
        """Start versions and segments above any this sensor wrote before (even if the clock went back)."""
        if not self.sensor:
            return
        row = client.execute(f"SELECT max(ver), max(seg) FROM {self._t('commits')} WHERE sensor = %(s)s",
                             {"s": self.sensor})
        if row:
            self._ver = max(self._ver, int(row[0][0] or 0))
            self._last_seg = max(self._last_seg, int(row[0][1] or 0))

    def _t(self, table: str) -> str:
        """The table queries and writes go through: the Distributed one in a cluster."""
        return f"{self.db}.{table}_d" if self.cluster else f"{self.db}.{table}"

    def close(self) -> None:
        """Write what waits in memory (once), disconnect; safe to call twice."""
        with self._lock:
            if self._pending and not self._drain():
                self._give_up_pending()
            client, self._client = self._client, None
            if client is not None:
                client.disconnect()
            pool, self._pool = self._pool, None
            if pool is not None:  # queued reads are dropped; running ones end on their connection
                pool.shutdown(wait=False, cancel_futures=True)
            with self._spare_lock:
                for spare in self._spare:
                    spare.disconnect()
                self._spare.clear()
            if self._state == "ok":
                self._state = "closed"

    # -- writes ----------------------------------------------------------------------------

    def write(self, batch: StoreBatch) -> bool:
        """Write a batch (given a batch id when it has none) after the earlier ones that wait; False if it waits."""
        return super().write(with_id(batch))

    def send(self, batch: StoreBatch) -> bool:
        """Write one batch now, outside the in-memory queue (the sensor's spool keeps it on failure)."""
        batch = with_id(batch)
        with self._lock:
            if not self._ready():
                return False
            try:
                self._write(batch)
            except Exception as exc:  # any backend failure is state: the caller spools the batch
                self._failed(exc)
                return False
            self._counts["batches_written"] += 1
            self._counts["rows_written"] += batch.rows()
            self._last_write = time.time()
            return True

    def next_version(self) -> int:
        """A version above every one this store wrote (microseconds of the wall clock, strictly increasing)."""
        with self._lock:
            self._ver = max(self._ver + 1, time.time_ns() // 1000)
            return self._ver

    def _write(self, batch: StoreBatch) -> None:
        """Write one batch under the write timeout (send(), and write() and close() through _drain())."""
        client = self._client
        if client is None:
            raise OSError("store is not open")
        with self._long(client):
            self._write_batch(client, batch)

    def _write_batch(self, client, batch: StoreBatch) -> None:
        batch = with_id(batch)
        segs = _segments(batch)
        sensor = self._batch_sensor(batch)
        periods = [p for p in segs.values() if p is not None]
        lo, hi = (min(periods), max(periods)) if periods else (0, 2 ** 62)
        alert_period = _alert_period(batch)
        lo = min(lo, alert_period) if alert_period is not None else lo
        hi = max(hi, alert_period) if alert_period is not None and periods else hi
        empty = not batch.rows() and not batch.replaces and not batch.hours_done and not batch.origins
        found = None if empty else client.execute(  # a heartbeat (no rows) counts nothing: no look-up needed
            f"SELECT count() FROM {self._t('commits')} WHERE sensor = %(s)s AND period >= %(lo)s "
            f"AND period <= %(hi)s AND batch = %(b)s", {"s": sensor, "lo": lo, "hi": hi, "b": batch.batch_id})
        if found and found[0][0]:
            self.batches_skipped += 1
            log.info("store: batch %s is already in ClickHouse (re-sent after a lost acknowledgement); not written "
                     "again", batch.batch_id)
            return
        ver = self.next_version()
        for table, frame in batch.frames.items():
            self._insert(client, table, frame, ver)
        has_alerts = batch.alerts is not None and len(batch.alerts) > 0
        if has_alerts:
            self._insert(client, "alerts", batch.alerts, ver)
        for row in batch.origins:
            self._exec(client, f"INSERT INTO {self._t('origins')} ({', '.join(c for c, _ in ORIGIN_COLUMNS)}) "
                               f"VALUES", [list(row)])
        if (sec := batch.frames.get("seconds")) is not None and len(sec):
            self._insert(client, "seconds_1m", minute_rows(sec), ver)
        hours = batch.frames.get("conversations_1h") if CH_SCHEMA_VERSION >= 5 else None  # 5: the candidates
        if hours is not None and len(hours):
            # The hour rows just written, read back on the sensor's shard: the hour's candidates and bound.
            h = hours["minute"].to_numpy(np.int64)
            self._exec(client, f"INSERT INTO {self._t('conv_top_1h')} (sensor, iface, origin, seg, minute, top_by, "
                           f"{_CONV_KEYS}, packets, bytes, first_us, last_us, rest, ver) " + conv_top_select(
                               self._t("conversations_1h"), f"sensor = %(s)s AND ver = {ver} AND minute >= "
                                                            f"{int(h.min())} AND minute <= {int(h.max())}"),
                           {"s": sensor})
        if hours is not None and len(hours) and CH_SCHEMA_VERSION >= 8:  # the hour's VLAN sums (the frame's rows)
            self._insert(client, "vlans_1h", vlan_rows(hours), ver)
        # A batch without rows (a sensor's heartbeat) commits under the wall clock's minute: its flush is
        # recent, and commits_max keeps one heartbeat row per sensor and minute.
        fallback = lo if periods else (alert_period or int(time.time()) // 60 * 60)
        commit = [(sensor, batch.batch_id, int(s), ver, int(p if p is not None else fallback), 0, time.time())
                  for s, p in segs.items()]
        commit.append((sensor, batch.batch_id, 0, ver, int(fallback), int(has_alerts), time.time()))
        self._write_losses(client, sensor, batch)
        # The commit: one block into one table on the sensor's shard; until it lands, the rows above count
        # nowhere. Then the batch-id record (`commits`): an attempt cut off between the two is not found
        # by id, so its retry writes the same segments under a newer version, which is the one that counts.
        self._exec(client, f"INSERT INTO {self._t('commits_max')} (sensor, period, seg, ver) VALUES",
                   [(c[0], c[4], c[2], c[3]) for c in commit])
        self._exec(client, f"INSERT INTO {self._t('commits')} (sensor, batch, seg, ver, period, alerts, wall) VALUES",
                   commit)

    def _write_losses(self, client, sensor: str, batch: StoreBatch) -> None:
        """The flush's receive time (the server's clock), and the sensor's loss counters when they grew.

        The loss row is stamped by the server that takes it (`received`, as `flushes`): the sensor's clock
        may be off. Whether a row is written depends on the batch alone (its counters against the `prev_*`
        it carries), never on what this store wrote before, so a re-send or a spool replayed after a
        restart writes exactly the rows the first attempt did (the same rows: they change no max or min)."""
        if CH_SCHEMA_VERSION < 6:
            return
        self._exec(client, f"INSERT INTO {self._t('flushes')} (sensor) VALUES", [(sensor,)])
        losses = tuple(getattr(batch, "losses", ()) or ())  # (iface, run, ts, *counters[, *prev])
        n = len(LOSS_COUNTERS)
        if len(losses) < 3 + n:
            return
        now, prev = losses[3:3 + n], losses[3 + n:3 + 2 * n]
        if len(prev) != n:  # a batch spooled by an older sensor: no previous counters (0: version 6's rule)
            prev = (0,) * n
        elif tuple(now) == tuple(prev):  # nothing lost since the run's previous flush: no row
            return
        values = ", ".join([_literal(sensor), _literal(str(losses[0])), _literal(str(losses[1])), self._now_sql,
                            *(str(int(v)) for v in (losses[2], *now, *prev))])
        self._exec(client, f"INSERT INTO {self._t('run_losses')} (sensor, iface, run, received, ts, "
                           f"{', '.join((*LOSS_COUNTERS, *PREV_COLUMNS))}) SELECT {values}")

    def _batch_sensor(self, batch: StoreBatch) -> str:
        for frame in (*batch.frames.values(), batch.alerts):
            if frame is not None and len(frame):
                return str(frame["sensor"].iloc[0])
        if batch.origins:
            return str(batch.origins[0][4])
        return self.sensor or ""

    def _insert(self, client, table: str, frame: pd.DataFrame, ver: int) -> None:
        if frame is None or not len(frame):
            return
        cols = list(frame.columns) if table in ("seconds_1m", "vlans_1h") else columns(table)
        data = [_column(frame[c], table, c) for c in cols]
        data.append([ver] * len(frame))
        self._exec(client, f"INSERT INTO {self._t(table)} ({', '.join(cols)}, ver) VALUES", data, columnar=True)

    def _failed(self, exc: Exception) -> None:
        """A failed write: the error becomes state; the connection is dropped and opened again on the next write."""
        self._set_state("error", f"store write failed: {self._describe(exc)}")
        client, self._client = self._client, None
        if client is not None:
            try:
                client.disconnect()
            except Exception:  # a broken connection may fail to close; it is gone either way
                log.debug("disconnect failed", exc_info=True)

    # -- documents ---------------------------------------------------------------------------

    def put_doc(self, kind: str, name: str, body: dict) -> None:
        """Save (or replace) one named document: a row of a newer version."""
        self._doc_row(kind, name, doc_text(kind, name, body), 0)

    def docs(self, kind: str) -> list[dict]:
        """Every document of a kind (each name's newest version, unless that one deletes it), by name."""
        df = self._run(f"SELECT name, argMax(body, ver) AS b, argMax(updated, ver) AS u, argMax(deleted, ver) AS d "
                       f"FROM {self._t('documents')} WHERE kind = %(kind)s GROUP BY name HAVING d = 0",
                       {"kind": kind})
        return doc_rows(df.rename(columns={"b": "body", "u": "updated"}))

    def delete_doc(self, kind: str, name: str) -> bool:
        """Remove one document (a deleting row of a newer version); False when there was none."""
        if not any(d["name"] == name for d in self.docs(kind)):
            return False
        self._doc_row(kind, name, "{}", 1)
        return True

    def _doc_row(self, kind: str, name: str, text: str, deleted: int) -> None:
        with self._lock:
            if not self._ready() or self._client is None:
                raise OSError(self._message or "store is not open")
            try:
                with self._long(self._client):
                    self._exec(self._client, f"INSERT INTO {self._t('documents')} (kind, name, body, updated, "
                                             f"deleted, ver) VALUES",
                               [(kind, name, text, time.time(), deleted, self.next_version())])
            except Exception as exc:  # any backend failure: the caller shows it
                self._failed(exc)
                raise OSError(self._message) from exc

    # -- retention -------------------------------------------------------------------------

    def prune(self, retention_days: float | None = None, now: float | None = None) -> int:
        """Drop the day partitions wholly older than the retention, on every shard; partitions dropped.

        A ClickHouse fleet store holds live sensor data only (imports go to the embedded store)."""
        days = config.get("RETENTION_DAYS") if retention_days is None else retention_days
        cutoff = int((self.clock() if now is None else now) - days * 86400)
        last_day = cutoff // 86400 - 1  # day d holds [d, d+1) * 86400: dropped when it ends before the cutoff
        dropped = 0
        with self._lock:
            if not self._ready():
                return 0
            try:
                def statements(c) -> list[str]:
                    nonlocal dropped
                    rows = c.execute("SELECT DISTINCT table, partition FROM system.parts WHERE database = %(d)s "
                                     "AND active", {"d": self.db})
                    out = [f"ALTER TABLE {self.db}.{t} DROP PARTITION {int(p)}" for t, p in rows
                           if t not in ("origins", "meta") and not t.endswith("_d") and p.lstrip("-").isdigit()
                           and int(p) <= last_day]
                    dropped += len(out)
                    return out

                self._each_shard(self._client, statements)
            except Exception as exc:  # retention failing is state, not a crash
                self._failed(exc)
                return 0
        if dropped:
            log.info("store: retention dropped %d day partitions before day %d", dropped, last_day + 1)
        return dropped

    def remove_origin(self, origin: str) -> int:
        """Delete an origin's rows (an asynchronous ALTER ... DELETE on every shard); 0 (not counted)."""
        with self._lock:
            if not self._ready():
                return 0
            quoted = "'" + origin.replace("\\", "\\\\").replace("'", "\\'") + "'"
            tables = [*SEG_TABLES, "seconds_1m", "conv_top_1h", "vlans_1h", "alerts", "origins"]
            try:
                self._each_shard(self._client, lambda c: [f"ALTER TABLE {self.db}.{t} DELETE WHERE origin = {quoted}"
                                                          for t in tables])
            except Exception as exc:
                self._failed(exc)
        return 0

    # -- queries ---------------------------------------------------------------------------

    def _visible(self, table: str) -> str:
        """The condition that keeps, of a segment's rows, those of its newest committed version."""
        # A delta segment (negative id, rollup.delta_segment) counts until its minute's own segment is
        # committed (the close): one commit row per closed minute excludes its ~30 deltas before grouping.
        window = f"FROM {self.db}.commits_max WHERE period >= $m0 - 3600 AND period <= $until{{sensor}}"
        return (f"(sensor, seg, ver) IN (SELECT sensor, seg, max(ver) {window} AND (seg >= 0 OR (sensor, "
                f"intDiv(-1 - seg, {DELTA_SLOTS})) NOT IN (SELECT sensor, seg {window} AND seg >= 0)) "
                f"GROUP BY sensor, seg)")

    def _rewrite(self, sql: str, params: dict[str, Any]) -> str:
        """The base class's SQL in this dialect: tables through the visibility filter, `$p` -> %(p)s."""
        sensor = " AND sensor = $sensor" if params.get("sensor") else ""

        def table(m: re.Match) -> str:
            name = m.group(1)
            if name not in SEG_TABLES and name not in ("seconds_1m", "conv_top_1h", "vlans_1h"):
                raise ValueError(f"no ClickHouse rewrite for table {name}")
            return f"FROM {self._t(name)} WHERE {self._visible(name).replace('{sensor}', sensor)} AND "

        out = re.sub(r"\bFROM (\w+) WHERE ", table, sql)
        out = re.sub(r"\bTRUE\b", "1", out)
        return re.sub(r"\$(\w+)", r"%(\1)s", out)

    def _query(self, sql: str, params: dict[str, Any]) -> pd.DataFrame:
        return self._run(self._rewrite(sql, params), params)

    def read_pool(self) -> ThreadPoolExecutor:
        """The store's one pool of reader threads (READERS_MAX, each on its own connection through
        own_connection): shared by every page run and tab, so connections stay bounded; closed by close()."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(READERS_MAX, thread_name_prefix="ch-read")
            return self._pool

    @contextmanager
    def own_connection(self):
        """Within (this thread): reads go through a connection of the thread's own, not the store's shared
        one under its lock, so a page's reads run in parallel (a clickhouse-driver client serves one thread
        at a time). The connection goes back to a bounded pool (READERS_MAX) for the next page run."""
        if self._client is None and not self.open():  # open: no lock taken (open() takes it otherwise)
            raise OSError(self._message or "store is not open")
        with self._spare_lock:
            client = self._spare.pop() if self._spare else None
        try:
            client = client or self._connect(self.host, self.port)
        except Exception as exc:
            raise OSError(self._describe(exc)) from exc
        self._own.client = client
        broken = False
        try:
            yield
        except Exception:
            broken = True  # a failed read may leave the connection mid-answer: never reused
            raise
        finally:
            self._own.client = None
            with self._spare_lock:
                keep = not broken and len(self._spare) < READERS_MAX and self._client is not None
                if keep:
                    self._spare.append(client)
            if not keep:
                client.disconnect()

    def _run(self, sql: str, params: dict[str, Any]) -> pd.DataFrame:
        own = getattr(self._own, "client", None)
        with nullcontext() if own is not None else self._lock:
            if own is None and self._client is None and not self.open():
                raise OSError(self._message or "store is not open")
            client = own or self._client
            try:
                slow = getattr(self._slow, "on", False)
                with self._long(client, "the long-read timeout of an exact grouping") if slow else nullcontext():
                    rows, types = client.execute(sql, params, with_column_types=True, columnar=True)
            except Exception as exc:
                if own is None:
                    self._failed(exc)
                    raise OSError(self._message) from exc
                raise OSError(self._describe(exc)) from exc
        names = [n for n, _ in types]
        if not rows:
            return pd.DataFrame({n: [] for n in names})
        return pd.DataFrame({n: list(col) for n, col in zip(names, rows)})

    def _sum(self, col: str) -> str:
        return f"toInt64(sum({col}))"

    def _bucket(self, col: str, width: int) -> str:
        return f"(intDiv({col}, {width}) * {width})"

    def _parts(self, r: TimeRange) -> list[tuple[str, str]] | None:
        """A long range as (table, condition) parts: its whole minutes from `seconds_1m`, the seconds
        before the first and after the last whole minute from `seconds`; None for a short range (one
        part, `seconds`: a live view's last minutes stay per second)."""
        m_lo = -(-r.since // 60) * 60
        m_hi = (min(r.until, 2 ** 61) + 1) // 60 * 60
        if m_hi - m_lo < MINUTES_FROM_S:
            return None
        sensor = " AND sensor = $sensor" if r.sensor else ""
        return [("seconds", f"((ts >= $since AND ts < {m_lo}) OR (ts >= {m_hi} AND ts <= $until)){sensor}"),
                ("seconds_1m", f"minute >= {m_lo} AND minute < {m_hi}{sensor}")]

    def _open_hours(self, r: TimeRange, h0: int, h1: int) -> list[int]:
        """As the base, remembered OPEN_HOURS_TTL_S: a page asks it before each of its ~10 range questions.

        A stale answer stays exact: an hour that closed meanwhile is read from its minute rows, which
        closing keeps (only its open_hours row goes); an hour first written within the TTL (a spool
        replaying an old hour) shows at the next refresh."""
        key, now = (r.sensor, h0, h1), time.monotonic()
        hit = self._hours_seen.get(key)
        if hit is not None and now - hit[0] < OPEN_HOURS_TTL_S:
            return list(hit[1])
        got = super()._open_hours(r, h0, h1)
        if len(self._hours_seen) >= 64:  # bounded: a page asks a few ranges
            self._hours_seen.clear()
        self._hours_seen[key] = (now, tuple(got))
        return got

    def totals(self, r: TimeRange) -> dict[str, Any]:
        """As the base (a long range's whole minutes read per minute), with no first/last time for an
        empty range (ClickHouse's min() of nothing is 0)."""
        parts = self._parts(r)
        if parts is None:
            out = super().totals(r)
        else:
            inner = ", ".join(f"sum({c}) AS {c}" for c in SECOND_VALUES)
            union = " UNION ALL ".join(f"SELECT {inner}, min(min_ts) AS lo, max(max_ts) AS hi, count() AS n "
                                       f"FROM {t} WHERE {cond}" for t, cond in parts)
            outer = ", ".join(f"{self._sum(c)} AS {c}" for c in SECOND_VALUES)
            df = self._query(f"SELECT {outer}, minIf(lo, n > 0) AS min_ts, maxIf(hi, n > 0) AS max_ts FROM ({union})",
                             r.params())
            row = df.iloc[0]
            out = {c: int(row[c]) for c in SECOND_VALUES}
            out["min_ts"], out["max_ts"] = float(row["min_ts"]), float(row["max_ts"])
        if not out["packets"]:
            out["min_ts"] = out["max_ts"] = None
        return out

    def series(self, r: TimeRange, bin_s: int = 1, cols: tuple[str, ...] = tuple(SECOND_VALUES)) -> pd.DataFrame:
        """As the base; bins of whole minutes over a long range add up per-minute rows."""
        parts = self._parts(r)
        if parts is None or bin_s % 60:
            return super().series(r, bin_s, cols)
        inner = ", ".join(f"sum({c}) AS {c}" for c in cols)
        union = " UNION ALL ".join(f"SELECT {self._bucket(col, int(bin_s))} AS t, {inner} FROM {t} WHERE {cond} "
                                   f"GROUP BY t" for (t, cond), col in zip(parts, ("ts", "minute")))
        outer = ", ".join(f"{self._sum(c)} AS {c}" for c in cols)
        return self._query(f"SELECT t, {outer} FROM ({union}) GROUP BY t ORDER BY t", r.params())

    def top_conversations(self, r: TimeRange, by: str = "bytes", n: int = 20, exact: bool = True) -> pd.DataFrame:
        """As the base, through the exact top-N shortcut when it applies (see `_conv_shortcut`).

        When it does not: `exact` -> the full grouping (every conversation of the range); otherwise the
        candidates' bounds, marked approximate (attrs method "approximate" and `unlisted_max`, the most
        any conversation not listed may have; columns `packets_error`, `bytes_error`: a count is at most
        its figure and at least its figure minus its error; first and last seen are unknown, NaN)."""
        if by not in ("bytes", "packets"):
            raise ValueError(f"top conversations by {by!r}: give bytes or packets")
        with self.slow_reads() if exact else nullcontext():  # exact (history): may group every conversation
            return self._top_conversations(r, by, n, exact)

    def _top_conversations(self, r: TimeRange, by: str, n: int, exact: bool) -> pd.DataFrame:
        got = self._conv_shortcut(r, by, int(n)) if 0 < n <= CONV_TOP_K else None
        if isinstance(got, pd.DataFrame):
            got.attrs["method"] = "shortcut"
            return got
        if exact or got is None:
            df = super().top_conversations(r, by, n)
            df.attrs["method"] = "full"
            return df
        return got[1]

    def _conv_shortcut(self, r: TimeRange, by: str, n: int):
        """The exact top n from the hours' candidates, or (False, approximate frame), or None (no hours).

        Per closed hour segment (`conv_top_1h`) and for the rest of the range (its minute rows, grouped,
        as one more part) the CONV_TOP_K largest conversations are candidates, and the part's `rest` (the
        largest value left out) bounds what any other conversation has there. So a conversation that is
        no candidate has at most B = the sum of every part's rest, and a candidate at most its known sum
        plus the rests of the parts where it is not listed. The n largest are exact when the n-th
        largest exact total (read for the candidates that may rank) is above everything else's bound."""
        ranges = self._ranges("conversations", r)
        hours = [rng for t, rng in ranges if t.endswith("_1h")]
        if not hours:
            return None
        other = "packets" if by == "bytes" else "bytes"
        sensor = " AND sensor = $sensor" if r.sensor else ""
        params = {**r.params(), "by": by}
        hsql = " UNION ALL ".join(f"SELECT {_CONV_TUPLE} AS k, packets, bytes, rest, top_by, seg, minute, sensor "
                                  f"FROM conv_top_1h WHERE {rng}{sensor}" for rng in hours)
        units = self._query(f"SELECT toInt64(sumIf(r, t = $by)) AS b, toInt64(sumIf(r, t != $by)) AS o FROM "
                            f"(SELECT top_by AS t, any(rest) AS r FROM ({hsql}) GROUP BY sensor, seg, minute, t)",
                            params)
        bound = {by: int(units.iloc[0]["b"]), other: int(units.iloc[0]["o"])} if len(units) else {by: 0, other: 0}
        # Per candidate: its `by` sum where listed by `by`, the `other` sums where listed by either, the rests
        # of the parts where it is listed.
        cands = self._query(
            f"SELECT k, toInt64(sumIf({by}, top_by = $by)) AS lo_by, toInt64(sumIf(rest, top_by = $by)) AS rest_by, "
            f"toInt64(greatest(sumIf({other}, top_by = $by), sumIf({other}, top_by != $by))) AS lo_o, "
            f"toInt64(sumIf({other}, top_by != $by)) AS known_o, toInt64(sumIf(rest, top_by != $by)) AS rest_o "
            f"FROM ({hsql}) GROUP BY k HAVING countIf(top_by = $by) > 0 ORDER BY lo_by DESC "
            f"LIMIT {CONV_SCAN_MAX * 2}", params)
        cands = cands.assign(up_by=cands["lo_by"] + bound[by] - cands["rest_by"],
                             up_o=cands["known_o"] + bound[other] - cands["rest_o"])
        minutes = [rng for t, rng in ranges if not t.endswith("_1h")]
        if minutes:
            cands = self._conv_minutes(by, other, minutes, sensor, params, cands, bound)
        cands = cands.rename(columns={"lo_by": by, "up_by": "upper"})
        return self._conv_decide(r, by, n, cands, bound[by], sensor, ranges)

    def _conv_minutes(self, by: str, other: str, minutes: list[str], sensor: str, params: dict,
                      cands: pd.DataFrame, bound: dict[str, int]) -> pd.DataFrame:
        """The range's minute rows (its ragged hours, open hours) as one more part: grouped here, its
        CONV_TOP_K largest by each count are candidates (exact there), its next largest the part's rest."""
        msql = " UNION ALL ".join(f"SELECT {_CONV_TUPLE} AS k, packets, bytes FROM conversations WHERE {rng}"
                                  f"{sensor}" for rng in minutes)
        lists, rest = [], {}
        for col in (by, other):
            top = self._query(f"SELECT k, toInt64(sum(packets)) AS packets, toInt64(sum(bytes)) AS bytes "
                              f"FROM ({msql}) GROUP BY k ORDER BY {col} DESC LIMIT {CONV_TOP_K + 1}", params)
            rest[col] = int(top.iloc[CONV_TOP_K][col]) if len(top) > CONV_TOP_K else 0
            lists.append(top.iloc[:CONV_TOP_K])
        listed = pd.concat(lists).drop_duplicates("k").set_index("k")
        new = [k for k in lists[0]["k"] if k not in set(cands["k"])]
        cands = pd.concat([cands, pd.DataFrame({"k": new, "lo_by": 0, "rest_by": 0, "lo_o": 0, "known_o": 0,
                                                "rest_o": 0, "up_by": bound[by], "up_o": bound[other]})],
                          ignore_index=True)
        known = cands["k"].map(lambda k: k in listed.index)
        got_by = cands["k"].map(lambda k: int(listed.at[k, by]) if k in listed.index else 0)
        got_o = cands["k"].map(lambda k: int(listed.at[k, other]) if k in listed.index else 0)
        # Listed in either of the part's lists: both counts exact there; else at most the part's rests.
        cands["lo_by"] += got_by
        cands["lo_o"] += got_o
        cands["up_by"] += got_by.where(known, rest[by])
        cands["up_o"] += got_o.where(known, rest[other])
        bound[by] += rest[by]
        bound[other] += rest[other]
        return cands

    def _conv_decide(self, r: TimeRange, by: str, n: int, cands: pd.DataFrame, bound: int, sensor: str,
                     ranges: list[tuple[str, str]]):
        """Exact totals for the candidates that may rank; the top n when provably exact, else bounds."""
        if not len(cands):
            return None
        full = len(cands) >= CONV_SCAN_MAX * 2  # candidates beyond those fetched: each ≤ the last + bound
        outside = bound + (int(cands[by].min()) if full else 0)
        lower_n = int(cands[by].nlargest(n).iloc[-1]) if len(cands) >= n else 0
        may_rank = cands[cands["upper"] >= max(lower_n, 1)]
        if (outside == 0 or outside < lower_n) and len(may_rank) <= CONV_SCAN_MAX:
            got = self._conv_exact(r, by, n, may_rank["k"].tolist(), sensor, ranges)
            if outside == 0 or (len(got) >= n and int(got[by].iloc[n - 1]) > outside):
                return got
        shown = cands.sort_values([by, "upper"], ascending=False).index[:n]
        rest = cands.drop(index=shown)["upper"]  # candidates not listed: each at most its own bound
        return False, self._conv_approx(by, n, cands, max(outside, int(rest.max()) if len(rest) else 0))

    def _conv_exact(self, r: TimeRange, by: str, n: int, keys: list, sensor: str,
                    ranges: list[tuple[str, str]]) -> pd.DataFrame:
        """Exact totals of these conversations over the range (every row, minute and hour), the top n."""
        times = "minute + first_us / 1000000.0 AS first_ts, minute + last_us / 1000000.0 AS last_ts"
        keyset = ", ".join("(" + ", ".join(_literal(v) for v in k) + ")" for k in keys)
        union = " UNION ALL ".join(f"SELECT {_CONV_KEYS}, packets, bytes, {times} FROM {t} WHERE {rng} AND "
                                   f"{_CONV_TUPLE} IN ({keyset}){sensor}" for t, rng in ranges)
        sql = self._rewrite(f"SELECT {_CONV_KEYS}, {self._sums()}, min(first_ts) AS first_ts, max(last_ts) AS "
                            f"last_ts FROM ({union}) GROUP BY {_CONV_KEYS} ORDER BY {by} DESC, a, b, a_port, b_port "
                            f"LIMIT {int(n)}", r.params())
        # The candidates' ends first (PREWHERE reads two columns of every row, the rest only where they match):
        # half the time of the tuple test alone over a day's conversation rows. The same rows either way.
        ends = " AND ".join(f"{c} IN ({', '.join(_literal(v) for v in sorted({k[i] for k in keys}))})"
                            for c, i in (("b", 2), ("a", 0)))
        sql = re.sub(r"(FROM [\w.]*conversations\w*) WHERE ", rf"\1 PREWHERE {ends} WHERE ", sql)
        return self._run(sql, r.params())

    def _conv_approx(self, by: str, n: int, cands: pd.DataFrame, unlisted: int) -> pd.DataFrame:
        """The n candidates with the largest certain `by` count, as bounds: each figure the most its count
        may be, its error how much less it may be (no read of the conversation rows: that is the cost)."""
        other = "packets" if by == "bytes" else "bytes"
        top = cands.sort_values([by, "upper"], ascending=False).head(n)
        a, a_port, b, b_port, proto, vlan = (list(x) for x in zip(*top["k"])) if len(top) else ([],) * 6
        df = pd.DataFrame({"a": a, "a_port": [None if p < 0 else p for p in a_port], "b": b,
                           "b_port": [None if p < 0 else p for p in b_port], "proto": proto, "vlan": vlan,
                           by: top["upper"].to_numpy(np.int64), other: top["up_o"].to_numpy(np.int64),
                           f"{by}_error": (top["upper"] - top[by]).to_numpy(np.int64),
                           f"{other}_error": (top["up_o"] - top["lo_o"]).to_numpy(np.int64),
                           "first_ts": np.nan, "last_ts": np.nan})
        df.attrs.update(method="approximate", unlisted_max=int(unlisted))
        return df

    def vlans(self, r: TimeRange) -> pd.DataFrame:
        """As the base; whole closed hours from their per-VLAN sums (`vlans_1h`), not their conversations."""
        sensor = " AND sensor = $sensor" if r.sensor else ""
        parts = [f"SELECT vlan, packets, bytes FROM {'vlans_1h' if t.endswith('_1h') else t} WHERE {rng}{sensor}"
                 for t, rng in self._ranges("conversations", r)]
        return self._query(f"SELECT vlan, {self._sums()} FROM ({' UNION ALL '.join(parts)}) GROUP BY vlan "
                           f"ORDER BY vlan", r.params())

    def addr_minutes(self, r: TimeRange, kind: str, addrs: list[str] | None = None,
                     limit: int = 100_000, nets: list | None = None) -> pd.DataFrame:
        """The per-minute top sources (kind src) or destinations (dst) of the range: without `addrs`, the
        distinct addresses there (`addr`, at most `limit`); with them, their packets and bytes per minute;
        with `nets` (ipaddress networks), the packets and bytes per minute of the addresses in all of them,
        matched here in SQL (a /8 holds more addresses than a query may list)."""
        if nets is not None:
            cond = " AND ".join(_net_condition(n) for n in nets) or "1"
            return self._query(f"SELECT minute, {self._sums()} FROM top_addrs WHERE {self._where(r, 'minute')} "
                               f"AND kind = $kind AND {cond} GROUP BY minute ORDER BY minute",
                               {**r.params(), "kind": kind})
        if addrs is None:
            return self._query(f"SELECT DISTINCT addr FROM top_addrs WHERE {self._where(r, 'minute')} AND kind = "
                               f"$kind ORDER BY addr LIMIT {int(limit)}", {**r.params(), "kind": kind})
        if not addrs:
            return pd.DataFrame({"minute": [], "packets": [], "bytes": []})
        return self._query(f"SELECT minute, {self._sums()} FROM top_addrs WHERE {self._where(r, 'minute')} AND "
                           f"kind = $kind AND addr IN $addrs GROUP BY minute ORDER BY minute",
                           {**r.params(), "kind": kind, "addrs": tuple(addrs)})

    def vlans_by(self, r: TimeRange, cols: tuple[str, ...] = ()) -> pd.DataFrame:
        """Packets and bytes per VLAN id and `cols` (conversation keys: a, b, a_port, b_port, proto) of the
        range's stored conversations, summed here: what a filtered VLAN chart needs, never the raw rows."""
        keys = ", ".join(dict.fromkeys(("vlan", *(c for c in cols if c in _CONV_KEYS.split(", ")))))
        src = self._source("conversations", r, f"{keys}, packets, bytes")
        return self._query(f"SELECT {keys}, {self._sums()} FROM {src} GROUP BY {keys} ORDER BY {keys}", r.params())

    def sensor_series(self, r: TimeRange, bin_s: int, cols: tuple[str, ...] = ("packets", "bytes")) -> pd.DataFrame:
        """Per sensor and bin (`sensor`, `t`, then `cols`): the fleet page's sparklines in one query."""
        parts = self._parts(r)
        if parts is None or bin_s % 60:
            parts = [("seconds", self._where(r, "ts"))]
        inner = ", ".join(f"sum({c}) AS {c}" for c in cols)
        union = " UNION ALL ".join(f"SELECT sensor, {self._bucket(col, int(bin_s))} AS t, {inner} FROM {t} "
                                   f"WHERE {cond} GROUP BY sensor, t"
                                   for (t, cond), col in zip(parts, ("ts", "minute")))
        outer = ", ".join(f"{self._sum(c)} AS {c}" for c in cols)
        df = self._query(f"SELECT sensor, t, {outer} FROM ({union}) GROUP BY sensor, t ORDER BY sensor, t",
                         r.params())
        return df if len(df) else pd.DataFrame(columns=["sensor", "t", *cols])

    def extent(self, r: TimeRange = TimeRange()) -> tuple[int, int] | None:  # noqa: B008  (as the base)
        """(first, last) second holding traffic in the range, or None when it is empty."""
        parts = self._parts(r) or [("seconds", self._where(r, "ts"))]
        bounds = {"seconds": ("toFloat64(ts)", "toFloat64(ts)"), "seconds_1m": ("min_ts", "max_ts")}
        union = " UNION ALL ".join(f"SELECT min({bounds[t][0]}) AS lo, max({bounds[t][1]}) AS hi, count() AS n "
                                   f"FROM {t} WHERE {cond}" for t, cond in parts)
        df = self._query(f"SELECT minIf(lo, n > 0) AS first, maxIf(hi, n > 0) AS last, sum(n) AS found "
                         f"FROM ({union})", r.params())
        if not len(df) or not int(df.iloc[0]["found"]):
            return None
        return int(np.floor(df.iloc[0]["first"])), int(np.floor(df.iloc[0]["last"]))

    def alerts(self, r: TimeRange) -> pd.DataFrame:
        """Alerts active at some moment of the range (each alert's newest committed version), newest first."""
        sensor = " AND sensor = %(sensor)s" if r.sensor else ""
        key = "sensor, iface, origin, detector, source, target, first_ts"
        latest = ", ".join(f"argMax({c}, ver) AS {c}" for c in ("severity", "last_ts", "count", "evidence"))
        sql = (f"SELECT {key}, {latest} FROM {self._t('alerts')} WHERE (sensor, ver) IN "
               f"(SELECT sensor, ver FROM {self.db}.commits WHERE seg = 0 AND alerts = 1{sensor}){sensor} "
               f"GROUP BY {key} HAVING last_ts >= %(since)s AND first_ts < %(until)s + 1 "
               f"ORDER BY last_ts DESC, first_ts DESC, detector, source, target")
        df = self._run(sql, r.params())
        return df[["sensor", "iface", "origin", *ALERT_KEYS]] if len(df) else pd.DataFrame(
            columns=["sensor", "iface", "origin", *ALERT_KEYS])

    def origins(self) -> pd.DataFrame:
        """Every origin with its kind, label and creation wall time."""
        return self._run(f"SELECT origin, argMax(kind, created) AS kind, argMax(label, created) AS label, "
                         f"max(created) AS created, sensor FROM {self._t('origins')} GROUP BY sensor, origin "
                         f"ORDER BY created", {})

    def losses(self, r: TimeRange) -> pd.DataFrame:
        """Per sensor, the packets lost within the range (by the servers' receive time): ring and NIC drops,
        detector-stage skips (packets and batches), history-stage skips. Per sensor run: the largest
        cumulative value up to the range's end minus the last one before its start, which is the largest
        row before the start or, when retention left none (or the run began within the range), the
        smallest `prev_*` of the run's rows in the range (re-sent rows change neither)."""
        sensor = " AND sensor = %(sensor)s" if r.sensor else ""
        within = "received >= %(since)s AND received <= %(until)s"
        inner = ", ".join(f"maxIf({c}, received <= %(until)s) - if(countIf(received < %(since)s) > 0, "
                          f"maxIf({c}, received < %(since)s), minIf(prev_{c}, {within})) AS {c}"
                          for c in LOSS_COUNTERS)
        outer = ", ".join(f"toInt64(sum({c})) AS {c}" for c in LOSS_COUNTERS)
        df = self._run(f"SELECT sensor, {outer} FROM (SELECT sensor, run, {inner} FROM {self._t('run_losses')} "
                       f"WHERE received <= %(until)s{sensor} GROUP BY sensor, run) GROUP BY sensor ORDER BY sensor",
                       r.params())
        return df if len(df) else pd.DataFrame(columns=["sensor", *LOSS_COUNTERS])

    def sensors(self, since: int = 0) -> pd.DataFrame:
        """Every sensor that committed periods from `since` on: its last flush (wall time) and newest period.

        Read from commits_max (a few rows per sensor and minute once merged, not one per flush): a version
        is the sensor's wall clock in microseconds when the write began (next_version), so the newest is
        the last flush. `server_age_s`: seconds since a server last took a write from it (`flushes`, the
        servers' clocks only), NaN for a sensor that wrote nothing since schema version 6."""
        df = self._run(f"SELECT sensor, max(ver) / 1000000.0 AS last_flush, max(period) AS last_period "
                       f"FROM {self._t('commits_max')} WHERE period >= %(since)s GROUP BY sensor ORDER BY sensor",
                       {"since": int(since)})
        # How long ago the servers last took a write from each sensor, by the servers' clocks alone: a
        # sensor whose clock is off is neither stale nor fresh for it (NaN: no flush since version 6).
        ages = self._run(f"SELECT sensor, toInt64(now()) - toInt64(max(received)) AS server_age_s "
                         f"FROM {self._t('flushes')} GROUP BY sensor", {})
        return df.merge(ages, on="sensor", how="left") if len(df) else df.assign(server_age_s=[])


def _literal(v) -> str:
    """A value as a ClickHouse literal (strings quoted and escaped)."""
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(int(v))


@contextmanager
def migration_lock(client, db: str):
    """Hold one server's migration lock: a table that only one CREATE can make (an atomic DDL in every
    ClickHouse version), dropped when done. Another program waits (MIGRATION_WAIT_S, then fails its open
    and retries later); a lock left by a program that died (older than MIGRATION_STALE_S) is taken over
    by renaming it away, which only one program can do."""
    name, deadline, first_empty = f"{db}.migration_lock", time.monotonic() + MIGRATION_WAIT_S, None
    while True:
        try:
            client.execute(f"CREATE TABLE {name} (since Float64) ENGINE = TinyLog")
            break
        except Exception as exc:
            if getattr(exc, "code", None) != 57:  # TABLE_ALREADY_EXISTS: another program migrates
                raise
        since = _lock_since(client, name)
        if since is None:  # created, its time not written yet (or its owner died right then)
            first_empty = first_empty or time.time()
            since = first_empty
        if time.time() - since > MIGRATION_STALE_S:
            _take_over(client, name)
            continue
        if time.monotonic() > deadline:
            raise RuntimeError(f"database {db} is being migrated by another program (since "
                               f"{time.strftime('%H:%M:%S', time.localtime(since))}); try again later")
        time.sleep(0.2)
    try:
        client.execute(f"INSERT INTO {name} (since) VALUES", [(time.time(),)])
        yield
    finally:
        client.execute(f"DROP TABLE IF EXISTS {name}")


def _lock_since(client, name: str) -> float | None:
    try:
        rows = client.execute(f"SELECT count(), max(since) FROM {name}")
    except Exception as exc:
        if getattr(exc, "code", None) == 60:  # UNKNOWN_TABLE: released meanwhile
            return time.time()
        raise
    return float(rows[0][1]) if rows and rows[0][0] else None


def _take_over(client, name: str) -> None:
    stale = f"{name}_stale_{uuid.uuid4().hex[:8]}"
    try:
        client.execute(f"RENAME TABLE {name} TO {stale}")
    except Exception as exc:
        if getattr(exc, "code", None) != 60:  # another program took it over first
            raise
        return
    log.warning("store: took over a migration lock left by a program that died (%s)", name)
    client.execute(f"DROP TABLE IF EXISTS {stale}")


def _schema_version(client, db: str) -> int:
    """The database's schema version on one server: 0 when it has none yet."""
    if not client.execute("SELECT count() FROM system.tables WHERE database = %(d)s AND name = 'meta'",
                          {"d": db})[0][0]:
        return 0
    rows = client.execute(f"SELECT max(toInt64(value)) FROM {db}.meta WHERE key = 'schema_version'")
    return int(rows[0][0]) if rows else 0


def _segments(batch: StoreBatch) -> dict[int, int | None]:
    """Every segment the batch writes, replaces or closes, with its period (first second) where known."""
    out: dict[int, int | None] = {}
    for table, frame in batch.frames.items():
        if frame is None or not len(frame):
            continue
        col = _PERIOD.get(table.removesuffix("_1h"), "minute")
        period = frame[col].to_numpy(np.int64)
        if table == "seconds":
            period = period - period % 60
        seg = frame["seg"].to_numpy(np.int64)
        for s, p in pd.DataFrame({"s": seg, "p": period}).groupby("s")["p"].min().items():
            out[int(s)] = min(int(p), out.get(int(s)) or int(p))
    for s, p in batch.periods:  # a closed minute's delta segments: filed at their own minute
        out.setdefault(int(s), int(p))
    for s in (*batch.replaces, *batch.hours_done):
        out.setdefault(int(s), None)
    return out


def minute_rows(sec: pd.DataFrame) -> pd.DataFrame:
    """The `seconds_1m` rows of a batch's per-second rows: sums per (sensor, iface, origin, segment, minute).

    A batch holds every second of each segment it writes (the rollup writes a segment whole), so a
    segment's minute row is exact, and each version of it replaces the last as the second rows do."""
    keys = ["sensor", "iface", "origin", "seg"]
    df = sec.astype({k: str for k in keys[:3]}).assign(minute=sec["ts"].to_numpy(np.int64) // 60 * 60)
    agg = {**{c: "sum" for c in SECOND_VALUES}, "min_ts": "min", "max_ts": "max"}
    out = df.groupby([*keys, "minute"], sort=False, observed=True).agg(agg).reset_index()
    return out[[*keys, "minute", *SECOND_VALUES, "min_ts", "max_ts"]]


def vlan_rows(hours: pd.DataFrame) -> pd.DataFrame:
    """The `vlans_1h` rows of a batch's hour conversation rows: packets and bytes per segment, hour and VLAN."""
    keys = ["sensor", "iface", "origin", "seg", "minute", "vlan"]
    df = hours.astype({k: str for k in keys[:3]})
    out = df.groupby(keys, sort=False, observed=True)[["packets", "bytes"]].sum().reset_index()
    return out[[*keys, "packets", "bytes"]]


def _net_condition(net) -> str:
    """SQL true for a text address `addr` inside the network (an ipaddress network), on 18.16 and later."""
    lo, hi = int(net.network_address), int(net.broadcast_address)
    if net.version == 4:
        return f"(position(addr, ':') = 0 AND IPv4StringToNum(addr) BETWEEN {lo} AND {hi})"
    return (f"(position(addr, ':') > 0 AND IPv6StringToNum(addr) BETWEEN toFixedString(unhex('{lo:032x}'), 16) "
            f"AND toFixedString(unhex('{hi:032x}'), 16))")


def _alert_period(batch: StoreBatch) -> int | None:
    if batch.alerts is None or not len(batch.alerts):
        return None
    return int(np.floor(pd.to_numeric(batch.alerts["last_ts"]).min()))


def _column(series: pd.Series, table: str, name: str) -> list:
    """One column as the Python values clickhouse-driver sends (None for a missing port)."""
    if isinstance(series.dtype, pd.CategoricalDtype) or series.dtype == object:
        values = series.astype(object)
        if (table.removesuffix("_1h"), name) in _NULLABLE:
            return [None if pd.isna(v) else int(v) for v in values]
        return ["" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in values]
    if (table.removesuffix("_1h"), name) in _NULLABLE:
        return [None if pd.isna(v) else int(v) for v in series.astype(object)]
    if pd.api.types.is_float_dtype(series.dtype):
        kind = dict(ALERT_COLUMNS).get(name) if table == "alerts" else None
        if kind in ("BIGINT", "INTEGER") or name not in ("min_ts", "max_ts", "first_ts", "last_ts"):
            return series.fillna(0).astype(np.int64).tolist()
        return series.astype(float).tolist()
    return series.astype(np.int64).tolist() if pd.api.types.is_integer_dtype(series.dtype) else \
        series.astype(str).tolist()
