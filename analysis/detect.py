"""Anomaly detectors run on every parsed batch, and the bounded alert book.

Detectors read the packed rows of one batch (never the rolling buffer) and keep bounded state:
port scans (vertical and horizontal, counting only failed or unanswered attempts, plus
NULL/FIN/Xmas probes), SYN/ICMP/UDP floods against one host, traffic spikes against an EWMA
band, new local hosts after a learning period, and ARP spoofing. Thresholds live in config.py
with where their defaults come from.

Every step is linear in the batch: numpy over the batch, then C-level bulk operations of Python
sets and dicts (set.update, set difference, dict(zip(...)), map(d.__contains__, keys)) on 64-bit
hashes of the keys; a Python-level loop runs only over what raises an alert. Scan state lives in
tumbling epochs like Zeek's scan.zeek (SumStats UNIQUE over SCAN_WINDOW_S, the whole table dropped
at the epoch's end); probes wait for their answer in generations, and a generation pushed out,
by time or by a full table, counts its unanswered probes as failed. Keys are hashed to 64 bits
(splitmix64): two keys share a hash with odds of about n^2 / 2^65, under 1e-10 for a full table.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict, deque
from dataclasses import asdict, dataclass, replace
from itertools import compress, islice, repeat
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

    def raise_alert(self, detector: str, severity: str, source: str, target: str, ts: float, evidence: str,
                    meaning: str, key: AlertKey | None = None) -> None:
        """Record a finding, or refresh the row of the same finding (same key: detector, source, target)."""
        key = key or (detector, source, target)
        rank = SEVERITY_RANK.get(severity, 0)
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
                alert = replace(old, source=source, last_ts=max(old.last_ts, ts), count=old.count + 1,
                                evidence=evidence, severity=severity, acknowledged=False)
            self._alerts[key] = alert
            self._queues.setdefault((detector, rank), OrderedDict())[key] = None

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


def _member(table: Any, keys: list[int]) -> np.ndarray:
    """keys in table (a set or dict), as a bool array: one C-level pass."""
    return np.fromiter(map(table.__contains__, keys), bool, len(keys))


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

    `seen` holds the (key, item) hashes of the epoch, at most 4 x cap: when more come it is emptied
    and `lossy` says that repeats may count again until the epoch ends. `count` and `first` keep at
    most cap keys: beyond, the half with the fewest items goes, so a noisy flood of one-off keys
    cannot push out a scanner that has many (amortised O(1): each shrink follows cap/2 new keys)."""

    def __init__(self, cap: int) -> None:
        self.cap = max(cap, 2)
        self.reset()

    def reset(self) -> None:
        """Start a new epoch: drop the whole table."""
        self.seen: set[int] = set()
        self.count: Counter[int] = Counter()
        self.first: dict[int, float] = {}
        self.lossy = False

    def __len__(self) -> int:
        return len(self.seen) + len(self.count) + len(self.first)

    def add(self, keys: list[int], items: list[int], ts: list[float]) -> dict[int, int]:
        """Count the items new to their key this epoch; {key: its latest row among them} for the keys that grew."""
        where = dict(zip(items, range(len(items))))  # item -> its last row
        new = where.keys() - self.seen
        if not new:
            return {}
        if len(self.seen) + len(new) > 4 * self.cap:
            self.seen = set()
            self.lossy = True
        self.seen.update(new)
        rows = sorted(map(where.__getitem__, new))
        grown = list(map(keys.__getitem__, rows))
        self.count.update(grown)
        earliest = dict(zip(reversed(grown), map(ts.__getitem__, reversed(rows))))
        missing = earliest.keys() - self.first.keys()
        self.first.update(zip(missing, map(earliest.__getitem__, missing)))
        if len(self.count) > self.cap:
            self._shrink()
        return dict(zip(grown, rows))

    def _shrink(self) -> None:
        keys = np.fromiter(self.count.keys(), np.int64, len(self.count))
        vals = np.fromiter(self.count.values(), np.int64, len(self.count))
        half = self.cap // 2
        keep = keys[np.argpartition(-vals, half)[:half]].tolist()
        self.count = Counter(dict(zip(keep, map(self.count.__getitem__, keep))))
        self.first = dict(zip(keep, map(self.first.__getitem__, keep)))


class _Pending:
    """Probes waiting for an answer, in generations of SCAN_UNANSWERED_S / 2 (a timing wheel, no sweeps).

    A probe expires when its generation falls off the end, between 1 and 1.5 x SCAN_UNANSWERED_S after
    it was sent; a generation pushed off early because the newest holds `cap` probes expires the same
    way, so the probes of a fast sweep count as unanswered, never as forgotten."""

    GENERATIONS = 3

    def __init__(self, timeout: float, cap: int) -> None:
        self.period = timeout / (self.GENERATIONS - 1)
        self.cap = max(cap, 1)
        self.turn_at: float | None = None
        self.gens: deque[tuple[set[int], list[np.ndarray]]] = deque(
            (set(), []) for _ in range(self.GENERATIONS))
        self.rows = 0  # probe rows held in the newest generation (repeats included)

    def __len__(self) -> int:
        return sum(len(s) for s, _ in self.gens)

    def add(self, probes: np.ndarray) -> None:
        """Hold ATTEMPT_DTYPE rows until answered or expired."""
        if len(probes):
            if self.turn_at is None:
                self.turn_at = float(probes["ts"].min()) + self.period
            newest = self.gens[-1]
            newest[0].update(_ints(probes["h"]))
            newest[1].append(probes)
            self.rows += len(probes)

    def contains(self, keys: list[int]) -> np.ndarray:
        """Which keys are pending."""
        hit = np.zeros(len(keys), bool)
        for pending, _ in self.gens:
            if pending:
                hit |= _member(pending, keys)
        return hit

    def answer(self, keys: list[int]) -> np.ndarray:
        """Remove the pending keys among `keys`; which of them were pending."""
        hit = self.contains(keys)
        if hit.any():
            found = list(compress(keys, hit))
            for pending, _ in self.gens:
                pending.difference_update(found)
        return hit

    def expire(self, now: float) -> list[np.ndarray]:
        """Turn the generations due by `now` (or full); the unanswered probes of those pushed off."""
        out = []
        if self.turn_at is None:
            return out
        turns = 0
        while now >= self.turn_at and turns < self.GENERATIONS:
            out.append(self._turn())
            self.turn_at += self.period
            turns += 1
        if now >= self.turn_at:  # a jump in time: every generation is already expired
            self.turn_at = now + self.period
        while len(self.gens[-1][0]) >= self.cap or self.rows >= 2 * self.cap:
            out.append(self._turn())
        return [rows for rows in out if len(rows)]

    def _turn(self) -> np.ndarray:
        pending, chunks = self.gens.popleft()
        self.gens.append((set(), []))
        self.rows = 0
        if not pending or not chunks:
            return np.empty(0, ATTEMPT_DTYPE)
        rows = np.concatenate(chunks)
        return rows[_member(pending, _ints(rows["h"]))]


class _Recent:
    """A set of hashes remembered for one to two periods (two generations), and at most 2 x cap of them."""

    def __init__(self, period: float, cap: int) -> None:
        self.period, self.cap = period, max(cap, 1)
        self.new: set[int] = set()
        self.old: set[int] = set()
        self.turn_at: float | None = None

    def __len__(self) -> int:
        return len(self.new) + len(self.old)

    def contains(self, keys: list[int]) -> np.ndarray:
        """Which keys are remembered."""
        return _member(self.new, keys) | _member(self.old, keys) if self else np.zeros(len(keys), bool)

    def add(self, keys: list[int], now: float) -> None:
        """Remember keys (the oldest generation goes when a period has passed or the newest is full)."""
        if self.turn_at is None:
            self.turn_at = now + self.period
        if now >= self.turn_at or len(self.new) + len(keys) > self.cap:
            self.old, self.new = self.new, set()
            self.turn_at = now + self.period
        self.new.update(keys)


class _Batch:
    """Columns of one batch that several detectors use, computed once."""

    def __init__(self, arr: np.ndarray) -> None:
        self.arr = arr
        self.hs = _addr_hash(arr["src"])
        self.hd = _addr_hash(arr["dst"])
        self.sec = np.floor(arr["ts"]).astype(np.int64)
        self.unicast = ~_group(arr["dst"])  # multicast and broadcast are one-way by nature: never probes


class _Second:
    """One kind of flood's counts over the current second: packets and distinct sources per destination.

    Exact: every (destination, source) pair of the second is remembered, up to cap pairs; beyond that
    the source counts are lower bounds and the evidence says "at least". Destinations beyond cap in one
    second are not counted that second (a flood's target is counted from its first packet of the second)."""

    def __init__(self, cap: int) -> None:
        self.cap = max(cap, 1)
        self.start(-(2 ** 62))

    def start(self, second: int) -> None:
        """Begin counting `second`."""
        self.second = second
        self.packets: Counter[int] = Counter()
        self.pairs: set[int] = set()
        self.sources: Counter[int] = Counter()
        self.full = False

    def __len__(self) -> int:
        return len(self.packets) + len(self.pairs) + len(self.sources)

    def add(self, dst: list[int], pairs: list[int] | None) -> None:
        """Count packets to `dst` (hashes, one per packet) and, when given, their (destination, source) pairs."""
        if len(self.packets) + len(dst) > self.cap:
            known = _member(self.packets, dst)
            room = max(self.cap - len(self.packets), 0)
            admitted = set(islice(dict.fromkeys(compress(dst, ~known)), room))  # the first newcomers that fit
            keep = known | _member(admitted, dst)
            dst = list(compress(dst, keep))
            pairs = None if pairs is None else list(compress(pairs, keep))
        self.packets.update(dst)
        if pairs is None or self.full:
            return
        dst_of_pair = dict(zip(pairs, dst))
        new = dst_of_pair.keys() - self.pairs
        if len(self.pairs) + len(new) > self.cap:
            new = set(islice(new, self.cap - len(self.pairs)))
            self.full = True
        self.pairs.update(new)
        self.sources.update(map(dst_of_pair.__getitem__, new))


_H_SALT = np.uint64(0x5851F42D4C957F2D)  # keeps (scanner, proto, port) keys apart from (scanner, target) ones
_SERVED_SALT = np.uint64(0x14057B7EF767814F)
PROTO_NAME = {6: "tcp", 17: "udp"}


class Detectors:
    """Detector state for one capture; observe() is called with each parsed batch, in time order.

    Holds no lock and no function objects, so it can live in (and be pickled to) a consumer process."""

    def __init__(self) -> None:
        cap = self.cap = config.get("DETECTOR_STATE_MAX")
        self.window = config.get("SCAN_WINDOW_S")
        self.vports = config.get("SCAN_PORTS")
        self.vhosts = config.get("SCAN_HOSTS")
        self.stealth_ports = config.get("SCAN_STEALTH_PORTS")
        self.timeout = config.get("SCAN_UNANSWERED_S")
        self.alerts_per_batch = config.get("ALERTS_PER_DETECTOR")
        self.epoch: int | None = None  # the SCAN_WINDOW_S epoch the scan tables count
        self.pending = _Pending(self.timeout, cap)  # probes (prober, target, proto, port) awaiting an answer
        self.vertical = _Unique(cap)  # (scanner, target) -> distinct (proto, port) that failed, this epoch
        self.horizontal = _Unique(cap)  # (scanner, proto, port) -> distinct targets that failed, this epoch
        self.stealth = _Unique(cap)  # (scanner, target) -> distinct ports sent NULL/FIN/Xmas, this epoch
        self.answered: Counter[int] = Counter()  # (scanner, target) -> answered attempts, this epoch
        self.served = _Recent(self.window, cap)  # (address, UDP port) that received probes: its replies are none
        self.last_udp: dict[int, int] = {}  # (prober, target) -> port of its latest UDP probe, for ICMP unreachable
        self.arp = _Bounded(cap)  # IPv4 address -> (MAC, time)
        self.flood_pps = {"syn": config.get("SYN_FLOOD_PPS"), "icmp": config.get("ICMP_FLOOD_PPS"),
                          "udp": config.get("UDP_FLOOD_PPS")}
        self.seconds = {kind: _Second(cap) for kind in ("synack", "syn", "icmp", "udp")}
        self.spike_k = config.get("SPIKE_SIGMAS")
        self.spike_min = config.get("SPIKE_MIN_PPS")
        self.spike_warmup = config.get("SPIKE_WARMUP_S")
        self.spike_state: list[float] | None = None  # [second, packets, bytes] being counted
        self.baseline = {"pk": [0.0, 0.0], "by": [0.0, 0.0]}  # EWMA mean and variance per metric
        self.seconds_seen = 0
        self.active_seconds = 0  # seconds that had traffic: the new-host learning clock
        self.learn_end = float("inf")  # capture time when NEW_HOST_LEARN_S seconds of traffic were learned
        self.known_hosts: set[int] = set()  # local addresses learned before learn_end: never evicted
        self.reported_hosts: set[int] = set()  # new hosts already reported (emptied beyond cap: a repeat updates)
        self.local_nets = LocalMatcher(nets=parse_nets(config.get("LOCAL_NETS")))
        self.learn = config.get("NEW_HOST_LEARN_S")

    def table_sizes(self) -> dict[str, int]:
        """Entries held by every table, inner tables included (each one is bounded by DETECTOR_STATE_MAX)."""
        sizes = {"pending": len(self.pending), "vertical": len(self.vertical), "horizontal": len(self.horizontal),
                 "stealth": len(self.stealth), "answered": len(self.answered), "served": len(self.served),
                 "last_udp": len(self.last_udp), "arp": len(self.arp), "known_hosts": len(self.known_hosts),
                 "reported_hosts": len(self.reported_hosts)}
        sizes["pending_rows"] = sum(len(c) for _, chunks in self.pending.gens for c in chunks)
        sizes.update({f"second_{kind}": len(st) for kind, st in self.seconds.items()})
        return sizes

    def observe(self, arr: np.ndarray, book: AlertBook) -> None:
        """Update the state with one batch and raise what it shows."""
        if not len(arr):
            return
        b = _Batch(arr)
        flags, cls = arr["tcp_flags"], arr["cls"]
        # Only packets that open, answer or refuse a connection matter; skip the data flow.
        opening = ((flags & (SYN | ACK)) != ACK) | ((flags & RST) != 0)
        # Per flow, not per packet: a flood of one flow costs one row, whatever its rate.
        tcp = _distinct(arr, (cls == TCP) & b.unicast & opening, PROBE_PORT)
        if len(tcp):
            self._tcp(b, tcp, book)
        udp = _distinct(arr, ((cls == UDP) & b.unicast) | ((arr["icmp_type"] == 3) & (arr["proto"] == 1)),
                        SERVICE_PORT)
        if len(udp):
            self._udp(b, udp, book)
        arp = arr.take(np.flatnonzero((cls == NON_IP) & (arr["ethertype"] == ETH_ARP) & (arr["arp_op"] > 0)))
        if len(arp):
            self._arp(arp, book)
        for expired in self.pending.expire(float(arr["ts"].max())):
            self._failed(expired, book)
        self._floods(b, book)
        self._spike(b, book)
        self._new_hosts(b, book)

    # -- port scans ---------------------------------------------------------------------

    def _tcp(self, b: _Batch, idx: np.ndarray, book: AlertBook) -> None:
        """SYN and NULL/FIN/Xmas rows are probes; SYN-ACK answers one, RST refuses one."""
        arr = b.arr
        fl = arr["tcp_flags"][idx]
        rst = (fl & RST) != 0
        probe = ~rst & ((fl & ACK) == 0)  # the rows are SYN, SYN-ACK, RST or no SYN and no ACK
        p = idx[probe]
        if len(p):  # probes first: the answer to a probe of this batch is in it too
            probes = _attempts(arr["src"][p], arr["dst"][p], b.hs[p], b.hd[p], 6, arr["dport"][p], arr["ts"][p])
            self.pending.add(probes)
            # NULL, FIN or Xmas: no client sends these, scanners do (nmap -sN/-sF/-sX)
            stealth = (fl[probe] & SYN) == 0
            if stealth.any():
                self._stealth(probes[stealth], book)
        a = idx[~probe]
        if len(a):
            answers = _attempts(arr["dst"][a], arr["src"][a], b.hd[a], b.hs[a], 6, arr["sport"][a], arr["ts"][a])
            hit = self.pending.answer(_ints(answers["h"]))
            refused = rst[~probe]
            if (hit & ~refused).any():  # first, so the scan alert of this batch says how many were answered
                self._answered(answers[hit & ~refused])
            if (hit & refused).any():
                self._failed(answers[hit & refused], book)

    def _udp(self, b: _Batch, idx: np.ndarray, book: AlertBook) -> None:
        cls = b.arr["cls"][idx]
        flows = idx[(cls == UDP) & (b.arr["dport"][idx] >= 0)]
        if len(flows):
            self._udp_flows(b, flows)
        unreachable = idx[cls != UDP]
        if len(unreachable):
            self._unreachable(b, unreachable, book)

    def _udp_flows(self, b: _Batch, idx: np.ndarray) -> None:
        """A UDP flow answers a pending probe, is a server's reply (no probe), or is a probe."""
        arr = b.arr
        hs, hd = b.hs[idx], b.hd[idx]
        sport, dport = arr["sport"][idx], arr["dport"][idx]
        answers = _probe_hash(hd, hs, 17, sport)  # the probe this flow would answer
        probes = _probe_hash(hs, hd, 17, dport)
        server = _comb(hs, sport.astype(np.uint64) + _SERVED_SALT)  # (this end, its port)
        marks = _comb(hd, dport.astype(np.uint64) + _SERVED_SALT)  # (the other end, its port): served if a probe
        order = np.arange(len(idx))
        keys = _ints(answers)
        is_answer = self.pending.contains(keys)
        candidate = ~is_answer & ~self.served.contains(_ints(server))
        is_answer |= _earlier(answers, probes, candidate, order)  # answers a probe earlier in the batch
        probe = candidate & ~is_answer
        probe &= ~_earlier(server, marks, probe, order)  # a reply from a port probed earlier in the batch
        if probe.any():
            p = idx[probe]
            self.pending.add(_attempts(arr["src"][p], arr["dst"][p], hs[probe], hd[probe], 17, dport[probe],
                                       arr["ts"][p]))
            self.served.add(_ints(marks[probe]), float(arr["ts"][p[-1]]))
            if len(self.last_udp) > self.cap:
                self.last_udp.clear()
            self.last_udp.update(zip(_ints(_comb(hs[probe], hd[probe])), dport[probe].tolist()))
        if is_answer.any():
            hit = self.pending.answer(list(compress(keys, is_answer)))
            a = np.flatnonzero(is_answer)[hit]
            if len(a):
                self._answered(_attempts(arr["dst"][idx[a]], arr["src"][idx[a]], hd[a], hs[a], 17, sport[a],
                                         arr["ts"][idx[a]]))

    def _unreachable(self, b: _Batch, idx: np.ndarray, book: AlertBook) -> None:
        """ICMP port unreachable from a target: the prober's latest UDP probe of it failed.

        The quoted datagram is not parsed, so the prober's latest probe of that target is taken:
        one dict lookup, and any other probe left pending fails when it expires anyway."""
        arr = b.arr
        pairs = _ints(_comb(b.hd[idx], b.hs[idx]))
        ports = np.fromiter(map(self.last_udp.pop, pairs, repeat(-1)), np.int64, len(pairs))
        ok = ports >= 0
        if ok.any():
            k = idx[ok]
            rows = _attempts(arr["dst"][k], arr["src"][k], b.hd[k], b.hs[k], 17, ports[ok], arr["ts"][k])
            hit = self.pending.answer(_ints(rows["h"]))
            if hit.any():
                self._failed(rows[hit], book)

    def _epochs(self, ts: np.ndarray):
        """Selectors of the rows per scan epoch, in order, starting each new epoch on the way."""
        ep = np.floor(ts / self.window).astype(np.int64)
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
        """Drop the scan tables whole, as scan.zeek's SumStats epoch does: no per-entry expiry."""
        self.epoch = epoch
        for table in (self.vertical, self.horizontal, self.stealth):
            table.reset()
        self.answered = Counter()

    def _answered(self, rows: np.ndarray) -> None:
        for sel in self._epochs(rows["ts"]):
            part = rows[sel]
            self.answered.update(_ints(_comb(part["hs"], part["ht"])))
            if len(self.answered) > self.cap:
                self.answered = _top_half(self.answered, self.cap)

    def _stealth(self, probes: np.ndarray, book: AlertBook) -> None:
        for sel in self._epochs(probes["ts"]):
            part = probes[sel]
            keys = _ints(_comb(part["hs"], part["ht"]))
            grown = self.stealth.add(keys, _ints(part["h"]), part["ts"].tolist())
            for _key, row, n in self._reached(self.stealth, grown, self.stealth_ports):
                r = part[row]
                book.raise_alert("port_scan", "high", addr_text(r["s"]), addr_text(r["t"]), float(r["ts"]),
                                 f"{n} NULL/FIN/Xmas probes to {n} ports on {addr_text(r['t'])}",
                                 "TCP packets with no SYN and no ACK are only sent by port scanners "
                                 "(nmap -sN/-sF/-sX): find the program on the source host.")

    @staticmethod
    def _reached(table: _Unique, grown: dict[int, int], threshold: int) -> list[tuple[int, int, int]]:
        """(key, row, distinct count) of the grown keys whose count reached `threshold`."""
        if not grown:
            return []
        keys = list(grown)
        counts = np.fromiter(map(table.count.__getitem__, keys), np.int64, len(keys))
        hot = counts >= threshold
        return [(k, grown[k], n) for k, n in zip(compress(keys, hot), counts[hot].tolist())]

    def _failed(self, rows: np.ndarray, book: AlertBook) -> None:
        """Failed or unanswered attempts (ATTEMPT_DTYPE rows): count the distinct ones, raise the scans."""
        for sel in self._epochs(rows["ts"]):
            part = rows[sel]
            ts = part["ts"].tolist()
            grown = self.vertical.add(_ints(_comb(part["hs"], part["ht"])), _ints(part["h"]), ts)
            for key, row, n in self._reached(self.vertical, grown, self.vports):
                self._vertical_alert(part[row], key, n, book)
            service = (part["proto"].astype(np.uint64) << np.uint64(32)) + part["port"].astype(np.uint64)
            hkeys = _comb(part["hs"] ^ _H_SALT, service)
            grown = self.horizontal.add(_ints(hkeys), _ints(_comb(hkeys, part["ht"])), ts)
            for key, row, n in self._reached(self.horizontal, grown, self.vhosts):
                self._horizontal_alert(part[row], key, n, book)

    def _vertical_alert(self, r: np.void, key: int, n: int, book: AlertBook) -> None:
        ts, target = float(r["ts"]), addr_text(r["t"])
        first = self.vertical.first.get(key, ts)
        note = " (approximate: the table of attempts filled up this epoch, a repeat may count twice)" \
            if self.vertical.lossy else ""
        book.raise_alert(
            "port_scan", "medium", addr_text(r["s"]), target, ts,
            f"{n} ports on {target} failed or went unanswered in {ts - first:.0f} s, "
            f"{self.answered.get(key, 0)} answered{note}",
            "One host probing many ports of another is a vertical port scan: check whether the source "
            "is an authorised scanner, else what runs on it.")

    def _horizontal_alert(self, r: np.void, key: int, n: int, book: AlertBook) -> None:
        ts, service = float(r["ts"]), f"{PROTO_NAME.get(int(r['proto']), r['proto'])}/{int(r['port'])}"
        first = self.horizontal.first.get(key, ts)
        note = " (approximate: the table of attempts filled up this epoch, a repeat may count twice)" \
            if self.horizontal.lossy else ""
        book.raise_alert(
            "port_scan", "medium", addr_text(r["s"]), service, ts,
            f"{n} hosts refused or ignored {service} in {ts - first:.0f} s{note}",
            "One host trying the same port on many hosts is a horizontal scan (a sweep or a worm): "
            "check the source host.")

    # -- floods -------------------------------------------------------------------------

    def _floods(self, b: _Batch, book: AlertBook) -> None:
        """SYN, ICMP echo and UDP packets per second to one destination, with their distinct sources."""
        arr = b.arr
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
                st.add(_ints(b.hs[sel]), None)
                continue
            dst = _ints(b.hd[sel])
            st.add(dst, _ints(_comb(b.hd[sel], b.hs[sel])))
            row_of = dict(zip(dst, sel.tolist()))  # a row of each destination
            keys = list(row_of)
            counts = np.fromiter(map(st.packets.__getitem__, keys), np.int64, len(keys))
            hot = counts >= self.flood_pps[kind]
            for key, n in zip(compress(keys, hot), counts[hot].tolist()):
                self._flood_alert(kind, key, n, b.arr["dst"][row_of[key]], book)

    def _flood_alert(self, kind: str, key: int, n: int, dst: bytes, book: AlertBook) -> None:
        st, answers = self.seconds[kind], self.seconds["synack"]
        completed = answers.packets.get(key, 0) if kind == "syn" and answers.second == st.second else 0
        if kind == "syn" and completed > n * 0.1:
            return  # a busy server that answers is not flooded
        sources = st.sources.get(key, 0)
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

    # -- traffic spike --------------------------------------------------------------------

    def _spike(self, b: _Batch, book: AlertBook) -> None:
        """Packets/s and bits/s against an EWMA band learned per second, after a warm-up."""
        sec, wire = b.sec, b.arr["wire_len"].astype(np.float64)
        if (sec[1:] >= sec[:-1]).all():  # time order (always, but for a file's stray packet): runs of seconds
            starts = np.concatenate(([0], np.flatnonzero(np.diff(sec)) + 1))
            secs, pk = sec[starts], np.diff(np.append(starts, len(sec)))
            by = np.add.reduceat(wire, starts)
        else:
            secs, inv = np.unique(sec, return_inverse=True)
            pk = np.bincount(inv, minlength=len(secs))
            by = np.bincount(inv, wire, len(secs))
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
        arr = b.arr
        ip = np.flatnonzero(arr["cls"] != NON_IP)
        if not len(ip):
            return
        keys = _ints(b.hs[ip])
        first = dict(zip(reversed(keys), reversed(ip.tolist())))  # address -> its first row of the batch
        fresh = first.keys() - self.known_hosts - self.reported_hosts
        if not fresh:
            return
        rows = np.array(sorted(map(first.__getitem__, fresh)), np.int64)
        # Devices of the local networks (LOCAL_NETS) only: on the Internet side every new peer is "new".
        rows = rows[(self.local_nets.kinds(arr["src"][rows]) == LocalMatcher.OURS) & ~np.isin(b.hs[rows], _UNSPEC)]
        learning = arr["ts"][rows] < self.learn_end
        if learning.any():
            room = max(self.cap - len(self.known_hosts), 0)
            self.known_hosts.update(islice(_ints(b.hs[rows[learning]]), room))
        rows = rows[~learning]
        if not len(rows):
            return
        if len(self.reported_hosts) + len(rows) > self.cap:
            self.reported_hosts.clear()
        self.reported_hosts.update(_ints(b.hs[rows]))
        shown = rows[:self.alerts_per_batch]
        book.count_suppressed("new_host", len(rows) - len(shown))
        for i in shown.tolist():
            src, ts = addr_text(arr["src"][i]), float(arr["ts"][i])
            # The clock is seconds that had traffic, so a file's jump in time teaches nothing.
            book.raise_alert("new_host", "low", src, addr_text(arr["dst"][i]), ts,
                             f"{src} sent its first packet after {self.active_seconds:,} seconds "
                             f"of traffic (learning period {self.learn:g} s)",
                             "A device or address not seen before: check that it belongs on this network.")

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



_UNSPECIFIED = (bytes(16), bytes(10) + b"\xff\xff" + bytes(4))  # :: and 0.0.0.0 (DHCP, DAD)
_UNSPEC = _addr_hash(np.array(_UNSPECIFIED, "S16"))


def _top_half(counts: Counter[int], cap: int) -> Counter[int]:
    """The cap / 2 keys with the largest counts (a bulk shrink, amortised O(1) per key added)."""
    keys = np.fromiter(counts.keys(), np.int64, len(counts))
    vals = np.fromiter(counts.values(), np.int64, len(counts))
    half = max(cap // 2, 1)
    keep = keys[np.argpartition(-vals, half)[:half]].tolist() if len(keys) > half else keys.tolist()
    return Counter(dict(zip(keep, map(counts.__getitem__, keep))))


def _earlier(keys: np.ndarray, refs: np.ndarray, mask: np.ndarray, order: np.ndarray) -> np.ndarray:
    """For each row i: keys[i] equals refs[j] of some row j < i with mask[j] (sorted search, no loop)."""
    j = np.flatnonzero(mask)
    if not len(j):
        return np.zeros(len(keys), bool)
    uniq, first = np.unique(refs[j], return_index=True)
    first = j[first]
    pos = np.searchsorted(uniq, keys).clip(max=len(uniq) - 1)
    return (uniq[pos] == keys) & (first[pos] < order)


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
