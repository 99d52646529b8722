"""Counting: whole-capture counters, per-second bins and the top tables, merged batch by batch.

The capture thread folds every parsed batch in (never skipping one): totals by class and
direction, per-second bins, top sources/destinations/conversations (Space-Saving summaries with
error bounds once full) and per-port tables. `prepare` does the heavy work outside the engine's
lock; `apply` folds the result in under it.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

import native
from analysis.headers import CLASSES, DIRECTIONS, NON_IP, OTHER_IP, TCP, UDP, group_rows

BIN_FIELDS = [f"pk_{d}" for d in DIRECTIONS] + [f"by_{d}" for d in DIRECTIONS] + [f"pk_{c}" for c in CLASSES]


TOP_MEMO_MAX = 32  # top() answers remembered per state (distinct questions: n, by, text)


class TopTable:
    """key -> packets, bytes (and first/last seen) for at most `cap` keys, merged batch by batch.

    While fewer than `cap` keys have been seen the counts are exact. Beyond that the table is a
    Space-Saving summary (Metwally, Agrawal, El Abbadi 2005) in batch form: after each merge the
    `cap` rows with the most packets stay, and `floor` remembers the largest (packets, bytes) ever
    pruned. A key not in the table has sent at most `floor` (its count when pruned was an upper
    bound), so a key that enters later starts at floor + its batch's count with error = floor:
    every row's true count lies in [count - error, count], and any key with more than floor
    packets is in the table. A late heavy hitter therefore gets in, and what is approximate says
    so. The engine's totals are kept apart and are always exact.
    The state is one tuple (keys, vals, times, err, floor), replaced whole, so a reader never sees
    keys and counts out of step.
    """

    def __init__(self, key_dtype: Any, cap: int, times: bool = False) -> None:
        self.cap = cap
        self.state = (np.empty(0, key_dtype), np.empty((0, 2), np.int64),  # keys; packets, bytes
                      np.empty((0, 2), np.float64) if times else None,  # first, last seen
                      np.empty((0, 2), np.int64), (0, 0))  # error bound per row; floor (packets, bytes)
        self._tops: tuple[tuple, dict] = (self.state, {})  # top()'s answers for this state (see top)

    keys = property(lambda self: self.state[0])
    vals = property(lambda self: self.state[1])
    times = property(lambda self: self.state[2])
    errors = property(lambda self: self.state[3])
    floor = property(lambda self: self.state[4])

    def __len__(self) -> int:
        return len(self.state[0])

    def merged(self, keys: np.ndarray, wire: np.ndarray, ts: np.ndarray | None = None) -> tuple:
        """The state after counting one packet of `wire` bytes (seen at `ts`) per key; self is unchanged."""
        if not len(keys):
            return self.state
        fast = native.top_merge(self.state[:3], keys, wire, ts)
        uniq, vals, times = fast if fast is not None else self.merged_numpy(keys, wire, ts)
        out = space_saving(self.state, uniq, vals, times, self.cap)
        if fast is not None and out[0] is uniq:  # copies, so the state does not pin the batch-sized buffers
            out = (uniq.copy(), vals.copy(), None if times is None else times.copy(), *out[3:])
        return out

    def merged_numpy(self, keys: np.ndarray, wire: np.ndarray, ts: np.ndarray | None = None) -> tuple:
        """merged's merge without the compiled helper and before Space-Saving (its reference)."""
        old_keys, old_vals, old_times = self.state[:3]
        # Group the batch first, then merge its groups into the table.
        bkeys, binv = _group(keys)
        nb = len(bkeys)
        bvals = np.stack((np.bincount(binv, minlength=nb), np.bincount(binv, wire, nb).astype(np.int64)), axis=1)
        # Old keys come first, so they keep their rows; new keys are appended.
        uniq, inv = _group(np.concatenate((old_keys, bkeys)))
        m = len(uniq)
        both_vals = np.concatenate((old_vals, bvals))
        vals = np.empty((m, 2), np.int64)
        # bincount sums in float64, exact for counts below 2**53.
        vals[:, 0] = np.bincount(inv, both_vals[:, 0], m)
        vals[:, 1] = np.bincount(inv, both_vals[:, 1], m)
        times = None
        if old_times is not None:
            both = np.concatenate((old_times, _min_max(binv, ts, ts, nb)))
            times = _min_max(inv, both[:, 0], both[:, 1], m)
        return uniq, vals, times

    def add(self, keys: np.ndarray, wire: np.ndarray, ts: np.ndarray | None = None) -> None:
        """Count keys into the table in place."""
        self.state = self.merged(keys, wire, ts)

    def frozen(self) -> TopTable:
        """A read-only copy for a snapshot (the arrays are never modified, only replaced)."""
        t = TopTable(self.keys.dtype, self.cap)
        t.state = self.state
        return t

    def top(self, n: int, by: str = "packets", text=None) -> list[tuple[Any, int, int, int]]:
        """The n largest as (key, packets, bytes, row), count descending, then by text(key) ascending.

        Remembered for the state it was computed from: the page asks a snapshot's tables the same question
        several times a rerun (the charts, the enrichment panel), and each viewer's rerun of one snapshot
        again. Among ties every tied key's text is made (a random-source flood: every row ties, ~1 us each).
        `text` is keyed by identity: pass the same function (a module-level one), not a new lambda per call."""
        state = self.state
        memo_state, memo = self._tops
        if memo_state is not state or len(memo) >= TOP_MEMO_MAX:
            memo = {}
            self._tops = (state, memo)
        mkey = (n, by, text)
        hit = memo.get(mkey)
        if hit is None:
            hit = memo[mkey] = self._top(state, n, by, text)
        return list(hit)

    @staticmethod
    def _top(state: tuple, n: int, by: str, text) -> list[tuple[Any, int, int, int]]:
        keys, vals = state[:2]
        if not len(keys):
            return []
        col = vals[:, 0 if by == "packets" else 1]
        k = min(n, len(col))
        cutoff = np.partition(col, len(col) - k)[len(col) - k]
        rows = np.flatnonzero(col >= cutoff)  # all rows tied at the cut-off, so ties sort by key
        keyed = [(-int(col[r]), text(keys[r]) if text else keys[r].item(), int(r)) for r in rows]
        keyed.sort()
        return [(key, int(vals[r, 0]), int(vals[r, 1]), r) for _, key, r in keyed[:n]]

    def error(self, row: int) -> tuple[int, int]:
        """(packets, bytes): how much a row's counts may exceed the truth (0, 0 when exact)."""
        err = self.state[3]
        return (int(err[row, 0]), int(err[row, 1])) if row < len(err) else (0, 0)


def space_saving(old: tuple, uniq: np.ndarray, vals: np.ndarray, times: np.ndarray | None, cap: int) -> tuple:
    """A merge's result (old rows first, then new keys) as the next Space-Saving state (see TopTable).

    Newcomers are charged the floor (what they may have sent while out of the table); over `cap`
    rows the most packets stay (ties: the older row, a stable sort) and the floor rises to the
    largest count pruned."""
    n_old, floor = len(old[0]), old[4]
    err = np.zeros((len(uniq), 2), np.int64)
    err[:n_old] = old[3]
    if floor != (0, 0) and len(uniq) > n_old:
        vals[n_old:] += floor  # vals is the merge's own new array, never the old state's
        err[n_old:] = floor
    if len(uniq) <= cap:
        return uniq, vals, times, err, floor
    # argpartition is no use here: with the many ties of a scan (counts of 1) it is 10x slower.
    order = np.argsort(-vals[:, 0], kind="stable")
    keep, gone = np.sort(order[:cap]), order[cap:]
    floor = (max(floor[0], int(vals[gone, 0].max())), max(floor[1], int(vals[gone, 1].max())))
    return uniq[keep], vals[keep], None if times is None else times[keep], err[keep], floor


def _seconds(ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index of each packet's second among the distinct seconds, the distinct seconds).

    Packets mostly arrive in time order: then the distinct seconds are where the value changes,
    found in one pass; otherwise np.unique sorts them."""
    sec = np.floor(ts).astype(np.int64)
    if len(sec) and np.all(sec[1:] >= sec[:-1]):
        starts = np.flatnonzero(np.concatenate(([True], sec[1:] != sec[:-1])))
        rel = np.cumsum(np.concatenate(([False], sec[1:] != sec[:-1]))).astype(np.intp)
        return rel, sec[starts]
    secs, rel = np.unique(sec, return_inverse=True)
    return rel.reshape(-1), secs


def _min_max(groups: np.ndarray, lows: np.ndarray, highs: np.ndarray, n: int) -> np.ndarray:
    """(n, 2): the least of `lows` and the greatest of `highs` per group (inf/-inf for empty groups)."""
    mins = np.full(n, np.inf)
    maxs = np.full(n, -np.inf)
    if native.minmax_at(groups, lows, highs, mins, maxs):
        return np.stack((mins, maxs), axis=1)
    np.minimum.at(mins, groups, lows)
    np.maximum.at(maxs, groups, highs)
    return np.stack((mins, maxs), axis=1)


def _group(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct keys in order of first appearance, group of each key): exact, hash-based for byte keys."""
    if keys.dtype.kind != "V":
        return np.unique(keys, return_inverse=True)
    first, inv = group_rows(np.ascontiguousarray(keys).view(np.uint8).reshape(len(keys), keys.dtype.itemsize))
    return keys[first], inv


class DenseTable(TopTable):
    """A TopTable over small integer keys (ports, protocol numbers): one row per possible key, never pruned."""

    def __init__(self, size: int) -> None:
        super().__init__(np.int32, size)
        self.state = (np.arange(size, dtype=np.int32), np.zeros((size, 2), np.int64), None,
                      np.zeros((0, 2), np.int64), (0, 0))

    def merged(self, keys: np.ndarray, wire: np.ndarray, ts: np.ndarray | None = None) -> tuple:
        """The state after counting one packet of `wire` bytes per key (bincount, no sorting)."""
        if not len(keys):
            return self.state
        keys = keys.astype(np.int64)
        vals = self.state[1].copy()
        vals[:, 0] += np.bincount(keys, minlength=self.cap)
        vals[:, 1] += np.bincount(keys, wire, self.cap).astype(np.int64)
        return self.state[0], vals, None, self.state[3], (0, 0)

    def frozen(self) -> TopTable:
        """The keys seen so far, as a plain read-only TopTable."""
        keys, vals = self.state[:2]
        seen = np.flatnonzero(vals[:, 0])
        t = TopTable(np.int32, self.cap)
        t.state = (keys[seen], vals[seen], None, np.zeros((len(seen), 2), np.int64), (0, 0))
        return t

    def __len__(self) -> int:
        return int(np.count_nonzero(self.state[1][:, 0]))


ADDR_KEY = np.dtype("V16")
CONV_KEY = np.dtype("V42")  # a(16) b(16) a_port(4) b_port(4) protocol(2), big-endian
CONV = struct.Struct(">16s16siih")


def _conversation_keys(arr: np.ndarray) -> np.ndarray:
    """One key per conversation in both directions: the two ends in canonical order."""
    raw = native.conv_keys(arr)
    if raw is not None:
        return raw.view(CONV_KEY).ravel()
    return conversation_keys_numpy(arr)


def conversation_keys_numpy(arr: np.ndarray) -> np.ndarray:
    """_conversation_keys without the compiled helper (its reference)."""
    src, dst = np.ascontiguousarray(arr["src"]), np.ascontiguousarray(arr["dst"])
    sport, dport = arr["sport"], arr["dport"]
    swap = (src > dst) | ((src == dst) & (sport > dport))
    raw = np.empty((len(arr), 42), np.uint8)
    raw[:, 0:16] = np.where(swap, dst, src).view(np.uint8).reshape(-1, 16)
    raw[:, 16:32] = np.where(swap, src, dst).view(np.uint8).reshape(-1, 16)
    raw[:, 32:36] = np.where(swap, dport, sport).astype(">i4").view(np.uint8).reshape(-1, 4)
    raw[:, 36:40] = np.where(swap, sport, dport).astype(">i4").view(np.uint8).reshape(-1, 4)
    raw[:, 40:42] = arr["proto"].astype(">i2").view(np.uint8).reshape(-1, 2)
    return raw.view(CONV_KEY).ravel()


class Counters:
    """Whole-capture state, updated batch by batch; never capped by the buffer size."""

    TABLES = ("src", "dst", "tcp_dports", "udp_dports", "other_protos", "conversations")

    def __init__(self, top_max: int) -> None:
        self.packets = self.bytes = self.bytes_captured = self.malformed = 0
        self.cls_packets = np.zeros(6, np.int64)
        self.cls_bytes = np.zeros(6, np.int64)
        self.dir_packets = np.zeros(4, np.int64)
        self.dir_bytes = np.zeros(4, np.int64)
        self.first_ts: float | None = None
        self.last_ts: float | None = None
        self.min_ts: float | None = None
        self.max_ts: float | None = None
        self.src = TopTable(ADDR_KEY, top_max)
        self.dst = TopTable(ADDR_KEY, top_max)
        self.tcp_dports = DenseTable(65536)
        self.udp_dports = DenseTable(65536)
        self.other_protos = DenseTable(256)
        self.conversations = TopTable(CONV_KEY, top_max, times=True)
        self.bins: dict[int, np.ndarray] = {}  # second -> BIN_FIELDS counts, least recently fed first

    def prepare(self, arr: np.ndarray) -> dict[str, Any]:
        """Everything one batch adds, computed without touching the counters (outside the engine lock)."""
        wire = arr["wire_len"].astype(np.int64)
        cls, dirs, ts = arr["cls"], arr["direction"], arr["ts"]
        ip = cls != NON_IP
        # Fields, not rows: copying whole 78-byte records of a batch costs more than all the merges.
        ip_wire, ip_ts = wire[ip], ts[ip]
        ip_src = np.ascontiguousarray(arr["src"][ip]).view(ADDR_KEY)
        ip_dst = np.ascontiguousarray(arr["dst"][ip]).view(ADDR_KEY)
        tcp = (cls == TCP) & (arr["dport"] >= 0)
        udp = (cls == UDP) & (arr["dport"] >= 0)
        other = cls == OTHER_IP
        rel, secs = _seconds(ts)
        # Per (second, field) sums as bincounts over a flattened index (np.add.at is far slower).
        width, cells = len(BIN_FIELDS), len(secs) * len(BIN_FIELDS)
        base = rel.astype(np.int64) * width
        dirs64 = dirs.astype(np.int64)
        grid = (np.bincount(base + dirs64, minlength=cells)
                + np.bincount(base + 4 + dirs64, wire, cells).astype(np.int64)
                + np.bincount(base + 8 + cls.astype(np.int64), minlength=cells)).reshape(len(secs), width)
        return {
            "n": len(arr), "bytes": int(wire.sum()), "cap": int(arr["cap_len"].sum(dtype=np.int64)),
            "malformed": int(arr["malformed"].sum(dtype=np.int64)),
            "cls_pk": np.bincount(cls, minlength=6)[:6], "cls_by": np.bincount(cls, wire, 6)[:6].astype(np.int64),
            "dir_pk": np.bincount(dirs, minlength=4)[:4], "dir_by": np.bincount(dirs, wire, 4)[:4].astype(np.int64),
            "first": float(ts[0]), "last": float(ts[-1]), "min": float(ts.min()), "max": float(ts.max()),
            "src": self.src.merged(ip_src, ip_wire),
            "dst": self.dst.merged(ip_dst, ip_wire),
            "tcp_dports": self.tcp_dports.merged(arr["dport"][tcp], wire[tcp]),
            "udp_dports": self.udp_dports.merged(arr["dport"][udp], wire[udp]),
            "other_protos": self.other_protos.merged(arr["proto"][other], wire[other]),
            "conversations": self.conversations.merged(_conversation_keys(arr)[ip], ip_wire, ip_ts),
            "bins": (secs.tolist(), grid),
        }

    def apply(self, u: dict[str, Any], bin_seconds: int) -> None:
        """Fold a prepared batch in: cheap assignments, done under the engine lock."""
        self.packets += u["n"]
        self.bytes += u["bytes"]
        self.bytes_captured += u["cap"]
        self.malformed += u["malformed"]
        self.cls_packets += u["cls_pk"]
        self.cls_bytes += u["cls_by"]
        self.dir_packets += u["dir_pk"]
        self.dir_bytes += u["dir_by"]
        if self.first_ts is None:
            self.first_ts = u["first"]
        self.last_ts = u["last"]
        self.min_ts = u["min"] if self.min_ts is None else min(self.min_ts, u["min"])
        self.max_ts = u["max"] if self.max_ts is None else max(self.max_ts, u["max"])
        for name in self.TABLES:
            getattr(self, name).state = u[name]
        self._add_bins(*u["bins"], bin_seconds)

    def add(self, arr: np.ndarray, bin_seconds: int) -> None:
        """Fold one packed batch into the counters."""
        if len(arr):
            self.apply(self.prepare(arr), bin_seconds)

    def _add_bins(self, secs: list[int], grid: np.ndarray, bin_seconds: int) -> None:
        # Capture files can jump by years between packets, so only the seconds present are kept:
        # the `bin_seconds` seconds that received packets most recently (in arrival order, not by
        # value), so one packet dated 2038 or a clock step back costs one bin and never wipes
        # the timeline; it ages out like any other second.
        # A new array per touched second, never `+=`: a snapshot copies the dict's items under the
        # lock but reads the arrays after it, so they must not change afterwards.
        bins = self.bins
        for s, row in zip(secs, grid):
            cur = bins.pop(s, None)
            # Re-inserted: dicts keep insertion order, so the end is the most recently fed second.
            bins[s] = row.copy() if cur is None else cur + row
        while len(bins) > bin_seconds:
            del bins[next(iter(bins))]
