"""The sensor's shipper and disk spool under faults: an exception never ends the shipper thread, a
damaged spool entry is moved aside and its packets counted, data reaches the disk before the meta
that points at it, a backlog never makes new batches pile up in memory, and one thread sends.

The store here is a stand-in that records what it was sent (ClickHouse itself is tested in
test_fleet_store.py and test_fleet_sensor.py): the faults are the spool's and the thread's."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
from storehelp import udp_burst

import fleet.spool as spoolmod
from fleet.sensor import Shipper
from fleet.spool import Spool
from store.clickhouse import with_id
from store.rollup import Rollup

T0 = 1_700_000_000


class RecordingStore:
    """Takes every batch (after `delay` seconds), remembering ids in order; `down` refuses them."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.down = False
        self.ids: list[str] = []
        self.packets = 0
        self.busy = 0
        self.most_busy = 0
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()

    def send(self, batch) -> bool:
        with self._lock:
            self.busy += 1
            self.most_busy = max(self.most_busy, self.busy)
        try:
            self.gate.wait()
            time.sleep(self.delay)
            if self.down:
                return False
            self.ids.append(batch.batch_id)
            sec = batch.frames.get("seconds")
            self.packets += int(sec["packets"].sum()) if sec is not None else 0
            return True
        finally:
            with self._lock:
                self.busy -= 1


def batches(n: int, start: float = T0, packets: int = 5) -> list:
    """n batches, each a new minute of `packets` packets (so none rewrites another's segment)."""
    r = Rollup(None, sensor="s", flush_s=3600)
    out = []
    for k in range(n):
        r.add(udp_burst(start + 61 * k, packets))
        out.append(with_id(r.build()))
    return out


def wait_for(cond, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_a_damaged_spool_entry_is_set_aside_counted_and_shipping_goes_on(tmp_path):
    """A 0-byte Parquet file (power cut) in the oldest entry: the shipper lives, the later batches are
    sent, the entry's 5 packets are counted as lost (and the count survives a restart)."""
    folder = tmp_path / "spool"
    sp = Spool(str(folder), 10**9)
    first, *rest = batches(6)
    sp.put(first)
    (next(folder.glob("0*")) / "seconds.parquet").write_bytes(b"")
    sp = Spool(str(folder), 10**9)  # the restarted sensor
    store = RecordingStore()
    sh = Shipper(store, sp, retry_s=0.05)
    sh.start()
    for b in rest:
        sh.submit(b)
    assert wait_for(lambda: len(store.ids) == 5), (store.ids, sh.last_error)
    assert sh.alive
    assert store.ids == [b.batch_id for b in rest]
    assert (sp.damaged_batches, sp.damaged_packets) == (1, 5)
    assert len(list(folder.glob(".bad-*"))) == 1
    assert sh.stop(join_s=10)
    again = Spool(str(folder), 10**9)
    assert (again.damaged_batches, again.damaged_packets) == (1, 5)


def test_the_shipper_survives_any_exception_counts_it_and_retries(tmp_path, monkeypatch):
    """ClickHouse down and the disk full for a moment (spool.put raises): logged and counted, the thread
    lives, and once both are back every batch arrives, in order, none lost."""
    sp = Spool(str(tmp_path / "spool"), 10**9)
    store = RecordingStore()
    store.down = True
    real_put = sp.put
    fails = {"n": 2}

    def put(batch):
        if fails["n"]:
            fails["n"] -= 1
            raise OSError(28, "No space left on device")
        real_put(batch)

    monkeypatch.setattr(sp, "put", put)
    sh = Shipper(store, sp, retry_s=0.05, max_retry_s=0.2)
    sh.start()
    sent = batches(4)
    for b in sent:
        sh.submit(b)
    assert wait_for(lambda: sh.errors == 2 and len(sp) == 4), (sh.errors, len(sp))
    assert sh.alive and "No space left" in sh.last_error
    store.down = False
    assert wait_for(lambda: len(store.ids) == 4)
    assert store.ids == [b.batch_id for b in sent] and store.packets == 20
    assert sh.stop(join_s=10)


def test_data_files_reach_the_disk_before_the_meta_that_points_at_them(tmp_path, monkeypatch):
    """Every Parquet file of an entry is fsynced before its meta.json (and the folder after the rename)."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(spoolmod.os, "fsync", fsync)
    sp = Spool(str(tmp_path / "spool"), 10**9)
    sp.put(batches(1)[0])
    names = [Path(p).name for p in synced]
    assert "seconds.parquet" in names and "meta.json" in names, names
    meta_at = names.index("meta.json")
    assert all(i < meta_at for i, n in enumerate(names) if n.endswith(".parquet")), names
    assert synced[-1] == str(tmp_path / "spool"), synced  # the rename itself is made durable


def test_new_batches_go_to_the_spool_while_a_backlog_drains(tmp_path):
    """200 spooled batches drain slowly while 20 new ones arrive (every 0.25 s: a sped-up FLEET_FLUSH_S):
    the new ones wait on disk behind the backlog (a kill -9 would lose none), never more than a couple
    in memory; all arrive in order."""
    sp = Spool(str(tmp_path / "spool"), 10**10)
    backlog = batches(200)
    for b in backlog:
        sp.put(b)
    store = RecordingStore(delay=0.05)
    sh = Shipper(store, sp, retry_s=0.05)
    sh.start()
    fresh = batches(20, start=T0 + 100_000)
    peak = 0
    for b in fresh:
        sh.submit(b)
        time.sleep(0.25)
        peak = max(peak, len(sh._in))
    assert len(store.ids) < 200  # the backlog was still draining when the last new batch came
    assert peak <= 6, peak  # a few at most (those that came during one read+send on a loaded box), not all 20
    assert wait_for(lambda: len(store.ids) == 220, timeout=60)
    assert store.ids == [b.batch_id for b in backlog + fresh]
    assert sh.stop(join_s=10)


def test_stop_never_lets_two_threads_send(tmp_path):
    """A send that hangs past stop()'s wait: stop() gives up (False) and sends nothing itself."""
    sp = Spool(str(tmp_path / "spool"), 10**9)
    store = RecordingStore()
    store.gate.clear()  # the send hangs
    sh = Shipper(store, sp, retry_s=0.05)
    sh.start()
    first, second = batches(2)
    sh.submit(first)
    assert wait_for(lambda: store.busy == 1)
    sh.submit(second)
    assert sh.stop(join_s=0.5) is False
    assert store.most_busy == 1 and store.ids == []
    store.gate.set()  # the hanging send ends: the thread finishes its last round alone, in order
    assert wait_for(lambda: not sh.alive)
    assert store.most_busy == 1 and store.ids == [first.batch_id, second.batch_id]


@pytest.mark.parametrize("damage", ["empty meta", "bad json"])
def test_an_unreadable_meta_at_start_is_set_aside(tmp_path, damage):
    """A meta.json cut short is found when the spool opens: moved aside, never a crash."""
    folder = tmp_path / "spool"
    sp = Spool(str(folder), 10**9)
    sp.put(batches(1)[0])
    meta = next(folder.glob("0*")) / "meta.json"
    meta.write_text("" if damage == "empty meta" else json.dumps({"batch_id": 1})[:-3])
    again = Spool(str(folder), 10**9)
    assert len(again) == 0 and again.head() is None
    assert len(list(folder.glob(".bad-*"))) == 1


def test_a_spooled_close_keeps_each_delta_segments_minute(tmp_path):
    """A minute's close, spooled and read back (a restarted sensor): the delta segments it replaces
    keep the minute they were shipped for, so the store files their replacement at that minute."""
    r = Rollup(None, sensor="s", flush_s=3600, deltas=True)
    minute = T0 - T0 % 60
    shipped: list[int] = []
    for k in range(3):
        r.add(udp_burst(minute + 2 * k + 0.5, 2))
        shipped += [int(s) for s in r.build().frames["seconds"]["seg"].unique()]
    r.add(udp_burst(minute + 65.5, 2))
    close = with_id(r.build())
    sp = Spool(str(tmp_path / "spool"), 10**9)
    sp.put(close)
    back = Spool(str(tmp_path / "spool"), 10**9).head()
    assert sorted(back.periods) == sorted((s, minute) for s in shipped)
    assert set(shipped) <= set(back.replaces)
