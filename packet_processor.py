"""Capture engine: the capture thread, the rolling buffer and the cumulative counters.

One ``CaptureEngine`` per process reads a live interface or a capture file through the
same pipeline: records -> headers.parse (header fields from raw bytes, never payload) ->
packed batch -> ring buffer + counters. Readers get immutable ``Snapshot`` objects.

Command line::

    python packet_processor.py summary FILE
    python packet_processor.py capture --iface lo [--filter BPF] --seconds 10
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import queue
import struct
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

import config
import native
from analysis.detect import Alert, AlertBook, Detectors
from analysis.headers import (  # noqa: F401  - re-exported: the engine's public vocabulary
    CLASSES,
    DIRECTIONS,
    ICMP,
    ICMPV6,
    LOOPBACK_NETS,
    NON_IP,
    OTHER_IP,
    PACKET_DTYPE,
    TCP,
    UDP,
    LocalMatcher,
    addr_text,
    group_rows,
    pack_records,
    parse_batch,
    parse_frame,
    parse_nets,
)
from capture.sources import CaptureError, FileReader, LiveRing, Record, default_interface, local_addresses

log = logging.getLogger(__name__)
STOP_WAIT_S = 0.7  # the longest stop() waits for the capture thread

# ----------------------------------------------------------------------------------------
# Cumulative state
# ----------------------------------------------------------------------------------------

BIN_FIELDS = [f"pk_{d}" for d in DIRECTIONS] + [f"by_{d}" for d in DIRECTIONS] + [f"pk_{c}" for c in CLASSES]


class TopTable:
    """key -> packets, bytes (and first/last seen) for at most `cap` keys, merged batch by batch.

    Beyond `cap` keys the smallest (by packets; among equals the newest) are pruned down to 90 %,
    so a scan or a flood of spoofed sources cannot grow it without bound; the engine's totals are
    kept apart and never pruned.
    The state is one tuple, replaced whole, so a reader never sees keys and counts out of step.
    """

    def __init__(self, key_dtype: Any, cap: int, times: bool = False) -> None:
        self.cap = cap
        self.state = (np.empty(0, key_dtype), np.empty((0, 2), np.int64),  # keys; packets, bytes
                      np.empty((0, 2), np.float64) if times else None)  # first, last seen

    keys = property(lambda self: self.state[0])
    vals = property(lambda self: self.state[1])
    times = property(lambda self: self.state[2])

    def __len__(self) -> int:
        return len(self.state[0])

    def merged(self, keys: np.ndarray, wire: np.ndarray, ts: np.ndarray | None = None) -> tuple:
        """The state after counting one packet of `wire` bytes (seen at `ts`) per key; self is unchanged."""
        if not len(keys):
            return self.state
        fast = native.top_merge(self.state, keys, wire, ts)
        uniq, vals, times = fast if fast is not None else self.merged_numpy(keys, wire, ts)
        m = len(uniq)
        if m > self.cap:
            # The most packets win; among equal counts the older rows (a stable sort). argpartition
            # is no use here: with the many ties of a scan (counts of 1) it is 10x slower than this.
            keep = np.sort(np.argsort(-vals[:, 0], kind="stable")[:int(self.cap * 0.9)])
            return uniq[keep], vals[keep], None if times is None else times[keep]
        if fast is not None:  # copies, so the state does not pin the batch-sized buffers
            return uniq.copy(), vals.copy(), None if times is None else times.copy()
        return uniq, vals, times

    def merged_numpy(self, keys: np.ndarray, wire: np.ndarray, ts: np.ndarray | None = None) -> tuple:
        """merged's merge without the compiled helper and before pruning (its reference)."""
        old_keys, old_vals, old_times = self.state
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
        """The n largest as (key, packets, bytes, row), count descending, then by text(key) ascending."""
        keys, vals, _ = self.state
        if not len(keys):
            return []
        col = vals[:, 0 if by == "packets" else 1]
        k = min(n, len(col))
        cutoff = np.partition(col, len(col) - k)[len(col) - k]
        rows = np.flatnonzero(col >= cutoff)  # all rows tied at the cut-off, so ties sort by key
        keyed = [(-int(col[r]), text(keys[r]) if text else keys[r].item(), int(r)) for r in rows]
        keyed.sort()
        return [(key, int(vals[r, 0]), int(vals[r, 1]), r) for _, key, r in keyed[:n]]


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
        self.state = (np.arange(size, dtype=np.int32), np.zeros((size, 2), np.int64), None)

    def merged(self, keys: np.ndarray, wire: np.ndarray, ts: np.ndarray | None = None) -> tuple:
        """The state after counting one packet of `wire` bytes per key (bincount, no sorting)."""
        if not len(keys):
            return self.state
        keys = keys.astype(np.int64)
        vals = self.state[1].copy()
        vals[:, 0] += np.bincount(keys, minlength=self.cap)
        vals[:, 1] += np.bincount(keys, wire, self.cap).astype(np.int64)
        return self.state[0], vals, None

    def frozen(self) -> TopTable:
        """The keys seen so far, as a plain read-only TopTable."""
        keys, vals, _ = self.state
        seen = np.flatnonzero(vals[:, 0])
        t = TopTable(np.int32, self.cap)
        t.state = (keys[seen], vals[seen], None)
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
        self.bins: dict[int, np.ndarray] = {}  # second -> BIN_FIELDS counts

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
        rel, secs = pd.factorize(np.floor(ts).astype(np.int64))  # seconds: a hash table, not a sort
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
        # Capture files can jump by years between packets, so only the seconds present are kept.
        bins = self.bins
        for s, row in zip(secs, grid):
            cur = bins.get(s)
            if cur is None:
                bins[s] = row.copy()
            else:
                cur += row
        if len(bins) > bin_seconds:
            newest = max(bins)
            for s in [s for s in bins if s <= newest - bin_seconds]:
                del bins[s]


# ----------------------------------------------------------------------------------------
# Snapshot: what readers get
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """Where the capture stands, for the page and the CLI."""

    state: str  # idle, running, paused, stopped, finished, error
    source: str = ""
    error: str | None = None
    generation: int = 0
    alive: bool = False
    last_packet_ts: float | None = None
    last_batch_wall: float | None = None
    started_wall: float | None = None
    file_note: str = ""  # what a pcapng file says about itself (untrusted text from the file)


@dataclass(frozen=True)
class Snapshot:
    """An immutable copy of the engine's state at one moment."""

    packets: np.ndarray  # PACKET_DTYPE rows, oldest first, read-only
    totals: dict[str, Any]
    bins: np.ndarray  # (n, 1 + len(BIN_FIELDS)) int64: second, then BIN_FIELDS
    src: TopTable
    dst: TopTable
    tcp_dports: TopTable
    udp_dports: TopTable
    other_protos: TopTable
    conversations: TopTable
    status: Status
    buffer_size: int
    alerts: tuple[Alert, ...] = ()

    def top_addresses(self, which: str = "src", by: str = "packets", n: int = 10) -> list[dict[str, Any]]:
        """Top n addresses (outer IP source or destination), count descending then address ascending."""
        table = self.src if which == "src" else self.dst
        return [{"addr": a, "packets": p, "bytes": b}
                for a, p, b, _ in table.top(n, by, lambda k: addr_text(bytes(k)))]

    def top_ports(self, klass: str = "tcp", n: int = 10, by: str = "packets") -> list[tuple[int, int, int]]:
        """Top destination ports as (port, packets, bytes)."""
        table = self.tcp_dports if klass == "tcp" else self.udp_dports
        return [(int(port), p, b) for port, p, b, _ in table.top(n, by)]

    def top_conversations(self, n: int = 20, by: str = "bytes") -> list[dict[str, Any]]:
        """Top conversations (both directions together)."""
        out = []
        conv = self.conversations
        for key, pk, byt, r in conv.top(n, by):
            a, b, ap, bp, proto = CONV.unpack(bytes(key))
            out.append({"a": addr_text(a), "a_port": ap if ap >= 0 else None, "b": addr_text(b),
                        "b_port": bp if bp >= 0 else None, "proto": proto_name(proto), "packets": pk,
                        "bytes": byt, "first_ts": float(conv.times[r, 0]), "last_ts": float(conv.times[r, 1])})
        return out

    def rate(self, window_s: int, now: float | None = None) -> tuple[float, float]:
        """(packets/s, bits/s) over the last `window_s` whole seconds of capture time."""
        if not len(self.bins):
            return 0.0, 0.0
        end = int(now) if now is not None else int(self.bins[-1, 0])
        sel = (self.bins[:, 0] > end - window_s) & (self.bins[:, 0] <= end)
        pk = self.bins[sel, 1:5].sum()
        by = self.bins[sel, 5:9].sum()
        return pk / window_s, by * 8 / window_s


def proto_name(proto: int) -> str:
    """A short protocol name for an IP protocol number."""
    return _PROTO_NAMES.get(proto) or f"ip-{proto}"


_PROTO_NAMES = {6: "TCP", 17: "UDP", 1: "ICMP", 58: "ICMPv6", 2: "IGMP", 4: "IPIP", 41: "IPv6",
                47: "GRE", 50: "ESP", 51: "AH", 89: "OSPF", 103: "PIM", 112: "VRRP", 132: "SCTP"}


# ----------------------------------------------------------------------------------------
# Packets as a table
# ----------------------------------------------------------------------------------------

TCP_FLAG_NAMES = ((0x02, "SYN"), (0x10, "ACK"), (0x01, "FIN"), (0x04, "RST"), (0x08, "PSH"), (0x20, "URG"),
                  (0x40, "ECE"), (0x80, "CWR"), (0x100, "NS"))
ETHERTYPE_NAMES = {0x0806: "ARP", 0x88CC: "LLDP", 0x8035: "RARP", 0x88E5: "MACsec", 0x888E: "EAPOL",
                   0x8863: "PPPoE-D", 0x8864: "PPPoE", 0x8847: "MPLS", 0x88F7: "PTP", 0x0842: "WoL"}
CLASS_LABELS = ("TCP", "UDP", "ICMP", "ICMPv6")


def tcp_flags_text(flags: int) -> str:
    """'SYN ACK' style text for a TCP flags value."""
    return " ".join(name for bit, name in TCP_FLAG_NAMES if flags & bit)


def _protocol_label(cls: int, proto: int, ethertype: int) -> str:
    if cls < OTHER_IP:
        return CLASS_LABELS[cls]
    if cls == OTHER_IP:
        return proto_name(proto)
    if ethertype in ETHERTYPE_NAMES:
        return ETHERTYPE_NAMES[ethertype]
    return f"0x{ethertype:04x}" if ethertype > 1500 else "LLC"


def _text_column(values: np.ndarray, convert) -> np.ndarray:
    """Convert each distinct value once (addresses repeat a lot), then spread the texts back."""
    if not len(values):
        return np.array([], dtype=object)
    uniq, inv = np.unique(values, return_inverse=True)
    texts = np.array([convert(u) for u in uniq.tolist()], dtype=object)
    return texts[inv]


def _ports(values: np.ndarray) -> pd.arrays.IntegerArray:
    # Nullable integers: a missing port as None would turn the column into floats.
    return pd.arrays.IntegerArray(values.astype(np.int32), values < 0)


def packets_frame(p: np.ndarray, tz: Any = None) -> pd.DataFrame:
    """Packed packet rows as a DataFrame for tables and CSV (one column per header field)."""
    has_addr = (p["cls"] != NON_IP) | (p["arp_op"] != 0)
    src = _text_column(p["src"], addr_text)
    dst = _text_column(p["dst"], addr_text)
    if len(p):
        src[~has_addr] = ""
        dst[~has_addr] = ""
    keys = (p["cls"].astype(np.int64) << 32) | (p["proto"].astype(np.int64) & 0xFFFF) << 16 | p["ethertype"]
    proto = _text_column(keys, lambda k: _protocol_label(k >> 32, ((k >> 16) & 0xFFFF), k & 0xFFFF))
    is_tcp = p["cls"] == TCP
    flags = _text_column(np.where(is_tcp, p["tcp_flags"], 0), tcp_flags_text)
    t = pd.to_datetime(p["ts"], unit="s", utc=True)
    if tz is not None:
        t = t.tz_convert(tz)
    return pd.DataFrame({
        "time": t.strftime("%Y-%m-%d %H:%M:%S.%f").str[:-3] if len(p) else pd.Series([], dtype=object),
        "ts": p["ts"],
        "direction": np.array(DIRECTIONS, dtype=object)[p["direction"]] if len(p) else [],
        "protocol": proto,
        "source": src,
        "src port": _ports(p["sport"]),
        "destination": dst,
        "dst port": _ports(p["dport"]),
        "size": p["wire_len"].astype(np.int64),
        "captured": p["cap_len"].astype(np.int64),
        "TCP flags": flags,
        "ICMP type": _ports(p["icmp_type"].astype(np.int32)),
        "malformed": p["malformed"].astype(bool),
    })


def packets_csv(p: np.ndarray, tz: Any = None) -> bytes:
    """Packed packet rows as CSV (the dashboard's download of the whole buffer): header fields only."""
    return packets_frame(p, tz).to_csv(index=False).encode()


# ----------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """What to capture from: a live interface (with a BPF filter) or a capture file."""

    kind: str  # "live" or "file"
    iface: str = ""
    bpf: str = ""
    path: str = ""
    speed: float = 0.0  # files: 0 = as fast as possible, else original pace x speed

    def describe(self) -> str:
        """A one-line description for the page."""
        if self.kind == "file":
            pace = "at once" if self.speed <= 0 else f"replayed at {self.speed:g}x"
            return f"file {self.path} ({pace})"
        flt = f" filter {self.bpf!r}" if self.bpf else ""
        return f"interface {self.iface}{flt}"


def parsed_ahead(reader: FileReader, matcher: LocalMatcher, size: int) -> Iterator[np.ndarray]:
    """The file's parsed batches, read and parsed one batch ahead in a helper thread.

    The record walk and the parser are C (native/) that releases the GIL, so reading batch k+1
    overlaps counting batch k on a second core. The queue holds two batches at most; closing the
    iterator stops the helper. Without the compiled helpers this is correct, just not faster."""
    ready: queue.Queue = queue.Queue(maxsize=2)
    quit_ = threading.Event()
    end = object()

    def put(item: Any) -> bool:
        while not quit_.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for raw in reader.batches(size):
                if not put(parse_batch(raw, matcher)):
                    return
        except Exception as exc:  # handed to the consumer, which raises it in the capture thread
            put(exc)
            return
        put(end)

    helper = threading.Thread(target=produce, name="file-reader", daemon=True)
    helper.start()
    try:
        while True:
            item = ready.get()
            if item is end:
                return
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        quit_.set()
        helper.join(timeout=5)


_ENGINES: weakref.WeakSet[CaptureEngine] = weakref.WeakSet()


def engines() -> list[CaptureEngine]:
    """The engines alive in this process (the dashboard's is among them once a page has run)."""
    return list(_ENGINES)


def stop_all() -> None:
    """Stop every engine of this process (tests, and a clean exit)."""
    for engine in list(_ENGINES):
        engine.stop()


class CaptureEngine:
    """One capture (live or file) feeding a rolling buffer and cumulative counters; thread-safe."""

    def __init__(self, buffer_size: int | None = None, local_nets: str | None = None) -> None:
        _ENGINES.add(self)
        native.keep_freed_memory(config.get("MALLOC_KEEP_MB"))
        self.buffer_size = int(buffer_size or config.get("BUFFER_SIZE"))
        self._nets = parse_nets(local_nets if local_nets is not None else config.get("LOCAL_NETS"))
        self._lock = threading.Lock()
        self._ring = np.zeros(self.buffer_size, dtype=PACKET_DTYPE)
        self._ring_pos = 0
        self._ring_len = 0
        self._counters = Counters(config.get("TOP_TABLE_MAX"))
        self._detectors = Detectors()
        self.alerts = AlertBook()
        self._gen = 0
        self._state = "idle"
        self._error: str | None = None
        self._source: Source | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._live: LiveRing | None = None
        self._kernel_received = 0
        self._kernel_dropped = 0
        self._paused_skipped = 0
        self._last_batch_wall: float | None = None
        self._started_wall: float | None = None
        self._file_note = ""
        self._control = threading.Lock()  # serialises start/stop from many browser tabs

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, source: Source) -> bool:
        """Stop any running capture, reset the state and start `source`; False (with the error kept) on failure."""
        with self._control:
            self._stop_locked()
            with self._lock:
                self._gen += 1
                self._reset_locked()
                self._source = source
                self._error = None
                self._file_note = ""
                self._started_wall = time.time()
            live = None
            if source.kind == "live":
                iface = source.iface or config.get("INTERFACE") or default_interface()
                source = Source("live", iface=iface, bpf=source.bpf)
                try:
                    live = LiveRing(iface, source.bpf, block_size=config.get("RING_BLOCK_KB") * 1024,
                                    block_nr=config.get("RING_BLOCKS"), snaplen=config.get("SNAPLEN"),
                                    block_timeout_ms=config.get("RING_BLOCK_TIMEOUT_MS"))
                except CaptureError as exc:
                    self._set_error(str(exc))
                    return False
            with self._lock:
                self._source = source
                self._state = "running"
                self._live = live
            self._stop = threading.Event()
            self._paused.clear()
            self._thread = threading.Thread(target=self._run, args=(source, live, self._gen, self._stop),
                                            name=f"capture-{self._gen}", daemon=True)
            self._thread.start()
            return True

    def stop(self) -> None:
        """Stop the capture; returns within about a second, also on a silent link; safe to call twice."""
        with self._control:
            self._stop_locked()

    def _stop_locked(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            # Bounded so that stop() returns within a second even when many readers keep the
            # thread waiting for the GIL; a thread still finishing its last batch ends by itself.
            thread.join(timeout=STOP_WAIT_S)
            if thread.is_alive():
                # It sets the state itself on its way out; status() already says "stopped". The
                # lock is not taken here: the thread may hold it while it waits for the GIL.
                log.warning("capture thread %s is still finishing its last batch after %.1f s",
                            thread.name, STOP_WAIT_S)
                return
        with self._lock:
            if self._state in ("running", "paused"):
                self._state = "stopped"

    def pause(self) -> None:
        """Stop adding packets (live packets are read and skipped; a file replay waits)."""
        self._paused.set()
        with self._lock:
            if self._state == "running":
                self._state = "paused"

    def resume(self) -> None:
        """Add packets again after pause()."""
        self._paused.clear()
        with self._lock:
            if self._state == "paused":
                self._state = "running"

    def clear(self) -> None:
        """Empty the buffer and counters; the capture itself goes on."""
        with self._lock:
            self._reset_locked()

    def _reset_locked(self) -> None:
        self._ring_pos = 0
        self._ring_len = 0
        self._counters = Counters(config.get("TOP_TABLE_MAX"))
        self._detectors = Detectors()
        self.alerts.clear()
        self._last_batch_wall = None
        self._paused_skipped = 0
        if self._live is None:
            self._kernel_received = self._kernel_dropped = 0

    def _set_error(self, message: str) -> None:
        log.error("capture: %s", message)
        with self._lock:
            self._error = message
            self._state = "error"

    # -- the capture thread ------------------------------------------------------------

    def _run(self, source: Source, live: LiveRing | None, gen: int, stop: threading.Event) -> None:
        try:
            if live is not None:
                self._run_live(live, gen, stop)
            else:
                self._run_file(source, gen, stop)
        except CaptureError as exc:
            self._set_error(str(exc))
        except Exception as exc:  # the thread must never die silently
            log.exception("capture thread failed")
            self._set_error(f"capture stopped: {type(exc).__name__}: {exc}")
        finally:
            if live is not None:
                self._update_kernel_stats(live, gen)
                live.close()
            with self._lock:
                if live is not None and self._live is live:
                    self._live = None
                if gen == self._gen and stop.is_set() and self._state in ("running", "paused"):
                    self._state = "stopped"

    def _run_live(self, live: LiveRing, gen: int, stop: threading.Event) -> None:
        matcher = LocalMatcher(local_addresses(), LOOPBACK_NETS)
        refresh = config.get("ADDR_REFRESH_S")
        next_refresh = next_stats = time.monotonic()
        for records in live.batches(stop, config.get("POLL_MS")):
            now = time.monotonic()
            if now >= next_refresh:  # interfaces and addresses come and go during a capture
                matcher = LocalMatcher(local_addresses(), LOOPBACK_NETS)
                next_refresh = now + refresh
            if now >= next_stats:
                self._update_kernel_stats(live, gen)
                next_stats = now + 1.0
            if self._paused.is_set():
                with self._lock:
                    self._paused_skipped += len(records)
                continue
            self._ingest(parse_batch(records, matcher), gen)

    def _update_kernel_stats(self, live: LiveRing, gen: int) -> None:
        received, dropped = live.stats()
        with self._lock:
            if gen == self._gen:
                self._kernel_received, self._kernel_dropped = received, dropped

    def _run_file(self, source: Source, gen: int, stop: threading.Event) -> None:
        reader = FileReader(source.path)
        if source.speed > 0:
            self.ingest_records(self._paced(reader, source.speed, stop), gen, stop)
        else:
            batches = parsed_ahead(reader, LocalMatcher(nets=self._nets), config.get("BATCH_SIZE"))
            with contextlib.closing(batches):  # a stop ends the helper thread too
                for arr in batches:
                    self._note_file(reader, gen)
                    while self._paused.is_set() and not stop.is_set():
                        stop.wait(0.1)
                    if stop.is_set():
                        break
                    self._ingest(arr, gen)
            native.release_memory()  # the batches were large; the kept memory is not needed now
        self._note_file(reader, gen)
        with self._lock:
            if gen != self._gen:
                return
            if reader.error:
                self._error = reader.error
                self._state = "error"
            elif self._state in ("running", "paused") and not stop.is_set():
                self._state = "finished"

    def _note_file(self, reader: FileReader, gen: int) -> None:
        note = reader.describe_file()
        with self._lock:
            if gen == self._gen:
                self._file_note = note

    def _paced(self, records: Iterable[Record], speed: float, stop: threading.Event) -> Iterator[Record]:
        """Replay records at their original pace x speed (speed <= 0: as fast as possible)."""
        if speed <= 0:
            yield from records
            return
        t0 = first = None
        for rec in records:
            while self._paused.is_set() and not stop.is_set():
                stop.wait(0.1)
                t0 = None  # resume the pace from here, not from before the pause
            if t0 is None or first is None:
                t0, first = time.monotonic(), rec[0]
            delay = (rec[0] - first) / speed - (time.monotonic() - t0)
            if delay > 0 and stop.wait(min(delay, 5.0)):
                return
            yield rec

    def ingest_records(self, records: Iterable[Record], gen: int | None = None,
                       stop: threading.Event | None = None) -> None:
        """Feed records through the pipeline in batches (the file path, and tests' crafted frames)."""
        gen = self._gen if gen is None else gen
        matcher = LocalMatcher(nets=self._nets)
        size = config.get("BATCH_SIZE")
        batch: list[Record] = []
        last_flush = time.monotonic()
        for rec in records:
            batch.append(rec)
            # Flush full batches, and paced replays at least every 0.2 s so the page moves.
            if len(batch) >= size or time.monotonic() - last_flush > 0.2:
                self._ingest(pack_records(batch, matcher), gen)
                batch, last_flush = [], time.monotonic()
                if stop is not None and stop.is_set():
                    return
        if batch:
            self._ingest(pack_records(batch, matcher), gen)

    def _ingest(self, arr: np.ndarray, gen: int) -> None:
        """Append a packed batch to the ring and the counters; batches of an old generation are dropped."""
        if not len(arr):
            return
        with self._lock:
            counters, detectors = self._counters, self._detectors
            if gen != self._gen:
                return
        # Only the capture thread writes the counters, so the heavy merge runs outside the lock;
        # a clear() or restart in the meantime replaces `counters`, and this batch is dropped.
        update = counters.prepare(arr)
        detectors.observe(arr, self.alerts)
        with self._lock:
            if gen != self._gen or counters is not self._counters:
                return
            self._write_ring(arr)
            counters.apply(update, config.get("BIN_SECONDS"))
            self._last_batch_wall = time.time()

    def _write_ring(self, arr: np.ndarray) -> None:
        cap = self.buffer_size
        if len(arr) >= cap:
            self._ring[:] = arr[-cap:]
            self._ring_pos, self._ring_len = 0, cap
            return
        end = self._ring_pos + len(arr)
        if end <= cap:
            self._ring[self._ring_pos:end] = arr
        else:
            first = cap - self._ring_pos
            self._ring[self._ring_pos:] = arr[:first]
            self._ring[:end - cap] = arr[first:]
        self._ring_pos = end % cap
        self._ring_len = min(cap, self._ring_len + len(arr))

    # -- readers -----------------------------------------------------------------------

    @property
    def source(self) -> Source | None:
        """What the capture reads (the last one started)."""
        with self._lock:
            return self._source

    def status(self) -> Status:
        """The capture's state, error and health."""
        with self._lock:
            return self._status_locked()

    def _status_locked(self) -> Status:
        thread = self._thread
        c = self._counters
        state = self._state
        if self._stop.is_set() and state in ("running", "paused"):
            state = "stopped"  # a stop was asked for; the thread may still be finishing a batch
        return Status(state=state, source=self._source.describe() if self._source else "",
                      error=self._error, generation=self._gen, alive=bool(thread and thread.is_alive()),
                      last_packet_ts=c.last_ts, last_batch_wall=self._last_batch_wall,
                      started_wall=self._started_wall, file_note=self._file_note)

    def snapshot(self) -> Snapshot:
        """An immutable copy of the buffer and counters; the lock is held only for the copies."""
        with self._lock:
            if self._ring_len < self.buffer_size:
                rows = self._ring[:self._ring_len].copy()
            else:
                rows = np.concatenate((self._ring[self._ring_pos:], self._ring[:self._ring_pos]))
            c = self._counters
            totals = self._totals_locked(c)
            bins = sorted(c.bins.items())
            tables = (c.src.frozen(), c.dst.frozen(), c.tcp_dports.frozen(), c.udp_dports.frozen(),
                      c.other_protos.frozen(), c.conversations.frozen())
            status = self._status_locked()
        alerts = tuple(self.alerts.alerts())
        rows.flags.writeable = False
        grid = np.array([[s, *v] for s, v in bins], dtype=np.int64).reshape(-1, 1 + len(BIN_FIELDS))
        grid.flags.writeable = False
        return Snapshot(rows, totals, grid, *tables, status=status, buffer_size=self.buffer_size, alerts=alerts)

    def _totals_locked(self, c: Counters) -> dict[str, Any]:
        return {
            "packets": c.packets, "bytes": c.bytes, "bytes_captured": c.bytes_captured,
            "malformed": c.malformed, "dropped": self._kernel_dropped,
            "kernel_received": self._kernel_received, "paused_skipped": self._paused_skipped,
            "transport_counts": dict(zip(CLASSES, c.cls_packets.tolist())),
            "transport_bytes": dict(zip(CLASSES, c.cls_bytes.tolist())),
            "direction_counts": dict(zip(DIRECTIONS, c.dir_packets.tolist())),
            "direction_bytes": dict(zip(DIRECTIONS, c.dir_bytes.tolist())),
            "first_ts": c.first_ts, "last_ts": c.last_ts, "min_ts": c.min_ts, "max_ts": c.max_ts,
            "buffer_len": self._ring_len,
        }

    def summary(self) -> dict[str, Any]:
        """The whole capture as one JSON-ready dict (the keys check_accuracy.py compares, and more)."""
        snap = self.snapshot()
        t = snap.totals
        duration = (t["last_ts"] - t["first_ts"]) if t["packets"] else 0.0
        return {
            "packets": t["packets"], "bytes_wire": t["bytes"], "bytes_captured": t["bytes_captured"],
            "transport_counts": t["transport_counts"], "transport_bytes": t["transport_bytes"],
            "direction_counts": t["direction_counts"], "direction_bytes": t["direction_bytes"],
            "other_ip_protocols": {str(p): n for p, n, _, _ in sorted(snap.other_protos.top(256))},
            "top10_src_by_packets": snap.top_addresses("src", "packets"),
            "top10_src_by_bytes": snap.top_addresses("src", "bytes"),
            "top10_dst_by_packets": snap.top_addresses("dst", "packets"),
            "top10_tcp_dst_ports": [[p, c] for p, c, _ in snap.top_ports("tcp")],
            "top10_udp_dst_ports": [[p, c] for p, c, _ in snap.top_ports("udp")],
            "first_ts": t["first_ts"], "last_ts": t["last_ts"], "min_ts": t["min_ts"], "max_ts": t["max_ts"],
            "duration_s": duration, "malformed": t["malformed"], "dropped": t["dropped"],
            "error": snap.status.error,
            "alerts": [a.as_dict() for a in snap.alerts],
        }

    def load_file(self, path: str) -> dict[str, Any]:
        """Read a whole capture file in the calling thread and return the summary."""
        with self._control:
            self._stop_locked()
            with self._lock:
                self._gen += 1
                self._reset_locked()
                self._source = Source("file", path=path)
                self._state = "running"
                self._error = None
            self._run_file(self._source, self._gen, threading.Event())
        return self.summary()


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def _cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Network Traffic Monitor capture engine")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summary", help="read a pcap/pcapng file and print its JSON summary")
    s.add_argument("file")
    s.add_argument("--local-nets", default=None, help="networks counted as local (default: config LOCAL_NETS)")
    c = sub.add_parser("capture", help="capture live for N seconds and print the JSON summary")
    c.add_argument("--iface", default="", help="interface (default: the default route's)")
    c.add_argument("--filter", default="", help="BPF capture filter")
    c.add_argument("--seconds", type=float, default=10.0)
    from fleet import cli as fleet_cli  # sensor; import/history (also --clickhouse); imported late: it imports us
    fleet_cli.add_subcommands(sub)
    args = ap.parse_args(argv)
    logging.basicConfig(level=config.get("LOG_LEVEL"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd in fleet_cli.COMMANDS:
        return fleet_cli.run(args)
    if args.cmd == "summary":
        engine = CaptureEngine(local_nets=args.local_nets)
        out = engine.load_file(args.file)
    else:
        engine = CaptureEngine()
        ok = engine.start(Source("live", iface=args.iface, bpf=args.filter))
        if ok:
            engine._stop.wait(args.seconds)
        engine.stop()
        out = engine.summary()
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0 if not out["error"] or args.cmd == "summary" else 1


if __name__ == "__main__":
    sys.exit(_cli())
