"""What a pipeline's history stage calls: batches in, flushes every STORE_FLUSH_S, prunes every STORE_PRUNE_S.

    rec = Recorder(EmbeddedStore(path), iface="eth0")   # opens the store; errors are status, not raised
    rec.on_batch(parsed)          # each parsed batch (PACKET_DTYPE rows)
    rec.on_alerts(alerts)         # Alert.as_dict() rows, whenever the detectors report
    rec.tick()                    # on every loop turn, also when no batch came (flushes the last minute)
    rec.note_skipped(n)           # packets this stage could not take: history lacks them, and says so
    rec.close()                   # final flush, close the store
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

import config
from store.base import Store, StoreStatus
from store.rollup import Rollup

log = logging.getLogger(__name__)


class Recorder:
    """A Rollup and its store, driven by one consumer thread; status() may be read from any thread."""

    def __init__(self, store: Store, sensor: str | None = None, iface: str = "", clock=time.monotonic) -> None:
        self.store = store
        store.open()
        self.rollup = Rollup(store, sensor=sensor, iface=iface, origin="live", clock=clock)
        self.clock = clock
        self.prune_s = float(config.get("STORE_PRUNE_S"))
        self._next_prune = clock()
        self.skipped = 0
        self._lock = threading.Lock()
        self._closed = False

    def on_batch(self, arr: np.ndarray) -> None:
        """Count one parsed batch, and flush when due."""
        self.rollup.add(arr)
        self.tick()

    def on_alerts(self, alerts: list[dict[str, Any]]) -> None:
        """New or updated alerts, written with the next flush."""
        self.rollup.add_alerts(alerts)

    def note_skipped(self, packets: int) -> None:
        """Packets the stage dropped before the rollup saw them (shown as history's loss)."""
        with self._lock:
            self.skipped += packets

    def tick(self) -> None:
        """Flush when STORE_FLUSH_S has passed; prune when STORE_PRUNE_S has."""
        self.rollup.maybe_flush()
        now = self.clock()
        if now >= self._next_prune:
            self._next_prune = now + self.prune_s
            deleted = self.store.prune()
            if deleted:
                log.info("store: retention pruned %d rows", deleted)

    def status(self) -> tuple[StoreStatus, int]:
        """(the store's status, packets skipped before the rollup)."""
        with self._lock:
            return self.store.status(), self.skipped

    def close(self) -> None:
        """Write everything still open and close the store; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.rollup.flush(final=True)
        self.store.close()
