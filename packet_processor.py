"""Capture engine: the capture thread, the rolling buffer and the cumulative counters.

One ``CaptureEngine`` per process reads a live interface or a capture file through the
same pipeline: records -> headers.parse (header fields from raw bytes, never payload) ->
packed batch -> ring buffer + counters, and -> the consumer stages (analysis/stages.py: the
detectors, in a worker process behind a bounded queue; capture never waits for them). Readers
get immutable ``Snapshot`` objects.

Exit status of the CLI: 0 when all went well; ``summary`` gives 2 when the file could not be read
to its end and 1 when nothing could be read (its JSON is printed either way); 1 for a bad setting.

Command line::

    python packet_processor.py summary FILE
    python packet_processor.py capture --iface lo [--filter BPF] --seconds 10
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if __name__ == "__main__":
    # Before numpy loads: its OpenBLAS starts a thread per core that spins ~70 ms of CPU at start-up, on the
    # core the detectors' worker needs, and nothing here does linear algebra (a user's setting stays).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # after the setting above

import config
import native
from analysis.counters import (  # noqa: F401  - re-exported: tests and benchmarks import them from here
    ADDR_KEY,
    BIN_FIELDS,
    CONV,
    CONV_KEY,
    Counters,
    DenseTable,
    TopTable,
    _conversation_keys,
    conversation_keys_numpy,
    space_saving,
)
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
from analysis.stages import AlertMirror, DetectorStage
from capture.nic import nic_counters, nic_dropped_since
from capture.sources import CaptureError, FileReader, LiveRing, Record, default_interface, local_addresses

if TYPE_CHECKING:  # the detectors, pandas and the history writer load where they run: the worker, the page
    import pandas as pd

    from analysis.detect import Alert
    from store.stage import StoreStage

log = logging.getLogger(__name__)
STOP_WAIT_S = 0.7  # the longest stop() waits for the capture thread

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
        return [{"addr": a, "packets": p, "bytes": b, **_bounds(table, r, by)}
                for a, p, b, r in table.top(n, by, key_text)]

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
                        "bytes": byt, "first_ts": float(conv.times[r, 0]), "last_ts": float(conv.times[r, 1]),
                        **_bounds(conv, r, by)})
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


def _marked(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Top entries for the summary JSON: exact ones as {addr, packets, bytes}; approximate ones also
    carry approx: true, error (of the count ranked by), packets_error and bytes_error."""
    bounds = ("error", "packets_error", "bytes_error", "approx")
    return [e if e["approx"] else {k: v for k, v in e.items() if k not in bounds} for e in entries]


def key_text(key) -> str:
    """An address table's key (16 bytes) as text: the one function its top() is asked with (top() remembers
    answers per function)."""
    return addr_text(bytes(key))


def _bounds(table: TopTable, row: int, by: str) -> dict[str, Any]:
    """A top entry's error bounds: the true count is at least count - error (error 0: exact).

    `error` is the bound of the count the list is ranked by; `approx` says whether either is inexact."""
    pk, by_ = table.error(row)
    return {"error": pk if by == "packets" else by_, "packets_error": pk, "bytes_error": by_,
            "approx": bool(pk or by_)}


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
    import pandas as pd

    # Nullable integers: a missing port as None would turn the column into floats.
    return pd.arrays.IntegerArray(values.astype(np.int32), values < 0)


# pandas' datetime64[ns] spans 1677..2262; pcapng allows timestamps far beyond (and a clock can be
# wrong). Inside this margin the time zone's offset cannot push a value out of range.
_TS_LIMIT_S = 9.0e9


def _time_text(ts: np.ndarray, tz: Any) -> np.ndarray:
    """'YYYY-mm-dd HH:MM:SS.mmm' per timestamp; outside pandas' range the seconds since 1970 instead."""
    import pandas as pd

    if not len(ts):
        return np.array([], dtype=object)
    ok = np.isfinite(ts) & (np.abs(ts) < _TS_LIMIT_S)
    t = pd.to_datetime(np.where(ok, ts, 0.0), unit="s", utc=True)
    if tz is not None:
        t = t.tz_convert(tz)
    text = np.asarray(t.strftime("%Y-%m-%d %H:%M:%S.%f").str[:-3], dtype=object)
    for i in np.flatnonzero(~ok):
        text[i] = f"{ts[i]:.6f} s since 1970 (beyond the calendar's range)"
    return text


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
    import pandas as pd

    return pd.DataFrame({
        "time": _time_text(p["ts"], tz),
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
        "vlan": p["vlan"].astype(np.int64),  # the outer 802.1Q/802.1ad VLAN id, 0 when untagged
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
    promisc: bool = True  # live: promiscuous mode (the PROMISC setting off turns it off everywhere)

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


def _open_store(path: str | None) -> Any:
    """The embedded history store at `path` (default: STORE, else the per-user folder), opened; an
    error (read-only folder, in use by another process) is its state, shown by the page."""
    from store.embedded import EmbeddedStore  # DuckDB is loaded only by an engine that keeps history

    store = EmbeddedStore(path or None)
    store.open()
    return store


def engines() -> list[CaptureEngine]:
    """The engines alive in this process (the dashboard's is among them once a page has run)."""
    return list(_ENGINES)


def stop_all() -> None:
    """Stop every engine of this process (tests, and a clean exit)."""
    for engine in list(_ENGINES):
        engine.stop()


class CaptureEngine:
    """One capture (live or file) feeding a rolling buffer and cumulative counters; thread-safe."""

    def __init__(self, buffer_size: int | None = None, local_nets: str | None = None, record: bool = False,
                 store_path: str | None = None) -> None:
        """record: write live captures into the history store (store_path, else STORE or the per-user
        folder), which is opened here so the page can query it before any capture starts."""
        config.validate()  # a bad setting is a clear error here, not a crash in the capture thread later
        _ENGINES.add(self)
        native.keep_freed_memory(config.get("MALLOC_KEEP_MB"))
        self.buffer_size = int(buffer_size or config.get("BUFFER_SIZE"))
        self._nets = parse_nets(local_nets if local_nets is not None else config.get("LOCAL_NETS"))
        self._lock = threading.Lock()
        self._ring = np.zeros(self.buffer_size, dtype=PACKET_DTYPE)
        self._ring_pos = 0
        self._ring_len = 0
        self._counters = Counters(config.get("TOP_TABLE_MAX"))
        self.alerts = AlertMirror()  # the detector stage's alerts, for the page (one per engine)
        self._stage: DetectorStage | None = None  # the consumer stage of the current generation
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
        self._kernel_base = (0, 0)  # the ring's (received, dropped) at the last Clear
        self._stats_wall = 0.0  # when the ring's counters were last read (monotonic)
        # One reading of the ring's counters at a time: a reader's older reading stored after the
        # capture thread's last one would otherwise hide the packets left in the ring at stop.
        self._stats_read = threading.Lock()
        self._nic_base: dict[str, int] | None = None  # the NIC's counters when the capture started (or Clear)
        self._nic_now: dict[str, int] | None = None
        self._file_dropped: int | None = None
        self._paused_skipped = 0
        self._last_batch_wall: float | None = None
        self._started_wall: float | None = None
        self._file_note = ""
        self._control = threading.Lock()  # serialises start/stop from many browser tabs
        self._store_stage: StoreStage | None = None  # the history writer of the current live capture
        self._proc_stage: Any = None  # enrich.attribution.ProcessStage of a live capture (ENRICHMENT on)
        self.store = _open_store(store_path) if record else None  # queried by the page through this object
        self._attach_notify()

    def _attach_notify(self) -> None:
        """Alerts leave the engine here, whatever the front-end (page, headless capture, fleet sensor): the
        delivery stage follows the alert mirror; rules and detector settings come from the store."""
        from notify.control import AlertControls
        from notify.notifier import Notifier

        self.notifier = Notifier()
        self.alerts.subscribe(self.notifier.offer)
        self.controls = AlertControls(self.store, self.notifier, lambda: self._stage,
                                      [str(n) for n in self._nets])

    @property
    def _detectors(self) -> Any:
        """The detectors' state when they run inline (crafted frames fed by hand; tests inspect it)."""
        stage = self._stage
        return None if stage is None or stage._inline is None else stage._inline[1]

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
            # The worker first: a forked one must not inherit the capture socket and its ring.
            stage = self._new_stage(self._gen)
            live = None
            if source.kind == "live":
                stage.yield_to_capture()
                iface = source.iface or config.get("INTERFACE") or default_interface()
                source = Source("live", iface=iface, bpf=source.bpf, promisc=source.promisc)
                try:
                    live = LiveRing(iface, source.bpf, block_size=config.get("RING_BLOCK_KB") * 1024,
                                    block_nr=config.get("RING_BLOCKS"), snaplen=config.get("SNAPLEN"),
                                    block_timeout_ms=config.get("RING_BLOCK_TIMEOUT_MS"),
                                    promisc=source.promisc and bool(config.get("PROMISC")))
                except CaptureError as exc:
                    stage.close()
                    self._set_error(str(exc))
                    return False
            nic = nic_counters(source.iface) if live is not None else None
            self.notifier.iface = source.iface or ""
            with self._lock:
                self._source = source
                self._state = "running"
                self._live = live
                self._nic_base = self._nic_now = nic
                self._kernel_received = self._kernel_dropped = 0
                self._kernel_base = (0, 0)
                self._stage = stage
                self._store_stage = self._new_store_stage(source) if live is not None else None
                self._proc_stage = self._new_process_stage(stage) if live is not None else None
            self._stop = threading.Event()
            self._paused.clear()
            self._thread = threading.Thread(target=self._run, args=(source, live, self._gen, self._stop),
                                            name=f"capture-{self._gen}", daemon=True)
            self._thread.start()
            return True

    def stop(self, drain_s: float = 0.0) -> None:
        """Stop the capture; returns within about a second, also on a silent link; safe to call twice.

        drain_s: how long the consumer stages may take to finish the batches already queued
        (the headless CLI waits for the last alerts; the page does not)."""
        with self._control:
            self._stop_locked(drain_s)

    def _new_stage(self, gen: int, inline: bool = False) -> DetectorStage:
        """A fresh detector stage (and alert book) for one capture: the worker process is started here."""
        mode = "inline" if inline else ("process" if config.get("DETECTORS_PROCESS") else "thread")
        stage = DetectorStage(gen, self.alerts, config.get("STAGE_QUEUE_PACKETS"), mode=mode)
        try:
            stage.start()
            self.controls.apply(stage)  # the page's thresholds, switches and exclusion rules, before any batch
            return stage
        except OSError as exc:  # no process could be started: counting goes on, the page says why
            stage.error = f"detector process could not start: {exc}"
            log.error("%s", stage.error)
            return stage

    def _new_store_stage(self, source: Source) -> StoreStage | None:
        """The history writer of a live capture (files enter history only through `import`)."""
        if self.store is None:
            return None
        from store.stage import StoreStage  # with pandas: `summary` of a file never loads them

        sensor = config.get("STORE_SENSOR") or None
        return StoreStage(self.store, config.get("STAGE_QUEUE_PACKETS"), iface=source.iface, sensor=sensor,
                          mirror=self.alerts).start()

    @staticmethod
    def _new_process_stage(detectors: DetectorStage) -> Any:
        """Per-process totals over every packet of a live capture (off with ENRICHMENT): in the detector worker
        process, which already receives every batch, so the capturing process pays nothing per packet; in a
        thread of this process when there is no worker (DETECTORS_PROCESS off, or it could not start)."""
        if not config.get("ENRICHMENT"):
            return None
        from enrich.processes import shared_table
        # The page's table (its columns name the same ports) mirrors the worker's reads: no second reader here;
        # a port the page asks for and the mirror lacks is read for by the worker.
        table = shared_table()
        in_worker = detectors.attribute(config.get("PROCESS_REFRESH_S"), config.get("ENRICH_CACHE_MAX"),
                                        on_table=table.feed)
        if in_worker is not None:
            table.forward_want = detectors.want_table
            return in_worker
        from enrich.attribution import ProcessStage
        return ProcessStage(shared_table(), config.get("STAGE_QUEUE_PACKETS"),
                            max_entries=config.get("ENRICH_CACHE_MAX")).start()

    def close_store(self, notify_drain_s: float = 0.0) -> None:
        """Stop recording and close the history store (at exit); safe to call twice."""
        self.stop()
        self.notifier.close(notify_drain_s)
        if self.store is not None:
            self.store.close()

    def history_state(self) -> dict[str, Any] | None:
        """The history store's state for the page (None when this engine keeps no history)."""
        if self.store is None:
            return None
        stage = self._store_stage
        if stage is not None:
            return stage.state()
        st = self.store.status()
        return {"state": st.state, "path": st.path, "message": st.message, "moved_aside": st.moved_aside,
                "pending": st.pending, "batches_dropped": st.batches_dropped, "packets_dropped": st.packets_dropped,
                "history_skipped": 0, "last_write_wall": st.last_write_wall, "recording": False}

    def _stop_locked(self, drain_s: float = 0.0) -> None:
        self._stop.set()
        try:
            self._join_capture_thread()
        finally:
            stage = self._stage
            if stage is not None:
                stage.close(drain_s)
            store_stage = self._store_stage
            if store_stage is not None:  # after the capture thread: every counted batch is in its queue
                store_stage.close(drain_s)
            if self._proc_stage is not None:
                self._proc_stage.close(drain_s)
        with self._lock:
            if self._state in ("running", "paused"):
                self._state = "stopped"

    def _join_capture_thread(self) -> None:
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
        """Empty the buffer, counters and alerts; the capture itself goes on (drops count from here)."""
        with self._lock:
            live = self._live
        if live is not None:  # the kernel's counts now, not as last read (they are read once a second)
            self._update_kernel_stats(live, self._gen)
        with self._lock:
            self._reset_locked()
            stage = self._stage
            self._kernel_base = (self._kernel_received, self._kernel_dropped)
            self._nic_base = self._nic_now
            proc_stage = self._proc_stage
        if stage is not None:
            stage.reset()
        if proc_stage is not None:
            proc_stage.reset()
        self.alerts.clear()

    def _reset_locked(self) -> None:
        self._ring_pos = 0
        self._ring_len = 0
        self._counters = Counters(config.get("TOP_TABLE_MAX"))
        self._last_batch_wall = None
        self._paused_skipped = 0
        self._file_dropped = None
        if self._live is None:
            self._kernel_received = self._kernel_dropped = 0
            self._kernel_base = (0, 0)
            self._nic_base = self._nic_now = None

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
            self._ingest(parse_batch(records, matcher), gen)  # live: a consumer that falls behind skips

    def _refresh_kernel_stats(self) -> None:
        """Re-read the ring's and NIC's counters when the capture thread has not for a second (it reads
        them as batches arrive, so on a link gone quiet the last drops would otherwise never show)."""
        with self._lock:
            live, gen, last = self._live, self._gen, self._stats_wall
        if live is None or time.monotonic() - last <= 1.0:
            return
        # A reader never queues behind another reading (twenty tabs would, and the capture thread's own
        # readings behind them): when one is under way, the counters are about to be fresh anyway.
        if not self._stats_read.acquire(blocking=False):
            return
        try:
            if time.monotonic() - self._stats_wall > 1.0:
                with contextlib.suppress(OSError, ValueError):  # the ring may be closing right now
                    self._read_kernel_stats(live, gen)
        finally:
            self._stats_read.release()

    def _update_kernel_stats(self, live: LiveRing, gen: int) -> None:
        with self._stats_read:
            self._read_kernel_stats(live, gen)

    def _read_kernel_stats(self, live: LiveRing, gen: int) -> None:
        """Read and store the counters; the caller holds _stats_read (one reading at a time)."""
        self._stats_wall = time.monotonic()
        received, dropped = live.stats()
        nic = nic_counters(live.iface)
        with self._lock:
            if gen == self._gen:
                self._kernel_received, self._kernel_dropped = received, dropped
                if nic is not None:
                    self._nic_now = nic

    def _run_file(self, source: Source, gen: int, stop: threading.Event) -> None:
        # A file's reader waits for the consumer stages (wait=True below): nothing arrives while it
        # waits, so a file cannot overflow and every batch is analysed, unlike a live capture.
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
                    self._ingest(arr, gen, wait=stop)
            native.release_memory()  # the batches were large; the kept memory is not needed now
        self._note_file(reader, gen)
        self._finish_stage(gen, stop)
        with self._lock:
            if gen != self._gen:
                return
            self._file_dropped = getattr(reader, "capturer_drops", None)
            if reader.error:
                self._error = reader.error
                self._state = "error"
            elif self._state in ("running", "paused") and not stop.is_set():
                self._state = "finished"

    def _finish_stage(self, gen: int, stop: threading.Event) -> None:
        """At a file's end: wait until the detectors have analysed every batch, then end their worker."""
        with self._lock:
            stage = self._stage if gen == self._gen else None
        if stage is not None and stage.drain(None, abort=stop):
            stage.close()

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
        """Feed records through the pipeline in batches (paced files, and tests' crafted frames).

        Like a file, it waits for the detectors: with no capture started, they run in this thread."""
        gen = self._gen if gen is None else gen
        wait = stop if stop is not None else threading.Event()
        with self._lock:
            if self._stage is None and gen == self._gen:
                self._stage = self._new_stage(gen, inline=True)
        matcher = LocalMatcher(nets=self._nets)
        size = config.get("BATCH_SIZE")
        batch: list[Record] = []
        last_flush = time.monotonic()
        for rec in records:
            batch.append(rec)
            # Flush full batches, and paced replays at least every 0.2 s so the page moves.
            if len(batch) >= size or time.monotonic() - last_flush > 0.2:
                self._ingest(pack_records(batch, matcher), gen, wait)
                batch, last_flush = [], time.monotonic()
                if stop is not None and stop.is_set():
                    return
        if batch:
            self._ingest(pack_records(batch, matcher), gen, wait)

    def _ingest(self, arr: np.ndarray, gen: int, wait: threading.Event | None = None) -> None:
        """Append a packed batch to the ring and the counters, and offer it to the consumer stages;
        batches of an old generation are dropped.

        wait: None for live capture (a stage that cannot take the batch skips it and counts it), else
        the stop event of a file, whose reader waits for the stages until it is set."""
        if not len(arr):
            return
        with self._lock:
            counters, stage, store_stage = self._counters, self._stage, self._store_stage
            proc_stage = self._proc_stage
            if gen != self._gen:
                return
        if stage is not None:  # first, so the detectors work on it while this thread counts
            stage.offer(arr, wait=wait is not None, abort=wait)
        if store_stage is not None:
            store_stage.offer(arr, wait=wait is not None, abort=wait)
        if proc_stage is not None:
            proc_stage.offer(arr, wait=wait is not None, abort=wait)
        # Only the capture thread writes the counters, so the heavy merge runs outside the lock;
        # a clear() or restart in the meantime replaces `counters`, and this batch is dropped.
        update = counters.prepare(arr)
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

    def losses(self) -> dict[str, int]:
        """The capture's loss counters (ring and NIC drops, the detector stage's skips), without the
        snapshot's copies: a fleet sensor ships them with every flush."""
        self._refresh_kernel_stats()
        with self._lock:
            ring = self._kernel_dropped - self._kernel_base[1]
            nic = nic_dropped_since(self._nic_base, self._nic_now)
            stage = self._stage
        d = stage.as_dict() if stage is not None else {}
        return {"ring_dropped": int(ring), "nic_dropped": int(nic or 0),
                "detect_skipped_packets": int(d.get("packets_skipped", 0)),
                "detect_skipped_batches": int(d.get("batches_skipped", 0))}

    def snapshot(self) -> Snapshot:
        """An immutable copy of the buffer and counters; the lock is held only for the copies."""
        self._refresh_kernel_stats()
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
            stage, store_stage, proc_stage = self._stage, self._store_stage, self._proc_stage
        totals["stages"] = {stage.name: stage.as_dict()} if stage is not None else {}
        if store_stage is not None:
            totals["stages"][store_stage.name] = store_stage.as_dict()
        totals["by_process"] = None  # only a live capture with ENRICHMENT on attributes every packet
        if proc_stage is not None:
            totals["stages"][proc_stage.name] = proc_stage.as_dict()
            totals["by_process"] = proc_stage.rows()
        totals["store"] = self.history_state()
        totals["alerts_suppressed"] = self.alerts.suppressed()
        totals["alerts_excluded"] = self.alerts.excluded()[0]
        totals["notify"] = self.notifier.status()
        alerts = tuple(self.alerts.alerts())
        rows.flags.writeable = False
        grid = np.array([[s, *v] for s, v in bins], dtype=np.int64).reshape(-1, 1 + len(BIN_FIELDS))
        grid.flags.writeable = False
        return Snapshot(rows, totals, grid, *tables, status=status, buffer_size=self.buffer_size, alerts=alerts)

    def _totals_locked(self, c: Counters) -> dict[str, Any]:
        return {
            "packets": c.packets, "bytes": c.bytes, "bytes_captured": c.bytes_captured,
            "malformed": c.malformed, "dropped": self._kernel_dropped - self._kernel_base[1],
            "kernel_received": self._kernel_received - self._kernel_base[0],
            "nic_dropped": nic_dropped_since(self._nic_base, self._nic_now),
            "file_dropped": self._file_dropped, "paused_skipped": self._paused_skipped,
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
            "top10_src_by_packets": _marked(snap.top_addresses("src", "packets")),
            "top10_src_by_bytes": _marked(snap.top_addresses("src", "bytes")),
            "top10_dst_by_packets": _marked(snap.top_addresses("dst", "packets")),
            "top10_tcp_dst_ports": [[p, c] for p, c, _ in snap.top_ports("tcp")],
            "top10_udp_dst_ports": [[p, c] for p, c, _ in snap.top_ports("udp")],
            "first_ts": t["first_ts"], "last_ts": t["last_ts"], "min_ts": t["min_ts"], "max_ts": t["max_ts"],
            "duration_s": duration, "malformed": t["malformed"], "dropped": t["dropped"],
            "nic_dropped": t["nic_dropped"], "file_dropped": t["file_dropped"],
            "error": snap.status.error,
            "alerts": [a.as_dict() for a in snap.alerts], "alerts_suppressed": t["alerts_suppressed"],
            "alerts_excluded": t["alerts_excluded"], "notify": t["notify"],
            "stages": t["stages"], "store": t.get("store"),
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
            # The detectors' worker starts first, so its start-up overlaps the file's reading.
            stage = self._new_stage(self._gen)
            with self._lock:
                self._stage = stage
                self._store_stage = None  # a file is not recorded (import is how files enter history)
            self._run_file(self._source, self._gen, threading.Event())
        return self.summary()


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def _cli(argv: list[str] | None = None) -> int:
    from store import cli as store_cli  # `import` and `history`; DuckDB is loaded only when a command needs it

    ap = argparse.ArgumentParser(description="Network Traffic Monitor capture engine")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summary", help="read a pcap/pcapng file and print its JSON summary")
    s.add_argument("file")
    s.add_argument("--local-nets", default=None, help="networks counted as local (default: config LOCAL_NETS)")
    s.add_argument("--enrich", action="store_true", help="add country, AS, host name and service names")
    c = sub.add_parser("capture", help="capture live for N seconds and print the JSON summary")
    c.add_argument("--iface", default="", help="interface (default: the default route's)")
    c.add_argument("--filter", default="", help="BPF capture filter")
    c.add_argument("--seconds", type=float, default=10.0)
    c.add_argument("--store", default=None, metavar="PATH",
                   help="also record the capture into this history store (see `history`)")
    store_cli.add_subcommands(sub)
    from fleet import cli as fleet_cli  # sensor; history --clickhouse; imported late: it imports this module
    fleet_cli.add_subcommands(sub)
    args = ap.parse_args(argv)
    bad = config.problems()
    if getattr(args, "local_nets", None) and config.bad_networks(args.local_nets):
        bad.append(f"--local-nets={args.local_nets!r} is not valid: {config.bad_networks(args.local_nets)}")
    logging.basicConfig(level="INFO" if bad else config.get("LOG_LEVEL").upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bad:
        for problem in bad:
            log.error("invalid setting: %s", problem)
        return 1
    if args.cmd in fleet_cli.COMMANDS:
        return fleet_cli.run(args)  # sensor; import and history (the embedded store, or --clickhouse)
    if args.cmd == "summary":
        engine = CaptureEngine(local_nets=args.local_nets)
        out = engine.load_file(args.file)
        engine.notifier.flush(config.get("NOTIFY_TIMEOUT_S") + 1)  # alerts found in a file are delivered too
        out["notify"] = engine.notifier.status()
        if args.enrich:
            from enrich import Enricher
            enricher = Enricher(processes=False)
            out = enricher.enrich_summary(out)
            enricher.stop()
    else:
        from capture import broker  # only live capture needs it: `summary` starts without it

        try:  # started as root: the capture helper starts, then this process gives up root
            if broker.separate().still_root:
                log.warning("capture as root: the parsers run with every privilege")
        except broker.PrivilegeError as exc:
            log.error("%s", exc)
            return 1
        engine = CaptureEngine(record=args.store is not None, store_path=args.store)
        ok = engine.start(Source("live", iface=args.iface, bpf=args.filter))
        if ok:
            engine._stop.wait(args.seconds)
        engine.stop(drain_s=5.0)  # headless: the alerts of the last batches are worth the wait
        engine.notifier.flush(config.get("NOTIFY_TIMEOUT_S") + 1)  # and their notifications
        engine.close_store()  # first: what the notifier (and the store) give up at close is in the JSON
        out = engine.summary()
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return exit_status(args.cmd, out)


def exit_status(cmd: str, out: dict[str, Any]) -> int:
    """0 when all went well; for `summary` (as tshark does) 2 when the file could not be read to its end
    and 1 when nothing could be read at all; for `capture` 1 on any error."""
    if not out["error"]:
        return 0
    if cmd == "summary" and out["packets"]:
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(_cli())
