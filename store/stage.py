"""The history consumer stage: a thread of the engine's process that feeds the Recorder.

Fed like the detector stage (analysis.stages.Stage: a bounded queue; a live capture that gets
ahead skips whole batches and counts them, which the Recorder reports as history's loss). It runs
in a thread, not a worker process, because DuckDB lets only one process open the store and the
page must answer history questions through this very store object. The rollup's work per batch is
a few numpy group-bys, so the thread takes little from the capture (benchmarks/store_cost.py).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from analysis.stages import AlertMirror, Stage
from store.base import Store
from store.recorder import Recorder

log = logging.getLogger(__name__)

TICK_S = 0.5  # the recorder ticks at least this often, so the last minute is flushed on a quiet link
CLOSE_WAIT_S = 10.0  # at stop, how long the final flush may take before stop() goes on without it


class StoreStage(Stage):
    """Writes the history of one live capture (one generation) into the engine's store."""

    name = "store"

    def __init__(self, store: Store, max_packets: int, iface: str = "", sensor: str | None = None,
                 mirror: AlertMirror | None = None) -> None:
        super().__init__(max_packets)
        self.store = store
        self.mirror = mirror
        self.iface = iface
        self.sensor = sensor
        self.recorder: Recorder | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._done = threading.Condition()
        self._done_batches = 0
        self._noted_skips = 0
        self._alert_seen: dict[tuple, tuple] = {}
        self._closed = False

    def start(self) -> StoreStage:
        """Open the recorder (a store error is state, not an exception) and start the thread."""
        self.recorder = Recorder(self.store, sensor=self.sensor, iface=self.iface)
        self._thread = threading.Thread(target=self._loop, name="store-writer", daemon=True)
        self._thread.start()
        return self

    def alive(self) -> bool:
        """Whether the writer thread still runs."""
        return self.error is None and self._thread is not None and self._thread.is_alive()

    def as_dict(self) -> dict[str, Any]:
        """Counters and health for the Snapshot (totals.stages.store), with the store's state."""
        d = super().as_dict()
        d.update(self.state())
        return d

    def state(self) -> dict[str, Any]:
        """What the page shows about history: the store's state, its message and every loss."""
        st = self.store.status()
        return {"state": st.state, "path": st.path, "message": st.message, "moved_aside": st.moved_aside,
                "pending": st.pending, "batches_dropped": st.batches_dropped,
                "packets_dropped": st.packets_dropped, "history_skipped": self.stats.packets_skipped,
                "last_write_wall": st.last_write_wall, "recording": not self._closed and self.error is None}

    # -- the writer thread ----------------------------------------------------------------

    def _loop(self) -> None:
        rec = self.recorder
        assert rec is not None
        try:
            while True:
                got = self.queue.get(TICK_S)
                if got is not None:
                    arr, n = got
                    rec.on_batch(arr)
                    with self._done:
                        self._done_batches += 1
                        self.stats.analysed(self.stats.batches_done + 1, self.stats.packets_done + n)
                        self._done.notify_all()
                elif self._stopping.is_set():
                    break  # the queue is empty and the capture has stopped
                self._note_skips(rec)
                self._copy_alerts(rec)
                rec.tick()
            self._note_skips(rec)
            self._copy_alerts(rec)
            rec.rollup.flush(final=True)  # every minute closed and written; the store stays open for queries
        except Exception as exc:  # the stage dies; capture and its counters go on
            log.exception("store stage failed")
            self.error = f"history writer failed: {type(exc).__name__}: {exc}; capture goes on without history"
            self.queue.close()
        finally:
            with self._done:
                self._done.notify_all()

    def _note_skips(self, rec: Recorder) -> None:
        skipped = self.stats.packets_skipped
        if skipped > self._noted_skips:
            rec.note_skipped(skipped - self._noted_skips)
            self._noted_skips = skipped

    def _copy_alerts(self, rec: Recorder) -> None:
        """New or changed alerts of the engine's mirror go to the store (a repeat replaces its row)."""
        if self.mirror is None:
            return
        changed = []
        for a in self.mirror.alerts():
            key, sig = (a.detector, a.target, a.first_ts), (a.count, a.last_ts, a.severity)
            if self._alert_seen.get(key) != sig:
                self._alert_seen[key] = sig
                changed.append(a.as_dict())
        if changed:
            rec.on_alerts(changed)

    # -- the capture side -------------------------------------------------------------------

    def drain(self, timeout: float | None, abort: threading.Event | None = None) -> bool:
        """Wait until every accepted batch has been added to the rollup."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._done:
            while self._done_batches < self._accepted:
                if self.error is not None or (abort is not None and abort.is_set()):
                    return False
                if self._thread is None or not self._thread.is_alive():
                    return False
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._done.wait(0.1 if left is None else min(left, 0.1))
        return True

    def close(self, drain_s: float = 0.0) -> None:
        """Write what is queued, flush every open minute and end the thread; the store stays open."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(CLOSE_WAIT_S, drain_s))
            if thread.is_alive():
                log.warning("store stage: the final flush is still running after %.0f s", CLOSE_WAIT_S)
        for _, packets in self.queue.close():
            self.stats.lost(1, packets)

    def offer(self, arr: np.ndarray, wait: bool = False, abort: threading.Event | None = None) -> bool:
        """Hand a batch over (Stage.offer); nothing is taken once the stage is closing."""
        if self._stopping.is_set():
            self.stats.offered(len(arr), skipped=True)
            return False
        return super().offer(arr, wait, abort)
