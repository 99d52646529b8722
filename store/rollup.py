"""Parsed packet batches -> history rows: per second, per minute (conversations, top tables), alerts.

A ``Rollup`` lives in a consumer stage: ``add(batch)`` is vectorised (one grouping per table per
batch), ``maybe_flush()`` hands the store one ``StoreBatch`` every STORE_FLUSH_S of wall time.

How a minute is written without double counting: each minute of capture time gets a segment id
when its first packet arrives. The rollup keeps the minute's cumulative state while it is open and
writes the whole minute (its seconds, conversations, top tables) at each flush in which it changed;
the store replaces that segment's earlier rows in the same transaction. Once a newer minute has
been seen the minute is closed: written a last time and forgotten. A packet arriving later for a
closed minute opens a new segment for it, whose rows add to the old ones. So every packet is in
exactly one segment's state, and every segment's rows in the store are one consistent version.
A flush that fails is retried by the store in order; a later write of the same segment carries
the whole minute anyway.

With `deltas` (a fleet sensor, flushing every FLEET_FLUSH_S): a flush ships, for each open minute,
only the keys and seconds that changed since its last flush (the difference, in a segment of its
own); reads sum a minute's rows over its segments, so the deltas add up to the minute's state. The
minute's close writes it whole once and replaces its delta segments (as a rewrite replaces a
segment), so each packet counts once, a re-sent batch is found by its id, and a sensor restarted
mid-minute leaves its shipped deltas as that minute's rows. A close files each replaced delta segment
at its own minute (`StoreBatch.periods`). While a minute is open, its per-second rows are exact; its
capped per-key rows are not always: a key a capped table evicts stays in the store with what was
shipped of it (no negative delta is sent), its count moves to the left-out sums that only the close
ships, and if it comes back its new count is shipped on top. The close replaces all of them.

Top tables and conversations are capped per minute (STORE_TOP_MAX, STORE_CONV_MAX): the keys
with most packets and those with most bytes are kept, and for the rest the store gets what was
left out and the most any single left-out key had, which bounds a range top-N's error.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import numpy as np
import pandas as pd

import config
import native
from analysis.headers import NON_IP, TCP, UDP, addr_text, group_rows
from store.base import SECOND_VALUES, Store, StoreBatch, columns

log = logging.getLogger(__name__)

W = len(SECOND_VALUES)  # packets, bytes, bytes_captured, malformed, pk_<6 classes>, by_<6>, pk_<4 dirs>, by_<4>
_ADDR_TEXT_MAX = 200_000


def _minmax(groups: np.ndarray, lows: np.ndarray, highs: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group: the least of `lows`, the greatest of `highs`."""
    mins = np.full(n, np.inf)
    maxs = np.full(n, -np.inf)
    if not native.minmax_at(groups, lows, highs, mins, maxs):
        np.minimum.at(mins, groups, lows)
        np.maximum.at(maxs, groups, highs)
    return mins, maxs


def _minute_bytes(minutes: np.ndarray) -> np.ndarray:
    """(n, 8) uint8: each minute's start second, little-endian, the first 8 bytes of every per-minute key."""
    return np.ascontiguousarray(minutes.astype("<i8")).view(np.uint8).reshape(-1, 8)


def _key_minutes(keys: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(keys[:, :8]).view("<i8").ravel()


DELTA_SLOTS = 1024  # delta segments one minute ships at most (then its changes wait for its close)


def delta_segment(base: int, k: int) -> int:
    """The id of a minute's k-th delta segment: negative, and naming the minute's own segment `base`, whose
    rows only the close writes, so that one commit hides all the minute's deltas (a read excludes the
    deltas of closed minutes without looking at each)."""
    return -(base * DELTA_SLOTS + k + 1)


def _changed(cur: tuple, prev: tuple | None) -> tuple:
    """The rows of `cur` (keys, vals, times) whose counts differ from `prev`'s, as the difference."""
    keys, vals, times = cur
    if prev is None or not len(prev[0]) or not len(keys):
        return cur
    before = {bytes(k): v for k, v in zip(prev[0], prev[1])}
    base = np.array([before.get(bytes(k), (0, 0)) for k in keys], np.int64).reshape(-1, 2)
    diff = vals - base
    keep = diff.any(axis=1)
    return keys[keep], diff[keep], None if times is None else times[keep]


def _replace_minutes(sent: tuple | None, cur: tuple | None, minutes: list[int]) -> tuple | None:
    """`sent` with the rows of these minutes replaced by `cur`'s (or removed, with cur None)."""
    if sent is None:
        return cur
    keep = ~np.isin(_key_minutes(sent[0]), minutes)
    parts = [(sent[0][keep], sent[1][keep], None if sent[2] is None else sent[2][keep])]
    if cur is not None:
        parts.append(cur)
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            None if parts[0][2] is None else np.concatenate([p[2] for p in parts]))


def _concat_frames(a: dict[str, pd.DataFrame], b: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Two batches' frames as one (per table, rows of both)."""
    out = dict(a)
    for k, v in b.items():
        out[k] = pd.concat([out[k], v], ignore_index=True) if k in out and len(out[k]) else v
    return out


def _to_hours(keys: np.ndarray) -> np.ndarray:
    """The same keys with their period (first 8 bytes) set to the hour holding it."""
    out = keys.copy()
    m = _key_minutes(keys)
    out[:, :8] = _minute_bytes(m - m % 3600)
    return out


class KeyTable:
    """Keyed (uint8 rows, minute first) packets, bytes and optionally first/last seen, merged lazily.

    Each batch's groups are kept as a part; parts are merged at flush, or earlier when they hold
    more rows than `merge_rows`, so memory stays bounded between flushes even under a flood.
    """

    def __init__(self, width: int, times: bool, cap: int, merge_rows: int) -> None:
        self.width = width
        self.times = times
        self.cap = cap
        self.merge_rows = merge_rows
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        self.rows = 0
        self.clean = True  # the parts are one merged, capped part: merge() has nothing to do
        self.ungrouped = False  # a part from add_grouped (closed minutes as hours) may hold a key twice
        self.dropped: dict[int, np.ndarray] = {}  # minute -> keys, packets, bytes, bound packets, bound bytes

    def add(self, keys: np.ndarray, wire: np.ndarray, ts: np.ndarray) -> None:
        """Count one packet of `wire` bytes at `ts` per key row."""
        if not len(keys):
            return
        first, inv = group_rows(keys)
        n = len(first)
        vals = np.empty((n, 2), np.int64)
        vals[:, 0] = np.bincount(inv, minlength=n)
        vals[:, 1] = np.bincount(inv, wire, n)
        times = np.stack(_minmax(inv, ts, ts, n), axis=1) if self.times else None
        self.parts.append((keys[first], vals, times))
        self.rows += n
        self.clean = False
        if self.rows > self.merge_rows:
            self.merge()

    def merge(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """One part: the sum of all parts, capped per minute."""
        if not self.parts:
            return (np.empty((0, self.width), np.uint8), np.empty((0, 2), np.int64),
                    np.empty((0, 2)) if self.times else None)
        if self.clean:
            return self.parts[0]
        if len(self.parts) > 1 or self.ungrouped:  # one part from add_grouped may repeat a key (its minutes)
            keys = np.concatenate([p[0] for p in self.parts])
            vals = np.concatenate([p[1] for p in self.parts])
            first, inv = group_rows(keys)
            n = len(first)
            merged = np.empty((n, 2), np.int64)
            merged[:, 0] = np.bincount(inv, vals[:, 0], n)  # float64 sums: exact below 2**53
            merged[:, 1] = np.bincount(inv, vals[:, 1], n)
            times = None
            if self.times:
                both = np.concatenate([p[2] for p in self.parts])
                times = np.stack(_minmax(inv, both[:, 0], both[:, 1], n), axis=1)
            self.parts = [self._capped(keys[first], merged, times)]
        else:
            self.parts = [self._capped(*self.parts[0])]
        self.rows = len(self.parts[0][0])
        self.clean = True
        self.ungrouped = False
        return self.parts[0]

    def _capped(self, keys: np.ndarray, vals: np.ndarray, times: np.ndarray | None) -> tuple:
        """Keep, per minute, the `cap` keys with most packets and the `cap` with most bytes; note the rest."""
        minutes = _key_minutes(keys)
        _, counts = np.unique(minutes, return_counts=True)
        if not len(counts) or counts.max() <= self.cap:
            return keys, vals, times
        keep = self._ranked(minutes, vals[:, 0]) | self._ranked(minutes, vals[:, 1])
        gone = ~keep
        for m in np.unique(minutes[gone]).tolist():
            sel = gone & (minutes == m)
            p, b = vals[sel, 0], vals[sel, 1]
            row = np.array([len(p), p.sum(), b.sum(), p.max(), b.max()], np.int64)
            # Bounds add up: a key cut twice in one minute may have lost the most of each cut.
            self.dropped[m] = self.dropped[m] + row if m in self.dropped else row
        return keys[keep], vals[keep], None if times is None else times[keep]

    def _ranked(self, minutes: np.ndarray, col: np.ndarray) -> np.ndarray:
        """True for the rows among the `cap` largest of `col` within their minute."""
        order = np.lexsort((-col, minutes))
        sm = minutes[order]
        idx = np.arange(len(sm))
        start = np.maximum.accumulate(np.where(np.r_[True, sm[1:] != sm[:-1]], idx, 0))
        out = np.zeros(len(sm), bool)
        out[order] = (idx - start) < self.cap
        return out

    def add_grouped(self, keys: np.ndarray, vals: np.ndarray, times: np.ndarray | None) -> None:
        """Add rows already grouped (another table's rows): merged with the rest at the next merge."""
        if len(keys):
            self.parts.append((keys, vals, times if self.times else None))
            self.rows += len(keys)
            self.clean = False
            self.ungrouped = True

    def select(self, periods: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The merged rows of these periods."""
        keys, vals, times = self.merge()
        sel = np.isin(_key_minutes(keys), periods)
        return keys[sel], vals[sel], None if times is None else times[sel]

    def forget(self, minutes: list[int]) -> None:
        """Drop the state of closed minutes (after their last write)."""
        keys, vals, times = self.merge()
        if len(keys):
            keep = ~np.isin(_key_minutes(keys), minutes)
            self.parts = [(keys[keep], vals[keep], None if times is None else times[keep])]
            self.rows = int(keep.sum())
        for m in minutes:
            self.dropped.pop(m, None)


class Rollup:
    """Turns parsed batches and alerts into store batches; call maybe_flush() from the same stage."""

    def __init__(self, store: Store | None, sensor: str | None = None, iface: str = "", origin: str = "live",
                 flush_s: float | None = None, top_max: int | None = None, conv_max: int | None = None,
                 clock=time.monotonic, deltas: bool = False) -> None:
        self.store = store
        # deltas (a fleet sensor's flushes every FLEET_FLUSH_S): an open minute's flush carries only what
        # changed since its last flush, in a segment of its own, summed on read; the minute's close writes it
        # whole once, replacing its delta segments (see `_delta_frames`).
        self.deltas = deltas
        self._sent: dict[str, tuple] = {}  # table kind -> the open minutes' rows as last shipped (deltas)
        self._sent_secs: dict[int, tuple] = {}  # second -> (grid row, min, max) as last shipped (deltas)
        self._dsegs: dict[int, list[int]] = {}  # open minute -> its delta segments shipped (deltas)
        self.sensor = sensor or config.get("STORE_SENSOR") or socket.gethostname()
        self.iface = iface
        self.origin = origin
        self.flush_s = float(config.get("STORE_FLUSH_S") if flush_s is None else flush_s)
        top_max = int(top_max or config.get("STORE_TOP_MAX"))
        conv_max = int(conv_max or config.get("STORE_CONV_MAX"))
        self.clock = clock
        self._next_flush = clock() + self.flush_s
        self._secs: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        merge = 200_000
        self.tables = {"conv": KeyTable(52, True, conv_max, max(merge, 4 * conv_max)),
                       "src": KeyTable(24, False, top_max, merge), "dst": KeyTable(24, False, top_max, merge),
                       "tcp": KeyTable(12, False, top_max, merge), "udp": KeyTable(12, False, top_max, merge)}
        self.hours = {k: KeyTable(t.width, t.times, t.cap, t.merge_rows) for k, t in self.tables.items()}
        self._hsegs: dict[int, int] = {}  # open hour -> its segment (the hourly tables' rows)
        self._segs: dict[int, int] = {}  # open minute -> its segment
        self._written: set[int] = set()  # minute segments handed to the store at least once
        self._marked: set[int] = set()  # hour segments listed in the store's open_hours
        self._dirty: set[int] = set()
        self._newest_minute: int | None = None
        self._alerts: dict[tuple, dict[str, Any]] = {}
        self._origins: list[tuple[str, str, str, float, str]] = []
        self._texts: dict[bytes, str] = {}
        self.packets_added = 0
        self.packets_flushed = 0  # packets counted in batches handed to the store (written or queued to retry)

    # -- input -------------------------------------------------------------------------

    def add(self, arr: np.ndarray) -> None:
        """Count one parsed batch (PACKET_DTYPE rows, with or without a `vlan` field)."""
        if not len(arr):
            return
        ts = arr["ts"]
        sec = np.floor(ts).astype(np.int64)
        minute = sec - sec % 60
        self._add_seconds(arr, sec)
        for m in np.unique(minute).tolist():
            if m not in self._segs:
                self._segs[m] = self._allocate()
            if m - m % 3600 not in self._hsegs:
                self._hsegs[m - m % 3600] = self._allocate()
            self._dirty.add(m)
        top = int(minute.max())
        self._newest_minute = top if self._newest_minute is None else max(top, self._newest_minute)
        self._add_tables(arr, minute, ts)
        self.packets_added += len(arr)

    def note_origin(self, kind: str, label: str) -> None:
        """Record what this rollup's origin is (an imported file's path), written with the next flush."""
        self._origins.append((self.origin, kind, label, time.time(), self.sensor))

    def add_alerts(self, alerts: list[dict[str, Any]]) -> None:
        """Alerts as Alert.as_dict() gives them; a newer version of the same alert replaces the older."""
        for a in alerts:
            self._alerts[(a["detector"], a["source"], a["target"], float(a["first_ts"]))] = dict(a)

    def _allocate(self) -> int:
        if self.store is not None:
            return self.store.allocate_segment()
        return time.time_ns() // 1000 + len(self._segs)

    def _add_seconds(self, arr: np.ndarray, sec: np.ndarray) -> None:
        rel, uniq = pd.factorize(sec)
        n = len(uniq)
        base = rel.astype(np.int64) * W
        wire = arr["wire_len"].astype(np.int64)
        cls = arr["cls"].astype(np.int64)
        dirs = arr["direction"].astype(np.int64)
        cells = n * W
        grid = (np.bincount(base, minlength=cells) + np.bincount(base + 1, wire, cells).astype(np.int64)
                + np.bincount(base + 2, arr["cap_len"].astype(np.float64), cells).astype(np.int64)
                + np.bincount(base + 3, arr["malformed"].astype(np.float64), cells).astype(np.int64)
                + np.bincount(base + 4 + cls, minlength=cells)
                + np.bincount(base + 10 + cls, wire, cells).astype(np.int64)
                + np.bincount(base + 16 + dirs, minlength=cells)
                + np.bincount(base + 20 + dirs, wire, cells).astype(np.int64)).reshape(n, W)
        mins, maxs = _minmax(rel, arr["ts"], arr["ts"], n)
        self._secs.append((np.asarray(uniq, np.int64), grid, mins, maxs))

    def _add_tables(self, arr: np.ndarray, minute: np.ndarray, ts: np.ndarray) -> None:
        wire = arr["wire_len"].astype(np.int64)
        cls = arr["cls"]
        ip = cls != NON_IP
        mb = _minute_bytes(minute)
        for kind in ("src", "dst"):
            keys = np.empty((int(ip.sum()), 24), np.uint8)
            keys[:, :8] = mb[ip]
            keys[:, 8:] = np.ascontiguousarray(arr[kind][ip]).view(np.uint8).reshape(-1, 16)
            self.tables[kind].add(keys, wire[ip], ts[ip])
        for kind, klass in (("tcp", TCP), ("udp", UDP)):
            sel = (cls == klass) & (arr["dport"] >= 0)
            keys = np.empty((int(sel.sum()), 12), np.uint8)
            keys[:, :8] = mb[sel]
            keys[:, 8:] = np.ascontiguousarray(arr["dport"][sel].astype("<i4")).view(np.uint8).reshape(-1, 4)
            self.tables[kind].add(keys, wire[sel], ts[sel])
        conv = conversation_keys(arr[ip] if not ip.all() else arr)
        keys = np.empty((len(conv), 52), np.uint8)
        keys[:, :8] = mb[ip]
        keys[:, 8:50] = conv
        vlan = arr["vlan"][ip] if "vlan" in (arr.dtype.names or ()) else np.zeros(len(conv), np.uint16)
        keys[:, 50:52] = np.ascontiguousarray(vlan.astype("<u2")).view(np.uint8).reshape(-1, 2)
        self.tables["conv"].add(keys, wire[ip], ts[ip])

    # -- output ------------------------------------------------------------------------

    def due(self) -> bool:
        """Whether STORE_FLUSH_S of wall time has passed since the last flush."""
        return self.clock() >= self._next_flush

    def maybe_flush(self) -> bool:
        """Flush when due; True when something was handed to the store."""
        return self.flush() if self.due() else False

    def flush(self, final: bool = False) -> bool:
        """Hand the changed minutes (whole), new alerts and origins to the store; close the minutes passed.

        `final`: close every minute (end of a capture or an import)."""
        self._next_flush = self.clock() + self.flush_s
        batch = self.build(final)
        if batch is None:
            return False
        if self.store is not None:
            self.store.write(batch)  # never raises; a failure is kept and retried by the store
        self.packets_flushed = self.packets_added
        return True

    def build(self, final: bool = False) -> StoreBatch | None:
        """The StoreBatch of everything changed since the last build; closes passed minutes and hours.

        `final`: close every minute and hour (end of a capture or an import)."""
        if not self._dirty and not self._alerts and not self._origins and not (final and self._hsegs):
            return None
        newest = self._newest_minute
        closed = sorted(m for m in self._segs if final or (newest is not None and m < newest))
        open_dirty: list[int] = []
        if self.deltas:  # a closing minute with deltas shipped is written whole (its deltas replaced)
            self._dirty |= {m for m in closed if m in self._dsegs}
            open_dirty = sorted(self._dirty - set(closed))
            self._dirty -= set(open_dirty)
        dirty = sorted(self._dirty)
        frames: dict[str, pd.DataFrame] = {}
        if dirty:
            rows = {k: t.select(dirty) for k, t in self.tables.items()}
            drops = {k: {m: t.dropped[m] for m in dirty if m in t.dropped} for k, t in self.tables.items()}
            frames.update(self._period_frames(rows, drops, self._segs, "", *self._merged_seconds()))
        periods = [(s, m) for m in dirty for s in self._dsegs.pop(m, [])]
        replaced = [s for s, _ in periods]
        if open_dirty:
            frames = _concat_frames(frames, self._delta_frames(open_dirty))
        self._fold(closed)
        still_open = {m - m % 3600 for m in self._segs if m not in closed}
        closing = sorted(h for h in self._hsegs if final or h not in still_open)
        if closing:
            rows = {k: t.select(closing) for k, t in self.hours.items()}
            drops = {k: {h: t.dropped[h] for h in closing if h in t.dropped} for k, t in self.hours.items()}
            frames.update(self._period_frames(rows, drops, self._hsegs, "_1h"))
        opened = sorted({m - m % 3600 for m in (*dirty, *open_dirty)} - set(closing))
        opened = [h for h in opened if self._hsegs[h] not in self._marked]
        if opened:
            frames["open_hours"] = pd.DataFrame({**self._prefix(len(opened), np.array(opened), self._hsegs),
                                                 "hour": opened}, columns=columns("open_hours"))
        segs = [self._segs[m] for m in dirty]
        batch = StoreBatch(frames=frames, replaces=tuple(s for s in segs if s in self._written) + tuple(replaced),
                           alerts=self._alert_frame(), origins=tuple(self._origins),
                           hours_done=tuple(self._hsegs[h] for h in closing if self._hsegs[h] in self._marked),
                           periods=tuple(periods))
        self._written.update(segs)
        self._marked.update(self._hsegs[h] for h in opened)
        self._alerts.clear()
        self._origins.clear()
        self._dirty.clear()
        self._close(closed, closing)
        return batch

    def _delta_frames(self, minutes: list[int]) -> dict[str, pd.DataFrame]:
        """What changed in these open minutes since their last shipment, each minute in a new segment.

        Per key (and per second): the current count minus the count last shipped; first/last seen as
        now (read as min/max). Reads sum a minute's rows over its segments, so the shipped deltas add up
        to the minute's state; its close writes it whole and replaces them. Capped tables are the exception
        until that close: an evicted key's shipped rows stay (no negative delta), its count goes to the
        left-out sums (shipped with the close), and a key that comes back ships its new count on top."""
        minutes = [m for m in minutes if len(self._dsegs.get(m, ())) < DELTA_SLOTS]  # the rest wait for the close
        if not minutes:
            return {}
        segs = {m: delta_segment(self._segs[m], len(self._dsegs.get(m, ()))) for m in minutes}
        rows = {}
        for kind, t in self.tables.items():
            cur = t.select(minutes)
            rows[kind] = _changed(cur, self._sent.get(kind))
            self._sent[kind] = _replace_minutes(self._sent.get(kind), cur, minutes)
        secs, grid, mins, maxs = self._merged_seconds()
        sel = np.isin(secs - secs % 60, minutes)
        secs, grid, mins, maxs = secs[sel], grid[sel].copy(), mins[sel], maxs[sel]
        for i, sec in enumerate(secs.tolist()):
            before = self._sent_secs.get(sec)
            self._sent_secs[sec] = (grid[i].copy(), mins[i], maxs[i])
            if before is not None:
                grid[i] -= before[0]
        moved = grid.any(axis=1)
        saved = self._dirty
        self._dirty = set(minutes)  # _period_frames ships the seconds of the dirty minutes
        try:
            frames = self._period_frames(rows, {}, segs, "", secs[moved], grid[moved], mins[moved], maxs[moved])
        finally:
            self._dirty = saved
        for m, seg in segs.items():
            self._dsegs.setdefault(m, []).append(seg)
        return frames

    def _fold(self, closed: list[int]) -> None:
        """Closed minutes join their hour's state (rows and what their caps left out)."""
        if not closed:
            return
        for kind, t in self.tables.items():
            keys, vals, times = t.select(closed)
            h = self.hours[kind]
            h.add_grouped(_to_hours(keys), vals, times)
            for m in closed:
                if m in t.dropped:
                    hour = m - m % 3600
                    h.dropped[hour] = h.dropped[hour] + t.dropped[m] if hour in h.dropped else t.dropped[m].copy()

    def _close(self, minutes: list[int], hours: list[int]) -> None:
        if minutes:
            for t in self.tables.values():
                t.forget(minutes)
            secs, grid, mins, maxs = self._merged_seconds()
            keep = ~np.isin(secs - secs % 60, minutes)
            self._secs = [(secs[keep], grid[keep], mins[keep], maxs[keep])] if keep.any() else []
            for m in minutes:
                self._written.discard(self._segs.pop(m))
                self._dsegs.pop(m, None)
            if self._sent:
                self._sent = {k: _replace_minutes(v, None, minutes) for k, v in self._sent.items()}
                self._sent_secs = {t: v for t, v in self._sent_secs.items() if t - t % 60 not in minutes}
        if hours:
            for t in self.hours.values():
                t.forget(hours)
            for h in hours:
                self._marked.discard(self._hsegs.pop(h))

    def _merged_seconds(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        if not self._secs:
            return np.empty(0, np.int64), np.empty((0, W), np.int64), np.empty(0), np.empty(0)
        if len(self._secs) == 1:
            return self._secs[0]
        secs = np.concatenate([s[0] for s in self._secs])
        grid = np.concatenate([s[1] for s in self._secs])
        rel, uniq = pd.factorize(secs)
        n = len(uniq)
        out = np.zeros((n, W), np.int64)
        np.add.at(out, rel, grid)
        mins, _ = _minmax(rel, np.concatenate([s[2] for s in self._secs]), np.zeros(len(rel)), n)
        _, maxs = _minmax(rel, np.zeros(len(rel)), np.concatenate([s[3] for s in self._secs]), n)
        self._secs = [(np.asarray(uniq, np.int64), out, mins, maxs)]
        return self._secs[0]

    def _prefix(self, n: int, periods: np.ndarray, segs: dict[int, int]) -> dict[str, Any]:
        def const(v: str) -> pd.Categorical:  # one dictionary entry: far cheaper than n Python strings
            return pd.Categorical.from_codes(np.zeros(n, np.int8), [v])

        return {"sensor": const(self.sensor), "iface": const(self.iface), "origin": const(self.origin),
                "seg": pd.Series(periods, dtype=np.int64).map(segs).to_numpy(np.int64)}

    def _period_frames(self, rows: dict, drops: dict, segs: dict[int, int], suffix: str,
                       secs: np.ndarray | None = None, grid: np.ndarray | None = None,
                       mins: np.ndarray | None = None, maxs: np.ndarray | None = None) -> dict[str, pd.DataFrame]:
        """DataFrames of one level (minutes: suffix "", with the seconds; hours: "_1h") for these rows."""
        frames = {}
        if secs is not None:
            sel = np.isin(secs - secs % 60, list(segs)) & np.isin(secs - secs % 60, sorted(self._dirty))
            s = secs[sel]
            frames["seconds"] = pd.DataFrame({**self._prefix(len(s), s - s % 60, segs), "ts": s,
                                              **{c: grid[sel, i] for i, c in enumerate(SECOND_VALUES)},
                                              "min_ts": mins[sel], "max_ts": maxs[sel]}, columns=columns("seconds"))
        frames["conversations" + suffix] = self._conv_frame(*rows["conv"], segs)
        addr_parts, port_parts, cap_parts = [], [], []
        for kind in ("src", "dst", "tcp", "udp"):
            keys, vals, _ = rows[kind]
            m = _key_minutes(keys)
            if kind in ("src", "dst"):
                addr_parts.append(self._table_frame("top_addrs", m, vals, segs, kind=kind,
                                                    addr=self._texts_of(keys[:, 8:24])))
            else:
                port = np.ascontiguousarray(keys[:, 8:12]).view("<i4").ravel()
                port_parts.append(self._table_frame("top_ports", m, vals, segs, proto=kind, port=port))
        frames["top_addrs" + suffix] = pd.concat(addr_parts, ignore_index=True)
        frames["top_ports" + suffix] = pd.concat(port_parts, ignore_index=True)
        for kind, d in drops.items():
            if d:
                cap_parts.append(self._caps_frame(kind, [(p, *row.tolist()) for p, row in sorted(d.items())], segs))
        frames["caps" + suffix] = pd.concat(cap_parts, ignore_index=True) if cap_parts else pd.DataFrame(
            columns=columns("caps"))
        return frames

    def _table_frame(self, table: str, periods: np.ndarray, vals: np.ndarray, segs: dict[int, int],
                     **cols: Any) -> pd.DataFrame:
        data = {**self._prefix(len(periods), periods, segs), "minute": periods, **cols,
                "packets": vals[:, 0], "bytes": vals[:, 1]}
        return pd.DataFrame(data, columns=columns(table))

    def _caps_frame(self, kind: str, rows: list[tuple], segs: dict[int, int]) -> pd.DataFrame:
        arr = np.array(rows, np.int64)
        names = ["dropped_keys", "dropped_packets", "dropped_bytes", "bound_packets", "bound_bytes"]
        data = {**self._prefix(len(arr), arr[:, 0], segs), "minute": arr[:, 0], "kind": kind,
                **{c: arr[:, i + 1] for i, c in enumerate(names)}}
        return pd.DataFrame(data, columns=columns("caps"))

    def _conv_frame(self, k: np.ndarray, vals: np.ndarray, times: np.ndarray | None,
                    segs: dict[int, int]) -> pd.DataFrame:
        m = _key_minutes(k)

        def be(lo: int, hi: int, dt: str) -> np.ndarray:
            return np.ascontiguousarray(k[:, lo:hi]).view(dt).ravel().astype(np.int64)

        a_port, b_port = be(40, 44, ">i4"), be(44, 48, ">i4")
        data = {**self._prefix(len(k), m, segs), "minute": m,
                "a": self._texts_of(k[:, 8:24]), "b": self._texts_of(k[:, 24:40]),
                "a_port": pd.arrays.IntegerArray(a_port.astype(np.int32), a_port < 0),
                "b_port": pd.arrays.IntegerArray(b_port.astype(np.int32), b_port < 0),
                "proto": be(48, 50, ">i2"), "vlan": be(50, 52, "<u2"),
                "packets": vals[:, 0], "bytes": vals[:, 1],
                # Microseconds after the period's start: small integers compress to a few bytes, where
                # random float64 epoch times cost 8 each (a third of a conversation row).
                "first_us": np.round((times[:, 0] - m) * 1e6).astype(np.int64),
                "last_us": np.round((times[:, 1] - m) * 1e6).astype(np.int64)}
        return pd.DataFrame(data, columns=columns("conversations"))

    def _texts_of(self, raw: np.ndarray) -> np.ndarray:
        """Address text for (n, 16) address bytes, each distinct address converted once."""
        if not len(raw):
            return np.empty(0, object)
        raw = np.ascontiguousarray(raw)
        first, inv = group_rows(raw)
        if len(self._texts) > _ADDR_TEXT_MAX:
            self._texts.clear()
        texts = self._texts
        # S16's tolist() makes the bytes objects in C (trailing NULs stripped: still one key per address).
        keys = raw[first].view("S16").ravel().tolist()
        out = [texts.get(k) for k in keys]
        for i, t in enumerate(out):
            if t is None:
                out[i] = texts[keys[i]] = addr_text(raw[first[i]].tobytes())
        return pd.Categorical.from_codes(inv, out) if len(set(out)) == len(out) else np.array(out, object)[inv]

    def _alert_frame(self) -> pd.DataFrame | None:
        if not self._alerts:
            return None
        rows = [{"sensor": self.sensor, "iface": self.iface, "origin": self.origin,
                 **{k: a.get(k) for k in ("detector", "severity", "source", "target", "first_ts", "last_ts",
                                          "count", "evidence")}} for a in self._alerts.values()]
        return pd.DataFrame(rows, columns=columns("alerts"))


def conversation_keys(arr: np.ndarray) -> np.ndarray:
    """(n, 42) uint8: one key per conversation in both directions, ends in canonical order (as the engine)."""
    raw = native.conv_keys(arr)
    if raw is not None:
        return raw
    src, dst = np.ascontiguousarray(arr["src"]), np.ascontiguousarray(arr["dst"])
    sport, dport = arr["sport"], arr["dport"]
    swap = (src > dst) | ((src == dst) & (sport > dport))
    out = np.empty((len(arr), 42), np.uint8)
    out[:, 0:16] = np.where(swap, dst, src).view(np.uint8).reshape(-1, 16)
    out[:, 16:32] = np.where(swap, src, dst).view(np.uint8).reshape(-1, 16)
    out[:, 32:36] = np.where(swap, dport, sport).astype(">i4").view(np.uint8).reshape(-1, 4)
    out[:, 36:40] = np.where(swap, sport, dport).astype(">i4").view(np.uint8).reshape(-1, 4)
    out[:, 40:42] = arr["proto"].astype(">i2").view(np.uint8).reshape(-1, 2)
    return out
