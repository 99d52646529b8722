"""Consumer stages of the pipeline: capture hands each parsed batch to them and never waits.

Capture (read, parse, count) is the producer. Each consumer stage (the detectors today; a store
writer and a fleet exporter later) gets the parsed batches through its own bounded queue. When a
stage falls behind during a live capture, whole batches are skipped and counted as skipped; the
counters of the capture itself never skip. A capture file cannot overflow (nothing arrives while
the reader waits), so for files the reader waits for the stage instead and every batch is analysed.

With the GIL, a consumer that loops in Python takes time from the capture thread even when it runs
in another thread, so the detectors run in a worker process (a 'spawn' context: never fork a
multithreaded process). A sender thread writes the batches to the worker's pipe (the write releases
the GIL); a receiver thread brings the worker's alerts back into the engine's `AlertMirror`.

This module stays light (numpy only): the worker imports the detectors itself.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import multiprocessing
import os
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import numpy as np

import config
from analysis.headers import PACKET_DTYPE

if TYPE_CHECKING:  # the worker imports it only once attribution is asked for (a file's `summary` never)
    from enrich.attribution import WorkerAttribution

log = logging.getLogger(__name__)

# Test hook, read only by the detector worker: sleep this many seconds per batch, so a test can
# make the stage fall behind on purpose and see skipped batches while the totals stay exact.
SLOW_HOOK_ENV = "NTM_TEST_DETECTOR_DELAY_S"
REPORT_S = 0.2  # the worker reports its alerts at least this often while it has news
MINUTE_S = 60

# Control messages on the batch pipe are shorter than one packed record, so a message's length
# tells a batch (a multiple of the record size, never empty) from a command.
_RESET, _STOP, _SYNC = b"reset", b"stop", b"sync"
assert PACKET_DTYPE.itemsize > 8
# A longer command (new thresholds, switches, exclusion rules: JSON after this prefix) is padded so its
# length is never a multiple of the record size.
_CONFIG = b"config:"
# Per-process attribution in the worker (ENRICHMENT on, a live capture): its settings as JSON after this prefix.
_ATTRIBUTE = b"attribute:"
_WANT_TABLE = b"want-table"  # the page asked for a port its mirror of the worker's socket table does not know


def config_message(overrides: dict[str, Any], disabled: frozenset[str] | set[str], rules: list[dict],
                   local_nets: list[str]) -> bytes:
    """The control message that gives a running detector stage new thresholds, switches and rules."""
    body = json.dumps({"overrides": overrides, "disabled": sorted(disabled), "rules": rules,
                       "local_nets": local_nets})
    return _padded(_CONFIG + body.encode())


def _padded(msg: bytes) -> bytes:
    """A command whose length is never a multiple of the record size (see _is_command)."""
    return msg + b" " if len(msg) % PACKET_DTYPE.itemsize == 0 else msg


def _is_command(buf: bytes) -> bool:
    """A control message, not a batch of records (see config_message)."""
    return _is_command_size(len(buf))


def _is_command_size(size: int) -> bool:
    """A message of this many bytes is a control message, not a batch of records."""
    return size < PACKET_DTYPE.itemsize or size % PACKET_DTYPE.itemsize != 0


class StageStats:
    """What one stage was offered, skipped and analysed, in all and over the last minute."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.batches_in = self.packets_in = 0
        self.batches_skipped = self.packets_skipped = 0
        self.batches_done = self.packets_done = 0
        self._minute: collections.deque[list[int]] = collections.deque(maxlen=MINUTE_S + 1)  # [sec, in, skipped]

    def offered(self, packets: int, skipped: bool, now: float | None = None) -> None:
        """Count one batch handed to the stage (skipped: it could not take it)."""
        sec = int(time.monotonic() if now is None else now)
        with self._lock:
            self.batches_in += 1
            self.packets_in += packets
            if skipped:
                self.batches_skipped += 1
                self.packets_skipped += packets
            if not self._minute or self._minute[-1][0] != sec:
                self._minute.append([sec, 0, 0])
            cell = self._minute[-1]
            cell[1] += packets
            cell[2] += packets if skipped else 0

    def lost(self, batches: int, packets: int, offered_at: int | None = None) -> None:
        """Batches accepted but never analysed (the worker died or was stopped with them queued).

        The minute's share charges them to the second they were offered (offered_at, in whole
        monotonic seconds): that second counted them in, so skipped never exceeds offered there."""
        with self._lock:
            self.batches_skipped += batches
            self.packets_skipped += packets
            for cell in self._minute:
                if cell[0] == offered_at:
                    cell[2] = min(cell[1], cell[2] + packets)
                    break

    def analysed(self, batches: int, packets: int) -> None:
        """The stage's own count of what it has finished (replaces the previous report)."""
        with self._lock:
            self.batches_done, self.packets_done = batches, packets

    def minute_pct(self, now: float | None = None) -> float | None:
        """Share of the packets offered in the last 60 s that were not skipped, in %; None if none were."""
        end = int(time.monotonic() if now is None else now)
        with self._lock:
            cells = [c for c in self._minute if c[0] > end - MINUTE_S]
        offered = sum(c[1] for c in cells)
        if not offered:
            return None
        return 100.0 * (offered - sum(c[2] for c in cells)) / offered

    def as_dict(self) -> dict[str, Any]:
        """The Snapshot's view: totals.stages[name]."""
        pct = self.minute_pct()
        with self._lock:
            return {"packets_in": self.packets_in, "packets_skipped": self.packets_skipped,
                    "batches_in": self.batches_in, "batches_skipped": self.batches_skipped,
                    "packets_analysed": self.packets_done, "minute_analysed_pct": pct}


class BatchQueue:
    """A FIFO of batches bounded by the packets it holds (a batch can be 1 or 65,536 packets)."""

    def __init__(self, max_packets: int) -> None:
        self.max_packets = max(1, int(max_packets))
        self._items: collections.deque = collections.deque()
        self._packets = 0
        self._cond = threading.Condition()
        self.closed = False

    def put(self, item: Any, packets: int, wait: bool, abort: threading.Event | None = None,
            at: int | None = None) -> bool:
        """Queue an item; without `wait` False when full, with it wait for room (False if closed/aborted).

        A 0-packet item (a control command such as Clear alerts) is always admitted while the queue
        is open: it holds no packets, and refusing it would silently lose the user's command.
        `at` is the second the batch was offered, returned by close()/drop_all()."""
        with self._cond:
            while packets and self._packets and self._packets + packets > self.max_packets:
                if not wait or self.closed or (abort is not None and abort.is_set()):
                    return False
                self._cond.wait(0.1)
            if self.closed:
                return False
            self._items.append((item, packets, at))
            self._packets += packets
            self._cond.notify_all()
            return True

    def get(self, timeout: float) -> tuple[Any, int] | None:
        """The oldest item and its packets, or None after `timeout` seconds (or when closed and empty)."""
        with self._cond:
            if not self._items and not self.closed:
                self._cond.wait(timeout)
            if not self._items:
                return None
            item, packets, _ = self._items.popleft()
            self._packets -= packets
            self._cond.notify_all()
            return item, packets

    def close(self) -> list[tuple[Any, int, int | None]]:
        """Refuse new items and wake every waiter; returns what was still queued."""
        with self._cond:
            self.closed = True
            left = list(self._items)
            self._items.clear()
            self._packets = 0
            self._cond.notify_all()
            return left

    def drop_all(self) -> list[tuple[Any, int, int | None]]:
        """Empty the queue (a Clear) and return what it held."""
        with self._cond:
            left = list(self._items)
            self._items.clear()
            self._packets = 0
            self._cond.notify_all()
            return left

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    @property
    def held(self) -> int:
        """Packets queued now."""
        with self._cond:
            return self._packets


class AlertMirror:
    """The engine's copy of a detector stage's alert book: what the page reads, acknowledges and clears.

    One per engine. Each capture (generation) starts it empty, and reports from a stage of another
    generation are ignored, so alerts of a previous capture never appear after Start."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._gen = 0
        self._alerts: list = []
        self._suppressed: dict[str, int] = {}
        self._acked: dict[tuple, int] = {}  # (detector, target, first_ts) -> count when acknowledged
        self._on_clear = None
        self._excluded: tuple[dict[str, int], list] = ({}, [])  # per rule: alerts silenced; (rule, alert) rows
        self._listeners: list = []  # called with each generation's latest alerts (the notifier)

    def reset(self, gen: int, on_clear=None) -> None:
        """Start a new generation: empty, and `on_clear` asks its stage to forget its alerts too."""
        with self._lock:
            self._gen, self._alerts, self._suppressed, self._acked = gen, [], {}, {}
            self._on_clear, self._excluded = on_clear, ({}, [])

    def update(self, gen: int, alerts: list, suppressed: dict[str, int],
               excluded: tuple[dict[str, int], list] | None = None) -> None:
        """A stage's latest alerts (the whole book, newest first); ignored for another generation."""
        with self._lock:
            if gen != self._gen:
                return
            self._alerts, self._suppressed = list(alerts), dict(suppressed)
            if excluded is not None:
                self._excluded = excluded
            listeners = list(self._listeners)
        for fn in listeners:  # each one only takes the list and returns (the notifier's queue): never waits
            fn(gen, alerts)

    def subscribe(self, fn) -> None:
        """Call fn(gen, alerts) with every report (the notifier: it must return at once)."""
        with self._lock:
            self._listeners.append(fn)

    def excluded(self) -> tuple[dict[str, int], list]:
        """Per exclusion rule the distinct alerts it silenced, and (rule, alert) rows newest first."""
        with self._lock:
            return self._excluded

    def alerts(self) -> list:
        """All alerts, newest (by last seen) first, with the page's acknowledgements."""
        with self._lock:
            alerts, acked = self._alerts, self._acked
        out = []
        for a in alerts:
            count = acked.get((a.detector, a.target, a.first_ts))
            out.append(replace(a, acknowledged=True) if count is not None and count >= a.count else a)
        return out

    def suppressed(self) -> dict[str, int]:
        """Per detector, how many alerts the stage's book left out (its quotas), as last reported."""
        with self._lock:
            return dict(self._suppressed)

    def acknowledge(self, alert: Any) -> None:
        """Mark one alert as seen; a new repeat (a higher count) makes it unacknowledged again."""
        with self._lock:
            self._acked[(alert.detector, alert.target, alert.first_ts)] = alert.count

    def clear(self) -> None:
        """Forget every alert, here and in the stage."""
        with self._lock:
            self._alerts, self._acked = [], {}
            on_clear = self._on_clear
        if on_clear is not None:
            on_clear()


class Stage:
    """A consumer of parsed batches behind a bounded queue; subclasses say what consuming means."""

    name = "stage"

    def __init__(self, max_packets: int) -> None:
        self.stats = StageStats()
        self.queue = BatchQueue(max_packets)
        self.error: str | None = None
        self._abort = threading.Event()
        self._accepted = 0  # batches queued, ever (the capture thread's count; drain() waits for them)

    def offer(self, arr: np.ndarray, wait: bool = False, abort: threading.Event | None = None) -> bool:
        """Hand a batch over: live capture never waits (a full queue skips the batch and counts it);
        a file reader passes wait=True and waits for room (stopped by `abort`)."""
        if self.error is not None:  # a dead stage analyses nothing; counting goes on
            self.stats.offered(len(arr), skipped=True)
            return False
        sec = int(time.monotonic())
        ok = self.queue.put(arr, len(arr), wait, abort if abort is not None else self._abort, at=sec)
        self.stats.offered(len(arr), skipped=not ok, now=sec)
        if ok:
            self._accepted += 1
        return ok

    def as_dict(self) -> dict[str, Any]:
        """Counters and health for the Snapshot."""
        d = self.stats.as_dict()
        d["error"] = self.error
        d["alive"] = self.alive()
        return d

    def alive(self) -> bool:  # pragma: no cover - overridden
        """Whether the stage can still take batches."""
        return self.error is None

    def reset(self) -> None:  # pragma: no cover - overridden
        """Forget the state built from earlier batches (the page's Clear)."""

    def drain(self, timeout: float | None, abort: threading.Event | None = None) -> bool:  # pragma: no cover
        """Wait until every accepted batch has been consumed; False on timeout, abort or death."""
        return True

    def close(self, drain_s: float = 0.0) -> None:  # pragma: no cover - overridden
        """Stop the stage (after up to drain_s seconds of finishing its queue); safe to call twice."""


class DetectorStage(Stage):
    """The detectors behind a bounded queue.

    mode: "process" (a worker process: the default), "thread" (a thread of this process, to
    measure against), or "inline" (in the caller's thread, for crafted frames fed by hand: nothing
    to start or stop, and every batch analysed before offer() returns)."""

    name = "detectors"

    def __init__(self, gen: int, mirror: AlertMirror, max_packets: int, mode: str = "process") -> None:
        super().__init__(max_packets)
        if mode not in ("process", "thread", "inline"):
            raise ValueError(f"unknown detector stage mode {mode!r}")
        self.gen = gen
        self.mirror = mirror
        self.mode = mode
        self.in_process = mode == "process"
        self._inline = None  # (book, detectors) in inline mode
        self._abandoned = 0  # of those, dropped by a Clear before the worker got them
        self._done_packets = 0
        self._done_offset = (0, 0)  # the worker's counts at the last Clear
        self._synced = threading.Condition()
        self._done_batches = 0
        self._threads: list[threading.Thread] = []
        self._proc = None
        self._closed = False
        self._attribution: dict[str, Any] | None = None  # the worker's last per-process report
        self._attr_epoch = 0  # Clears sent; a report from before the last one is not shown
        mirror.reset(gen, self.reset_alerts)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> DetectorStage:
        """Start the worker (process or thread) and the threads that feed it."""
        if self.in_process:
            if start_method() == "fork":
                ctx = multiprocessing.get_context("fork")
                batches_r, batches_w = ctx.Pipe(duplex=False)
                results_r, results_w = ctx.Pipe(duplex=False)
                # The child inherits the engine's ends too; it closes them, or it would never see EOF.
                self._proc = ctx.Process(target=detector_worker, args=(batches_r, results_w, (batches_w, results_r)),
                                         name=f"ntm-detectors-{self.gen}", daemon=True)
                self._proc.start()
            else:
                batches_r, batches_w, results_r, results_w = _pipes()
                self._proc = _ExecWorker(batches_r, results_w)
            _widen_pipe(batches_w.fileno())
            batches_r.close()  # the child has its own copies; EOF then reaches whoever is left
            results_w.close()
            self._conn, self._results = batches_w, results_r
            # The lifecycle is explicit (close(), from the engine's stop and start); this is a last
            # resort should a stage ever be collected unclosed. At exit a forked worker is a daemon
            # and an exec'd one reads EOF when this process's pipe ends close.
            weakref.finalize(self, _end_process, self._proc, batches_w)
            self._spawn_thread(self._send_loop, "sender")
            self._spawn_thread(self._receive_loop, "receiver")
        elif self.mode == "thread":
            self._spawn_thread(self._thread_loop, "thread")
        else:
            from analysis.detect import AlertBook, Detectors

            self._inline = (AlertBook(), Detectors())
        return self

    def offer(self, arr: np.ndarray, wait: bool = False, abort: threading.Event | None = None) -> bool:
        """Hand a batch over (see Stage.offer); inline, analyse it now."""
        if self._inline is None:
            return super().offer(arr, wait, abort)
        book, detectors = self._inline
        self.stats.offered(len(arr), skipped=False)
        detectors.observe(arr, book)
        self.stats.analysed(self.stats.batches_done + 1, self.stats.packets_done + len(arr))
        self.mirror.update(self.gen, book.alerts(), _suppressed(book), _excluded(book))
        return True

    def _spawn_thread(self, target, role: str) -> None:
        t = threading.Thread(target=target, name=f"detectors-{role}-{self.gen}", daemon=True)
        t.start()
        self._threads.append(t)

    def alive(self) -> bool:
        """Whether the worker still runs."""
        if self.error is not None or self._closed:
            return False
        if self._inline is not None:
            return True
        if self._proc is not None:
            return self._proc.is_alive()
        return any(t.is_alive() for t in self._threads)

    def pid(self) -> int | None:
        """The worker process's id (None in thread mode)."""
        return None if self._proc is None else self._proc.pid

    def yield_to_capture(self) -> None:
        """A live capture's worker gives way to the capture (DETECTORS_IDLE, DETECTORS_NICE); files' do not."""
        # A file's reader waits for the detectors (nothing is lost), so there the worker's speed is the
        # file's speed: it keeps its priority.
        if self._proc is not None:
            lower_priority(self._proc.pid, config.get("DETECTORS_NICE"), config.get("DETECTORS_IDLE"))

    def _fail(self, message: str) -> None:
        if self.error is None and not self._closed:
            log.error("detectors: %s", message)
            self.error = message
        for _, packets, at in self.queue.close():
            self.stats.lost(1, packets, at)
        with self._synced:
            self._synced.notify_all()

    def close(self, drain_s: float = 0.0) -> None:
        """Stop the worker, after letting it finish its queue for up to drain_s seconds."""
        if self._closed:
            return
        if drain_s > 0 and self.error is None:
            self.drain(drain_s)
        self._closed = True
        self._abort.set()
        left = self.queue.close()
        for _, packets, at in left:
            self.stats.lost(1, packets, at)
        # The sender first (its queue is closed: it ends after the write in progress), then the
        # worker (EOF on its pipe, else SIGTERM), then the receiver (EOF on the results pipe).
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=0.3)
                if self._proc is not None:
                    _end_process(self._proc, self._conn)
        if self._proc is not None:
            _end_process(self._proc, self._conn)
            self._results.close()
        on_table, self._on_table = self._on_table, None
        if on_table is not None:
            with _ignore_errors():
                on_table(None)  # no more reads come from this worker: the page's table reads itself

    # -- capture side ---------------------------------------------------------------------

    def reset_alerts(self) -> None:
        """The page's 'Clear alerts': the worker forgets its book (its detector state stays)."""
        self._command(_RESET)

    def reset(self) -> None:
        """The page's Clear: drop queued batches (their packets were cleared) and restart the detectors."""
        dropped = self.queue.drop_all()  # their packets were cleared with the counters
        with self._synced:
            self._attr_epoch += 1
            if self._attribution is not None:
                self._attribution = {"rows": [], "batches": 0, "packets": 0, "error": self._attribution["error"]}
        self._abandoned += sum(1 for item, _, _ in dropped if not isinstance(item, bytes))  # batches, not commands
        self.stats = StageStats()
        with self._synced:
            self._done_offset = (self._done_batches, self._done_packets)
        self._command(_RESET + b"!" + str(self._attr_epoch).encode())  # the worker takes this epoch
        if self._config is not None:  # drop_all may have dropped it: the rebuilt detectors need it again
            self._command(self._config)
        if self._attr_cmd is not None:  # likewise (the worker starts attributing once: a repeat is ignored)
            self._command(self._attr_cmd)

    _config: bytes | None = None  # the last configure() message, sent again after a reset
    _attr_cmd: bytes | None = None  # the attribute() message, likewise
    _on_table: Callable[[dict | None], None] | None = None

    def configure(self, message: bytes) -> None:
        """New thresholds, switches and exclusion rules (a config_message) for the running detectors; they
        apply from the next batch, after the ones already queued."""
        self._config = message
        self._command(message)

    def attribute(self, refresh_s: float, max_entries: int, on_table: Callable[[dict | None], None] | None = None,
                  gather_s: float | None = None) -> WorkerProcesses | None:
        """Per-process attribution in the worker process (the page's 'by process' over all traffic); None when
        there is no worker process (thread or inline mode, or it could not start): then the caller runs it in
        a thread of its own (enrich.attribution.ProcessStage). on_table: given each new read of the worker's
        socket table (enrich.processes.ProcessTable.state()), so the page's table can mirror it instead of
        reading the same table again in this process."""
        if not self.in_process or self.error is not None or self._proc is None:
            return None
        self._on_table = on_table
        with self._synced:
            self._attribution = {"rows": [], "batches": 0, "packets": 0, "error": None}
        body = json.dumps({"refresh_s": refresh_s, "max_entries": max_entries, "gather_s": gather_s})
        self._attr_cmd = _padded(_ATTRIBUTE + body.encode())
        self._command(self._attr_cmd)
        return WorkerProcesses(self)

    def want_table(self) -> None:
        """Ask the worker's socket table for a read soon (ProcessTable.want): the page's mirror missed a port."""
        if self._attr_cmd is not None and not self._closed:
            self._command(_WANT_TABLE)

    def attribution(self) -> dict[str, Any] | None:
        """The worker's last per-process report: {rows, batches, packets, error}, or None if not asked for."""
        with self._synced:
            return self._attribution

    def _command(self, cmd: bytes) -> None:
        if self._inline is not None:
            self._inline = _command(cmd, *self._inline)
        else:
            if not self.queue.put(cmd, 0, wait=False):  # only a closed queue refuses a command
                log.warning("detectors: command %r not sent: the stage is closed", cmd)

    def drain(self, timeout: float | None, abort: threading.Event | None = None) -> bool:
        """Wait until the worker has analysed every batch accepted so far."""
        if self._inline is not None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        target = self._accepted - self._abandoned
        with self._synced:
            while self._done_batches < target:
                if self.error is not None or self._closed or (abort is not None and abort.is_set()):
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._synced.wait(0.1 if left is None else min(left, 0.1))
        return True

    # -- the threads ----------------------------------------------------------------------

    def _send_loop(self) -> None:
        """Write queued batches to the worker's pipe; blocking here never blocks capture."""
        try:
            while not self._abort.is_set():
                got = self.queue.get(0.2)
                if got is None:
                    continue
                item, _ = got
                if isinstance(item, bytes):
                    self._conn.send_bytes(item)
                else:  # the record bytes without a copy; send_bytes releases the GIL while it writes
                    self._conn.send_bytes(np.ascontiguousarray(item).view(np.uint8))
        except (OSError, ValueError, TypeError) as exc:
            # The worker went away (BrokenPipe), or close() closed the pipe under a write in progress
            # (a closed Connection's handle is None: TypeError inside multiprocessing).
            if not self._closed:
                code = self._exit_code()
                why = f"exited (code {code})" if code is not None else f"stopped ({type(exc).__name__}: {exc})"
                self._fail(f"detector process {why}; counting goes on, alerts are not updated")

    def _receive_loop(self) -> None:
        """Bring the worker's reports back: alerts into the mirror, progress into the stats."""
        while True:
            try:
                msg = self._results.recv()
            except (EOFError, OSError):
                break
            self._apply_report(msg)
        if not self._closed:
            self._fail(f"detector process exited (code {self._exit_code()}); counting goes on, alerts are not "
                       "updated")

    def _exit_code(self) -> int | None:
        """The worker's exit code, waiting a moment for a process that is going (whichever loop saw it first)."""
        if self._proc is None:
            return None
        if self._proc.exitcode is None:
            self._proc.join(timeout=0.5)
        return self._proc.exitcode

    def _apply_report(self, msg: tuple) -> None:
        if msg[0] == "error":
            self._fail(f"detectors failed: {msg[1]}; counting goes on")
            return
        _, batches, packets, alerts, suppressed, excluded, *rest = msg
        self.mirror.update(self.gen, alerts, suppressed, excluded)
        procs = rest[0] if rest else None
        table = procs.pop("table", None) if procs is not None else None  # any epoch: not a per-Clear total
        with self._synced:
            shown = procs is not None and procs.pop("epoch") == self._attr_epoch and self._attribution is not None
            if shown:
                self._attribution = procs
            self._done_batches, self._done_packets = batches, packets
            offset = self._done_offset
            self._synced.notify_all()
        self.stats.analysed(batches - offset[0], packets - offset[1])
        on_table = self._on_table  # None once closed: a late report must not feed a table that was told to stop
        if table is not None and on_table is not None:
            try:  # outside the lock; a failure here must not end the receiver (alerts would freeze)
                on_table(table)
            except Exception:
                log.exception("the worker's socket table could not be mirrored")

    def _thread_loop(self) -> None:
        """Thread mode (for comparison with the process): the same work in a thread of this process."""
        from analysis.detect import AlertBook, Detectors

        book, detectors = AlertBook(), Detectors()
        batches = packets = 0
        delay = float(os.environ.get(SLOW_HOOK_ENV) or 0)
        last = 0.0
        while not self._abort.is_set():
            got = self.queue.get(0.2)
            if got is not None:
                item, n = got
                if isinstance(item, bytes):
                    book, detectors = _command(item, book, detectors)
                    continue
                try:
                    detectors.observe(item, book)
                except Exception as exc:  # the stage dies, the capture goes on
                    log.exception("detectors failed")
                    self._fail(f"detectors failed: {type(exc).__name__}: {exc}; counting goes on")
                    return
                batches, packets = batches + 1, packets + n
                if delay:
                    time.sleep(delay)
            if got is not None or time.monotonic() - last > REPORT_S:
                self._apply_report(("report", batches, packets, book.alerts(), _suppressed(book), _excluded(book)))
                last = time.monotonic()


class WorkerProcesses:
    """The engine's handle on attribution running in the detector worker, shaped as a consumer stage (offer,
    rows, as_dict, reset, close) so the engine treats it as it treats the thread stage. Its batches reach the
    worker with the detectors': what the detector queue skipped is not attributed either, and is said so."""

    name = "processes"

    def __init__(self, detectors: DetectorStage) -> None:
        self.detectors = detectors

    def offer(self, arr: np.ndarray, wait: bool = False, abort: threading.Event | None = None) -> bool:
        """Nothing to do: the detector stage already hands this batch to the worker."""
        return True

    def rows(self) -> list[dict[str, Any]]:
        """[{process, pid, packets, bytes, connections, connections_capped}] as the worker last reported."""
        got = self.detectors.attribution()
        return list(got["rows"]) if got else []

    def as_dict(self) -> dict[str, Any]:
        """The detector stage's counters (the same batches), with what the worker has attributed. Once
        attribution failed, or the worker has ended, whatever it took but never attributed counts as skipped:
        no packet is counted and silently left out of the per-process totals."""
        d = self.detectors.as_dict()
        got = self.detectors.attribution() or {}
        d["packets_analysed"] = done = int(got.get("packets") or 0)
        d["error"] = d.get("error") or got.get("error")
        if got.get("error") or not d.get("alive"):
            d["packets_skipped"] = max(int(d.get("packets_skipped") or 0), int(d.get("packets_in") or 0) - done)
            if got.get("error"):
                d["minute_analysed_pct"] = 0.0  # nothing is attributed any more
        d["alive"] = bool(d.get("alive")) and not got.get("error")
        return d

    def alive(self) -> bool:
        """Whether the worker runs and attribution has not failed in it."""
        return self.as_dict()["alive"]

    def reset(self) -> None:
        """Nothing more to do: the detector stage's reset (the page's Clear) resets the worker's totals."""

    def close(self, drain_s: float = 0.0) -> None:
        """Nothing to do: closing the detector stage ends the worker."""


def start_method() -> str:
    """'fork' while this process has a single thread (the CLI at start-up: the child starts in ~10 ms
    with everything imported), else 'exec': forking a multithreaded process (the page's Streamlit
    server, a running capture) can copy a lock held by another thread and deadlock the child.

    'exec' is a fresh interpreter that runs only this module's worker. multiprocessing's own 'spawn'
    does not fit: it re-imports the parent's __main__ in the child, and under Streamlit __main__ is
    the page script (Streamlit installs it there), which would run the whole page in the worker."""
    return "fork" if threading.active_count() == 1 else "exec"


PIPE_BYTES = 1 << 20  # Linux's default /proc/sys/fs/pipe-max-size: what an unprivileged process may ask


def _widen_pipe(fd: int) -> None:
    """Give the batch pipe 1 MiB instead of 64 KiB: a 5.6 MB batch then crosses in 6 writes and reads,
    not 86, each a wake-up of the other process (when the kernel refuses, the pipe stays as it was)."""
    if os.environ.get(SLOW_HOOK_ENV):
        # The tests that slow the worker down to make it fall behind send a few thousand packets: with
        # a 1 MiB pipe those would all wait in the pipe and nothing would ever be skipped.
        return
    with contextlib.suppress(OSError, AttributeError):
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def _pipes() -> tuple[Connection, Connection, Connection, Connection]:
    """(batches reader, batches writer, results reader, results writer) over plain OS pipes."""
    br, bw = os.pipe()
    rr, rw = os.pipe()
    return (Connection(br, writable=False), Connection(bw, readable=False),
            Connection(rr, writable=False), Connection(rw, readable=False))


class _ExecWorker:
    """The worker as a fresh interpreter (fork + exec, safe from a multithreaded process), with the
    part of multiprocessing.Process's interface the stage uses."""

    def __init__(self, batches: Connection, results: Connection) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
        # numpy's OpenBLAS would start a thread per core that spins ~70 ms of CPU while the worker starts;
        # the detectors do no linear algebra (a user's own setting stays).
        env.setdefault("OPENBLAS_NUM_THREADS", "1")
        code = "import sys; from analysis.stages import exec_worker; exec_worker(int(sys.argv[1]), int(sys.argv[2]))"
        fds = (batches.fileno(), results.fileno())
        self._popen = subprocess.Popen([sys.executable, "-c", code, *map(str, fds)], pass_fds=fds, env=env,
                                       cwd=root, stdin=subprocess.DEVNULL, start_new_session=False)
        self.pid = self._popen.pid

    @property
    def exitcode(self) -> int | None:
        """None while running; negative: the signal that ended it (as multiprocessing says it)."""
        return self._popen.poll()

    def is_alive(self) -> bool:
        """Whether the process still runs."""
        return self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        """Wait for the end, at most `timeout` seconds."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout)

    def terminate(self) -> None:
        """SIGTERM."""
        with contextlib.suppress(ProcessLookupError):
            self._popen.terminate()

    def kill(self) -> None:
        """SIGKILL."""
        with contextlib.suppress(ProcessLookupError):
            self._popen.kill()


def exec_worker(batches_fd: int, results_fd: int) -> None:
    """Entry point of the 'exec' worker: the pipes' ends arrive as file descriptors."""
    detector_worker(Connection(batches_fd, writable=False), Connection(results_fd, readable=False))


def _command(cmd: bytes, book, detectors, attr: _Attribution | None = None):
    """Apply a control message in the worker: returns the (possibly new) book and detectors."""
    from analysis.detect import Detectors

    if cmd.startswith(_CONFIG):
        return _configure(json.loads(cmd[len(_CONFIG):]), book, detectors)
    if cmd.startswith(_ATTRIBUTE):
        if attr is not None:
            attr.begin(json.loads(cmd[len(_ATTRIBUTE):]))
        return book, detectors
    if cmd == _WANT_TABLE:
        if attr is not None and attr.impl is not None:
            attr.impl.want_table()
        return book, detectors
    if cmd.startswith(_RESET):
        book.clear()
        if cmd.startswith(_RESET + b"!"):  # the page's Clear (Clear alerts keeps the detectors' state)
            detectors = Detectors(detectors.overrides, detectors.disabled)
            if attr is not None:
                # The engine's count of Clears: two Clears in a row may drop the first one's command from the
                # queue (drop_all), so the worker takes the number, not its own count.
                attr.reset(int(cmd[len(_RESET) + 1:] or 0))
    return book, detectors


class _Attribution:
    """The worker's side of per-process attribution: off until the engine asks (a live capture with
    ENRICHMENT on), then enrich.attribution.WorkerAttribution; its epoch counts the Clears it has applied."""

    def __init__(self) -> None:
        self.impl: WorkerAttribution | None = None
        self.epoch = 0
        self.error: str | None = None

    def begin(self, settings: dict[str, Any]) -> None:
        """Start attributing (once)."""
        if self.impl is not None or self.error is not None:
            return
        try:
            from enrich.attribution import GATHER_S, WorkerAttribution

            impl = WorkerAttribution(float(settings["refresh_s"]), int(settings["max_entries"]),
                                     gather_s=float(settings.get("gather_s") or GATHER_S))
            try:
                self.impl = impl.start()
            except Exception:
                impl.stop()  # its table's thread may have started
                raise
        except Exception as exc:  # the detectors go on; the page says why there is no 'by process'
            log.exception("process attribution could not start")
            self.error = f"process attribution could not start: {type(exc).__name__}: {exc}"

    def add(self, arr: np.ndarray, batches: int) -> None:
        """Batches (joined into one array) the detectors have analysed."""
        if self.impl is not None:
            self.impl.add(arr, batches)

    def tick(self, now: float) -> bool:
        """Gathered batches tallied, waiting ends named; True when a report is due."""
        return self.impl is not None and self.impl.tick(now)

    def flush(self) -> bool:
        """Tally the batches still gathered (the capture stopped); True if there were any."""
        return self.impl is not None and self.impl.flush()

    def reset(self, epoch: int) -> None:
        """The page's Clear (the engine's count of Clears so far)."""
        self.epoch = epoch
        if self.impl is not None:
            self.impl.reset()

    def report(self) -> dict[str, Any] | None:
        """The per-process part of a report, or None while attribution is off."""
        if self.impl is None:
            return None if self.error is None else {"rows": [], "batches": 0, "packets": 0, "error": self.error,
                                                    "epoch": self.epoch}
        return {**self.impl.report(), "epoch": self.epoch}

    def stop(self) -> None:
        """End the table's thread."""
        if self.impl is not None:
            self.impl.stop()


def _configure(cfg: dict[str, Any], book, detectors):
    """Apply a config_message: thresholds and switches to the detectors, rules to the book."""
    import ipaddress

    from analysis.rules import RuleError, RuleSet, rule_from

    detectors = detectors.reconfigured(cfg["overrides"], frozenset(cfg["disabled"]))
    nets = [ipaddress.ip_network(n, strict=False) for n in cfg["local_nets"]]
    rules = []
    for r in cfg["rules"]:
        with contextlib.suppress(RuleError):  # the engine checked them; a bad one must not end the detectors
            rules.append(rule_from(r))
    book.set_rules(RuleSet(rules, nets))
    return book, detectors


def _excluded(book) -> tuple[dict[str, int], list]:
    return book.excluded_counts(), book.excluded()


def _suppressed(book) -> dict[str, int]:
    fn = getattr(book, "suppressed", None)
    return {str(k): int(v) for k, v in fn().items()} if fn is not None else {}


def _end_process(proc, conn) -> None:
    """Ask the worker to stop (EOF on its pipe), then make sure it is gone."""
    with _ignore_errors():
        conn.close()
    with _ignore_errors():
        proc.join(timeout=1.0)  # at EOF it tallies what it gathered and sends its last report
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=1.0)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=1.0)


class _ignore_errors:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return exc[0] is not None and issubclass(exc[0], (OSError, ValueError, AssertionError))


def _read_exactly(fd: int, view: memoryview) -> None:
    """Fill `view` from the pipe; EOFError if the pipe ends first."""
    got, size = 0, len(view)
    while got < size:
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise EOFError("the batch pipe closed")
        got += n


def _receive(conn: Connection) -> np.ndarray | bytes:
    """The next message of the batch pipe (sent with send_bytes): a batch as PACKET_DTYPE rows, read
    straight into the array, or a command as bytes. EOFError when the engine closed the pipe.

    Connection.recv_bytes reads a 5 MB batch in pipe-sized chunks, each into a fresh buffer of the
    whole remaining size, then copies them twice (BytesIO, getvalue): ~0.1 s of the worker's CPU per
    million packets, ten times this readv into the array (benchmarks/pipe_receive.py)."""
    fd = conn.fileno()
    head = bytearray(4)
    _read_exactly(fd, memoryview(head))
    size = struct.unpack("!i", head)[0]
    if size == -1:  # multiprocessing's header for messages of 2 GiB and more
        head = bytearray(8)
        _read_exactly(fd, memoryview(head))
        size = struct.unpack("!Q", head)[0]
    if _is_command_size(size):
        buf = bytearray(size)
        _read_exactly(fd, memoryview(buf))
        return bytes(buf)
    arr = np.empty(size // PACKET_DTYPE.itemsize, PACKET_DTYPE)
    _read_exactly(fd, memoryview(arr.view(np.uint8)))
    return arr


def _join_waiting(first: np.ndarray, batches, most: int) -> tuple[list[np.ndarray], bytes | None]:
    """The batch `first` and those already waiting in the pipe behind it, up to `most` packets in all
    (a worker that fell behind a live capture's small ring blocks pays the per-batch cost once for
    many), and the command that ended the run, if one did."""
    arrs, n = [first], len(first)
    while n < most and batches.poll(0):
        got = _receive(batches)
        if isinstance(got, bytes):
            return arrs, got
        arrs.append(got)
        n += len(got)
    return arrs, None


def lower_priority(pid: int, steps: int, idle: bool) -> int | None:
    """Make process `pid` `steps` nicer (at most 19) and, with `idle`, SCHED_IDLE; its policy after (None: gone)."""
    # A live capture's worker and the capture share a core when the machine is busy (or a CPU quota holds
    # them). At the capture's priority the worker took a share of that core (by weight, and at each wake-up),
    # and a small ring overflowed meanwhile: a scan-like flood under a quota counted 0.86 enriched / plain;
    # niced by 10, 0.93-0.96; at SCHED_IDLE, where it runs only when the capture leaves the core, 0.97-0.99
    # (benchmarks/RESULTS.md, "Session 13"). The worker skips batches when it falls behind and counts them,
    # so it is the one that should lose. A process may lower its own user's processes' priority.
    try:
        # Linux keeps both per thread: every thread the worker has by now (threads it starts later inherit).
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        nice = min(19, os.getpriority(os.PRIO_PROCESS, pid) + max(0, steps))
    except OSError:  # the worker has already ended: its exit is the stage's error
        return None
    failed: list[str] = []
    for tid in tids:
        if steps > 0:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
            except ProcessLookupError:  # a thread that ended meanwhile
                continue
            except OSError as exc:  # a sandbox that forbids it: that part of the priority stays
                failed.append(f"nice: {exc}")
        if idle:
            try:
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            except ProcessLookupError:
                continue
            except (OSError, AttributeError) as exc:  # forbidden, or not Linux
                failed.append(f"SCHED_IDLE: {exc}")
    if failed:
        log.warning("could not lower the detector worker's priority (%s)", "; ".join(sorted(set(failed))))
    try:
        return os.sched_getscheduler(pid)
    except OSError:
        return None


def detector_worker(batches, results, unused: tuple = ()) -> None:
    """The detector process: batches in, the alert book's contents out (every REPORT_S while busy)."""
    import signal

    for conn in unused:
        conn.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent, which stops us
    import numpy.ma  # noqa: F401 - np.unique imports it at its first call: now, before the first batch arrives

    import native

    # As the engine's process does (a forked worker inherits it; an exec'd one starts without it): reuse
    # freed memory instead of page-faulting fresh pages for every batch's arrays.
    native.keep_freed_memory(config.get("MALLOC_KEEP_MB"))

    from analysis.detect import AlertBook, Detectors

    book, detectors = AlertBook(), Detectors()
    attr = _Attribution()
    delay = float(os.environ.get(SLOW_HOOK_ENV) or 0)
    join_max = config.get("BATCH_SIZE")
    n_batches = n_packets = 0
    last, news = time.monotonic(), False
    try:
        while True:
            if batches.poll(REPORT_S):
                got = _receive(batches)  # EOFError when the engine closes the pipe: the end
                if isinstance(got, bytes):
                    book, detectors = _command(got, book, detectors, attr)
                else:
                    arrs, cmd = _join_waiting(got, batches, join_max)
                    arr = arrs[0] if len(arrs) == 1 else np.concatenate(arrs)
                    detectors.observe(arr, book)
                    attr.add(arr, len(arrs))
                    n_batches, n_packets = n_batches + len(arrs), n_packets + len(arr)
                    if delay:
                        time.sleep(delay * len(arrs))
                    if cmd is not None:  # a command that came after those batches
                        book, detectors = _command(cmd, book, detectors, attr)
                news = True
            now = time.monotonic()
            news |= attr.tick(now)
            # Report when idle with news (the last batch of a burst at once) or every REPORT_S.
            if news and (now - last >= REPORT_S or not batches.poll(0)):
                results.send(("report", n_batches, n_packets, book.alerts(), _suppressed(book), _excluded(book),
                              attr.report()))
                last, news = now, False
    except EOFError:
        # The capture stopped: the batches gathered since the last tally were counted, so they are attributed
        # and reported before the end (the engine's receiver reads until this process closes its pipe), as is
        # any news a busy pipe held back.
        if attr.flush() or news:
            with _ignore_errors():
                results.send(("report", n_batches, n_packets, book.alerts(), _suppressed(book), _excluded(book),
                              attr.report()))
    except Exception as exc:  # say why before dying; the engine shows it
        with _ignore_errors():
            results.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        attr.stop()
        with _ignore_errors():
            results.close()
