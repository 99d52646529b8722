"""The embedded store: DuckDB tables in one file in the user's data folder; no server, works the first time.

Why DuckDB tables rather than Parquet segments: the rollup rewrites the still-open minute every
STORE_FLUSH_S, and a transaction that deletes a segment's old rows and inserts its new ones is
atomic in DuckDB (its write-ahead log makes a `kill -9` lose at most the batch being written),
where immutable Parquet files would need one file per flush and a compaction job to merge them.
A day of range queries stays fast because DuckDB keeps min/max statistics per row group, and rows
arrive in time order, so a time range reads only its own row groups.

The price: DuckDB lets one process open a file for writing, and no other process may open it at
the same time, even to read. A second process gets the state "in_use" (with the holder's PID),
never a crash; the process that records (the dashboard, `capture --store`) answers history
queries through its own open store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import time
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

import config
from store.base import (
    ALERT_COLUMNS,
    DOC_COLUMNS,
    ORIGIN_COLUMNS,
    PREFIX,
    SCHEMA_VERSION,
    TABLES,
    Store,
    StoreBatch,
    columns,
    doc_rows,
    doc_text,
)

log = logging.getLogger(__name__)

APP_DIR = "network-traffic-monitor"
STORE_FILE = "history.duckdb"

# Messages of a file DuckDB cannot read as a database of this version: move it aside, never delete it.
_UNREADABLE = ("not a valid duckdb database", "serialization", "corrupt", "checksum", "version number",
               "cannot read", "invalid", "internal error", "failed to read")
_IN_USE = "could not set lock"


def default_path() -> str:
    """The store's file: STORE when set, else $XDG_DATA_HOME (or ~/.local/share)/network-traffic-monitor/."""
    chosen = config.get("STORE")
    if chosen:
        return str(Path(chosen).expanduser())
    base = os.environ.get("XDG_DATA_HOME") or str(_home() / ".local" / "share")
    return str(Path(base) / APP_DIR / STORE_FILE)


def _home() -> Path:
    """The effective user's home: after `sudo` gives up root, $HOME still names root's, which that
    user cannot write, so the store goes to the home of the user the process now runs as."""
    try:
        return Path(pwd.getpwuid(os.geteuid()).pw_dir)
    except KeyError:
        return Path.home()


def _create_sql() -> list[str]:
    """Schema version 1, every table."""
    out = ["CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)"]
    for name, cols in TABLES.items():
        body = ", ".join(f"{c} {t}" for c, t in (*PREFIX, *cols))
        out.append(f"CREATE TABLE IF NOT EXISTS {name} ({body})")
    out.append(f"CREATE TABLE IF NOT EXISTS alerts ({', '.join(f'{c} {t}' for c, t in ALERT_COLUMNS)})")
    out.append(f"CREATE TABLE IF NOT EXISTS origins ({', '.join(f'{c} {t}' for c, t in ORIGIN_COLUMNS)})")
    return out


# version -> statements that bring a store from version-1 to version. A new schema version adds an
# entry here (ALTER TABLE ...) and bumps SCHEMA_VERSION; old stores are migrated when opened.
MIGRATIONS: dict[int, list[str]] = {
    1: _create_sql(),
    # 2: small named JSON documents (exclusion rules, baselines); one row per (kind, name).
    2: [f"CREATE TABLE IF NOT EXISTS documents ({', '.join(f'{c} {t}' for c, t in DOC_COLUMNS)})"],
}


class StoreInUse(Exception):
    """Another process holds the store's lock."""


class EmbeddedStore(Store):
    """A DuckDB file; one writer process at a time, queries from any thread of that process."""

    def __init__(self, path: str | None = None, read_only: bool = False, pending_max: int | None = None,
                 clock=time.time) -> None:
        super().__init__(pending_max if pending_max is not None else config.get("STORE_PENDING_MAX"), clock)
        self._path = str(Path(path).expanduser()) if path else default_path()
        self.read_only = read_only
        self._con: duckdb.DuckDBPyConnection | None = None

    @property
    def path(self) -> str:
        """The DuckDB file."""
        return self._path

    # -- open, migrate, move aside -------------------------------------------------------

    def open(self) -> bool:
        """Open (creating or migrating) the file; a corrupt or newer store is moved aside first."""
        with self._lock:
            if self._con is not None:
                return True
            try:
                self._con = self._connect_and_migrate()
            except StoreInUse as exc:
                return self._set_state("in_use", str(exc))
            except (OSError, duckdb.Error) as exc:
                return self._set_state("error", f"store unavailable ({self._path}): {_short(exc)}")
            self._state = "ok"
            if self._message and not self._moved_aside:
                self._message = None
            log.info("store: %s open (schema version %d)", self._path, SCHEMA_VERSION)
            return True

    def _set_state(self, state: str, message: str) -> bool:
        if (state, message) != (self._state, self._message):
            log.error("store: %s", message)
        self._state, self._message = state, message
        return False

    def _connect_and_migrate(self) -> duckdb.DuckDBPyConnection:
        if self.read_only and not os.path.exists(self._path):
            raise OSError(f"no store at {self._path}")
        if not self.read_only:  # a folder made here is this user's only (the store holds page-set webhook URLs)
            os.makedirs(os.path.dirname(self._path) or ".", mode=0o700, exist_ok=True)
        con = self._connect()
        try:
            version = _schema_version(con)
        except duckdb.Error as exc:
            con.close()
            if self.read_only:
                raise
            self._move_aside("unreadable", _short(exc))
            con = self._connect()
            version = 0
        if version > SCHEMA_VERSION:
            con.close()
            if self.read_only:
                raise OSError(f"the store has schema version {version}, newer than this program's "
                              f"{SCHEMA_VERSION}: upgrade Network Traffic Monitor")
            self._move_aside("newer", f"schema version {version} is newer than this program's {SCHEMA_VERSION}")
            con = self._connect()
            version = 0
        if version < SCHEMA_VERSION and not self.read_only:
            _migrate(con, version)
        if not self.read_only:
            _private(self._path)
        return con

    def _connect(self) -> duckdb.DuckDBPyConnection:
        try:
            return duckdb.connect(self._path, read_only=self.read_only)
        except duckdb.Error as exc:
            text = str(exc)
            if _IN_USE in text.lower():
                pid = re.search(r"PID (\d+)", text)
                raise StoreInUse(f"store in use by another process{f' (PID {pid.group(1)})' if pid else ''}: "
                                 f"{self._path}; history is recorded by that process") from exc
            if self.read_only or not _unreadable(text) or not os.path.exists(self._path):
                raise
            self._move_aside("unreadable", _short(exc))
            return duckdb.connect(self._path)

    def _move_aside(self, why: str, detail: str) -> None:
        """Rename the store (and its write-ahead log) so a fresh one can be made; never delete it."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        aside = f"{self._path}.{why}-{stamp}"
        n = 1
        while os.path.exists(aside):
            n += 1
            aside = f"{self._path}.{why}-{stamp}-{n}"
        os.replace(self._path, aside)
        if os.path.exists(self._path + ".wal"):
            os.replace(self._path + ".wal", aside + ".wal")
        self._moved_aside = aside
        self._message = f"the store at {self._path} was {why} ({detail}); it was moved to {aside} and a new one created"
        log.warning("store: %s", self._message)

    def close(self) -> None:
        """Checkpoint and close the file; safe to call twice."""
        with self._lock:
            if self._pending and not self.read_only and not self._drain():
                self._give_up_pending()
            con, self._con = self._con, None
            if con is not None:
                try:
                    if not self.read_only:
                        con.execute("CHECKPOINT")
                except duckdb.Error as exc:
                    log.warning("store: checkpoint at close failed: %s", _short(exc))
                finally:
                    con.close()
            if self._state in ("ok",):
                self._state = "closed"

    # -- writes ------------------------------------------------------------------------

    def _write(self, batch: StoreBatch) -> None:
        con = self._con
        if con is None or self.read_only:
            raise OSError("store is not open for writing")
        con.execute("BEGIN TRANSACTION")
        try:
            if batch.replaces:
                segs = sorted(int(s) for s in batch.replaces)
                # The range first: segment ids grow with time, so row-group statistics skip old data.
                cond = f"seg >= {segs[0]} AND seg <= {segs[-1]} AND seg IN ({', '.join(map(str, segs))})"
                for table in TABLES:
                    con.execute(f"DELETE FROM {table} WHERE {cond}")
            for table, frame in batch.frames.items():
                _insert(con, table, frame)
            if batch.alerts is not None and len(batch.alerts):
                _upsert_alerts(con, batch.alerts)
            if batch.hours_done:
                con.execute(f"DELETE FROM open_hours WHERE seg IN ({', '.join(str(int(h)) for h in batch.hours_done)})")
            for row in batch.origins:
                con.execute("DELETE FROM origins WHERE origin = ?", [row[0]])
                con.execute("INSERT INTO origins VALUES (?, ?, ?, ?, ?)", list(row))
            con.execute("COMMIT")
            _private(self._path)
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                con.execute("ROLLBACK")
            raise

    def _failed(self, exc: Exception) -> None:
        """A failed write: the error becomes state; the connection is dropped and reopened on the next write."""
        self._set_state("error", f"store write failed ({self._path}): {_short(exc)}")
        con, self._con = self._con, None
        if con is not None:
            with contextlib.suppress(duckdb.Error):
                con.close()

    # -- documents ---------------------------------------------------------------------

    def put_doc(self, kind: str, name: str, body: dict) -> None:
        """Save (or replace) one named document in its own transaction."""
        text = doc_text(kind, name, body)
        self._doc_change([("DELETE FROM documents WHERE kind = ? AND name = ?", [kind, name]),
                          ("INSERT INTO documents VALUES (?, ?, ?, ?)", [kind, name, text, time.time()])])

    def docs(self, kind: str) -> list[dict]:
        """Every document of a kind, by name."""
        return doc_rows(self._query("SELECT name, body, updated FROM documents WHERE kind = $kind", {"kind": kind}))

    def delete_doc(self, kind: str, name: str) -> bool:
        """Remove one document; False when there was none."""
        return self._doc_change([("DELETE FROM documents WHERE kind = ? AND name = ?", [kind, name])]) > 0

    def _doc_change(self, statements: list[tuple[str, list]]) -> int:
        """Run statements in one transaction; rows the first one changed. OSError when the store cannot write."""
        with self._lock:
            if self.read_only:
                raise OSError(f"the store {self._path} is open read-only")
            if not self._ready() or self._con is None:
                raise OSError(self._message or "store is not open")
            con = self._con
            try:
                con.execute("BEGIN TRANSACTION")
                first = con.execute(*statements[0]).fetchone()
                for stmt in statements[1:]:
                    con.execute(*stmt)
                con.execute("COMMIT")
                _private(self._path)
            except duckdb.Error as exc:
                with contextlib.suppress(duckdb.Error):
                    con.execute("ROLLBACK")
                self._failed(exc)
                raise OSError(self._message) from exc
            return int(first[0]) if first else 0

    # -- retention ---------------------------------------------------------------------

    def prune(self, retention_days: float | None = None, now: float | None = None) -> int:
        """Delete live rows whose capture time is older than the retention; imported rows are kept."""
        days = config.get("RETENTION_DAYS") if retention_days is None else retention_days
        cutoff = int((self.clock() if now is None else now) - days * 86400)
        conds = {t: ("ts < $cut" if t == "seconds" else "hour + 3600 <= $cut" if t == "open_hours"
                     else "minute + 3600 <= $cut" if t.endswith("_1h") else "minute + 60 <= $cut") for t in TABLES}
        conds["alerts"] = "last_ts < $cut"
        return self._delete(conds, "origin = 'live'", {"cut": cutoff})

    def remove_origin(self, origin: str) -> int:
        """Delete every row of one origin (an imported file) and its origin entry."""
        conds = {t: "TRUE" for t in (*TABLES, "alerts", "origins")}
        return self._delete(conds, "origin = $origin", {"origin": origin})

    def _delete(self, conds: dict[str, str], common: str, params: dict[str, Any]) -> int:
        with self._lock:
            if not self._ready() or self._con is None:
                return 0
            total = 0
            try:
                self._con.execute("BEGIN TRANSACTION")
                for table, cond in conds.items():
                    res = self._con.execute(f"DELETE FROM {table} WHERE {common} AND {cond}", params).fetchone()
                    total += int(res[0]) if res else 0
                self._con.execute("COMMIT")
            except duckdb.Error as exc:
                with contextlib.suppress(duckdb.Error):
                    self._con.execute("ROLLBACK")
                self._failed(exc)
                return 0
            return total

    # -- queries -----------------------------------------------------------------------

    def _query(self, sql: str, params: dict[str, Any]) -> pd.DataFrame:
        with self._lock:
            if self._con is None and not self.open():
                raise OSError(self._message or "store is not open")
            cur = self._con.cursor()  # a cursor per query: other threads may query at the same time
        try:
            used = {k: v for k, v in params.items() if f"${k}" in sql}
            return cur.execute(sql, used).df()
        finally:
            cur.close()

    def size_bytes(self) -> int:
        """Bytes on disk: the file and its write-ahead log."""
        return sum(os.path.getsize(p) for p in (self._path, self._path + ".wal") if os.path.exists(p))

    def max_segment(self) -> int:
        """The largest segment id written so far (0 for an empty store)."""
        df = self._query("SELECT max(seg) AS s FROM seconds", {})
        return 0 if not len(df) or pd.isna(df.iloc[0]["s"]) else int(df.iloc[0]["s"])

    def allocate_segment(self) -> int:
        """A segment id above every id in the store, even if the clock went back since it was written."""
        with self._lock:
            if self._last_seg == 0 and self._con is not None:
                with contextlib.suppress(OSError, duckdb.Error):
                    self._last_seg = self.max_segment()
        return super().allocate_segment()


def _private(path: str) -> None:
    """The store file and its write-ahead log readable by this user only (0600): DuckDB makes them (and the
    log again after each checkpoint) with the umask's mode. One stat each when already private."""
    for p in (path, path + ".wal"):
        with contextlib.suppress(OSError):  # not there (no log yet), or not ours to change
            if os.stat(p).st_mode & 0o077:
                os.chmod(p, 0o600)


def _schema_version(con: duckdb.DuckDBPyConnection) -> int:
    """The store's schema version: 0 for an empty file; raises duckdb.Error for an unreadable one."""
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    if "meta" not in tables:
        if tables:
            raise duckdb.InvalidInputException(f"not a history store: tables {sorted(tables)} but no meta table")
        return 0
    row = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        raise duckdb.InvalidInputException("meta table without a schema version")
    return int(row[0])


def _migrate(con: duckdb.DuckDBPyConnection, version: int) -> None:
    """Run the migrations after `version`, each in its own transaction with the version it reaches."""
    for target in range(version + 1, SCHEMA_VERSION + 1):
        con.execute("BEGIN TRANSACTION")
        for stmt in MIGRATIONS[target]:
            con.execute(stmt)
        con.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(target)])
        con.execute("COMMIT")
        log.info("store: schema migrated to version %d", target)


def _insert(con: duckdb.DuckDBPyConnection, table: str, frame: pd.DataFrame) -> None:
    if frame is None or not len(frame):
        return
    cols = ", ".join(columns(table))
    con.register("_rows", frame)
    try:
        con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _rows")
    finally:
        con.unregister("_rows")


def _upsert_alerts(con: duckdb.DuckDBPyConnection, frame: pd.DataFrame) -> None:
    """An alert seen again (same sensor, origin, detector, source, target, first seen) replaces its row."""
    con.register("_alerts", frame)
    try:
        con.execute("DELETE FROM alerts WHERE EXISTS (SELECT 1 FROM _alerts n WHERE n.sensor = alerts.sensor "
                    "AND n.origin = alerts.origin AND n.detector = alerts.detector AND n.source = alerts.source "
                    "AND n.target = alerts.target AND n.first_ts = alerts.first_ts)")
    finally:
        con.unregister("_alerts")
    _insert(con, "alerts", frame)


def _unreadable(text: str) -> bool:
    low = text.lower()
    return any(m in low for m in _UNREADABLE) and "permission" not in low and "read-only" not in low \
        and "no space" not in low


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
