"""Anomaly detectors run on every parsed batch, and the bounded alert book.

Detectors read the packed rows of one batch (never the rolling buffer) and keep bounded state:
port scans (vertical and horizontal, counting only failed or unanswered attempts, plus
NULL/FIN/Xmas probes), SYN/ICMP/UDP floods against one host, UDP reflection/amplification,
traffic spikes against an EWMA band, new local hosts after a learning period, and ARP spoofing.
Thresholds live in config.py with where their defaults come from.

Every step is linear in the batch and never rescans a table per packet: numpy over the batch on
64-bit hashes of the keys (splitmix64), with the state in fixed-size numpy hash-slot tables
(pending probes, served ports, requests, fragments), sorted arrays merged once per batch (the
per-second flood and reflection counts) and, for the few keys that can raise an alert, Python sets
and dicts updated in bulk (set.update, set difference, dict(zip(...))). A Python-level loop runs
only over what raises an alert. Scan state lives in tumbling epochs like Zeek's scan.zeek (SumStats
UNIQUE over SCAN_WINDOW_S, each table dropped whole at the epoch's end, no per-entry expiry); a
probe pushed out of the pending table counts as unanswered. Two keys share a 64-bit hash with odds
of about n^2 / 2^65, under 1e-10 for a full table.
"""

from __future__ import annotations

import ctypes
import threading
from collections import Counter, OrderedDict, deque
from dataclasses import asdict, dataclass, replace
from itertools import compress, islice
from typing import Any

import numpy as np

import config
import native
from analysis.headers import NON_IP, TCP, UDP, LocalMatcher, addr_text, group_rows, parse_nets

SYN, ACK, RST = 0x02, 0x10, 0x04
ETH_ARP = 0x0806
SEVERITY_RANK = {"low": 0, "medium": 1, "high": 2}


@dataclass(frozen=True)
class Alert:
    """One finding: who, what, the evidence in numbers, and what it means."""

    detector: str  # port_scan, syn_flood, icmp_flood, udp_flood, spike, new_host, arp_spoof, reflection
    severity: str  # high, medium, low
    source: str
    target: str
    first_ts: float
    last_ts: float
    count: int
    evidence: str
    meaning: str
    acknowledged: bool = False

    def as_dict(self) -> dict[str, Any]:
        """The JSON shape of the summary's `alerts` list."""
        d = asdict(self)
        d.pop("meaning")
        d.pop("acknowledged")
        return d


AlertKey = tuple[str, str, str]


class AlertBook:
    """Alerts keyed by (detector, source, target): a repeat updates its row (count, last seen, evidence).

    Bounded twice: ALERTS_PER_DETECTOR rows per detector and ALERTS_MAX in all. When full, the row
    raised least recently among the lowest severity goes, never one of a higher severity than the
    newcomer (the newcomer is refused instead); suppressed() counts both, per detector."""

    def __init__(self, max_alerts: int | None = None, per_detector: int | None = None) -> None:
        self.max_alerts = max_alerts or config.get("ALERTS_MAX")
        self.per_detector = per_detector or config.get("ALERTS_PER_DETECTOR")
        self._alerts: dict[AlertKey, Alert] = {}
        # (detector, severity rank) -> its keys, least recently raised first: eviction is O(detectors).
        self._queues: dict[tuple[str, int], OrderedDict[AlertKey, None]] = {}
        self._kept: Counter[str] = Counter()
        self._suppressed: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._rules: Any = None  # an analysis.rules.RuleSet: matching findings are kept apart, never raised
        self._excluded: OrderedDict[AlertKey, tuple[str, Alert]] = OrderedDict()  # by the rule's name
        self._excluded_counts: Counter[str] = Counter()  # per rule: distinct alerts it silenced

    def __getstate__(self) -> dict[str, Any]:
        """Picklable (to hand to another process): everything but the lock."""
        with self._lock:
            state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def raise_alert(self, detector: str, severity: str, source: str, target: str, ts: float, evidence: str,
                    meaning: str, key: AlertKey | None = None) -> None:
        """Record a finding, or refresh the row of the same finding (same key: detector, source, target)."""
        key = key or (detector, source, target)
        rank = SEVERITY_RANK.get(severity, 0)
        rules = self._rules
        rule = rules.match(detector, source, target) if rules else None
        if rule is not None:
            self._exclude(rule.name, key, Alert(detector, severity, source, target, ts, ts, 1, evidence, meaning))
            return
        with self._lock:
            old = self._alerts.get(key)
            if old is None:
                if not self._make_room(detector, rank):
                    self._suppressed[detector] += 1
                    return
                alert = Alert(detector, severity, source, target, ts, ts, 1, evidence, meaning)
                self._kept[detector] += 1
            else:
                del self._queues[(old.detector, SEVERITY_RANK.get(old.severity, 0))][key]
                # The constructor, not dataclasses.replace (5x its cost): a scan repeats hundreds of rows a batch.
                alert = Alert(old.detector, severity, source, old.target, old.first_ts, max(old.last_ts, ts),
                              old.count + 1, evidence, old.meaning, False)
            self._alerts[key] = alert
            self._queues.setdefault((detector, rank), OrderedDict())[key] = None

    def set_rules(self, rules: Any) -> None:
        """Exclusion rules (an analysis.rules.RuleSet, or None) for the findings raised from now on."""
        with self._lock:
            self._rules = rules

    def _exclude(self, rule: str, key: AlertKey, alert: Alert) -> None:
        """Keep a finding a rule silences apart (a repeat updates its row), bounded as the book is."""
        with self._lock:
            old = self._excluded.pop(key, None)
            if old is None:
                self._excluded_counts[rule] += 1
                while len(self._excluded) >= self.max_alerts:
                    self._excluded.popitem(last=False)  # the count stays; only the row goes
            else:
                alert = replace(old[1], last_ts=max(old[1].last_ts, alert.last_ts), count=old[1].count + 1,
                                evidence=alert.evidence, severity=alert.severity)
            self._excluded[key] = (rule, alert)

    def excluded(self) -> list[tuple[str, Alert]]:
        """(rule name, alert) for the findings exclusion rules silenced, newest (by last seen) first."""
        with self._lock:
            rows = list(self._excluded.values())
        return sorted(rows, key=lambda r: r[1].last_ts, reverse=True)

    def excluded_counts(self) -> dict[str, int]:
        """Per rule name, the distinct alerts (detector, source, target) it silenced since the last clear()."""
        with self._lock:
            return dict(self._excluded_counts)

    def count_suppressed(self, detector: str, n: int) -> None:
        """Count n findings a detector did not raise (its per-batch share was used up)."""
        if n > 0:
            with self._lock:
                self._suppressed[detector] += n

    def _make_room(self, detector: str, rank: int) -> bool:
        """Evict what the quotas say must go before a new row of `detector` at `rank`; False: refuse it."""
        if self._kept[detector] >= self.per_detector:
            victim = self._victim(rank, detector)
            if victim is None:
                return False
            self._evict(victim)
        if len(self._alerts) >= self.max_alerts:
            victim = self._victim(rank, None)
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _victim(self, rank: int, detector: str | None) -> AlertKey | None:
        """The row raised least recently among the lowest severity up to `rank` (of `detector` if given)."""
        for r in range(rank + 1):
            heads = [next(iter(q)) for (det, rr), q in self._queues.items()
                     if rr == r and q and (detector is None or det == detector)]
            if heads:
                return min(heads, key=lambda k: self._alerts[k].last_ts)
        return None

    def _evict(self, key: AlertKey) -> None:
        alert = self._alerts.pop(key)
        del self._queues[(alert.detector, SEVERITY_RANK.get(alert.severity, 0))][key]
        self._kept[alert.detector] -= 1
        self._suppressed[alert.detector] += 1

    def alerts(self) -> list[Alert]:
        """All alerts, newest (by last seen) first."""
        with self._lock:
            return sorted(self._alerts.values(), key=lambda a: a.last_ts, reverse=True)

    def suppressed(self) -> dict[str, int]:
        """Per detector, the alerts this book dropped or refused (quota) since the last clear()."""
        with self._lock:
            return {k: v for k, v in self._suppressed.items() if v}

    def acknowledge(self, alert: Alert) -> None:
        """Mark one alert as seen; a new repeat makes it unacknowledged again."""
        with self._lock:
            for key, current in self._alerts.items():
                if current.detector == alert.detector and current.target == alert.target and \
                        current.first_ts == alert.first_ts:
                    self._alerts[key] = replace(current, acknowledged=True)
                    return

    def clear(self) -> None:
        """Forget every alert and every suppressed count."""
        with self._lock:
            self._alerts.clear()
            self._queues.clear()
            self._kept.clear()
            self._suppressed.clear()
            self._excluded.clear()
            self._excluded_counts.clear()


class _Switched:
    """An alert book seen through the page's detector switches: a switched-off detector raises nothing
    (its state is kept, so switching it back on needs no new learning period)."""

    def __init__(self, book: AlertBook, disabled: frozenset[str]) -> None:
        self.book, self.disabled = book, disabled

    def raise_alert(self, detector: str, *args: Any, **kw: Any) -> None:
        """Forward a finding unless its detector is switched off."""
        if detector not in self.disabled:
            self.book.raise_alert(detector, *args, **kw)

    def count_suppressed(self, detector: str, n: int) -> None:
        """Forward a quota count unless its detector is switched off."""
        if detector not in self.disabled:
            self.book.count_suppressed(detector, n)


class _Bounded(OrderedDict):
    """An insertion-ordered dict that forgets its oldest entries beyond `cap` (LRU when keys are touched)."""

    def __init__(self, cap: int = 65_536) -> None:
        super().__init__()
        self.cap = cap

    def put(self, key: Any, value: Any) -> None:
        """Set key to value at the newest end."""
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.cap:
            self.popitem(last=False)


# -- hashing keys to 64 bits, a whole column at a time -----------------------------------------

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> _S30)) * _M1
    x = (x ^ (x >> _S27)) * _M2
    return x ^ (x >> _S31)


def _comb(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The hash of the ordered pair (a, b) of uint64 arrays: _comb(a, b) != _comb(b, a)."""
    return _mix(a * _GOLD + b)


def _addr_hash(col: np.ndarray) -> np.ndarray:
    """64-bit hashes of a column of 16-byte addresses (S16 or V16)."""
    words = np.ascontiguousarray(col).view("<u8").reshape(-1, 2)
    return _comb(words[:, 0], words[:, 1])


def _ints(h: np.ndarray) -> list[int]:
    """uint64 hashes as Python ints (signed 64-bit: small ints hash and compare fastest)."""
    return h.view(np.int64).tolist()


# A probe, a failed attempt or a stealth probe: who probed whom on which port, when.
ATTEMPT_DTYPE = np.dtype([("s", "S16"), ("t", "S16"), ("hs", "<u8"), ("ht", "<u8"), ("proto", "u1"),
                          ("port", "<i4"), ("ts", "<f8"), ("h", "<u8")])


def _attempts(s: np.ndarray, t: np.ndarray, hs: np.ndarray, ht: np.ndarray, proto: int, port: np.ndarray,
              ts: np.ndarray) -> np.ndarray:
    """ATTEMPT_DTYPE rows; h is the hash of (prober, target, protocol, port)."""
    out = np.empty(len(s), ATTEMPT_DTYPE)
    out["s"], out["t"], out["hs"], out["ht"], out["proto"], out["port"], out["ts"] = s, t, hs, ht, proto, port, ts
    out["h"] = _probe_hash(hs, ht, proto, port)
    return out


def _probe_hash(hs: np.ndarray, ht: np.ndarray, proto: int, port: np.ndarray) -> np.ndarray:
    return _comb(_comb(hs, ht), np.uint64(proto << 32) + port.astype(np.uint64))


class _Unique:
    """Distinct items per key within the current epoch (Zeek SumStats UNIQUE), bounded.

    Most keys of hostile traffic fail once (a spoofed source, one probe): those stay in numpy arrays,
    one slot per key hash (`one_*`), at no Python cost. A key's second distinct item promotes it to
    the exact tables: `seen`, the (key, item) hashes of promoted keys, at most 4 x cap (when more come
    it is emptied and `lossy` says a repeat may count again until the epoch ends), and `count` and
    `first`, at most cap keys (beyond, the half with the fewest items goes, so a flood of one-off keys
    cannot push out a scanner: amortised O(1), each shrink follows cap/2 new keys). A single whose
    slot another key takes is forgotten: that key counts one item fewer if it comes back."""

    def __init__(self, cap: int) -> None:
        self.cap = max(cap, 2)
        size = 1 << max((2 * self.cap - 1).bit_length(), 4)
        self.mask = np.uint64(size - 1)
        self.one_key = np.zeros(size, np.uint64)
        self.one_item = np.zeros(size, np.uint64)
        self.one_ts = np.zeros(size, np.float64)
        self.reset()

    def reset(self) -> None:
        """Start a new epoch: drop the whole table."""
        self.one_key[:] = 0
        self.multi = np.empty(0, np.uint64)  # promoted keys, sorted
        self.seen: set[int] = set()
        self.count: Counter[int] = Counter()
        self.first: dict[int, float] = {}
        self.lossy = False

    def __len__(self) -> int:
        return len(self.seen) + len(self.count) + len(self.first) + len(self.multi)

    def add(self, keys: np.ndarray, items: np.ndarray, ts: np.ndarray) -> dict[int, int]:
        """Count the items new to their key this epoch; {key: a row of it} for the promoted keys that grew."""
        multi = self.multi
        if len(multi):
            pos = np.searchsorted(multi, keys).clip(max=len(multi) - 1)
            exact = multi[pos] == keys
        else:
            exact = np.zeros(len(keys), bool)
        slot = (keys & self.mask).astype(np.intp)
        cand = ~exact & (self.one_key[slot] != keys)  # not the single of its slot: becomes it
        cs = slot[cand]
        self.one_key[cs], self.one_item[cs], self.one_ts[cs] = keys[cand], items[cand], ts[cand]
        # A key whose slot holds another of its items now has two: promote it, with that stored item.
        promote = ~exact & (self.one_key[slot] == keys) & (self.one_item[slot] != items)
        if promote.any():
            fresh = np.unique(keys[promote])
            held = (fresh & self.mask).astype(np.intp)  # each promoted key's slot, which holds it
            rows = np.flatnonzero(exact | np.isin(keys, fresh))
            mine = rows[np.isin(keys[rows], fresh)]
            rep = mine[np.unique(keys[mine], return_index=True)[1]]  # a row of each promoted key
            k = np.concatenate((keys[rows], fresh))
            i = np.concatenate((items[rows], self.one_item[held]))
            t = np.concatenate((ts[rows], self.one_ts[held]))
            r = np.concatenate((rows, rep))
            self.one_key[held] = 0
            self.multi = np.union1d(multi, fresh)
        elif exact.any():
            r = np.flatnonzero(exact)
            k, i, t = keys[r], items[r], ts[r]
        else:
            return {}
        return self._exact(k, i, t, r)

    def _exact(self, keys: np.ndarray, items: np.ndarray, ts: np.ndarray, rows: np.ndarray) -> dict[int, int]:
        order = np.argsort(ts, kind="stable")  # time order, so setdefault keeps each key's earliest time
        keys, items, ts, rows = _ints(keys[order]), _ints(items[order]), ts[order].tolist(), rows[order].tolist()
        where = dict(zip(items, range(len(items))))  # item -> its last position
        new = where.keys() - self.seen
        if not new:
            return {}
        if len(self.seen) + len(new) > 4 * self.cap:
            self.seen = set()
            self.lossy = True
        self.seen.update(new)
        at = np.sort(np.fromiter(map(where.__getitem__, new), np.int64, len(new))).tolist()
        grown = list(map(keys.__getitem__, at))
        self.count.update(grown)
        deque(map(self.first.setdefault, grown, map(ts.__getitem__, at)), 0)
        if len(self.count) > self.cap:
            self._shrink()
        return dict(zip(grown, map(rows.__getitem__, at)))

    def counts(self, keys: np.ndarray) -> np.ndarray:
        """The distinct items counted for each key (int64 hashes) this epoch, 0 for keys not counted."""
        return np.fromiter(map(self.count.__getitem__, keys.tolist()), np.int64, len(keys))

    def first_of(self, key: int, default: float) -> float:
        """The time of the key's first counted item this epoch (default when it has none)."""
        return self.first.get(key, default)

    def _shrink(self) -> None:
        keys = np.fromiter(self.count.keys(), np.int64, len(self.count))
        vals = np.fromiter(self.count.values(), np.int64, len(self.count))
        half = self.cap // 2
        keep = keys[np.argpartition(-vals, half)[:half]]
        self.multi = np.sort(keep.view(np.uint64))
        keep = keep.tolist()
        self.count = Counter(dict(zip(keep, map(self.count.__getitem__, keep))))
        self.first = dict(zip(keep, map(self.first.__getitem__, keep)))


class _NSet:
    """A set of uint64 keys for native/detect.c (its `hset`): the keys in insertion order in a dense numpy
    array, with an open-addressing index of their positions (-1: empty) at least twice as large, and
    optional value columns beside the keys. Numpy arrays, so the set pickles with the detectors."""

    def __init__(self, values: tuple[tuple[str, Any], ...] = (), room: int = 1024) -> None:
        self.n = 0
        self.keys = np.zeros(room, np.uint64)
        self.index = np.full(2 * room, -1, np.int64)
        self.values = {name: np.zeros(room, dt) for name, dt in values}
        self.version = 0  # counts the times the arrays moved (a cached C view of them is then stale)
        self._c: _HSetC | None = None
        self._ptrs: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Picklable: the arrays, not the cached C view (addresses of this process)."""
        state = self.__dict__.copy()
        state["_c"], state["_ptrs"] = None, {}
        return state

    def __len__(self) -> int:
        return self.n

    def ptr(self, name: str) -> int:
        """The address of a value column (cached until the arrays move)."""
        at = self._ptrs.get(name)
        if at is None:
            at = self._ptrs[name] = self.values[name].ctypes.data
        return at

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more keys (a call into C never grows a set itself)."""
        need = self.n + extra
        if need <= len(self.keys):
            return
        room = 1 << max(need - 1, 1).bit_length()
        keys = np.zeros(room, np.uint64)
        keys[:self.n] = self.keys[:self.n]
        self.keys, self.index = keys, np.empty(2 * room, np.int64)
        for name, col in self.values.items():
            grown = np.zeros(room, col.dtype)
            grown[:self.n] = col[:self.n]
            self.values[name] = grown
        self.version += 1
        self._c, self._ptrs = None, {}
        self.reindex()

    def reindex(self) -> None:
        """Rebuild the index over keys[:n] (after the keys moved)."""
        s = self.struct()
        _fn("ntm_hset_reindex")(ctypes.byref(s))

    def clear(self) -> None:
        """Forget every key (in time proportional to them, not to the index)."""
        s = self.struct()
        _fn("ntm_hset_clear")(ctypes.byref(s))
        self.n = 0

    def struct(self) -> _HSetC:
        """The C view of the set, with the current n (built again only after the arrays moved); a call
        that adds keys updates its n, which the caller copies back."""
        c = self._c
        if c is None:
            c = self._c = _HSetC(self.keys.ctypes.data, self.index.ctypes.data, len(self.index) - 1, self.n)
        c.n = self.n
        return c


class _HSetC(ctypes.Structure):
    _fields_ = [("keys", ctypes.c_void_p), ("index", ctypes.c_void_p), ("mask", ctypes.c_int64),
                ("n", ctypes.c_int64)]


class _UniqueStateC(ctypes.Structure):
    _fields_ = [("one_key", ctypes.c_void_p), ("one_item", ctypes.c_void_p), ("one_ts", ctypes.c_void_p),
                ("one_mask", ctypes.c_uint64), ("multi", _HSetC), ("seen", _HSetC), ("count", _HSetC),
                ("cnt", ctypes.c_void_p), ("first", ctypes.c_void_p), ("seen_max", ctypes.c_int64),
                ("lossy", ctypes.c_int64)]


class _UniqueNative(_Unique):
    """_Unique with its add() in native/detect.c: the same state changes and results, held in _NSet
    tables (multi, seen, and count with each key's count and first time) instead of Python sets."""

    def reset(self) -> None:
        """Start a new epoch: drop the whole table."""
        self.one_key[:] = 0
        if getattr(self, "multi_set", None) is None:
            self.multi_set, self.seen_set = _NSet(), _NSet()
            self.count_set = _NSet((("cnt", np.int64), ("first", np.float64)))
        else:
            for table in (self.multi_set, self.seen_set, self.count_set):
                table.clear()
        self.lossy = False

    def __len__(self) -> int:
        return len(self.seen_set) + 2 * len(self.count_set) + len(self.multi_set)

    def __getstate__(self) -> dict[str, Any]:
        """Picklable: the arrays, not the cached C view."""
        state = self.__dict__.copy()
        state["_st"] = None
        return state

    def _state(self) -> _UniqueStateC:
        """The C view of the table (cached; built again after one of its sets' arrays moved)."""
        sets = (self.multi_set, self.seen_set, self.count_set)
        versions = tuple(t.version for t in sets)
        st = getattr(self, "_st", None)
        if st is None or self._st_versions != versions:
            c = self.count_set
            st = self._st = _UniqueStateC(self.one_key.ctypes.data, self.one_item.ctypes.data,
                                          self.one_ts.ctypes.data, int(self.mask), self.multi_set.struct(),
                                          self.seen_set.struct(), c.struct(), c.ptr("cnt"), c.ptr("first"),
                                          4 * self.cap, 0)
            self._st_versions = versions
        st.multi.n, st.seen.n, st.count.n = self.multi_set.n, self.seen_set.n, self.count_set.n
        st.lossy = int(self.lossy)
        return st

    def add(self, keys: np.ndarray, items: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """As _Unique.add, the promoted keys that grew as arrays: (keys as int64, a row of each)."""
        n = len(keys)
        keys, items = np.ascontiguousarray(keys, np.uint64), np.ascontiguousarray(items, np.uint64)
        ts = np.ascontiguousarray(ts, np.float64)
        gk, gi, gt, gr = (np.empty(2 * n, dt) for dt in (np.uint64, np.uint64, np.float64, np.int64))
        fresh, nfresh = np.empty(n, np.uint64), ctypes.c_int64()
        st = self._state()
        m = _fn("ntm_unique_gather")(ctypes.byref(st), keys.ctypes.data, items.ctypes.data,
                                                 ts.ctypes.data, n, gk.ctypes.data, gi.ctypes.data, gt.ctypes.data,
                                                 gr.ctypes.data, fresh.ctypes.data, ctypes.byref(nfresh))
        if m < 0:
            raise MemoryError("native/detect.c: no memory for a batch of the scan tables")
        # Room for what the commit adds, known now: tables grow to what the traffic needs, not to 2 x a batch.
        self.multi_set.reserve(nfresh.value)
        self.seen_set.reserve(m)
        self.count_set.reserve(m)
        out_key, out_row = np.empty(m, np.uint64), np.empty(m, np.int64)
        st = self._state()
        got = _fn("ntm_unique_commit")(ctypes.byref(st), fresh.ctypes.data, nfresh.value,
                                                   gk.ctypes.data, gi.ctypes.data, gt.ctypes.data, gr.ctypes.data,
                                                   m, out_key.ctypes.data, out_row.ctypes.data)
        if got < 0:
            raise MemoryError("native/detect.c: no memory for a batch of the scan tables")
        self.multi_set.n, self.seen_set.n, self.count_set.n = st.multi.n, st.seen.n, st.count.n
        self.lossy = bool(st.lossy)
        if self.count_set.n > self.cap:
            self._shrink()
        return out_key[:got].view(np.int64), out_row[:got]

    def _shrink(self) -> None:
        c = self.count_set
        keys, vals = c.keys[:c.n].view(np.int64), c.values["cnt"][:c.n]
        keep = keys[np.argpartition(-vals, self.cap // 2)[:self.cap // 2]]  # as _Unique._shrink: the same keys
        at = self.lookup_rows(keep)
        c.keys[:len(keep)] = keep.view(np.uint64)
        for col in c.values.values():
            col[:len(keep)] = col[at]
        c.n = len(keep)
        c.reindex()
        m = self.multi_set
        m.keys[:len(keep)] = np.sort(keep.view(np.uint64))
        m.n = len(keep)
        m.reindex()

    def lookup_rows(self, keys: np.ndarray) -> np.ndarray:
        """The dense positions of counted keys (int64 hashes) in count_set."""
        c = self.count_set
        order = np.argsort(c.keys[:c.n])
        return order[np.searchsorted(c.keys[:c.n], keys.view(np.uint64), sorter=order)]

    def counts(self, keys: np.ndarray) -> np.ndarray:
        """The distinct items counted for each key (int64 hashes) this epoch, 0 for keys not counted."""
        keys = np.ascontiguousarray(keys).view(np.uint64)
        count, first = np.empty(len(keys), np.int64), np.empty(len(keys), np.float64)
        st = self._state()
        _fn("ntm_unique_lookup")(ctypes.byref(st), keys.ctypes.data, len(keys), count.ctypes.data,
                                             first.ctypes.data)
        return count

    def first_of(self, key: int, default: float) -> float:
        """The time of the key's first counted item this epoch (default when it has none)."""
        c = self.count_set
        at = _fn("ntm_hset_find")(ctypes.byref(c.struct()), ctypes.c_uint64(key & _U64))
        return float(c.values["first"][at]) if at >= 0 else default


_U64 = (1 << 64) - 1
_FUNCTIONS: dict[str, Any] = {}


def _fn(name: str) -> Any:
    """A function of native/detect.c (looked up once per process)."""
    f = _FUNCTIONS.get(name)
    if f is None:
        f = _FUNCTIONS[name] = native.function(name)
    return f


def _nset_add(table: _NSet, keys: np.ndarray) -> None:
    """Add keys (uint64 hashes) to a native set, in order."""
    if len(keys):
        table.reserve(len(keys))
        keys = np.ascontiguousarray(keys, np.uint64)
        s = table.struct()
        _fn("ntm_hset_add")(ctypes.byref(s), keys.ctypes.data, len(keys))
        table.n = s.n


class _Tally:
    """Counter-like counts of uint64 hashes in a native/detect.c set, in insertion order as a Counter keeps
    them (so _top_half's shrink keeps the same keys); get() takes the signed int keys a Counter would."""

    def __init__(self) -> None:
        self.table = _NSet((("cnt", np.int64),))

    def __len__(self) -> int:
        return len(self.table)

    def update(self, keys: np.ndarray) -> None:
        """Count each key once per occurrence."""
        t, keys = self.table, np.ascontiguousarray(keys, np.uint64)
        t.reserve(len(keys))
        s = t.struct()
        _fn("ntm_hset_count")(ctypes.byref(s), t.values["cnt"].ctypes.data, keys.ctypes.data, len(keys))
        t.n = s.n

    def get(self, key: int, default: int = 0) -> int:
        """The count of a key (a signed 64-bit int, as _ints gives)."""
        t = self.table
        at = _fn("ntm_hset_find")(ctypes.byref(t.struct()), ctypes.c_uint64(key & _U64))
        return int(t.values["cnt"][at]) if at >= 0 else default

    def items(self) -> list[tuple[int, int]]:
        """(key, count) in insertion order, keys as signed ints."""
        t = self.table
        return list(zip(t.keys[:t.n].view(np.int64).tolist(), t.values["cnt"][:t.n].tolist()))

    def clear(self) -> None:
        """Forget every count."""
        self.table.clear()

    def top_half(self, cap: int) -> None:
        """_top_half in place: keep the cap / 2 keys with the largest counts, in the order it keeps them."""
        t = self.table
        keys, vals = t.keys[:t.n].view(np.int64), t.values["cnt"][:t.n]
        half = max(cap // 2, 1)
        if len(keys) <= half:
            return
        pick = np.argpartition(-vals, half)[:half]
        keep_keys, keep_vals = keys[pick].copy(), vals[pick].copy()
        t.keys[:half], t.values["cnt"][:half] = keep_keys.view(np.uint64), keep_vals
        t.n = half
        t.reindex()


def _unique(cap: int) -> _Unique:
    """A _Unique table: the compiled one when native/detect.c is built (NATIVE_TABLES), else the reference."""
    return _UniqueNative(cap) if _native_tables() else _Unique(cap)


NATIVE_TABLES = True  # tests set it to False to build the pure numpy/Python reference detectors


def _native_tables() -> bool:
    return NATIVE_TABLES and _fn("ntm_unique_gather") is not None


def _slots(cap: int) -> int:
    """A power of two of at least 2 x cap: the size of a hash-slot table for cap entries."""
    return 1 << max((2 * max(cap, 1) - 1).bit_length(), 4)


class _Pending:
    """Probes waiting for an answer, in numpy buckets of WAYS slots (set-associative): vector steps only.

    Bounded by construction. A probe whose bucket is full of live probes pushes the oldest out: that
    one counts as unanswered at once, never as forgotten, so a fast sweep cannot hide in a full
    table. Expired probes (no answer after SCAN_UNANSWERED_S) are collected by one vectorised pass
    every SCAN_UNANSWERED_S / 2 of capture time, between 1 and 1.5 x SCAN_UNANSWERED_S after they
    were sent. A probe sent again while pending keeps its first time, as a retransmission should."""

    WAYS = 4

    def __init__(self, timeout: float, cap: int) -> None:
        self.timeout, self.period = timeout, timeout / 2
        buckets = _slots(cap) // self.WAYS
        self.mask = np.uint64(buckets - 1)
        self.slots = np.zeros((buckets, self.WAYS), ATTEMPT_DTYPE)  # h == 0: empty
        self.sweep_at: float | None = None

    def __len__(self) -> int:
        return int(np.count_nonzero(self.slots["h"]))

    def _find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bucket, way, present) of each key."""
        bucket = (keys & self.mask).astype(np.intp)
        match = self.slots["h"][bucket] == keys[:, None]
        return bucket, match.argmax(axis=1), match.any(axis=1)

    def add(self, probes: np.ndarray) -> np.ndarray:
        """Hold ATTEMPT_DTYPE rows until answered or expired; the probes pushed out (to count as unanswered)."""
        if not len(probes):
            return probes
        if self.sweep_at is None:
            self.sweep_at = float(probes["ts"].min()) + self.period
        bucket, _, present = self._find(probes["h"])
        new = np.flatnonzero(~present)
        if not len(new):
            return probes[:0]
        # Newcomers of one bucket take its slots from the emptiest and oldest on; one plain sort of
        # (bucket, row) packed into an integer ranks them within their bucket.
        shift = max(len(probes).bit_length(), 1)
        packed = np.sort((bucket[new].astype(np.int64) << shift) | new)
        new, nb = packed & ((1 << shift) - 1), packed >> shift
        head = np.r_[True, nb[1:] != nb[:-1]]
        dup = ~head & (probes["h"][new] == np.r_[0, probes["h"][new][:-1]].astype(np.uint64))
        new, nb = new[~dup], nb[~dup]  # a probe twice in one batch takes one slot
        start = np.flatnonzero(np.r_[True, nb[1:] != nb[:-1]])
        rank = np.arange(len(new)) - np.repeat(start, np.diff(np.r_[start, len(new)]))
        over = rank >= self.WAYS  # more newcomers than slots in their bucket: the surplus never waits
        cells = self.slots[nb[~over]]
        age = np.where(cells["h"] == 0, -np.inf, cells["ts"])
        way = np.argsort(age, axis=1, kind="stable")[np.arange(len(cells)), rank[~over]]
        old = cells[np.arange(len(cells)), way]
        self.slots[nb[~over], way] = probes[new[~over]]
        return np.concatenate((old[old["h"] != 0], probes[new[over]]))

    def answer(self, keys: np.ndarray) -> np.ndarray:
        """Remove the pending probes among `keys` (uint64 hashes); which of them were pending."""
        bucket, way, hit = self._find(keys)
        self.slots["h"][bucket[hit], way[hit]] = 0
        return hit

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Which keys are pending."""
        return self._find(keys)[2]

    def expire(self, now: float) -> np.ndarray:
        """The probes unanswered for SCAN_UNANSWERED_S, removed (a pass over the slots every period)."""
        flat = self.slots.reshape(-1)
        if self.sweep_at is None or now < self.sweep_at:
            return flat[:0]
        self.sweep_at = now + self.period
        h = flat["h"]
        stale = np.flatnonzero((h != 0) & (flat["ts"] <= now - self.timeout))
        out = flat[stale]
        h[stale] = 0
        return out


class _Recent:
    """Hashes remembered with their last time and a value, in numpy buckets of WAYS slots each (set-associative,
    so two keys of one bucket do not push each other out); `contains` says added within `period`.

    Bounded by construction: a key that finds its bucket full takes the slot of the oldest entry."""

    WAYS = 4

    def __init__(self, period: float, cap: int) -> None:
        buckets = _slots(cap) // self.WAYS
        self.period, self.mask = period, np.uint64(buckets - 1)
        self.keys = np.zeros((buckets, self.WAYS), np.uint64)
        self.ts = np.full((buckets, self.WAYS), -np.inf)
        self.value = np.zeros((buckets, self.WAYS), np.int64)

    def __len__(self) -> int:
        return int(np.count_nonzero(self.keys))

    def _find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(bucket, way, present) of each key."""
        bucket = (keys & self.mask).astype(np.intp)
        match = self.keys[bucket] == keys[:, None]
        return bucket, match.argmax(axis=1), match.any(axis=1)

    def add(self, keys: np.ndarray, ts: np.ndarray, value: np.ndarray | int = 0) -> None:
        """Remember keys at times ts (a key twice in one call may take two slots of its bucket)."""
        if not len(keys):
            return
        value = np.broadcast_to(value, keys.shape)
        bucket, way, present = self._find(keys)
        self.ts[bucket[present], way[present]] = ts[present]
        self.value[bucket[present], way[present]] = value[present]
        new = np.flatnonzero(~present)
        if not len(new):
            return
        # Newcomers of one bucket take its slots from the oldest on (empty ones have time -inf): rank them
        # within their bucket with one plain sort of (bucket, row) packed into an integer.
        shift = max(len(keys).bit_length(), 1)
        packed = np.sort((bucket[new].astype(np.int64) << shift) | new)
        new, nb = packed & ((1 << shift) - 1), packed >> shift
        start = np.flatnonzero(np.r_[True, nb[1:] != nb[:-1]])
        rank = np.arange(len(new)) - np.repeat(start, np.diff(np.r_[start, len(new)]))
        fits = rank < self.WAYS
        new, nb, rank = new[fits], nb[fits], rank[fits]
        way = (self.ts[nb].argmin(axis=1) + rank) % self.WAYS
        self.keys[nb, way], self.ts[nb, way], self.value[nb, way] = keys[new], ts[new], value[new]

    def contains(self, keys: np.ndarray, now: float) -> np.ndarray:
        """Which keys were added within `period` before `now`."""
        bucket, way, present = self._find(keys)
        return present & (self.ts[bucket, way] >= now - self.period)

    def pop(self, keys: np.ndarray, now: float) -> np.ndarray:
        """The value of each key still remembered (-1 if not), forgetting it."""
        bucket, way, present = self._find(keys)
        hit = present & (self.ts[bucket, way] >= now - self.period)
        out = np.where(hit, self.value[bucket, way], -1)
        self.keys[bucket[hit], way[hit]] = 0
        self.ts[bucket[hit], way[hit]] = -np.inf
        return out


class _PendingNative(_Pending):
    """_Pending with add, answer and contains in native/detect.c: the same slots, the same probes out."""

    def _c(self) -> tuple:
        f = ATTEMPT_DTYPE.fields
        return self.slots.ctypes.data, ATTEMPT_DTYPE.itemsize, f["h"][1]

    def add(self, probes: np.ndarray) -> np.ndarray:
        """Hold ATTEMPT_DTYPE rows until answered or expired; the probes pushed out (to count as unanswered)."""
        if not len(probes):
            return probes
        if self.sweep_at is None:
            self.sweep_at = float(probes["ts"].min()) + self.period
        probes = np.ascontiguousarray(probes)
        out = np.empty(len(probes), ATTEMPT_DTYPE)
        slots, rec, off_h = self._c()
        got = _fn("ntm_pending_add")(slots, rec, off_h, ATTEMPT_DTYPE.fields["ts"][1], int(self.mask),
                                                 probes.ctypes.data, len(probes), out.ctypes.data)
        if got < 0:
            raise MemoryError("native/detect.c: no memory for a batch of probes")
        return out[:got]

    def _lookup(self, keys: np.ndarray, remove: bool) -> np.ndarray:
        keys = np.ascontiguousarray(keys, np.uint64)
        hit, where = np.empty(len(keys), np.uint8), np.empty(len(keys), np.int64)
        slots, rec, off_h = self._c()
        _fn("ntm_pending_answer")(slots, rec, off_h, int(self.mask), keys.ctypes.data, len(keys),
                                              hit.ctypes.data, int(remove), where.ctypes.data)
        return hit.view(bool)

    def answer(self, keys: np.ndarray) -> np.ndarray:
        """Remove the pending probes among `keys` (uint64 hashes); which of them were pending."""
        return self._lookup(keys, True)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        """Which keys are pending."""
        return self._lookup(keys, False)


class _RecentNative(_Recent):
    """_Recent with add, contains and pop in native/detect.c: the same slots, the same answers."""

    def add(self, keys: np.ndarray, ts: np.ndarray, value: np.ndarray | int = 0) -> None:
        """Remember keys at times ts (a key twice in one call may take two slots of its bucket)."""
        if not len(keys):
            return
        keys = np.ascontiguousarray(keys, np.uint64)
        ts = np.ascontiguousarray(ts, np.float64)
        value = np.ascontiguousarray(np.broadcast_to(value, keys.shape), np.int64)
        if _fn("ntm_recent_add")(self.keys.ctypes.data, self.ts.ctypes.data, self.value.ctypes.data,
                                             int(self.mask), keys.ctypes.data, ts.ctypes.data, value.ctypes.data,
                                             len(keys)) < 0:
            raise MemoryError("native/detect.c: no memory for a batch of a recent-keys table")

    def _find_recent(self, keys: np.ndarray, now: float, remove: bool) -> tuple[np.ndarray, np.ndarray]:
        keys = np.ascontiguousarray(keys, np.uint64)
        hit, value = np.empty(len(keys), np.uint8), np.empty(len(keys), np.int64)
        _fn("ntm_recent_find")(self.keys.ctypes.data, self.ts.ctypes.data, self.value.ctypes.data,
                                           int(self.mask), keys.ctypes.data, len(keys), now - self.period,
                                           int(remove), hit.ctypes.data, value.ctypes.data)
        return hit.view(bool), value

    def contains(self, keys: np.ndarray, now: float) -> np.ndarray:
        """Which keys were added within `period` before `now`."""
        return self._find_recent(keys, now, False)[0]

    def pop(self, keys: np.ndarray, now: float) -> np.ndarray:
        """The value of each key still remembered (-1 if not), forgetting it."""
        return self._find_recent(keys, now, True)[1]


def _pending(timeout: float, cap: int) -> _Pending:
    """A _Pending table: compiled (native/detect.c) when it is built and NATIVE_TABLES, else the reference."""
    return _PendingNative(timeout, cap) if _native_tables() else _Pending(timeout, cap)


def _recent(period: float, cap: int) -> _Recent:
    """A _Recent table: compiled (native/detect.c) when it is built and NATIVE_TABLES, else the reference."""
    return _RecentNative(period, cap) if _native_tables() else _Recent(period, cap)


class _PairSet:
    """The (destination, source) pairs of the current second, in numpy buckets of WAYS slots stamped with
    their second (a new second needs no clearing). Counting is exact while every pair finds a slot; a
    pair whose bucket is full of this second's pairs is neither stored nor counted, so the counts are
    then lower bounds (`add` says so)."""

    WAYS = 4

    def __init__(self, cap: int) -> None:
        buckets = _slots(cap) // self.WAYS
        self.mask = np.uint64(buckets - 1)
        self.keys = np.zeros((buckets, self.WAYS), np.uint64)
        self.stamp = np.full((buckets, self.WAYS), -(2 ** 62), np.int64)

    def __len__(self) -> int:
        return int(np.count_nonzero(self.keys))

    def add(self, pairs: np.ndarray, second: int) -> tuple[np.ndarray, bool]:
        """(rows whose pair is new this second and now stored, whether some new pair found no slot)."""
        counted = np.zeros(len(pairs), bool)
        if not len(pairs):
            return counted, False
        first = _first_rows(pairs)
        p = pairs[first]
        bucket = (p & self.mask).astype(np.intp)
        live = self.stamp[bucket] == second
        present = ((self.keys[bucket] == p[:, None]) & live).any(axis=1)
        new = np.flatnonzero(~present)
        if not len(new):
            return counted, False
        shift = max(len(p).bit_length(), 1)
        packed = np.sort((bucket[new].astype(np.int64) << shift) | new)
        new, nb = packed & ((1 << shift) - 1), packed >> shift
        start = np.flatnonzero(np.r_[True, nb[1:] != nb[:-1]])
        rank = np.arange(len(new)) - np.repeat(start, np.diff(np.r_[start, len(new)]))
        nlive = self.stamp[nb] == second
        fits = rank < self.WAYS - nlive.sum(axis=1)  # a slot of an earlier second is free
        new, nb, rank = new[fits], nb[fits], rank[fits]
        way = np.argsort(nlive[fits], axis=1, kind="stable")[np.arange(len(nb)), rank]
        self.keys[nb, way], self.stamp[nb, way] = p[new], second
        counted[first[new]] = True
        return counted, bool((~fits).any())


class _PairSetNative(_PairSet):
    """_PairSet with add in native/detect.c: the same slots, the same rows counted."""

    def add(self, pairs: np.ndarray, second: int) -> tuple[np.ndarray, bool]:
        """(rows whose pair is new this second and now stored, whether some new pair found no slot)."""
        pairs = np.ascontiguousarray(pairs, np.uint64)
        counted = np.empty(len(pairs), np.uint8)
        missed = _fn("ntm_pairs_add")(self.keys.ctypes.data, self.stamp.ctypes.data, int(self.mask),
                                                  pairs.ctypes.data, len(pairs), int(second), counted.ctypes.data)
        if missed < 0:
            raise MemoryError("native/detect.c: no memory for a batch of pairs")
        return counted.view(bool), bool(missed)


def _first_rows(h: np.ndarray) -> np.ndarray:
    """The first row of each distinct hash (one plain sort of (hash, row) packed into a uint64; the hash
    keeps its top 64 - log2(rows) bits, 48 for 65,536 rows: a merge of two has odds under 1e-5)."""
    bits = np.uint64(max(len(h).bit_length(), 16))
    low = (np.uint64(1) << bits) - np.uint64(1)
    packed = np.sort((h >> bits << bits) | np.arange(len(h), dtype=np.uint64))
    top = packed >> bits
    head = np.r_[True, top[1:] != top[:-1]]
    return (packed[head] & low).astype(np.intp)


class _ReflectSecond:
    """Per victim over the current second: answer bytes, answers, unasked answers, request bytes, reflectors.

    Sorted numpy arrays merged once per batch, as _Second; distinct reflectors through a _PairSet
    (exact, or a stated lower bound)."""

    COLUMNS = ("bytes", "answers", "unasked", "req_bytes", "sources")

    def __init__(self, cap: int) -> None:
        self.cap = max(cap, 1)
        self.pairs = _PairSetNative(cap) if _native_tables() else _PairSet(cap)
        self.start(-(2 ** 62))

    def start(self, second: int) -> None:
        """Begin counting `second`."""
        self.second = second
        self.keys = np.empty(0, np.uint64)
        self.cols = {c: np.empty(0, np.int64) for c in self.COLUMNS}
        self.full = False

    def __len__(self) -> int:
        return len(self.keys) * (1 + len(self.COLUMNS)) + len(self.pairs)

    def _bump(self, keys: np.ndarray, col: str, weights: np.ndarray) -> None:
        uk, inv = np.unique(keys, return_inverse=True)
        sums = np.bincount(inv.ravel(), weights, len(uk)).astype(np.int64)
        pos, found = _find(self.keys, uk)
        new = np.flatnonzero(~found)[:max(self.cap - len(self.keys), 0)]
        if len(new):
            self.keys = np.insert(self.keys, pos[new], uk[new])
            for c in self.COLUMNS:
                self.cols[c] = np.insert(self.cols[c], pos[new], 0)
            pos, found = _find(self.keys, uk)
        self.cols[col][pos[found]] += sums[found]

    def add(self, b: _Batch, rows: np.ndarray, answer: np.ndarray, unasked: np.ndarray, req: np.ndarray) -> None:
        """Count the second's answer rows (non-first fragments among them: answer False) to their victims,
        and the bytes of requests (rows req) each host sent to reflector ports."""
        if len(req):
            self._bump(b.hs[req], "req_bytes", b.cols["wire_len"][req].astype(np.float64))
        if not len(rows):
            return
        dst = b.hd[rows]
        self._bump(dst, "bytes", b.cols["wire_len"][rows].astype(np.float64))
        self._bump(dst, "answers", answer.astype(np.float64))
        self._bump(dst, "unasked", (answer & unasked).astype(np.float64))
        counted, missed = self.pairs.add(_comb(dst, b.hs[rows]), self.second)
        self.full |= missed
        if counted.any():  # each pair new this second adds a reflector to its victim
            self._bump(dst[counted], "sources", np.ones(int(counted.sum())))

    def lookup(self, keys: np.ndarray) -> dict[str, np.ndarray]:
        """Each column for each key (0 for keys not counted)."""
        pos, found = _find(self.keys, keys)
        pos = pos.clip(max=max(len(self.keys) - 1, 0))
        return {c: np.where(found, v[pos], 0) if len(v) else np.zeros(len(keys), np.int64)
                for c, v in self.cols.items()}


class _ScanEpochs:
    """The scan tables of one series of tumbling SCAN_WINDOW_S epochs (starting at `offset`), dropped whole
    at each epoch's end as scan.zeek's SumStats epochs are: no per-entry expiry."""

    def __init__(self, window: float, offset: float, cap: int) -> None:
        self.window, self.offset, self.cap = window, offset, cap
        self.epoch: int | None = None
        self.vertical = _unique(cap)  # (scanner, target) -> distinct (proto, port) that failed
        self.horizontal = _unique(cap)  # (scanner, proto, port) -> distinct targets that failed
        self.stealth = _unique(cap)  # (scanner, target) -> distinct ports sent NULL/FIN/Xmas
        # (scanner, target) -> answered attempts
        self.answered: Counter[int] | _Tally = _Tally() if _native_tables() else Counter()

    def parts(self, ts: np.ndarray):
        """Selectors of the rows per epoch, in order, starting each new epoch on the way."""
        ep = np.floor((ts - self.offset) / self.window).astype(np.int64)
        if self.epoch is None:
            self.epoch = int(ep.min())
        ep = np.maximum(ep, self.epoch)  # a late row counts in the current epoch
        lo, hi = int(ep.min()), int(ep.max())
        if lo == hi:
            if hi > self.epoch:
                self._new_epoch(hi)
            yield slice(None)
            return
        for e in np.unique(ep).tolist():
            if e > self.epoch:
                self._new_epoch(e)
            yield ep == e

    def _new_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for table in (self.vertical, self.horizontal, self.stealth):
            table.reset()
        if isinstance(self.answered, _Tally):
            self.answered.clear()
        else:
            self.answered = Counter()


def _reached(table: _Unique, grown: dict[int, int] | tuple[np.ndarray, np.ndarray],
             threshold: int) -> list[tuple[int, int, int]]:
    """(key, row, distinct count) of the grown keys whose count reached `threshold`."""
    if isinstance(grown, tuple):  # the compiled table's (keys, rows)
        keys, rows = grown
        counts = table.counts(keys)
        hot = np.flatnonzero(counts >= threshold)
        return list(zip(keys[hot].tolist(), rows[hot].tolist(), counts[hot].tolist()))
    if not grown:
        return []
    keys = list(grown)
    counts = table.counts(np.array(keys, np.int64))
    hot = counts >= threshold
    return [(k, grown[k], n) for k, n in zip(compress(keys, hot), counts[hot].tolist())]


class _Columns:
    """A batch's fields as contiguous arrays, each copied once on first use.

    A field of the packed 86-byte records is a strided view: a comparison over it reads every
    record's cache line and costs ~20x the same comparison over a copy, and the detectors read the
    same few fields a dozen times a batch."""

    def __init__(self, arr: np.ndarray) -> None:
        self._arr = arr
        self._cache: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        col = self._cache.get(name)
        if col is None:
            col = self._cache[name] = np.ascontiguousarray(self._arr[name])
        return col


class _Batch:
    """Columns of one batch that several detectors use, computed once."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr
        cols = self.cols = _Columns(arr)  # the detectors read fields here (read only), not from arr
        self.hs = _addr_hash(cols["src"])
        self.hd = _addr_hash(cols["dst"])
        self.sec = np.floor(cols["ts"]).astype(np.int64)
        self.unicast = ~_group(cols["dst"])  # multicast and broadcast are one-way by nature: never probes


class _Second:
    """One kind of flood's counts over the current second: packets and distinct sources per destination.

    Packets per destination in sorted numpy arrays merged once per batch; destinations beyond cap in one
    second are not counted that second (a flood's target is counted from its first packet of the
    second, which comes early). Distinct sources through a _PairSet: exact while every pair finds a
    slot, else a lower bound and the evidence says "at least"."""

    def __init__(self, cap: int) -> None:
        self.cap = max(cap, 1)
        self.pairs = _PairSet(cap)
        self.start(-(2 ** 62))

    def start(self, second: int) -> None:
        """Begin counting `second`."""
        self.second = second
        self.keys = np.empty(0, np.uint64)
        self.packets = np.empty(0, np.int64)
        self.sources = np.empty(0, np.int64)
        self.full = False

    def __len__(self) -> int:
        return len(self.keys) * 3 + len(self.pairs)

    def add(self, dst: np.ndarray, pairs: np.ndarray | None) -> None:
        """Count packets to `dst` (hashes, one per packet) and, when given, their (destination, source) pairs."""
        uk, cnt = np.unique(dst, return_counts=True)
        pos, found = _find(self.keys, uk)
        self.packets[pos[found]] += cnt[found]
        new = np.flatnonzero(~found)[:max(self.cap - len(self.keys), 0)]
        if len(new):
            self.keys = np.insert(self.keys, pos[new], uk[new])
            self.packets = np.insert(self.packets, pos[new], cnt[new])
            self.sources = np.insert(self.sources, pos[new], 0)
        if pairs is None:
            return
        counted, missed = self.pairs.add(pairs, self.second)
        self.full |= missed
        nd, nc = np.unique(dst[counted], return_counts=True)
        kpos, ok = _find(self.keys, nd)
        self.sources[kpos[ok]] += nc[ok]

    def hot(self, dst: np.ndarray, threshold: int) -> np.ndarray:
        """The distinct keys among dst with at least `threshold` packets this second, ascending."""
        keys = np.unique(dst)
        return keys[self.lookup(keys)[0] >= threshold]

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(packets, distinct sources) this second for each key (0 for keys not counted)."""
        pos, found = _find(self.keys, keys)
        return (np.where(found, self.packets[pos.clip(max=max(len(self.keys) - 1, 0))] if len(self.keys) else 0, 0),
                np.where(found, self.sources[pos.clip(max=max(len(self.keys) - 1, 0))] if len(self.keys) else 0, 0))


class _SecondNative(_Second):
    """_Second with its per-destination counts in a native/detect.c set (packets and sources beside each
    key): the same counts for every key, without inserting into sorted arrays."""

    def __init__(self, cap: int) -> None:
        self.table = _NSet((("packets", np.int64), ("sources", np.int64)))
        super().__init__(cap)
        self.pairs = _PairSetNative(cap)

    def start(self, second: int) -> None:
        """Begin counting `second`."""
        self.second = second
        self.table.clear()
        self.full = False

    def __len__(self) -> int:
        return len(self.table) * 3 + len(self.pairs)

    def add(self, dst: np.ndarray, pairs: np.ndarray | None) -> None:
        """Count packets to `dst` (hashes, one per packet) and, when given, their (destination, source) pairs."""
        t = self.table
        t.reserve(len(dst))
        dst = np.ascontiguousarray(dst, np.uint64)
        counted = None
        if pairs is not None:
            counted, missed = self.pairs.add(pairs, self.second)
            self.full |= missed
            counted = np.ascontiguousarray(counted).view(np.uint8)
        s = t.struct()
        if _fn("ntm_second_add")(ctypes.byref(s), t.values["packets"].ctypes.data,
                                             t.values["sources"].ctypes.data, self.cap, dst.ctypes.data, len(dst),
                                             None if counted is None else counted.ctypes.data) < 0:
            raise MemoryError("native/detect.c: no memory for a batch of per-second counts")
        t.n = s.n

    def hot(self, dst: np.ndarray, threshold: int) -> np.ndarray:
        """The distinct keys among dst with at least `threshold` packets this second, ascending."""
        t, dst = self.table, np.ascontiguousarray(dst, np.uint64)
        out = np.empty(len(dst), np.uint64)
        got = _fn("ntm_second_hot")(ctypes.byref(t.struct()), t.values["packets"].ctypes.data,
                                                dst.ctypes.data, len(dst), int(threshold), out.ctypes.data)
        if got < 0:
            raise MemoryError("native/detect.c: no memory to find a second's busiest destinations")
        return out[:got]

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(packets, distinct sources) this second for each key (0 for keys not counted)."""
        t, keys = self.table, np.ascontiguousarray(keys, np.uint64)
        s, out = t.struct(), []
        for col in ("packets", "sources"):
            got = np.empty(len(keys), np.int64)
            _fn("ntm_hset_values")(ctypes.byref(s), t.values[col].ctypes.data, keys.ctypes.data,
                                               len(keys), got.ctypes.data)
            out.append(got)
        return out[0], out[1]


def _find(table: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(insertion position, present) of each key in a sorted table."""
    pos = np.searchsorted(table, keys)
    if not len(table):
        return pos, np.zeros(len(keys), bool)
    return pos, table[pos.clip(max=len(table) - 1)] == keys


# What the page may change on the running detectors (applied to their state as it is) ...
THRESHOLDS = ("SCAN_PORTS", "SCAN_HOSTS", "SCAN_STEALTH_PORTS", "SYN_FLOOD_PPS", "ICMP_FLOOD_PPS", "UDP_FLOOD_PPS",
              "REFLECTION_BPS", "REFLECTION_SOURCES", "SPIKE_SIGMAS", "SPIKE_MIN_PPS", "SPIKE_WARMUP_S",
              "NEW_HOST_LEARN_S")
# ... and what sizes or times their tables: a change starts the detectors afresh.
STRUCTURAL = ("DETECTOR_STATE_MAX", "SCAN_WINDOW_S", "SCAN_UNANSWERED_S", "ALERTS_PER_DETECTOR", "LOCAL_NETS")
_THRESHOLD_ATTRS = ("vports", "vhosts", "stealth_ports", "flood_pps", "reflect_bps", "reflect_sources", "spike_k",
                    "spike_min", "spike_warmup", "learn")
DETECTOR_NAMES = ("port_scan", "syn_flood", "icmp_flood", "udp_flood", "reflection", "spike", "new_host", "arp_spoof")

_H_SALT = np.uint64(0x5851F42D4C957F2D)  # keeps (scanner, proto, port) keys apart from (scanner, target) ones
_SERVED_SALT = np.uint64(0x14057B7EF767814F)
PROTO_NAME = {6: "tcp", 17: "udp"}


class Detectors:
    """Detector state for one capture; observe() is called with each parsed batch, in time order.

    Holds no lock and no function objects, so it can live in (and be pickled to) a consumer process."""

    def __init__(self, overrides: dict[str, Any] | None = None, disabled: frozenset[str] = frozenset()) -> None:
        """overrides: settings (THRESHOLDS, STRUCTURAL) changed at run time, read before config; disabled:
        detector names (DETECTOR_NAMES) whose findings are not raised."""
        self.overrides = dict(overrides or {})
        self.disabled = frozenset(disabled)
        setting = self.setting
        cap = self.cap = setting("DETECTOR_STATE_MAX")
        self.compiled = _native_tables()  # the tables and steps of native/detect.c, else their references
        self.window = setting("SCAN_WINDOW_S")
        self.vports = setting("SCAN_PORTS")
        self.vhosts = setting("SCAN_HOSTS")
        self.stealth_ports = setting("SCAN_STEALTH_PORTS")
        self.timeout = setting("SCAN_UNANSWERED_S")
        self.alerts_per_batch = setting("ALERTS_PER_DETECTOR")
        self.pending = _pending(self.timeout, cap)  # probes (prober, target, proto, port) awaiting an answer
        # Two sets of epoch tables, offset by half an epoch: a scan that fits in SCAN_WINDOW_S / 2 lies
        # wholly inside an epoch of one of them, wherever the epoch boundaries fall.
        self.phases = (_ScanEpochs(self.window, 0.0, cap), _ScanEpochs(self.window, self.window / 2, cap))
        self.served = _recent(self.window, cap)  # (address, UDP port) that received probes: its replies are none
        self.last_udp = _recent(2 * self.timeout, cap)  # (prober, target) -> port of its latest UDP probe
        self.arp = _Bounded(cap)  # IPv4 address -> (MAC, time)
        self.flood_pps = {"syn": setting("SYN_FLOOD_PPS"), "icmp": setting("ICMP_FLOOD_PPS"),
                          "udp": setting("UDP_FLOOD_PPS")}
        second = _SecondNative if self.compiled else _Second
        self.seconds = {kind: second(cap) for kind in ("synack", "syn", "icmp", "udp")}
        self.reflect_bps = setting("REFLECTION_BPS")
        self.reflect_sources = setting("REFLECTION_SOURCES")
        self.asked = _recent(REQUEST_WAIT_S, cap)  # (asker, server, service port) of requests to reflector ports
        self.fragments = _recent(REASSEMBLY_S, cap)  # (reflector, victim, IP id) of fragmented answers -> asked?
        self.reflected = _ReflectSecond(cap)  # per victim over the current second
        self.spike_k = setting("SPIKE_SIGMAS")
        self.spike_min = setting("SPIKE_MIN_PPS")
        self.spike_warmup = setting("SPIKE_WARMUP_S")
        self.spike_state: list[float] | None = None  # [second, packets, bytes] being counted
        self.baseline = {"pk": [0.0, 0.0], "by": [0.0, 0.0]}  # EWMA mean and variance per metric
        self.seconds_seen = 0
        self.active_seconds = 0  # seconds that had traffic: the new-host learning clock
        self.learn_end = float("inf")  # capture time when NEW_HOST_LEARN_S seconds of traffic were learned
        # Local addresses learned before learn_end (never evicted), and new hosts already reported (emptied
        # beyond cap: a repeat updates): Python sets, or the same in native/detect.c's tables.
        self.known_hosts: set[int] | _NSet = _NSet() if self.compiled else set()
        self.reported_hosts: set[int] | _NSet = _NSet() if self.compiled else set()
        self.local_nets = LocalMatcher(nets=parse_nets(setting("LOCAL_NETS")))
        self.learn = setting("NEW_HOST_LEARN_S")

    def setting(self, name: str) -> Any:
        """A detector setting: the run-time override when there is one, else the configured value."""
        return self.overrides[name] if name in self.overrides else config.get(name)

    def reconfigured(self, overrides: dict[str, Any] | None, disabled: frozenset[str]) -> Detectors:
        """These detectors with new thresholds and switches. Thresholds apply to the state built so far;
        a change of a STRUCTURAL setting (table sizes, windows) starts the detectors afresh."""
        fresh = Detectors(overrides, disabled)
        if any(fresh.setting(n) != self.setting(n) for n in STRUCTURAL):
            return fresh
        for attr in _THRESHOLD_ATTRS:
            setattr(self, attr, getattr(fresh, attr))
        self.overrides, self.disabled = fresh.overrides, fresh.disabled
        if self.learn_end == float("inf") and self.active_seconds >= self.learn and self.spike_state:
            # A learning period shortened below the seconds already learned ends now (it ends only when the
            # count equals it); one lengthened after it ended stays ended: the baseline is not unlearned.
            self.learn_end = float(self.spike_state[0])
        return self

    def table_sizes(self) -> dict[str, int]:
        """Entries held by every table, inner tables included (each one is bounded by DETECTOR_STATE_MAX)."""
        sizes = {f"{name}_{i}": len(getattr(ph, name)) for i, ph in enumerate(self.phases)
                 for name in ("vertical", "horizontal", "stealth", "answered")}
        sizes.update({"pending": len(self.pending), "served": len(self.served),
                 "last_udp": len(self.last_udp), "arp": len(self.arp), "known_hosts": len(self.known_hosts),
                 "reported_hosts": len(self.reported_hosts), "asked": len(self.asked),
                 "fragments": len(self.fragments), "reflected": len(self.reflected)})
        sizes.update({f"second_{kind}": len(st) for kind, st in self.seconds.items()})
        return sizes

    def observe(self, arr: np.ndarray, book: AlertBook) -> None:
        """Update the state with one batch and raise what it shows."""
        if not len(arr):
            return
        book = _Switched(book, self.disabled) if self.disabled else book
        b = _Batch(arr)
        cols = b.cols
        flags, cls = cols["tcp_flags"], cols["cls"]
        # Only packets that open, answer or refuse a connection matter; skip the data flow.
        opening = ((flags & (SYN | ACK)) != ACK) | ((flags & RST) != 0)
        # Per flow, not per packet: a flood of one flow costs one row, whatever its rate.
        tcp = _distinct(arr, (cls == TCP) & b.unicast & opening, PROBE_PORT)
        if len(tcp):
            self._tcp(b, tcp, book)
        udp = _distinct(arr, ((cls == UDP) & b.unicast) | ((cols["icmp_type"] == 3) & (cols["proto"] == 1)),
                        SERVICE_PORT)
        if len(udp):
            self._udp(b, udp, book)
        arp = arr.take(np.flatnonzero((cls == NON_IP) & (cols["ethertype"] == ETH_ARP) & (cols["arp_op"] > 0)))
        if len(arp):
            self._arp(arp, book)
        expired = self.pending.expire(float(cols["ts"].max()))
        if len(expired):
            self._failed(expired, book)
        self._floods(b, book)
        self._reflection(b, book)
        self._spike(b, book)
        self._new_hosts(b, book)

    # -- port scans ---------------------------------------------------------------------

    def _tcp(self, b: _Batch, idx: np.ndarray, book: AlertBook) -> None:
        """SYN and NULL/FIN/Xmas rows are probes; SYN-ACK answers one, RST refuses one."""
        arr = b.cols  # contiguous fields (see _Columns)
        fl = arr["tcp_flags"][idx]
        rst = (fl & RST) != 0
        probe = ~rst & ((fl & ACK) == 0)  # the rows are SYN, SYN-ACK, RST or no SYN and no ACK
        p, a = idx[probe], idx[~probe]
        probes = _attempts(arr["src"][p], arr["dst"][p], b.hs[p], b.hd[p], 6, arr["dport"][p], arr["ts"][p])
        answers = _attempts(arr["dst"][a], arr["src"][a], b.hd[a], b.hs[a], 6, arr["sport"][a], arr["ts"][a])
        # Answers to probes of this same batch (a fast scan's RSTs) are matched here: those probes never
        # take a slot. The others are looked up in the table.
        here = _earlier(answers["h"], a, probes["h"], p, self.compiled)
        if len(p):
            waiting = ~_isin(probes["h"], answers["h"][here], self.compiled) if here.any() else np.ones(len(p), bool)
            pushed = self.pending.add(probes[waiting])
            if len(pushed):
                self._failed(pushed, book)
            # NULL, FIN or Xmas: no client sends these, scanners do (nmap -sN/-sF/-sX)
            stealth = (fl[probe] & SYN) == 0
            if stealth.any():
                self._stealth(probes[stealth], book)
        if len(a):
            hit = here.copy()
            hit[~here] = self.pending.answer(answers["h"][~here])
            refused = rst[~probe]
            if (hit & ~refused).any():  # first, so the scan alert of this batch says how many were answered
                self._answered(answers[hit & ~refused])
            if (hit & refused).any():
                self._failed(answers[hit & refused], book)

    def _udp(self, b: _Batch, idx: np.ndarray, book: AlertBook) -> None:
        cls = b.cols["cls"][idx]
        flows = idx[(cls == UDP) & (b.cols["dport"][idx] >= 0)]
        if len(flows):
            self._udp_flows(b, flows, book)
        unreachable = idx[cls != UDP]
        if len(unreachable):
            self._unreachable(b, unreachable, book)

    def _udp_flows(self, b: _Batch, idx: np.ndarray, book: AlertBook) -> None:
        """A UDP flow answers a pending probe, is a server's reply (no probe), or is a probe."""
        arr = b.cols  # contiguous fields (see _Columns)
        hs, hd, ts = b.hs[idx], b.hd[idx], arr["ts"][idx]
        sport, dport = arr["sport"][idx], arr["dport"][idx]
        answers = _probe_hash(hd, hs, 17, sport)  # the probe this flow would answer
        probes = _probe_hash(hs, hd, 17, dport)
        server = _comb(hs, sport.astype(np.uint64) + _SERVED_SALT)  # (this end, its port)
        marks = _comb(hd, dport.astype(np.uint64) + _SERVED_SALT)  # (the other end, its port): served if a probe
        now = float(ts[-1])
        in_table = self.pending.contains(answers)
        candidate = ~in_table & ~self.served.contains(server, now)
        # Answers a probe earlier in the batch; then, a reply from a port probed earlier in the batch.
        here = _earlier(answers, idx, probes[candidate], idx[candidate], self.compiled)
        probe = candidate & ~here
        probe &= ~_earlier(server, idx, marks[probe], idx[probe], self.compiled)
        if probe.any():
            self.served.add(marks[probe], ts[probe])
            self.last_udp.add(_comb(hs[probe], hd[probe]), ts[probe], dport[probe])
            waiting = probe & ~_isin(probes, answers[here], self.compiled) if here.any() else probe  # not answered
            p = idx[waiting]
            pushed = self.pending.add(_attempts(arr["src"][p], arr["dst"][p], hs[waiting], hd[waiting], 17,
                                                dport[waiting], ts[waiting]))
            if len(pushed):
                self._failed(pushed, book)
        if in_table.any():
            t = np.flatnonzero(in_table)
            here[t[self.pending.answer(answers[t])]] = True
        if here.any():
            self._answered(_attempts(arr["dst"][idx[here]], arr["src"][idx[here]], hd[here], hs[here], 17,
                                     sport[here], ts[here]))

    def _unreachable(self, b: _Batch, idx: np.ndarray, book: AlertBook) -> None:
        """ICMP port unreachable from a target: the prober's latest UDP probe of it failed.

        The quoted datagram is not parsed, so the prober's latest probe of that target is taken:
        one slot lookup, and any other probe left pending fails when it expires anyway."""
        arr = b.cols  # contiguous fields (see _Columns)
        ports = self.last_udp.pop(_comb(b.hd[idx], b.hs[idx]), float(arr["ts"][idx[-1]]))
        ok = ports >= 0
        if ok.any():
            k = idx[ok]
            rows = _attempts(arr["dst"][k], arr["src"][k], b.hd[k], b.hs[k], 17, ports[ok], arr["ts"][k])
            hit = self.pending.answer(rows["h"])
            if hit.any():
                self._failed(rows[hit], book)

    def _answered(self, rows: np.ndarray) -> None:
        for ph in self.phases:
            for sel in ph.parts(rows["ts"]):
                part = rows[sel]
                if isinstance(ph.answered, _Tally):
                    ph.answered.update(_comb(part["hs"], part["ht"]))
                    if len(ph.answered) > self.cap:
                        ph.answered.top_half(self.cap)
                    continue
                ph.answered.update(_ints(_comb(part["hs"], part["ht"])))
                if len(ph.answered) > self.cap:
                    ph.answered = _top_half(ph.answered, self.cap)

    def _stealth(self, probes: np.ndarray, book: AlertBook) -> None:
        best: dict[int, tuple[int, np.void]] = {}
        for ph in self.phases:
            for sel in ph.parts(probes["ts"]):
                part = probes[sel]
                grown = ph.stealth.add(_comb(part["hs"], part["ht"]), part["h"], part["ts"])
                for key, row, n in _reached(ph.stealth, grown, self.stealth_ports):
                    if n > best.get(key, (0,))[0]:
                        best[key] = (n, part[row])
        for n, r in best.values():
            book.raise_alert("port_scan", "high", addr_text(r["s"]), addr_text(r["t"]), float(r["ts"]),
                             f"{n} NULL/FIN/Xmas probes to {n} ports on {addr_text(r['t'])}",
                             "TCP packets with no SYN and no ACK are only sent by port scanners "
                             "(nmap -sN/-sF/-sX): find the program on the source host.")

    def _failed(self, rows: np.ndarray, book: AlertBook) -> None:
        """Failed or unanswered attempts (ATTEMPT_DTYPE rows): count the distinct ones, raise the scans."""
        service = (rows["proto"].astype(np.uint64) << np.uint64(32)) + rows["port"].astype(np.uint64)
        vkeys, hkeys = _comb(rows["hs"], rows["ht"]), _comb(rows["hs"] ^ _H_SALT, service)
        hitems = _comb(hkeys, rows["ht"])
        best: dict[tuple[bool, int], tuple[int, _ScanEpochs, np.void]] = {}  # the larger count of the two phases
        for ph in self.phases:
            for sel in ph.parts(rows["ts"]):
                part = rows[sel]
                grown = ph.vertical.add(vkeys[sel], part["h"], part["ts"])
                for key, row, n in _reached(ph.vertical, grown, self.vports):
                    if n > best.get((True, key), (0,))[0]:
                        best[(True, key)] = (n, ph, part[row])
                grown = ph.horizontal.add(hkeys[sel], hitems[sel], part["ts"])
                for key, row, n in _reached(ph.horizontal, grown, self.vhosts):
                    if n > best.get((False, key), (0,))[0]:
                        best[(False, key)] = (n, ph, part[row])
        for (vertical, key), (n, ph, r) in best.items():
            (self._vertical_alert if vertical else self._horizontal_alert)(ph, r, key, n, book)

    @staticmethod
    def _vertical_alert(ph: _ScanEpochs, r: np.void, key: int, n: int, book: AlertBook) -> None:
        ts, target = float(r["ts"]), addr_text(r["t"])
        first = ph.vertical.first_of(key, ts)
        note = " (approximate: the table of attempts filled up this epoch, a repeat may count twice)" \
            if ph.vertical.lossy else ""
        book.raise_alert(
            "port_scan", "medium", addr_text(r["s"]), target, ts,
            f"{n} ports on {target} failed or went unanswered in {ts - first:.0f} s, "
            f"{ph.answered.get(key, 0)} answered{note}",
            "One host probing many ports of another is a vertical port scan: check whether the source "
            "is an authorised scanner, else what runs on it.")

    @staticmethod
    def _horizontal_alert(ph: _ScanEpochs, r: np.void, key: int, n: int, book: AlertBook) -> None:
        ts, service = float(r["ts"]), f"{PROTO_NAME.get(int(r['proto']), r['proto'])}/{int(r['port'])}"
        first = ph.horizontal.first_of(key, ts)
        note = " (approximate: the table of attempts filled up this epoch, a repeat may count twice)" \
            if ph.horizontal.lossy else ""
        book.raise_alert(
            "port_scan", "medium", addr_text(r["s"]), service, ts,
            f"{n} hosts refused or ignored {service} in {ts - first:.0f} s{note}",
            "One host trying the same port on many hosts is a horizontal scan (a sweep or a worm): "
            "check the source host.")

    # -- floods -------------------------------------------------------------------------

    def _floods(self, b: _Batch, book: AlertBook) -> None:
        """SYN, ICMP echo and UDP packets per second to one destination, with their distinct sources."""
        arr = b.cols  # contiguous fields (see _Columns)
        flags, cls, proto, icmp = arr["tcp_flags"], arr["cls"], arr["proto"], arr["icmp_type"]
        handshake = flags & (SYN | ACK)
        synack = (cls == TCP) & (handshake == (SYN | ACK))
        if synack.any():  # SYN-ACKs counted first: a SYN answered in the same batch is answered
            self._per_second("synack", b, np.flatnonzero(synack), book)
        echo = ((proto == 1) & (icmp == 8)) | ((proto == 58) & (icmp == 128))
        for kind, mask in (("syn", (cls == TCP) & (handshake == SYN)), ("icmp", echo), ("udp", cls == UDP)):
            idx = np.flatnonzero(mask & b.unicast)
            if len(idx):
                self._per_second(kind, b, idx, book)

    def _per_second(self, kind: str, b: _Batch, idx: np.ndarray, book: AlertBook) -> None:
        """Add the rows idx to their seconds' counts (a batch holds a few seconds), then check the floods."""
        st = self.seconds[kind]
        secs = np.maximum(np.maximum.accumulate(b.sec[idx]), st.second)  # a late packet counts in the current second
        starts = np.concatenate(([0], np.flatnonzero(np.diff(secs)) + 1, [len(idx)]))
        for lo, hi in zip(starts[:-1].tolist(), starts[1:].tolist()):
            sel = idx[lo:hi]
            second = int(secs[lo])
            if second != st.second:
                st.start(second)
            if kind == "synack":  # counted per answering server
                st.add(b.hs[sel], None)
                continue
            dst = b.hd[sel]
            st.add(dst, _comb(dst, b.hs[sel]))
            keys = st.hot(dst, self.flood_pps[kind])
            packets, sources = st.lookup(keys)
            hot = np.arange(min(len(keys), self.alerts_per_batch))
            if not len(hot):
                continue
            answers = self.seconds["synack"]
            completed = answers.lookup(keys[hot])[0] if answers.second == second else np.zeros(len(hot), np.int64)
            for j, done in zip(hot.tolist(), completed.tolist()):
                row = sel[int(np.argmax(dst == keys[j]))]
                self._flood_alert(kind, int(packets[j]), int(sources[j]), done, b.cols["dst"][row], book)

    def _flood_alert(self, kind: str, n: int, sources: int, completed: int, dst: bytes, book: AlertBook) -> None:
        st = self.seconds[kind]
        if kind == "syn" and completed > n * 0.1:
            return  # a busy server that answers is not flooded
        some = f"at least {sources}" if st.full else f"{sources}"  # the table of pairs filled up this second
        target = addr_text(dst)
        what = {"syn": "SYNs", "icmp": "ICMP echo requests", "udp": "UDP packets"}[kind]
        extra = f", {completed / n:.0%} answered with SYN-ACK" if kind == "syn" else ""
        spoofed = " (many sources: likely spoofed)" if sources >= 100 else ""
        meaning = {"syn": "A SYN flood exhausts the target's half-open connections: check SYN cookies and "
                          "rate limits upstream.",
                   "icmp": "An ICMP flood saturates the target's link or CPU: rate-limit ICMP upstream.",
                   "udp": "A UDP flood saturates the target's link or service: find the sources and filter them."}
        book.raise_alert(f"{kind}_flood", "high", f"{some} source(s)", target, float(st.second),
                         f"{n:,} {what} to {target} in 1 s from {some} source(s){extra}{spoofed}",
                         meaning[kind], key=(f"{kind}_flood", "", target))

    # -- reflection / amplification --------------------------------------------------------

    def _reflection(self, b: _Batch, book: AlertBook) -> None:
        """UDP answers from reflector service ports to one host from many sources, mostly unasked."""
        arr = b.cols  # contiguous fields (see _Columns)
        udp = (arr["proto"] == 17) & (arr["cls"] == UDP) & b.unicast
        off = arr["frag"] & 0x1FFF
        head = udp & (off == 0) & (arr["sport"] >= 0)  # whole datagrams and first fragments: ports known
        sport, dport = arr["sport"].clip(0, 65535), arr["dport"].clip(0, 65535)
        req = np.flatnonzero(head & _REFLECTOR[dport])
        if len(req):  # the victim's own requests: their answers are no attack, their bytes the denominator
            self.asked.add(_asked_key(b.hs[req], b.hd[req], dport[req], sport[req]), arr["ts"][req])
        ans = np.flatnonzero(head & _REFLECTOR[sport])
        tail = np.flatnonzero(udp & (off != 0))
        if not len(ans) and not len(tail) and not len(req):
            return
        now = float(arr["ts"][-1])
        asked = self.asked.contains(_asked_key(b.hd[ans], b.hs[ans], sport[ans], dport[ans]), now)
        more = (arr["frag"][ans] & 0x2000) != 0  # first fragments: remember the datagram for its other fragments
        if more.any():
            dgram = _comb(_comb(b.hs[ans[more]], b.hd[ans[more]]), arr["ip_id"][ans[more]].astype(np.uint64))
            self.fragments.add(dgram, arr["ts"][ans[more]], asked[more].astype(np.int64))
        if len(tail):  # non-first fragments carry no UDP header: attributed by IP identification
            dgram = _comb(_comb(b.hs[tail], b.hd[tail]), arr["ip_id"][tail].astype(np.uint64))
            known = self.fragments.contains(dgram, now)
            tail = tail[known]
        rows = np.concatenate((ans, tail))
        unasked = np.concatenate((~asked, np.zeros(len(tail), bool)))
        answer = np.concatenate((np.ones(len(ans), bool), np.zeros(len(tail), bool)))
        st = self.reflected
        # Per second of the batch, in order; a late row counts in the current second.
        rsec = np.maximum(b.sec[rows], st.second)
        qsec = np.maximum(b.sec[req], st.second)
        for second in np.unique(np.concatenate((rsec, qsec))).tolist():
            if second > st.second:
                st.start(second)
            here = rsec == second
            st.add(b, rows[here], answer[here], unasked[here], req[qsec == second])
            if here.any():
                self._check_reflection(b, rows[here], book)

    def _check_reflection(self, b: _Batch, rows: np.ndarray, book: AlertBook) -> None:
        st = self.reflected
        keys = np.unique(b.hd[rows])
        cols = st.lookup(keys)
        hot = np.flatnonzero((cols["bytes"] * 8 >= self.reflect_bps) & (cols["sources"] >= self.reflect_sources)
                             & (cols["unasked"] * 2 >= cols["answers"]))[:self.alerts_per_batch]
        for j in hot.tolist():
            mine = rows[b.hd[rows] == keys[j]]
            self._reflection_alert(b, mine, {k: int(v[j]) for k, v in cols.items()}, book)

    def _reflection_alert(self, b: _Batch, mine: np.ndarray, c: dict[str, int], book: AlertBook) -> None:
        arr = b.cols  # contiguous fields (see _Columns)
        victim = addr_text(arr["dst"][mine[0]])
        ports = np.unique(arr["sport"][mine][arr["sport"][mine] >= 0]).tolist()
        services = ", ".join(f"{REFLECTOR_PORTS[p]} {p}" for p in ports[:6] if p in REFLECTOR_PORTS)
        amp = (f", {c['bytes'] / c['req_bytes']:.1f}x the {c['req_bytes']:,} bytes of requests {victim} sent"
               f" to those services" if c["req_bytes"] else f", no request from {victim} seen")
        book.raise_alert(
            "reflection", "high", f"{c['sources']} reflector(s)", victim, float(self.reflected.second),
            f"{c['bytes'] * 8:,} bit/s of UDP answers ({services}) from {c['sources']} reflector(s) to {victim} "
            f"in 1 s: {c['answers']:,} answers, {c['unasked']:,} without a matching request{amp}"
            + (" (at least: the table of reflectors filled up)" if self.reflected.full else ""),
            "A reflection/amplification attack: spoofed requests made open servers answer this host. Filter "
            "the service ports upstream (the ISP), and check that no open server here takes part.",
            key=("reflection", "", victim))

    # -- traffic spike --------------------------------------------------------------------

    def _spike(self, b: _Batch, book: AlertBook) -> None:
        """Packets/s and bits/s against an EWMA band learned per second, after a warm-up."""
        sec, wire = b.sec, b.cols["wire_len"].astype(np.float64)
        if (sec[1:] >= sec[:-1]).all():  # time order (always, but for a file's stray packet): runs of seconds
            starts = np.concatenate(([0], np.flatnonzero(np.diff(sec)) + 1))
            secs, pk = sec[starts], np.diff(np.append(starts, len(sec)))
            by = np.add.reduceat(wire, starts)
        else:
            secs, inv = np.unique(sec, return_inverse=True)
            pk = np.bincount(inv, minlength=len(secs))
            by = np.bincount(inv, wire, len(secs))
        self.spike_seconds(secs, pk, by, book)

    def spike_seconds(self, secs: np.ndarray, pk: np.ndarray, by: np.ndarray, book: AlertBook) -> None:
        """The spike detector fed per-second totals (second, packets, wire bytes), seconds ascending: what
        a batch's packets come to, and what the history store keeps (the back-test over a stored range)."""
        for second, p, bb in zip(secs.tolist(), pk.tolist(), by.tolist()):
            cur = self.spike_state
            if cur is None:
                self.spike_state = [second, p, bb]
            elif second == cur[0]:
                cur[1] += p
                cur[2] += bb
            elif second > cur[0]:
                self._close_second(cur, book)
                # Silent seconds between count as zeros, up to an hour (a file may jump by years).
                for _ in range(min(second - cur[0] - 1, 3600)):
                    self._learn(0.0, 0.0)
                self.spike_state = [second, p, bb]

    def _close_second(self, cur: list, book: AlertBook) -> None:
        second, p, b = cur
        self.active_seconds += 1
        if self.active_seconds == self.learn:
            self.learn_end = second + 1.0
        mean_p, var_p = self.baseline["pk"]
        mean_b, var_b = self.baseline["by"]
        if self.seconds_seen >= self.spike_warmup:
            for name, value, mean, var in (("packets/s", p, mean_p, var_p), ("bit/s", b * 8, mean_b * 8, var_b * 64)):
                band = mean + self.spike_k * var ** 0.5
                if value > band and value > 3 * mean and p >= self.spike_min:
                    book.raise_alert("spike", "medium", "all traffic", name, float(second),
                                     f"{value:,.0f} {name} against a usual {mean:,.0f} (band up to {band:,.0f})",
                                     "Traffic left its learned band: look at the top talkers and conversations "
                                     "of that second.", key=("spike", "", name))
        self._learn(float(p), float(b))

    def _learn(self, p: float, b: float) -> None:
        alpha = 2 / (min(self.spike_warmup, 300) + 1)
        for name, value in (("pk", p), ("by", b)):
            mean, var = self.baseline[name]
            if self.seconds_seen == 0:
                self.baseline[name] = [value, 0.0]
                continue
            diff = value - mean
            mean += alpha * diff
            var = (1 - alpha) * (var + alpha * diff * diff)
            self.baseline[name] = [mean, var]
        self.seconds_seen += 1

    # -- new hosts ------------------------------------------------------------------------

    def _new_hosts(self, b: _Batch, book: AlertBook) -> None:
        """A local IP address that starts talking after the learning period.

        The addresses learned before it are kept apart and never evicted: a flood of spoofed local
        sources afterwards can fill only the table of reported ones, never make a learned host new."""
        arr = b.cols  # contiguous fields (see _Columns)
        # Devices of the local networks (LOCAL_NETS) only: on the Internet side every new peer is "new".
        ip = np.flatnonzero(arr["cls"] != NON_IP)
        ip = ip[(self.local_nets.kinds(arr["src"][ip]) == LocalMatcher.OURS) & ~np.isin(b.hs[ip], _UNSPEC)]
        if not len(ip):
            return
        rows = self._fresh_hosts(b, ip)
        if not len(rows):
            return
        shown = rows[:self.alerts_per_batch]
        book.count_suppressed("new_host", len(rows) - len(shown))
        for i in shown.tolist():
            src, ts = addr_text(arr["src"][i]), float(arr["ts"][i])
            # The clock is seconds that had traffic, so a file's jump in time teaches nothing.
            book.raise_alert("new_host", "low", src, addr_text(arr["dst"][i]), ts,
                             f"{src} sent its first packet after {self.active_seconds:,} seconds "
                             f"of traffic (learning period {self.learn:g} s)",
                             "A device or address not seen before: check that it belongs on this network.")

    def _fresh_hosts(self, b: _Batch, ip: np.ndarray) -> np.ndarray:
        """Of the rows ip (local sources), the first row of each address new to both host tables, learned
        (before learn_end) or reported (after); the rows to report, in order."""
        if isinstance(self.known_hosts, _NSet):
            return self._fresh_hosts_native(b, ip)
        keys = _ints(b.hs[ip])
        first = dict(zip(reversed(keys), reversed(ip.tolist())))  # address -> its first row of the batch
        fresh = first.keys() - self.known_hosts - self.reported_hosts
        if not fresh:
            return ip[:0]
        rows = np.sort(np.fromiter(map(first.__getitem__, fresh), np.int64, len(fresh)))
        learning = b.cols["ts"][rows] < self.learn_end
        if learning.any():
            room = max(self.cap - len(self.known_hosts), 0)
            self.known_hosts.update(islice(_ints(b.hs[rows[learning]]), room))
        rows = rows[~learning]
        if not len(rows):
            return rows
        if len(self.reported_hosts) + len(rows) > self.cap:
            self.reported_hosts.clear()
        self.reported_hosts.update(_ints(b.hs[rows]))
        return rows

    def _fresh_hosts_native(self, b: _Batch, ip: np.ndarray) -> np.ndarray:
        """_fresh_hosts with the tables in native/detect.c (the same rows and the same table contents)."""
        known, reported = self.known_hosts, self.reported_hosts
        keys, ip = np.ascontiguousarray(b.hs[ip]), np.ascontiguousarray(ip, np.int64)
        out = np.empty(len(ip), np.int64)
        got = _fn("ntm_new_hosts")(ctypes.byref(known.struct()), ctypes.byref(reported.struct()),
                                               keys.ctypes.data, ip.ctypes.data, len(ip), out.ctypes.data)
        if got < 0:
            raise MemoryError("native/detect.c: no memory for a batch of new hosts")
        rows = out[:got]
        learning = b.cols["ts"][rows] < self.learn_end
        if learning.any():
            _nset_add(known, b.hs[rows[learning]][:max(self.cap - len(known), 0)])
        rows = rows[~learning]
        if len(rows):
            if len(reported) + len(rows) > self.cap:
                reported.clear()
            _nset_add(reported, b.hs[rows])
        return rows

    # -- ARP ----------------------------------------------------------------------------

    def _arp(self, rows: np.ndarray, book: AlertBook) -> None:
        """ARP rows in time order: a MAC that differs from the address's last known one may be spoofing.

        Only rows whose MAC differs from their address's previous row (or, for an address's first row
        of the batch, from the state) can raise, so only those are stepped through; an ARP storm of one
        address costs one step, not one per packet."""
        src = np.ascontiguousarray(rows["src"]).view(np.uint8).reshape(-1, 16)
        mac = np.ascontiguousarray(rows["hw_src"]).view(np.uint8).reshape(-1, 6)
        named = np.flatnonzero(src.any(axis=1) & mac.any(axis=1))  # rows that give an address and a MAC
        if not len(named):
            return
        rows, src, mac = rows.take(named), src[named], mac[named]
        _, codes = group_rows(src)
        order = np.argsort(codes, kind="stable")  # by address, then time
        same = np.zeros(len(order), bool)  # the previous row (in that order) is of the same address
        same[1:] = codes[order[1:]] == codes[order[:-1]]
        changed = np.ones(len(order), bool)
        changed[1:] = (mac[order[1:]] != mac[order[:-1]]).any(axis=1)
        step = ~same | changed
        prev = np.where(same, np.concatenate(([-1], order[:-1])), -1)[step]
        cand = order[step]
        by_time = np.argsort(cand, kind="stable")
        cand, prev = cand[by_time], prev[by_time]
        ts, ops = rows["ts"], rows["arp_op"]
        dst = rows["dst"]
        ips = rows["src"][cand].tolist()
        for i, p, ip in zip(cand.tolist(), prev.tolist(), ips):
            now = bytes(mac[i])
            known = self.arp.get(ip) if p < 0 else (bytes(mac[p]), float(ts[p]))
            op = int(ops[i])
            if known is not None and known[0] != now and op in (1, 2):
                t = float(ts[i])
                kind = "gratuitous ARP" if ip == dst[i] else ("ARP reply" if op == 2 else "ARP request")
                # One row per address however many MACs claim it (a fuzzer or a flood cycles through many).
                book.raise_alert(
                    "arp_spoof", "high", _mac(now), addr_text(ip), t,
                    f"{kind} says {addr_text(ip)} is at {_mac(now)}; it was at {_mac(known[0])} "
                    f"{t - known[1]:.0f} s before",
                    "An address whose MAC changes may be ARP spoofing (a man in the middle): check which "
                    "device owns that MAC; a replaced NIC or a failover also does this.",
                    key=("arp_spoof", "", addr_text(ip)))
        # The state: each address's last row, put in the order of those rows, as one put per row would leave it.
        last = np.ones(len(order), bool)
        last[:-1] = ~same[1:]
        lasts = np.sort(order[last])
        for i, ip in zip(lasts.tolist(), rows["src"][lasts].tolist()):
            self.arp.put(ip, (bytes(mac[i]), float(ts[i])))



# UDP services that answer a small request with a large one, abused for reflection: US-CERT alert
# TA14-017A ("UDP-based amplification attacks") and the services added to it since (CLDAP, memcached,
# WS-Discovery, ARMS, CoAP, Ubiquiti discovery, OpenVPN, Jenkins discovery, TP240).
REFLECTOR_PORTS = {17: "QOTD", 19: "chargen", 53: "DNS", 69: "TFTP", 111: "portmap", 123: "NTP",
                   137: "NetBIOS", 161: "SNMP", 389: "CLDAP", 520: "RIP", 1194: "OpenVPN", 1434: "MS-SQL",
                   1900: "SSDP", 3283: "ARMS", 3702: "WS-Discovery", 5353: "mDNS", 5683: "CoAP",
                   10001: "Ubiquiti", 10074: "TP240", 11211: "memcached", 27015: "Steam", 33848: "Jenkins"}
_REFLECTOR = np.zeros(65536, bool)
_REFLECTOR[list(REFLECTOR_PORTS)] = True
def _asked_key(asker: np.ndarray, server: np.ndarray, service: np.ndarray, port: np.ndarray) -> np.ndarray:
    """The hash of a request: asker and its port, server and its service port (the answer swaps them)."""
    return _comb(_comb(asker, server), (service.astype(np.uint64) << np.uint64(16)) + port.astype(np.uint64))


REQUEST_WAIT_S = 30.0  # an answer within this long of a request to that server and port was asked for
REASSEMBLY_S = 30.0  # the fragments of one datagram arrive within this long (Linux ipfrag_time: 30 s)

_UNSPECIFIED = (bytes(16), bytes(10) + b"\xff\xff" + bytes(4))  # :: and 0.0.0.0 (DHCP, DAD)
_UNSPEC = _addr_hash(np.array(_UNSPECIFIED, "S16"))


def _top_half(counts: Counter[int], cap: int) -> Counter[int]:
    """The cap / 2 keys with the largest counts (a bulk shrink, amortised O(1) per key added)."""
    keys = np.fromiter(counts.keys(), np.int64, len(counts))
    vals = np.fromiter(counts.values(), np.int64, len(counts))
    half = max(cap // 2, 1)
    keep = keys[np.argpartition(-vals, half)[:half]].tolist() if len(keys) > half else keys.tolist()
    return Counter(dict(zip(keep, map(counts.__getitem__, keep))))


def _isin(a: np.ndarray, b: np.ndarray, compiled: bool) -> np.ndarray:
    """np.isin(a, b) for uint64 hashes; compiled: native/detect.c's one hash pass."""
    if not compiled:
        return np.isin(a, b)
    a, b = np.ascontiguousarray(a, np.uint64), np.ascontiguousarray(b, np.uint64)
    out = np.empty(len(a), np.uint8)
    if _fn("ntm_isin")(a.ctypes.data, len(a), b.ctypes.data, len(b), out.ctypes.data) < 0:
        raise MemoryError("native/detect.c: no memory to match a batch's answers")
    return out.view(bool)


def _earlier(keys: np.ndarray, key_rows: np.ndarray, refs: np.ndarray, ref_rows: np.ndarray,
             compiled: bool = False) -> np.ndarray:
    """For each key: some ref equals it at an earlier row (one sort, no loop).

    Each ref is packed as (hash, row) into one uint64, the hash's top bits above the row's: after a
    plain sort the first entry of a hash holds its earliest row. The hash keeps 64 - row bits (48 for
    batches up to 65,536 rows): two refs of one batch share them with odds under 1e-5."""
    if not len(refs) or not len(keys):
        return np.zeros(len(keys), bool)
    bits = np.uint64(max(int(max(int(key_rows.max()), int(ref_rows.max()))).bit_length(), 16))
    if compiled:  # native/detect.c: one hash pass instead of a sort, the same answer
        out = np.empty(len(keys), np.uint8)
        keys, refs = np.ascontiguousarray(keys, np.uint64), np.ascontiguousarray(refs, np.uint64)
        key_rows, ref_rows = np.ascontiguousarray(key_rows, np.int64), np.ascontiguousarray(ref_rows, np.int64)
        if _fn("ntm_earlier")(keys.ctypes.data, key_rows.ctypes.data, len(keys), refs.ctypes.data,
                                          ref_rows.ctypes.data, len(refs), int(bits), out.ctypes.data) < 0:
            raise MemoryError("native/detect.c: no memory to match a batch's answers")
        return out.view(bool)
    packed = np.sort((refs >> bits << bits) | ref_rows.astype(np.uint64))
    want = keys >> bits << bits
    pos = np.searchsorted(packed, want).clip(max=len(packed) - 1)
    found = packed[pos]
    return (found >> bits << bits == want) & ((found & ((np.uint64(1) << bits) - np.uint64(1))) < key_rows)


BOTH_PORTS, SERVICE_PORT, PROBE_PORT = 0, 1, 2  # which ports a flow key keeps (flow_keys_numpy)


def _distinct(arr: np.ndarray, mask: np.ndarray, ports: int = BOTH_PORTS) -> np.ndarray:
    """Row numbers of the first packet of each (addresses, ports, protocol, TCP flags, ICMP type) among arr[mask].

    Only the ports the detector keys its state on count (see flow_keys_numpy), so a scan or a
    flood from random source ports costs one step per probed port, not one per packet."""
    idx = np.flatnonzero(mask)
    if len(idx) < 2:
        return idx
    key = native.flow_keys(arr, ports, idx)
    first, _ = group_rows(key if key is not None else flow_keys_numpy(arr.take(idx), ports))
    return idx[first]


def flow_keys_numpy(rows: np.ndarray, ports: int = BOTH_PORTS) -> np.ndarray:
    """_distinct's keys without the compiled helper (its reference).

    ports: BOTH_PORTS as they are; SERVICE_PORT both the lower of the two (the service's, for UDP:
    clients that pick a new source port for every query are one flow); PROBE_PORT only the port a
    TCP probe is keyed on (the destination port, or the source port of a RST or an ACK, which
    answer a probe), the other 0."""
    sport, dport = rows["sport"], rows["dport"]
    if ports == SERVICE_PORT:
        sport = dport = np.minimum(sport, dport)
    elif ports == PROBE_PORT:
        answer = (rows["tcp_flags"] & (RST | ACK)) != 0
        sport, dport = np.where(answer, sport, 0), np.where(answer, 0, dport)
    key = np.empty((len(rows), 44), np.uint8)
    key[:, :16] = np.ascontiguousarray(rows["src"]).view(np.uint8).reshape(-1, 16)
    key[:, 16:32] = np.ascontiguousarray(rows["dst"]).view(np.uint8).reshape(-1, 16)
    key[:, 32:36] = sport.astype("<i4").view(np.uint8).reshape(-1, 4)
    key[:, 36:40] = dport.astype("<i4").view(np.uint8).reshape(-1, 4)
    key[:, 40:42] = rows["tcp_flags"].astype("<u2").view(np.uint8).reshape(-1, 2)
    key[:, 42] = rows["cls"]
    key[:, 43] = rows["icmp_type"].astype(np.uint8)
    return key


def _group(dst: np.ndarray) -> np.ndarray:
    """Multicast or broadcast destinations (IPv4 224.0.0.0 and up, IPv6 ff00::/8)."""
    # As two big-endian 64-bit words: whole-word tests, not per-byte reductions over a 2-D array.
    words = np.ascontiguousarray(dst).view(">u8").reshape(-1, 2)
    hi, lo = words[:, 0], words[:, 1]
    v4 = (hi == 0) & ((lo >> np.uint64(32)) == 0xFFFF)  # ::ffff:a.b.c.d
    return np.where(v4, ((lo >> np.uint64(24)) & np.uint64(0xFF)) >= 224, (hi >> np.uint64(56)) == 0xFF)


def _mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac.ljust(6, b"\x00"))
