"""Per-process totals over packet rows: each end whose address is this machine's is looked up by port."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import native
from analysis.headers import TCP, UDP, V4_PREFIX, take
from analysis.stages import Stage, StageStats
from enrich.processes import HIDDEN, UNKNOWN, ProcessTable

log = logging.getLogger(__name__)
_PROTO = {TCP: "tcp", UDP: "udp"}


def _owner_ids(cls: np.ndarray, addrs: np.ndarray, ports: np.ndarray, table: ProcessTable,
               owners: dict[tuple[int, str], int]) -> np.ndarray:
    """Per row: the index of the owning process in `owners`, -2 for a local end with no owner, -3 for one whose
    owner this process may not see, -1 not local."""
    out = np.full(len(cls), -1, dtype=np.int64)
    # Only this machine's ends are looked up: found with array compares, so remote traffic (a file of
    # strangers' packets: every row a new flow) costs no per-key Python work.
    rows = np.flatnonzero(local_rows(addrs, table))
    if not len(rows):
        return out
    keys = np.empty(len(rows), dtype=[("c", "u1"), ("a", "S16"), ("p", "<i4")])
    keys["c"], keys["a"], keys["p"] = cls[rows], addrs[rows], ports[rows]
    uniq, inv = np.unique(keys, return_inverse=True)
    ids = np.full(len(uniq), -1, dtype=np.int64)
    for i, (c, _a, p) in enumerate(uniq.tolist()):
        o = table.owner(_PROTO[int(c)], int(p))
        if o is None:
            ids[i] = -3 if table.hidden(_PROTO[int(c)], int(p)) else -2
            continue
        ids[i] = owners.setdefault((o[0], o[1]), len(owners))
    out[rows] = ids[inv]
    return out


def _key(text: str) -> bytes | None:
    """An address's 16-byte key as the records hold it (IPv4 behind V4_PREFIX), None for no address."""
    try:
        return V4_PREFIX + socket.inet_pton(socket.AF_INET, text)
    except OSError:
        try:
            return socket.inet_pton(socket.AF_INET6, text)
        except OSError:
            return None


def local_rows(addrs: np.ndarray, table: ProcessTable) -> np.ndarray:
    """Per row: whether the address is this machine's as table.is_local says (loopback, or an address of
    an interface at the table's last read)."""
    keys = np.ascontiguousarray(addrs, dtype="S16")
    b = keys.view(np.uint8).reshape(-1, 16)
    prefix = np.frombuffer(V4_PREFIX, dtype=np.uint8)
    local = (b[:, :12] == prefix).all(axis=1) & (b[:, 12] == 127)  # 127.0.0.0/8
    local |= (b[:, :15] == 0).all(axis=1) & (b[:, 15] == 1)  # ::1
    for text in table.local_addresses():
        key = _key(text)
        if key is not None:
            local |= keys == np.bytes_(key)
    return local


def by_process(packets: np.ndarray, table: ProcessTable) -> list[dict[str, Any]]:
    """[{process, pid, packets, bytes, connections}] for local TCP/UDP packets, largest bytes first."""
    p = packets[np.isin(packets["cls"], (TCP, UDP))]
    owners: dict[tuple[int, str], int] = {}
    a = _owner_ids(p["cls"], p["src"], p["sport"], table, owners)
    b = _owner_ids(p["cls"], p["dst"], p["dport"], table, owners)
    mine = (a != -1) | (b != -1)  # no other row is in any tally: conversations are told apart over these only
    p, a, b = p[mine], a[mine], b[mine]
    rows = []
    conv = _conversation_ids(p)
    for (pid, name), i in [*owners.items(), ((None, HIDDEN), -3), ((None, UNKNOWN), -2)]:
        mask = (a == i) | (b == i)
        if i < -1:  # a local end with no owner, and no known owner at the other end (hidden first: once)
            mask &= (a < 0) & (b < 0)
            if i == -2:
                mask &= (a != -3) & (b != -3)
        if not mask.any():
            continue
        rows.append({"process": name, "pid": pid, "packets": int(mask.sum()),
                     "bytes": int(p["wire_len"][mask].sum()), "connections": len(np.unique(conv[mask]))})
    rows.sort(key=lambda r: (-r["bytes"], r["process"]))
    return rows


def _conversation_ids(p: np.ndarray) -> np.ndarray:
    """One id per conversation (both directions together: the smaller end first)."""
    if not len(p):
        return np.zeros(0, dtype=np.int64)
    ends = np.empty(len(p), dtype=[("a", "S16"), ("ap", "<i4"), ("b", "S16"), ("bp", "<i4"), ("c", "u1")])
    swap = (p["src"] > p["dst"]) | ((p["src"] == p["dst"]) & (p["sport"] > p["dport"]))
    ends["a"] = np.where(swap, p["dst"], p["src"])
    ends["b"] = np.where(swap, p["src"], p["dst"])
    ends["ap"] = np.where(swap, p["dport"], p["sport"])
    ends["bp"] = np.where(swap, p["sport"], p["dport"])
    ends["c"] = p["cls"]
    return np.unique(ends, return_inverse=True)[1]


# ---------------------------------------------------------------------------------------------------
# Over all traffic: a consumer stage that attributes every counted TCP/UDP packet as it arrives.
# ---------------------------------------------------------------------------------------------------

WAITING = "not named yet"  # a port seen before the socket table's next read: kept apart, then named
OTHERS = "other processes (table full)"
_K = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F), np.uint64(0x165667B19E3779F9),
      np.uint64(0x27D4EB2F165667C5))
TICK_S = 0.25
# How long the stage lets batches gather before one call attributes them all: the work per call, not per
# packet, was most of the stage's cost (one call ~0.6 ms live: 100 ns/packet gathering 0.05 s of 100,000/s,
# 40 ns gathering 0.25 s). It checks every GATHER_STEP_S and stops early once half a call's worth (or half the
# queue's bound) is waiting, so a fast link fills its queue no more than with the former 0.05 s gather.
GATHER_S = 0.25
GATHER_STEP_S = 0.05
GATHER_MAX = 262_144  # packets attributed in one call at most
WAITING_MAX = 1024  # pairs of ends waiting for the socket table's next read; beyond, new ones count as 'unknown'
_NONE = 0x3FFFF  # a waiting pair's code for an end that is not this machine's


def _find(keys: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(position, found) of each wanted key in the sorted `keys` (both int64: no float comparison)."""
    pos = np.searchsorted(keys, wanted)
    if not len(keys):
        return pos, np.zeros(len(wanted), bool)
    return pos, keys[np.minimum(pos, len(keys) - 1)] == wanted


class _ConnIds:
    """The distinct connection ids of one tally: a Python set while small, then a native/detect.c set where it is
    built (one C pass per call: a Python set cost ~0.2 us an id, and a call repeats every live conversation's
    id; a C call costs ~6 us, more than a small set's work: a scan's waiting pairs hold one or two ids each)."""

    __slots__ = ("_nset", "_set")
    SMALL = 64  # ids held in a Python set before moving to a native one

    def __init__(self) -> None:
        self._nset = None
        self._set: set[int] = set()

    def __len__(self) -> int:
        return self._nset.n if self._nset is not None else len(self._set)

    def ids(self) -> np.ndarray:
        """Every id held, as uint64."""
        if self._nset is not None:
            return self._nset.keys[:self._nset.n].copy()
        return np.fromiter(self._set, np.uint64, len(self._set))

    def _grow(self) -> None:
        """Move the ids to a native set (when the compiled tables are built)."""
        from analysis import detect
        if detect._native_tables():
            held = self.ids()
            self._nset = detect._NSet(room=max(16, 2 * len(held)))
            detect._nset_add(self._nset, held)
            self._set = set()

    def add(self, ids: np.ndarray, room: int) -> tuple[int, bool]:
        """Add distinct ids while there is room: (how many were new and added, whether some new ones had none).
        Within the room the first new ids in `ids`' order are kept."""
        ids = np.ascontiguousarray(ids, np.uint64)
        before = len(self)
        if self._nset is None and before + len(ids) > self.SMALL:
            self._grow()
        if self._nset is not None:
            from analysis.detect import _nset_add
            if len(ids) > room:  # only the new ones count against the room: a lookup in the set (no sort)
                import ctypes

                from analysis.detect import _fn
                held = np.empty(len(ids), np.uint8)
                _fn("ntm_hset_has")(ctypes.byref(self._nset.struct()), ids.ctypes.data, len(ids), held.ctypes.data)
                ids = ids[held == 0]
                capped = len(ids) > room
                _nset_add(self._nset, ids[:max(room, 0)])
                return len(self) - before, capped
            _nset_add(self._nset, ids)
            return len(self) - before, False
        # A set difference walks the new ids only; their order matters only when some find no room.
        listed = ids.tolist()
        fresh = set(listed).difference(self._set) if before else set(listed)
        capped = len(fresh) > room
        self._set.update([c for c in listed if c in fresh][:max(room, 0)] if capped else fresh)
        return len(self) - before, capped


class _Tally:
    """Packets, bytes and distinct connections of one process (connections bounded: then '≥').

    The stage gives each add a room: what is left of its bound on connection ids held over all tallies."""

    __slots__ = ("bytes", "capped", "conns", "packets", "since")

    def __init__(self, since: float = 0.0) -> None:
        self.packets = self.bytes = 0
        self.conns = _ConnIds()
        self.capped = False
        self.since = since

    def add(self, packets: int, nbytes: int, conns: np.ndarray, room: int) -> int:
        """Count packets and bytes, and the connection ids while there is room; returns the ids added."""
        self.packets += packets
        self.bytes += nbytes
        if self.capped:
            return 0
        added, capped = self.conns.add(conns, room)
        self.capped |= capped
        return added

    def merge(self, other: _Tally, room: int) -> int:
        """Take another tally's counts (a waiting port now named); returns the connection ids added."""
        added = self.add(other.packets, other.bytes, other.conns.ids(), room)
        self.capped |= other.capped
        return added


def _end_hash(addrs: np.ndarray, ports: np.ndarray) -> np.ndarray:
    # The halves in native byte order: a hash needs no numeric value, and a byte swap would copy the lot.
    u = np.ascontiguousarray(addrs).view(np.uint64).reshape(-1, 2)
    return (u[:, 0] * _K[0]) ^ (u[:, 1] * _K[1]) ^ (ports.astype(np.uint64) * _K[2])


def conversation_hashes(p: np.ndarray) -> np.ndarray:
    """One 64-bit id per conversation (both directions alike: the sum of the two ends' hashes)."""
    with np.errstate(over="ignore"):
        return (_end_hash(p["src"], p["sport"]) + _end_hash(p["dst"], p["dport"])) ^ \
            (p["cls"].astype(np.uint64) * _K[3])


def conversations(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """The TCP/UDP records grouped by conversation: (ids sorted, one record of each, packets, wire bytes), or
    None when there are none. native/grouprows.c in one pass where built, else numpy (the reference)."""
    got = native.conv_tally(arr, TCP, UDP) if len(arr) else None
    if got is not None:
        conv, first, pk, by = got
        return (conv, take(arr, first), pk, by) if len(conv) else None
    return conversations_numpy(arr)


def conversations_numpy(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """conversations() in numpy: a sort of the 64-bit ids."""
    ip = (arr["cls"] == TCP) | (arr["cls"] == UDP)
    p = arr if ip.all() else arr[ip]
    if not len(p):
        return None
    conv, first, inv = np.unique(conversation_hashes(p), return_index=True, return_inverse=True)
    pk = np.bincount(inv, minlength=len(conv))
    by = np.bincount(inv, weights=p["wire_len"], minlength=len(conv)).astype(np.int64)
    return conv, p[first], pk, by


class ProcessTallies:
    """Per-process packets, bytes and connections over the TCP/UDP packets handed to tally().

    Each local end is keyed by (protocol, port) and named from the process table's last read: a dictionary
    lookup, never a psutil call (the table re-reads the socket table in its own thread). A port not in the
    table yet is kept apart for `grace_s` (the connection may be younger than the last read), then named
    by settle(), or counted as 'unknown'. A packet between two local processes counts for both; for one
    process at both ends, once. Where it runs: ProcessStage (a thread of the capturing process) or the
    detector worker process (WorkerAttribution), which already receives every batch."""

    def __init__(self, table: ProcessTable, max_entries: int = 10_000, conn_max: int = 200_000,
                 grace_s: float | None = None) -> None:
        self.table = table
        self.max_entries = max_entries
        self.conn_max = conn_max  # connection ids held over all tallies (8 bytes each, plus the set's)
        self._conns_held = 0
        self.grace_s = grace_s if grace_s is not None else max(3.0, 3 * table.refresh_s)
        self._lock = threading.Lock()
        self._named: dict[tuple[int | None, str], _Tally] = {}
        self._waiting: dict[int, _Tally] = {}  # key: a conversation's two ends, see _entities
        self._matcher = None
        self._matcher_at = 0.0
        self._index_of: dict | None = None
        self._index: tuple[np.ndarray, np.ndarray, list[tuple[int, str]]] = (np.zeros(0, np.int64),
                                                                             np.zeros(0, np.int64), [])

    def forget(self) -> None:
        """Forget every total (the page's Clear)."""
        with self._lock:
            self._named.clear()
            self._waiting.clear()
            self._conns_held = 0

    def warm(self) -> None:
        """Do a first call's one-time work now, before traffic: reading the interfaces' addresses (psutil's
        import) and numpy's first calls took ~85 ms of CPU, which under a CPU quota stalled the first
        batches long enough to lose packets (benchmarks/RESULTS.md). The row has no local end: nothing counts."""
        from analysis.headers import PACKET_DTYPE
        row = np.zeros(1, PACKET_DTYPE)
        row["cls"] = UDP
        self.tally(row)

    def waiting(self) -> bool:
        """Whether some ends wait for the socket table (settle() may then change the rows)."""
        return bool(self._waiting)

    def _local(self, addrs: np.ndarray) -> np.ndarray:
        now = time.monotonic()
        if self._matcher is None or now - self._matcher_at > 5.0:  # interfaces' addresses come and go
            from analysis.headers import LOOPBACK_NETS, LocalMatcher
            from capture.sources import local_addresses
            self._matcher, self._matcher_at = LocalMatcher(local_addresses(), LOOPBACK_NETS), now
        return self._matcher.kinds(addrs) == self._matcher.OURS

    def tally(self, arr: np.ndarray) -> None:
        """Attribute one batch.

        The batch is first grouped by conversation (one sort of 64-bit ids): a conversation's packets
        all have the same two ends, so locality and owners are looked up once per conversation."""
        grouped = conversations(arr)
        if grouped is None:
            return
        conv, f, pk, by = grouped
        udp = (f["cls"] == UDP).astype(np.int64) << 16
        la, lb = self._local(f["src"]), self._local(f["dst"])
        if not (la | lb).any():
            return
        ka = udp | (f["sport"].astype(np.int64) & 0xFFFF)
        kb = udp | (f["dport"].astype(np.int64) & 0xFFFF)
        ents, cols = self._entities(la, lb, ka, kb)
        # A conversation counts once for each distinct tally of its row (one process at both ends: once).
        cols.sort(axis=1)
        cols[:, 1:][cols[:, 1:] == cols[:, :-1]] = -1
        ids = cols.ravel()
        m = ids >= 0
        w = cols.shape[1]
        ids, cpk, cby, cconv = ids[m], np.repeat(pk, w)[m], np.repeat(by, w)[m], np.repeat(conv, w)[m]
        epk = np.bincount(ids, weights=cpk, minlength=len(ents))
        eby = np.bincount(ids, weights=cby, minlength=len(ents))
        # A stable sort of small ints is numpy's radix sort (~5x the general one on a scan's 50,000 rows).
        order = np.argsort(ids.astype(np.int16) if len(ents) < 1 << 15 else ids, kind="stable")
        bounds = np.searchsorted(ids[order], np.arange(len(ents) + 1))
        with self._lock:
            for e, tally in enumerate(ents):
                if epk[e]:
                    self._conns_held += tally.add(int(epk[e]), int(eby[e]), cconv[order[bounds[e]:bounds[e + 1]]],
                                                  self.conn_max - self._conns_held)

    def _entities(self, la: np.ndarray, lb: np.ndarray, ka: np.ndarray,
                  kb: np.ndarray) -> tuple[list[_Tally], np.ndarray]:
        """Per conversation, up to four tallies it counts into: the named process of each owned local end, and
        for its unowned local ends one waiting tally per pair of ends (so a conversation between two unowned
        ports waits, and later counts, once per distinct owner, not once per port), or, once WAITING_MAX
        pairs wait, 'unknown'/hidden at once (a scan's thousands of unowned ports cost no Python loop)."""
        okeys, oid, owners = self._owner_index()
        pa, oa = _find(okeys, ka)
        pb, ob = _find(okeys, kb)
        oa &= la
        ob &= lb
        wa, wb = la & ~oa, lb & ~ob
        cols = np.full((len(ka), 4), -1, np.int64)
        ents: list[_Tally] = []
        index: dict[int, int] = {}

        def ent(t: _Tally) -> int:
            j = index.get(id(t))
            if j is None:
                j = index[id(t)] = len(ents)
                ents.append(t)
            return j

        now = time.monotonic()
        with self._lock:
            upos = np.unique(np.concatenate((pa[oa], pb[ob])))
            # Per distinct owner, not per port: a process with thousands of ports (a sender, a server's
            # connections) is one tally, looked up once.
            uo = np.unique(oid[upos])
            of_owner = np.full(len(owners), -1, np.int64)
            of_owner[uo] = [ent(self._named_tally(owners[o])) for o in uo.tolist()]
            of_pos = np.full(len(okeys), -1, np.int64)
            of_pos[upos] = of_owner[oid[upos]]
            cols[:, 0] = np.where(oa, of_pos[np.minimum(pa, len(okeys) - 1)] if len(okeys) else -1, -1)
            cols[:, 1] = np.where(ob, of_pos[np.minimum(pb, len(okeys) - 1)] if len(okeys) else -1, -1)
            waits = np.flatnonzero(wa | wb)
            if not len(waits):
                return ents, cols
            # The pair's code: each end's key, bit 17 = owned (already counted under its name), NONE = not local.
            code = (np.where(la, ka | (oa.astype(np.int64) << 17), _NONE) << 18) | \
                np.where(lb, kb | (ob.astype(np.int64) << 17), _NONE)
            ucode, uinv = np.unique(code[waits], return_inverse=True)
            of_code = np.full(len(ucode), -1, np.int64)
            known = np.isin(ucode, np.fromiter(self._waiting, np.int64, len(self._waiting)))
            for i in np.flatnonzero(known).tolist():
                of_code[i] = ent(self._waiting[int(ucode[i])])
            new = np.flatnonzero(~known)
            if len(new):
                self.table.want()  # a new port: read the socket table now, while its connection is open
            room = max(0, min(self.max_entries, WAITING_MAX) - len(self._waiting))
            for i in new[:room].tolist():
                t = self._waiting[int(ucode[i])] = _Tally(now)
                of_code[i] = ent(t)
            cols[waits, 2] = of_code[uinv]
            over = waits[of_code[uinv] < 0]
            if len(over):  # no room to wait: each unowned end counts as hidden or unknown now
                hk = self._hidden_keys()
                for col, k, unowned in ((2, ka, wa), (3, kb, wb)):
                    rows = over[unowned[over]]
                    hid = np.isin(k[rows], hk)
                    if hid.any():
                        cols[rows[hid], col] = ent(self._named_tally((None, HIDDEN)))
                    if not hid.all():
                        cols[rows[~hid], col] = ent(self._named_tally((None, UNKNOWN)))
        return ents, cols

    def _owner_index(self) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
        """The process table's owners: (sorted keys, each key's owner as an index into the distinct owners, the
        distinct owners), rebuilt when the table is re-read."""
        src = self.table.owners()
        if src is not self._index_of:
            items = sorted(((1 << 16 if proto == "udp" else 0) | port, (v[0], v[1]))
                           for (proto, port), v in src.items())
            distinct: dict[tuple[int, str], int] = {}
            oid = np.array([distinct.setdefault(o, len(distinct)) for _, o in items], np.int64)
            self._index = (np.array([k for k, _ in items], np.int64), oid, list(distinct))
            self._index_of = src
        return self._index

    def _hidden_keys(self) -> np.ndarray:
        """The ports listed without a visible owner, as keys (udp<<16 | port)."""
        return np.fromiter(((1 << 16 if proto == "udp" else 0) | port for proto, port in self.table.hidden_ports()),
                           np.int64)

    def _unowned(self, key: int) -> tuple[None, str]:
        """The tally of a port with no owner: hidden (listed, owner not visible) or unknown."""
        return (None, HIDDEN) if self.table.hidden("udp" if key >> 16 else "tcp", key & 0xFFFF) else (None, UNKNOWN)

    def _named_tally(self, owner: tuple[int | None, str]) -> _Tally:
        t = self._named.get(owner)
        if t is None:
            if len(self._named) >= self.max_entries:
                owner = (None, OTHERS)
                t = self._named.get(owner)
            if t is None:
                t = self._named[owner] = _Tally()
        return t

    def settle(self) -> None:
        """Name the waiting ends the table now knows; after grace_s, count the rest as 'unknown' (or hidden).

        A waiting pair counts once for each distinct owner of its unowned ends, minus the owners its owned
        ends were already counted under (one process at both ends: once)."""
        now = time.monotonic()
        missed = False
        with self._lock:
            for code, t in list(self._waiting.items()):
                ends = [(part & 0x1FFFF, bool(part >> 17 & 1)) for part in (code >> 18, code & _NONE) if part != _NONE]
                found = {k: self._owner_of(k) for k, owned in ends if not owned}
                if None in found.values() and now - t.since < self.grace_s:
                    missed = True
                    continue
                counted = {self._owner_of(k) for k, owned in ends if owned}
                targets = {o or self._unowned(k) for k, o in found.items()} - counted
                self._conns_held -= len(t.conns)
                for target in sorted(targets, key=str):
                    self._conns_held += self._named_tally(target).merge(t, self.conn_max - self._conns_held)
                del self._waiting[code]
        if missed:  # some ends still wait: the table reads again (once an interval at most)
            self.table.want()

    def _owner_of(self, key: int) -> tuple[int, str] | None:
        # A plain look-up: settle() asks for a read once for all its misses (owner() would, per miss).
        v = self.table.owners().get(("udp" if key >> 16 else "tcp", key & 0xFFFF))
        return None if v is None else (v[0], v[1])

    def rows(self) -> list[dict[str, Any]]:
        """[{process, pid, packets, bytes, connections, connections_capped}], largest bytes first."""
        with self._lock:
            items = [(pid, name, t.packets, t.bytes, len(t.conns), t.capped) for (pid, name), t in
                     self._named.items()]
            if self._waiting:
                w = list(self._waiting.values())
                items.append((None, WAITING, sum(t.packets for t in w), sum(t.bytes for t in w),
                              sum(len(t.conns) for t in w), any(t.capped for t in w)))
        rows = [{"process": n, "pid": pid, "packets": p, "bytes": b, "connections": c, "connections_capped": cap}
                for pid, n, p, b, c, cap in items]
        rows.sort(key=lambda r: (-r["bytes"], r["process"]))
        return rows


class ProcessStage(Stage, ProcessTallies):
    """ProcessTallies in a thread of the capturing process, behind a bounded queue (analysis.stages.Stage: a
    capture that gets ahead skips whole batches and counts them). Used when the detectors run in a thread
    (DETECTORS_PROCESS off) or their worker could not start; otherwise WorkerAttribution in that worker."""

    name = "processes"

    def __init__(self, table: ProcessTable, max_packets: int, max_entries: int = 10_000,
                 conn_max: int = 200_000, grace_s: float | None = None) -> None:
        Stage.__init__(self, max_packets)
        ProcessTallies.__init__(self, table, max_entries, conn_max, grace_s)
        self._done = 0
        self._dropped = 0  # batches accepted, then dropped by a Clear before the thread took them
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def offer(self, arr: np.ndarray, wait: bool = False, abort: threading.Event | None = None) -> bool:
        """Hand a batch over (Stage.offer); nothing is taken once the stage is closing."""
        if self._stopping.is_set():
            self.stats.offered(len(arr), skipped=True)
            return False
        return super().offer(arr, wait, abort)

    def alive(self) -> bool:
        """Whether the attribution thread runs."""
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def start(self) -> ProcessStage:
        """Start the process table's refresh and this stage's thread."""
        self.table.feed(None)  # this stage's owners come from the table's own reads, not a former worker's
        self.table.start()
        self._thread = threading.Thread(target=self._loop, name="process-attribution", daemon=True)
        self._thread.start()
        return self

    def reset(self) -> None:
        """Forget every total and the counts of what was offered (the page's Clear)."""
        self._dropped += len(self.queue.drop_all())  # their packets were cleared with the counters
        self.stats = StageStats()
        self.forget()

    def drain(self, timeout: float | None, abort: threading.Event | None = None) -> bool:
        """Wait until every accepted batch is counted; False on timeout or a dead thread."""
        end = None if timeout is None else time.monotonic() + timeout
        while self._done + self._dropped < self._accepted:
            if not self.alive() or (abort is not None and abort.is_set()):
                return False
            if end is not None and time.monotonic() > end:
                return False
            time.sleep(0.02)
        return True

    def close(self, drain_s: float = 0.0) -> None:
        """Count what is queued (up to drain_s), then end the thread; safe to call twice."""
        if drain_s:
            self.drain(drain_s)
        self._stopping.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(5)
        for _, packets, at in self.queue.close():
            self.stats.lost(1, packets, at)

    def _loop(self) -> None:
        try:
            self.warm()
            while True:
                got = self.queue.get(TICK_S)
                if got is not None:
                    self._gather(*got)
                elif self._stopping.is_set():
                    break
                self.settle()
        except Exception as exc:  # attribution stops; capture and its counters go on
            log.exception("process attribution failed")
            self.error = f"process attribution failed: {type(exc).__name__}: {exc}"
            self.queue.close()

    def _gather(self, arr: np.ndarray, n: int) -> None:
        """Attribute this batch with those that arrive within GATHER_S (or until half a call's worth waits): a
        live ring hands over small batches, and the work per call, not per packet, was most of the cost
        (benchmarks/enrich_cost.py)."""
        arrs = [arr]
        enough = min(GATHER_MAX, self.queue.max_packets) // 2
        end = time.monotonic() + GATHER_S
        while n + self.queue.held < enough and time.monotonic() < end and not self._stopping.wait(GATHER_STEP_S):
            pass
        while n < GATHER_MAX:
            more = self.queue.get(0)
            if more is None:
                break
            arrs.append(more[0])
            n += more[1]
        self.tally(arrs[0] if len(arrs) == 1 else np.concatenate(arrs))
        self._done += len(arrs)
        st = self.stats
        st.analysed(st.batches_done + len(arrs), st.packets_done + n)


class WorkerAttribution:
    """ProcessTallies inside the detector worker process, which already receives every batch: attribution then
    costs the capturing process nothing per packet (in a thread there it took ~0.1 µs of CPU per packet under
    the GIL beside the capture's ~0.45: benchmarks/RESULTS.md). The worker runs as the same user as the page,
    so its own process table sees the same owners. Batches are gathered up to GATHER_S before one tally (the
    work per call, not per packet, was most of the cost), at most GATHER_MAX packets."""

    def __init__(self, refresh_s: float, max_entries: int, table: ProcessTable | None = None,
                 gather_s: float = GATHER_S) -> None:
        table = table if table is not None else ProcessTable(refresh_s=refresh_s, max_entries=max_entries)
        self.tallies = ProcessTallies(table, max_entries=max_entries)
        self.gather_s = gather_s
        self._held: list[np.ndarray] = []
        self._held_n = 0
        self._held_batches = 0
        self._since = 0.0
        self._settled = 0.0
        self.batches = self.packets = 0  # attributed since the last Clear
        self.error: str | None = None
        self._table_sent = -1  # the table's refreshes when its state last went out with a report

    def start(self) -> WorkerAttribution:
        """Start the table's refresh thread and do the first call's one-time work before traffic."""
        self.tallies.table.start()
        self.tallies.warm()
        return self

    def add(self, arr: np.ndarray, batches: int = 1) -> None:
        """Take what the detectors just analysed (`batches` batches joined into `arr`); tally once enough has
        gathered (at most GATHER_MAX // 2 packets plus one arrival wait: bounded)."""
        if self.error is not None:
            return
        if not self._held:
            self._since = time.monotonic()
        self._held.append(arr)
        self._held_n += len(arr)
        self._held_batches += batches
        if self._held_n >= GATHER_MAX // 2:
            self._flush()

    def tick(self, now: float) -> bool:
        """Tally what has gathered for GATHER_S, name waiting ends every TICK_S; True when the rows may have
        changed (a report is due)."""
        if self.error is not None:
            return False
        changed = False
        if self._held and now - self._since >= self.gather_s:
            changed = self._flush()
        if now - self._settled >= TICK_S:
            self._settled = now
            if self.tallies.waiting():
                self._guard(self.tallies.settle)
                changed = True
        return changed or self._table_news()

    def flush(self) -> bool:
        """Tally everything gathered now (before the worker's last report); True if anything was."""
        return bool(self._held) and self._flush()

    def _flush(self) -> bool:
        """Tally what is held; True (a report is due) whether or not the tally succeeded."""
        arrs, n, b = self._held, self._held_n, self._held_batches
        self._held, self._held_n, self._held_batches = [], 0, 0
        if self._guard(lambda: self.tallies.tally(arrs[0] if len(arrs) == 1 else np.concatenate(arrs))):
            self.batches += b
            self.packets += n
        return True

    def _guard(self, fn: Callable[[], object]) -> bool:
        """Run one step; a failure ends attribution (said in the report), never the detectors."""
        try:
            fn()
            return True
        except Exception as exc:
            log.exception("process attribution failed")
            self.error = f"process attribution failed: {type(exc).__name__}: {exc}"
            self._held, self._held_n, self._held_batches = [], 0, 0
            return False

    def reset(self) -> None:
        """The page's Clear: gathered batches were cleared with the counters; every total is forgotten."""
        self._held, self._held_n, self._held_batches = [], 0, 0
        self.batches = self.packets = 0
        self.tallies.forget()

    def report(self) -> dict[str, Any]:
        """What the engine shows: the rows, how much was attributed, and any error."""
        rows: list[dict[str, Any]] = []
        self._guard(lambda: rows.extend(self.tallies.rows()))  # a failure here must not end the detectors
        table = self.tallies.table
        fresh = self._table_news()  # the page's table mirrors each new read once
        self._table_sent = table.refreshes
        return {"rows": rows, "batches": self.batches, "packets": self.packets, "error": self.error,
                "table": table.state() if fresh else None}

    def _table_news(self) -> bool:
        """The table read again since its state last went out (never before its first read: an empty state
        would wipe the page's owners)."""
        n = self.tallies.table.refreshes
        return n > 0 and n != self._table_sent

    def want_table(self) -> None:
        """The page asked for a port its mirror does not know: read the socket table soon (ProcessTable.want)."""
        self.tallies.table.want()

    def stop(self) -> None:
        """Stop the table's refresh thread (it wakes at once; a read in progress takes ~20 ms)."""
        self.tallies.table.stop()
