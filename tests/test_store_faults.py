"""Store faults lose nothing silently: kill -9 while writing, a read-only folder, a full filesystem."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import PYTHON, ROOT, need, wait_for
from storehelp import udp_burst

from store.base import TimeRange
from store.embedded import EmbeddedStore
from store.rollup import Rollup

FLUSH_S = 1.0

WRITER = """
import sys, time
sys.path[:0] = [{root!r}, {tests!r}]
from store.embedded import EmbeddedStore
from store.rollup import Rollup
from storehelp import udp_burst
s = EmbeddedStore({path!r}); assert s.open(), s.status()
r = Rollup(s, sensor="k", flush_s={flush})
fed, end = 0, time.time() + {feed_s}
while True:
    now = time.time()
    if now < end:
        r.add(udp_burst(now, 200, spacing=0.0001)); fed += 200
        print("fed", fed, now, flush=True)
    if r.maybe_flush() and s.status().pending == 0:
        print("acked", r.packets_flushed, flush=True)
    time.sleep(0.02)
"""


def _writer(path: str, feed_s: float) -> subprocess.Popen:
    code = WRITER.format(root=str(ROOT), tests=str(ROOT / "tests"), path=path, flush=FLUSH_S, feed_s=feed_s)
    return subprocess.Popen([PYTHON, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def _kill_after(proc: subprocess.Popen, seconds: float) -> tuple[list[tuple[int, float]], int, float]:
    """Read the writer's lines until `seconds` after its first packet, kill -9 it; (fed counts with
    times, last acked, kill time). Start-up is not counted: the machine may be busy."""
    fed: list[tuple[int, float]] = []
    acked = [0]

    def read() -> None:
        for line in proc.stdout:
            parts = line.split()
            if parts[0] == "fed":
                fed.append((int(parts[1]), float(parts[2])))
            elif parts[0] == "acked":
                acked[0] = int(parts[1])

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert wait_for(lambda: bool(fed), timeout=60), "the writer never started"
    time.sleep(max(0.0, fed[0][1] + seconds - time.time()))
    killed_at = time.time()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    reader.join(timeout=10)
    return fed, acked[0], killed_at


def _reopen(path: str) -> tuple[int, EmbeddedStore]:
    s = EmbeddedStore(path)
    assert s.open(), s.status()
    st = s.status()
    assert st.state == "ok" and st.moved_aside is None, st  # opens cleanly, nothing moved aside
    return s.totals(TimeRange())["packets"], s


def test_kill9_while_writing_loses_at_most_the_last_flush_interval(tmp_path):
    path = str(tmp_path / "h.duckdb")
    fed, acked, killed_at = _kill_after(_writer(path, feed_s=60), 3.5)
    assert fed and acked > 0
    stored, s = _reopen(path)
    s.close()
    assert acked <= stored <= fed[-1][0]
    # Everything fed more than one flush interval (plus a write's time) before the kill is there.
    older = [n for n, t in fed if t < killed_at - FLUSH_S - 0.5]
    assert stored >= older[-1]
    assert stored % 200 == 0  # whole batches only: no half-written transaction survived


def test_kill9_after_the_traffic_ends_keeps_every_packet(tmp_path):
    path = str(tmp_path / "h.duckdb")
    fed, acked, _ = _kill_after(_writer(path, feed_s=1.5), 1.5 + 3 * FLUSH_S + 1.5)
    stored, s = _reopen(path)
    assert stored == acked == fed[-1][0]
    s.close()


@pytest.fixture
def tmpfs(tmp_path):
    need(os.geteuid() == 0, "mounting a small tmpfs needs root: run with sudo")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _remount(mnt: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mnt)], check=True)


def test_read_only_folder_is_an_error_state_and_nothing_is_lost(tmpfs):
    s = EmbeddedStore(str(tmpfs / "h.duckdb"))
    assert s.open()
    r = Rollup(s, flush_s=3600)
    fed = 0
    m0 = 1_700_000_040
    try:
        r.add(udp_burst(m0, 50))
        fed += 50
        r.flush()
        assert s.status().batches_written == 1
        # Linux refuses a read-only remount while a file is open for writing: the store is closed
        # first, as at a restart, and must then find its folder read-only when it reopens to write.
        s.close()
        _remount(tmpfs, "ro")
        for k in range(1, 4):  # the capture goes on: adds and flushes never raise
            r.add(udp_burst(m0 + 60 * k, 10))
            fed += 10
            r.flush()
        st = s.status()
        assert st.state == "error" and "read-only" in st.message.lower(), st
        assert st.batches_failed >= 3 and st.pending == 3 and st.batches_dropped == 0
        _remount(tmpfs, "rw")
        r.add(udp_burst(m0 + 300, 5))
        fed += 5
        r.flush(final=True)
        st = s.status()
        assert st.state == "ok" and st.pending == 0, st
        assert s.totals(TimeRange())["packets"] == fed  # the batches kept while it failed were written
    finally:
        s.close()


def test_a_store_that_cannot_be_created_is_an_error_state(tmpfs):
    _remount(tmpfs, "ro")
    s = EmbeddedStore(str(tmpfs / "sub" / "h.duckdb"))
    assert not s.open()
    r = Rollup(s, flush_s=3600)
    r.add(udp_burst(1_700_000_040, 10))
    r.flush()  # no exception
    st = s.status()
    assert st.state == "error" and "read-only" in st.message.lower() and st.pending == 1
    s.close()  # still unwritable: what waited is given up, and counted
    st = s.status()
    assert st.pending == 0 and st.batches_dropped == 1 and st.packets_dropped == 10


def test_full_filesystem_is_an_error_state_and_resumes_when_space_returns(tmpfs):
    s = EmbeddedStore(str(tmpfs / "h.duckdb"))
    assert s.open()
    r = Rollup(s, flush_s=3600)
    m0 = 1_700_000_040
    r.add(udp_burst(m0, 10))
    r.flush()
    filler = tmpfs / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True, check=False)
    fed = 10
    try:
        # Many conversations per batch so each write needs new blocks on the full filesystem.
        for k in range(1, 6):
            for port in range(0, 2000, 50):
                r.add(udp_burst(m0 + 60 * k, 50, dport=port + 1, spacing=0.01))
                fed += 50
            r.flush()
        st = s.status()
        assert st.state == "error" and st.batches_failed >= 1, st
        assert "space" in st.message.lower() or "write" in st.message.lower(), st
        filler.unlink()
        r.flush(final=True)
        r.add(udp_burst(m0 + 600, 1))
        fed += 1
        r.flush(final=True)
        st = s.status()
        assert st.state == "ok" and st.pending == 0 and st.batches_dropped == 0, st
        assert s.totals(TimeRange())["packets"] == fed
    finally:
        s.close()
        if filler.exists():
            filler.unlink()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
