"""The engine's buffer, counters, lifecycle and snapshots, fed with crafted frames and files."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from pcapgen import pcap_bytes
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from packet_processor import CaptureEngine, Source, addr_text

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def frames(n: int, t0: float = 1_000_000.0, step: float = 0.01, port0: int = 1000) -> list:
    """n UDP records (ts, data, wire_len, linktype) from 10.0.0.(i % 50) with rising ports."""
    out = []
    for i in range(n):
        data = bytes(ETH / IP(src=f"10.0.1.{i % 50}", dst="10.0.0.1") / UDP(sport=port0 + i, dport=53))
        out.append((t0 + i * step, data, len(data), 1))
    return out


def test_totals_never_cap_at_the_buffer_size():
    eng = CaptureEngine(buffer_size=100)
    recs = frames(1050)
    eng.ingest_records(recs)
    snap = eng.snapshot()
    assert snap.totals["packets"] == 1050 and len(snap.packets) == 100
    assert snap.totals["bytes"] == sum(r[2] for r in recs)
    # The buffer holds the newest 100, oldest first, across the ring's wrap.
    assert snap.packets["sport"].tolist() == list(range(1000 + 950, 1000 + 1050))
    assert snap.totals["buffer_len"] == 100


def test_ring_wraps_in_small_batches(monkeypatch):
    monkeypatch.setenv("NTM_BATCH_SIZE", "7")
    eng = CaptureEngine(buffer_size=10)
    eng.ingest_records(frames(33))
    assert eng.snapshot().packets["sport"].tolist() == list(range(1023, 1033))


def test_snapshot_is_immutable_and_detached():
    eng = CaptureEngine(buffer_size=50)
    eng.ingest_records(frames(20))
    snap = eng.snapshot()
    with pytest.raises(ValueError):
        snap.packets["sport"][0] = 1
    eng.ingest_records(frames(5, t0=2_000_000.0))
    assert len(snap.packets) == 20 and snap.totals["packets"] == 20
    assert eng.snapshot().totals["packets"] == 25


def test_per_second_bins_and_rate():
    eng = CaptureEngine()
    eng.ingest_records(frames(300, t0=5000.0, step=0.01))  # 100 packets in each of 3 seconds
    snap = eng.snapshot()
    assert snap.bins[:, 0].tolist() == [5000, 5001, 5002]
    assert snap.bins[:, 1:5].sum(axis=1).tolist() == [100, 100, 100]
    pps, bps = snap.rate(2)
    assert pps == 100.0 and bps == pytest.approx(100 * 8 * frames(1)[0][2])


def test_bins_are_bounded(monkeypatch):
    monkeypatch.setenv("NTM_BIN_SECONDS", "60")
    eng = CaptureEngine()
    eng.ingest_records(frames(500, t0=0.0, step=1.0))
    bins = eng.snapshot().bins
    assert len(bins) <= 61 and bins[-1, 0] == 499


def test_top_tables_are_bounded_but_totals_exact(monkeypatch):
    monkeypatch.setenv("NTM_TOP_TABLE_MAX", "20")
    eng = CaptureEngine()
    eng.ingest_records(frames(500))
    snap = eng.snapshot()
    assert len(snap.src) <= 20 and len(snap.conversations) <= 20
    assert snap.totals["packets"] == 500


def test_top_addresses_sorted_by_count_then_address():
    eng = CaptureEngine()
    recs = []
    for i, src in enumerate(["10.0.0.9", "10.0.0.3", "10.0.0.3", "10.0.0.10", "10.0.0.9", "10.0.0.2"]):
        d = bytes(ETH / IP(src=src, dst="10.0.0.1") / TCP(sport=1, dport=2))
        recs.append((float(i), d, len(d), 1))
    eng.ingest_records(recs)
    top = eng.snapshot().top_addresses("src", "packets")
    assert [(t["addr"], t["packets"]) for t in top] == [("10.0.0.3", 2), ("10.0.0.9", 2), ("10.0.0.10", 1),
                                                        ("10.0.0.2", 1)]


def test_conversations_join_both_directions():
    eng = CaptureEngine()
    a = bytes(ETH / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=80))
    b = bytes(ETH / IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=80, dport=40000))
    eng.ingest_records([(1.0, a, 100, 1), (2.0, b, 1500, 1), (3.0, a, 100, 1)])
    conv = eng.snapshot().top_conversations()
    assert len(conv) == 1
    c = conv[0]
    assert (c["packets"], c["bytes"], c["first_ts"], c["last_ts"], c["proto"]) == (3, 1700, 1.0, 3.0, "TCP")
    assert {(c["a"], c["a_port"]), (c["b"], c["b_port"])} == {("10.0.0.1", 40000), ("10.0.0.2", 80)}


def test_clear_empties_buffer_and_counters():
    eng = CaptureEngine()
    eng.ingest_records(frames(30))
    eng.clear()
    snap = eng.snapshot()
    assert snap.totals["packets"] == 0 and len(snap.packets) == 0 and not snap.src and not len(snap.bins)


def test_stale_generation_is_dropped(tmp_path):
    eng = CaptureEngine()
    f = tmp_path / "a.pcap"
    f.write_bytes(pcap_bytes([(r[0], r[1]) for r in frames(10)]))
    eng.load_file(str(f))
    old_gen = eng.status().generation - 1
    eng.ingest_records(frames(5), gen=old_gen)  # late data from an earlier capture
    assert eng.snapshot().totals["packets"] == 10


def test_file_source_in_the_capture_thread(tmp_path):
    f = tmp_path / "a.pcap"
    f.write_bytes(pcap_bytes([(r[0], r[1]) for r in frames(200)]))
    eng = CaptureEngine()
    assert eng.start(Source("file", path=str(f)))
    deadline = time.monotonic() + 10
    while eng.status().state == "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    st = eng.status()
    assert st.state == "finished" and st.error is None
    assert eng.snapshot().totals["packets"] == 200
    eng.stop()
    eng.stop()
    assert eng.status().state == "finished"


def test_paced_replay_can_pause_and_stop(tmp_path):
    """Pause holds the count still, resume moves it again, stop ends the thread and nothing more is added."""
    from conftest import wait_for

    f = tmp_path / "slow.pcap"
    f.write_bytes(pcap_bytes([(r[0], r[1]) for r in frames(100, step=0.1)]))  # 10 s of traffic
    eng = CaptureEngine()
    count = lambda: eng.snapshot().totals["packets"]  # noqa: E731
    assert eng.start(Source("file", path=str(f), speed=1.0))
    assert wait_for(lambda: count() >= 3, timeout=5)
    eng.pause()
    assert eng.status().state == "paused"
    time.sleep(0.3)  # the pacing flushes every 0.2 s: a record in flight has landed by now
    seen = count()
    time.sleep(1.0)  # ten more records' worth of file time
    assert count() == seen  # paused: nothing more goes in
    eng.resume()
    assert wait_for(lambda: count() >= seen + 3, timeout=5)  # and it moves again
    eng.stop()
    assert not eng.status().alive  # the thread itself ended within stop()'s wait, mid-file
    stopped_at = count()
    time.sleep(0.5)
    assert count() == stopped_at < 100


def test_many_readers_while_ingesting_see_consistent_snapshots():
    eng = CaptureEngine(buffer_size=1000)
    errors: list[str] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            s = eng.snapshot()
            t = s.totals
            if sum(t["transport_counts"].values()) != t["packets"]:
                errors.append("classes do not add up")
            if sum(t["direction_counts"].values()) != t["packets"]:
                errors.append("directions do not add up")
            if len(s.packets) != min(t["packets"], 1000):
                errors.append("buffer length disagrees")

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for th in threads:
        th.start()
    recs = frames(200)
    for _ in range(30):
        eng.ingest_records(recs)
    stop.set()
    for th in threads:
        th.join()
    assert not errors
    assert eng.snapshot().totals["packets"] == 6000


def test_addr_text_round_trips_zero_suffixes():
    eng = CaptureEngine()
    d = bytes(ETH / IP(src="10.0.0.0", dst="192.168.0.0") / UDP())
    eng.ingest_records([(1.0, d, len(d), 1)])
    r = eng.snapshot().packets
    assert addr_text(r["src"][0]) == "10.0.0.0" and addr_text(r["dst"][0]) == "192.168.0.0"
    assert np.all(r["malformed"] == 0)


def test_csv_export_of_the_whole_buffer_has_headers_only():
    import csv
    import io

    from packet_processor import packets_csv

    marker = b"NTM-CSV-MARKER-91c2"
    eng = CaptureEngine(buffer_size=50)
    recs = []
    for i in range(60):
        d = bytes(ETH / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1000 + i, dport=53) / marker)
        recs.append((1_700_000_000.0 + i, d, len(d), 1))
    eng.ingest_records(recs)
    data = packets_csv(eng.snapshot().packets)
    rows = list(csv.DictReader(io.StringIO(data.decode())))
    assert len(rows) == 50 and rows[-1]["src port"] == "1059" and rows[0]["protocol"] == "UDP"
    assert rows[0]["time"].startswith("2023-11-14") and marker not in data


def test_a_file_read_ahead_stops_with_the_capture(tmp_path, monkeypatch):
    """Unpaced files are parsed one batch ahead in a helper thread: pause holds it, stop ends it, and a
    whole load counts every packet exactly once."""
    monkeypatch.setenv("NTM_BATCH_SIZE", "1000")
    d = bytes(ETH / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2))
    f = tmp_path / "many.pcap"
    f.write_bytes(pcap_bytes([(1_700_000_000 + i * 1e-3, d) for i in range(200_000)]))
    eng = CaptureEngine()
    assert eng.load_file(str(f))["packets"] == 200_000
    assert eng.start(Source("file", path=str(f)))
    eng.pause()
    time.sleep(0.3)
    held = eng.snapshot().totals["packets"]
    time.sleep(0.3)
    assert eng.snapshot().totals["packets"] == held < 200_000  # paused: nothing more goes in
    eng.stop()
    end = time.monotonic() + 5
    while any(t.name == "file-reader" for t in threading.enumerate()) and time.monotonic() < end:
        time.sleep(0.05)
    assert not [t.name for t in threading.enumerate() if t.name == "file-reader" or t.name.startswith("capture-")]


HEAP_SCRIPT = """
import ctypes
import numpy as np
from packet_processor import CaptureEngine
class MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
engine = CaptureEngine()  # applies MALLOC_KEEP_MB
def batch():  # what every batch does: arrays of a few MB alive together, filled, then all freed
    arrays = [np.empty(mb << 17) for mb in (1, 2, 3, 4, 5, 6)]
    for a in arrays:
        a.fill(1.0)
batch()
first = libc.mallinfo2()
for _ in range(20):
    batch()
last = libc.mallinfo2()
print(first.arena + first.hblkhd, last.arena + last.hblkhd, last.fordblks)
"""


def test_freed_batch_memory_is_kept_for_the_next_batch():
    """MALLOC_KEEP_MB: the 21 MB a batch frees stay in glibc's heap for the next batch (which then
    reuses them: the heap does not grow over twenty batches); with 0, glibc hands them back.
    Read from glibc's own statistics (mallinfo2), not from page-fault counts, which transparent
    huge pages change."""
    import os
    import subprocess

    from conftest import PYTHON, ROOT

    got = {}
    for keep in ("0", "64"):
        env = dict(os.environ, NTM_MALLOC_KEEP_MB=keep, PYTHONPATH=str(ROOT))
        out = subprocess.run([PYTHON, "-c", HEAP_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        got[keep] = [int(x) for x in out.stdout.split()]
    mb = 1 << 20
    first, last, kept = got["64"]
    assert kept >= 21 * mb and last <= first + mb, got  # kept, and reused rather than grown
    assert got["0"][2] < 21 * mb, got  # the allocator's defaults give the freed memory back




class _SlowFirstReading:
    """A capture ring whose first counters reading is held back: the page's reader read the counters
    before the capture thread finished, and stores them only after the thread's last reading."""

    iface = "lo"

    def __init__(self) -> None:
        self.calls = 0
        self.first_taken = threading.Event()
        self.second_taken = threading.Event()
        self.release = threading.Event()

    def stats(self) -> tuple[int, int]:
        self.calls += 1
        if self.calls == 1:
            self.first_taken.set()
            self.release.wait(10)
            return 1000, 100  # before the thread finished: 900 were still to come or in the ring
        self.second_taken.set()
        return 1000, 400  # the thread finished: 300 left in the ring count as dropped


def test_an_older_counters_reading_never_overwrites_the_last_one():
    eng = CaptureEngine()
    ring = _SlowFirstReading()
    reader = threading.Thread(target=eng._update_kernel_stats, args=(ring, eng._gen))
    reader.start()
    assert ring.first_taken.wait(10)
    last = threading.Thread(target=eng._update_kernel_stats, args=(ring, eng._gen))
    last.start()
    # Unserialised, the capture thread's reading is taken and stored at once; serialised, it waits.
    ring.second_taken.wait(1)
    ring.release.set()
    reader.join(10)
    last.join(10)
    t = eng.snapshot().totals
    assert (t["kernel_received"], t["dropped"]) == (1000, 400)


def test_a_tables_top_is_computed_once_per_state_and_anew_when_the_counts_change():
    """The page asks a snapshot's table the same question several times a rerun (charts, enrichment panel),
    each viewer again: a random-source flood ties every row, and ordering ties makes every tied key's text."""
    from analysis.counters import TopTable

    table = TopTable(np.dtype("S4"), cap=100)
    keys = np.array([b"%03d" % i for i in range(50)], dtype="S4")
    table.add(keys, np.full(50, 60, np.int64))
    made: list[bytes] = []

    def text(k) -> str:
        made.append(bytes(k))
        return bytes(k).decode()

    snap = table.frozen()
    first = snap.top(3, "packets", text)
    assert [k for k, *_ in first] == ["000", "001", "002"] and len(made) == 50  # 50 ties: every text made
    assert snap.top(3, "packets", text) == first and len(made) == 50  # the same question: answered once
    assert [k for k, *_ in snap.top(3, "bytes", text)] == ["000", "001", "002"] and len(made) == 100
    # Another text function is another question (keyed by identity: a closure over other values differs).
    assert [k for k, *_ in snap.top(3, "packets", lambda k: bytes(k).decode()[::-1])] == ["000", "010", "020"]
    assert [k for k, *_ in snap.top(3, "packets", lambda k: "x" + bytes(k).decode())] == ["x000", "x001", "x002"]
    table.add(np.array([b"049", b"049"], dtype="S4"), np.full(2, 60, np.int64))  # the live table moves on
    assert table.top(1, "packets", text)[0][:2] == ("049", 3)
    assert snap.top(1, "packets", text)[0][:2] == ("000", 1)  # the snapshot's answer is still its own
