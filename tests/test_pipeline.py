"""The staged pipeline and the engine's numbers: top tables under churn, bins, settings, the CLI's exit
status, file completeness of the detector stage and its lifecycle (crafted frames and files)."""

from __future__ import annotations

import collections
import json
import os
import random
import socket
import subprocess
import threading
import time

import numpy as np
import pytest
from conftest import PYTHON, ROOT, wait_for
from pcapgen import pcap_bytes
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

import config
from analysis import stages
from capture.nic import nic_counters, nic_dropped_since
from packet_processor import CaptureEngine, Source, TopTable, packets_csv, packets_frame

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
T0 = 1_700_000_000.0


def key(i: int) -> np.ndarray:
    return np.frombuffer(i.to_bytes(16, "big"), np.uint8)


def keys(ids) -> np.ndarray:
    return np.stack([key(int(i)) for i in ids]).view("V16").ravel()


# -- top tables: Space-Saving ------------------------------------------------------------------


def test_top_table_is_exact_until_full():
    rng = np.random.default_rng(1)
    table = TopTable(np.dtype("V16"), 100)
    truth: collections.Counter = collections.Counter()
    for _ in range(20):
        ids = rng.integers(0, 100, 500)  # 100 distinct keys: the table never overflows
        table.add(keys(ids), np.full(len(ids), 60, np.int64))
        truth.update(ids.tolist())
    got = {int.from_bytes(bytes(k), "big"): int(v) for k, v in zip(table.keys, table.vals[:, 0])}
    assert got == dict(truth)
    assert not table.errors.any() and table.floor == (0, 0)


def test_late_heavy_hitter_enters_a_full_table_with_true_counts_inside_the_bounds():
    """49 keys send 100 packets each, then a scan of 80,000 one-packet keys churns through, and a late
    heavy hitter sends 50 packets in each of its 40 batches (2,000 in all, more than N / cap). The old
    pruning (keep the top 90 % by counts so far, forget the rest) dropped it every batch: 50 < 100."""
    cap = 50
    table = TopTable(np.dtype("V16"), cap)
    truth: collections.Counter = collections.Counter()
    rng = np.random.default_rng(7)
    stale = np.repeat(np.arange(100, 149), 100)
    table.add(keys(stale), np.full(len(stale), 100, np.int64))
    truth.update(stale.tolist())
    heavy, next_id = 7, 1000
    for _ in range(40):
        ids = np.array(list(range(next_id, next_id + 2000)) + [heavy] * 50)  # churn: every other key new
        next_id += 2000
        rng.shuffle(ids)
        table.add(keys(ids), np.full(len(ids), 100, np.int64))
        truth.update(ids.tolist())
    rows = {int.from_bytes(bytes(k), "big"): r for r, k in enumerate(table.keys)}
    assert heavy in rows, "the late heavy hitter never got into the table"
    for ident, r in rows.items():
        count, err = int(table.vals[r, 0]), int(table.errors[r, 0])
        assert count - err <= truth[ident] <= count, (ident, count, err, truth[ident])
        b, berr = int(table.vals[r, 1]), int(table.errors[r, 1])
        assert b - berr <= truth[ident] * 100 <= b
    # Every key with more packets than the floor is in the table (the Space-Saving guarantee), and
    # the floor stays below N / cap.
    floor = table.floor[0]
    assert all(i in rows for i, n in truth.items() if n > floor)
    assert floor <= sum(truth.values()) / cap


def test_snapshot_and_summary_mark_approximate_top_entries(tmp_path, monkeypatch):
    monkeypatch.setenv("NTM_TOP_TABLE_MAX", "10")
    recs = []
    for i in range(300):  # 300 sources of one packet, then one of 50
        d = bytes(ETH / IP(src=f"10.1.{i // 250}.{i % 250}", dst="10.0.0.1") / UDP(sport=1, dport=2))
        recs.append((T0 + i * 0.001, d))
    d = bytes(ETH / IP(src="10.9.9.9", dst="10.0.0.1") / UDP(sport=1, dport=2))
    recs += [(T0 + 1 + i * 0.001, d) for i in range(50)]
    f = tmp_path / "churn.pcap"
    f.write_bytes(pcap_bytes(recs))
    monkeypatch.setenv("NTM_BATCH_SIZE", "64")
    eng = CaptureEngine()
    out = eng.load_file(str(f))
    page = eng.snapshot().top_addresses("src")  # the page's list: every entry says its bound (0 = exact)
    assert all({"error", "packets_error", "bytes_error", "approx"} <= set(e) for e in page)
    assert page[0]["addr"] == "10.9.9.9" and page[0]["packets"] - page[0]["error"] <= 50 <= page[0]["packets"]
    top = out["top10_src_by_packets"]
    assert top[0]["addr"] == "10.9.9.9"
    assert top[0]["packets"] - top[0]["error"] <= 50 <= top[0]["packets"]
    assert all(e["approx"] and e["error"] > 0 for e in top if "approx" in e)
    assert any("approx" in e for e in top)  # 300 keys through a table of 10: something is approximate
    monkeypatch.setenv("NTM_TOP_TABLE_MAX", "1000")
    top = CaptureEngine().load_file(str(f))["top10_src_by_packets"]
    assert top[0] == {"addr": "10.9.9.9", "packets": 50, "bytes": 50 * len(d)}  # exact: no bounds


# -- per-second bins and timestamps ---------------------------------------------------------


def udp_records(n: int, t0: float, step: float = 0.5) -> list:
    d = bytes(ETH / IP(src="10.0.0.2", dst="10.0.0.1") / UDP(sport=5, dport=6))
    return [(t0 + i * step, d, len(d), 1) for i in range(n)]


def test_an_outlier_second_does_not_wipe_the_timeline(monkeypatch):
    monkeypatch.setenv("NTM_BIN_SECONDS", "60")
    eng = CaptureEngine()
    eng.ingest_records(udp_records(100, T0))  # 50 seconds
    eng.ingest_records(udp_records(1, 2_200_000_000.0))  # one packet dated 2039
    eng.ingest_records(udp_records(40, T0 + 50))  # 20 more ordinary seconds: 71 in all, 60 kept
    secs = eng.snapshot().bins[:, 0].tolist()
    assert secs == [*range(int(T0) + 11, int(T0) + 70), 2_200_000_000]
    # A clock step back: the newest 60 seconds that received packets are kept, the outlier ages out.
    eng.ingest_records(udp_records(140, T0 - 10_000))
    secs = eng.snapshot().bins[:, 0].tolist()
    assert secs == list(range(int(T0) - 10_000 + 10, int(T0) - 10_000 + 70))


def test_timestamps_beyond_pandas_range_do_not_crash_the_table_or_csv():
    eng = CaptureEngine()
    d = bytes(ETH / IP(src="10.0.0.2", dst="10.0.0.1") / UDP(sport=5, dport=6))
    eng.ingest_records([(T0, d, len(d), 1), (1e12, d, len(d), 1), (-1e11, d, len(d), 1)])
    rows = eng.snapshot().packets
    frame = packets_frame(rows, "Europe/Berlin")
    assert frame["time"].iloc[0].startswith("2023-11-1")
    assert "1000000000000.000000" in frame["time"].iloc[1] and "-100000000000" in frame["time"].iloc[2]
    assert packets_csv(rows).count(b"\n") == 4


# -- settings --------------------------------------------------------------------------------


def test_invalid_settings_are_refused_at_start_up_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("NTM_BUFFER_SIZE", "0")
    monkeypatch.setenv("NTM_RING_BLOCKS", "many")
    with pytest.raises(config.SettingError) as exc:
        CaptureEngine()
    msg = str(exc.value)
    assert "NTM_BUFFER_SIZE='0' is out of range: it must be at least 1" in msg
    assert "NTM_RING_BLOCKS='many' is not a valid int" in msg
    env = dict(os.environ, NTM_BUFFER_SIZE="0", NTM_RING_BLOCKS="64", PYTHONPATH=str(ROOT))
    out = subprocess.run([PYTHON, str(ROOT / "packet_processor.py"), "summary", "/dev/null"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "NTM_BUFFER_SIZE='0' is out of range" in out.stderr
    assert "Traceback" not in out.stderr


def test_every_default_is_inside_its_own_range():
    for s in config.SETTINGS:
        if s.low is not None:
            assert s.low <= s.default <= s.high, s.name


def test_every_numeric_setting_has_a_range_and_its_bounds_are_enforced(monkeypatch):
    numeric = [s for s in config.SETTINGS if isinstance(s.default, (int, float)) and not isinstance(s.default, bool)]
    assert {"STORE_FLUSH_S", "RETENTION_DAYS", "STORE_PRUNE_S", "STORE_TOP_MAX", "STORE_CONV_MAX",
            "STORE_PENDING_MAX"} <= {s.name for s in numeric}
    for s in numeric:
        assert s.low is not None and s.high is not None, f"{s.name} has no range"
        kind = type(s.default)
        for value in (kind(s.low) - 1, kind(s.high) * 2 + 1):  # outside, each side, in the setting's own type
            monkeypatch.setenv(f"NTM_{s.name}", str(value))
            assert any(p.startswith(f"NTM_{s.name}=") and "is out of range" in p for p in config.problems()), s.name
        monkeypatch.setenv(f"NTM_{s.name}", str(s.default))
        assert config.problems() == [], s.name
        monkeypatch.delenv(f"NTM_{s.name}")


def test_invalid_local_nets_are_refused_at_start_up(monkeypatch):
    monkeypatch.setenv("NTM_LOCAL_NETS", "10.0.0.0/8,garbage,192.168.0.0/33")
    with pytest.raises(config.SettingError) as exc:
        CaptureEngine()
    assert "NTM_LOCAL_NETS='10.0.0.0/8,garbage,192.168.0.0/33' is not valid: not networks: 'garbage', " \
           "'192.168.0.0/33'" in str(exc.value)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([PYTHON, str(ROOT / "packet_processor.py"), "summary", "/dev/null"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "NTM_LOCAL_NETS=" in out.stderr and "Traceback" not in out.stderr
    monkeypatch.delenv("NTM_LOCAL_NETS")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([PYTHON, str(ROOT / "packet_processor.py"), "summary", "--local-nets", "nonsense",
                          "/dev/null"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "--local-nets='nonsense' is not valid" in out.stderr, out.stderr
    with pytest.raises(ValueError, match="not networks: 'nonsense'"):
        CaptureEngine(local_nets="nonsense")


# -- the CLI ----------------------------------------------------------------------------------


def cli(path) -> tuple[int, dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([PYTHON, str(ROOT / "packet_processor.py"), "summary", str(path)], env=env,
                         capture_output=True, text=True, timeout=120)
    return out.returncode, json.loads(out.stdout)


def test_cli_exit_status_says_whether_the_file_was_read_to_its_end(tmp_path):
    good = pcap_bytes([(T0 + i, bytes(ETH / IP() / UDP(sport=9, dport=9))) for i in range(10)])
    whole, cut, junk = tmp_path / "whole.pcap", tmp_path / "cut.pcap", tmp_path / "junk.pcap"
    whole.write_bytes(good)
    cut.write_bytes(good[:-20])  # the last record is cut short
    junk.write_bytes(b"this is not a capture file at all" * 10)
    code, out = cli(whole)
    assert code == 0 and out["packets"] == 10 and out["error"] is None
    code, out = cli(cut)
    assert code == 2 and out["packets"] == 9 and out["error"]
    code, out = cli(junk)
    assert code == 1 and out["packets"] == 0 and out["error"]


# -- the detector stage on files ----------------------------------------------------------------


def scan_file(tmp_path, n_ports: int = 300) -> str:
    """A vertical scan: SYNs to n_ports ports, each refused with RST."""
    recs = []
    for i, port in enumerate(range(1000, 1000 + n_ports)):
        syn = ETH / IP(src="10.9.0.5", dst="10.9.0.7") / TCP(sport=40000, dport=port, flags="S")
        rst = ETH / IP(src="10.9.0.7", dst="10.9.0.5") / TCP(sport=port, dport=40000, flags="RA")
        recs += [(T0 + i * 0.002, bytes(syn)), (T0 + i * 0.002 + 0.001, bytes(rst))]
    f = tmp_path / "scan.pcap"
    f.write_bytes(pcap_bytes(recs))
    return str(f)


def test_files_are_analysed_completely_even_by_a_slow_detector_stage(tmp_path, monkeypatch):
    """A file cannot overflow: its reader waits for the stage, so nothing is skipped (the hook makes
    the worker sleep 0.05 s per batch; the queue holds 100 packets, a batch is 50)."""
    f = scan_file(tmp_path)
    monkeypatch.setenv("NTM_BATCH_SIZE", "50")
    monkeypatch.setenv("NTM_STAGE_QUEUE_PACKETS", "100")
    monkeypatch.setenv(stages.SLOW_HOOK_ENV, "0.05")
    out = CaptureEngine().load_file(f)
    st = out["stages"]["detectors"]
    assert out["packets"] == 600
    assert st["packets_in"] == 600 and st["packets_skipped"] == 0 and st["packets_analysed"] == 600
    assert st["minute_analysed_pct"] == 100.0
    assert [a["detector"] for a in out["alerts"]] == ["port_scan"]


@pytest.mark.parametrize("mode", ["process", "thread", "exec"])
def test_detector_stage_modes_find_the_same_alerts(tmp_path, monkeypatch, mode):
    """The worker process (forked from the single-threaded CLI, or a fresh interpreter when threads run)
    and the thread mode give the alerts of the inline detectors."""
    f = scan_file(tmp_path)
    monkeypatch.setenv("NTM_DETECTORS_PROCESS", "0" if mode == "thread" else "1")
    blocker = threading.Event()
    extra = threading.Thread(target=blocker.wait, daemon=True)
    if mode == "exec":
        extra.start()  # a second thread: forking would be unsafe, the stage must exec a fresh interpreter
        assert stages.start_method() == "exec"
    try:
        got = CaptureEngine().load_file(f)["alerts"]
    finally:
        blocker.set()
    from capture.sources import FileReader

    inline = CaptureEngine()
    inline.ingest_records(FileReader(f))  # no capture started: the detectors run inline
    want = inline.summary()["alerts"]
    assert got == want and want


def test_the_worker_never_runs_the_page_script(tmp_path, monkeypatch):
    """Under Streamlit, __main__ is the page script. multiprocessing's 'spawn' re-imports __main__ in
    the child, which would run the whole page (and start a capture) inside the detector worker."""
    import sys
    import types

    marker = tmp_path / "page-ran"
    page = tmp_path / "page.py"
    page.write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    fake = types.ModuleType("__main__")
    fake.__file__ = str(page)
    monkeypatch.setitem(sys.modules, "__main__", fake)
    blocker = threading.Event()
    threading.Thread(target=blocker.wait, daemon=True).start()  # as in the page's process: many threads
    try:
        out = CaptureEngine().load_file(scan_file(tmp_path))
    finally:
        blocker.set()
    assert out["stages"]["detectors"]["packets_analysed"] == 600 and out["alerts"]
    assert not marker.exists()


def test_no_worker_process_outlives_its_engine(tmp_path):
    """Start a capture of a paced file in a child process, print the worker's pid, exit without stop():
    the worker must be gone too."""
    f = scan_file(tmp_path)
    script = ("import sys, time; sys.path.insert(0, sys.argv[1])\n"
              "from packet_processor import CaptureEngine, Source\n"
              "e = CaptureEngine(); e.start(Source('file', path=sys.argv[2], speed=0.01))\n"
              "time.sleep(0.5); print(e._stage.pid(), flush=True)\n")
    out = subprocess.run([PYTHON, "-c", script, str(ROOT), f], capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.split()[-1])
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}") or _zombie(pid), timeout=5), f"worker {pid} left"


def _policy(pid: int) -> tuple[int, int]:
    """(scheduling policy, nice value) of process `pid`."""
    return os.sched_getscheduler(pid), os.getpriority(os.PRIO_PROCESS, pid)


@pytest.mark.live
@pytest.mark.parametrize("idle, steps", [(None, None), ("1", "0"), ("0", None), ("0", "0"), ("0", "4"), ("0", "19")])
def test_a_live_captures_worker_gives_way_to_the_capture(root_only, monkeypatch, idle, steps):
    """When capture and worker share a core the capture must go first: a live capture's worker process runs
    SCHED_IDLE (DETECTORS_IDLE, on unless set) and DETECTORS_NICE (10 unless set, at most 19) steps nicer,
    and still analyses the packets; the capture thread keeps its priority. (The page's process has many
    threads, so its worker is exec'd; the CLI's forked one: test_pipeline_live.py's test of its sockets.)"""
    for name, value in (("NTM_DETECTORS_IDLE", idle), ("NTM_DETECTORS_NICE", steps)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(stages, "start_method", lambda: "exec")  # forking pytest's threads could deadlock
    mine = _policy(0)
    assert mine[0] == os.SCHED_OTHER
    port = random.randint(40_000, 60_000)
    eng = CaptureEngine()
    assert eng.start(Source("live", iface="lo", bpf=f"udp port {port}")), eng.status().error
    try:
        pid = eng._stage.pid()
        want = (os.SCHED_IDLE if idle in (None, "1") else os.SCHED_OTHER, min(19, mine[1] + int(steps or 10)))
        assert _policy(pid) == want
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for _ in range(200):
                s.sendto(b"x", ("127.0.0.1", port))
        assert wait_for(lambda: eng._stage.stats.packets_done >= 200, timeout=20), eng.snapshot().totals
        assert eng._stage.stats.packets_skipped == 0
        assert {_policy(int(t)) for t in os.listdir(f"/proc/{pid}/task")} == {want}  # each of its threads
        assert _policy(eng._thread.native_id) == mine  # the capture thread's priority is untouched
    finally:
        eng.stop()
    assert _policy(0) == mine


def test_every_thread_a_process_has_gives_way():
    """Linux keeps nice and policy per thread: a worker that already runs a second thread must lower both."""
    code = "import threading, sys; threading.Thread(target=sys.stdin.read).start(); print('up', flush=True)"
    proc = subprocess.Popen([PYTHON, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "up\n"
        tids = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task")]
        assert len(tids) == 2
        before = _policy(proc.pid)
        assert stages.lower_priority(proc.pid, 4, True) == os.SCHED_IDLE
        assert {_policy(t) for t in tids} == {(os.SCHED_IDLE, min(19, before[1] + 4))}
    finally:
        proc.stdin.close()
        proc.wait(10)


def test_a_files_worker_keeps_the_readers_priority(tmp_path, monkeypatch):
    """A file's reader waits for its detectors (nothing is lost), so their speed is the file's: no yielding."""
    monkeypatch.delenv("NTM_DETECTORS_IDLE", raising=False)
    eng = CaptureEngine()
    assert eng.start(Source("file", path=scan_file(tmp_path), speed=0.01))
    try:
        assert wait_for(lambda: eng._stage is not None and eng._stage.pid(), timeout=5)
        assert wait_for(lambda: eng._stage.stats.packets_done > 0, timeout=20)
        assert _policy(eng._stage.pid()) == _policy(0)
    finally:
        eng.stop()


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_stop_ends_the_worker_and_start_gives_a_fresh_alert_book(tmp_path, monkeypatch):
    """Generation ids: alerts of a previous capture never appear after Start, even from a worker that
    was still busy with it (slowed by the hook)."""
    f = scan_file(tmp_path, 2000)
    monkeypatch.setenv("NTM_BATCH_SIZE", "100")
    monkeypatch.setenv(stages.SLOW_HOOK_ENV, "0.05")  # 40 batches: the worker is busy for 2 s
    eng = CaptureEngine()
    assert eng.start(Source("file", path=f))
    assert wait_for(lambda: eng.snapshot().alerts, timeout=20)
    first = eng._stage
    assert first.stats.packets_done < 4000  # still busy with the first capture
    assert eng.start(Source("file", path=f, speed=0.001))  # the same scan, paced: 4 s per 0.004 s of it
    second = eng._stage
    assert second is not first and not first.alive()
    assert not first._proc.is_alive()
    seen = []
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        seen += eng.snapshot().alerts
        time.sleep(0.05)
    assert seen == []  # the new capture has not scanned enough yet; the old alerts are gone
    eng.stop()
    assert not second.alive() and not second._proc.is_alive()


def test_a_dead_worker_is_state_the_page_sees_and_counting_goes_on(tmp_path, monkeypatch):
    f = scan_file(tmp_path, 2000)
    monkeypatch.setenv("NTM_BATCH_SIZE", "100")
    eng = CaptureEngine()
    assert eng.start(Source("file", path=f, speed=0.05))  # paced: 4,000 packets over 80 s... of file time
    assert wait_for(lambda: eng._stage is not None and eng._stage.pid(), timeout=5)
    os.kill(eng._stage.pid(), 9)
    assert wait_for(lambda: eng.snapshot().totals["stages"]["detectors"]["error"], timeout=5)
    st = eng.snapshot().totals["stages"]["detectors"]
    assert "exited (code -9)" in st["error"] and not st["alive"]
    before = eng.snapshot().totals["packets"]
    assert wait_for(lambda: eng.snapshot().totals["packets"] > before + 50, timeout=10)
    eng.stop()


# -- NIC counters ------------------------------------------------------------------------------


def test_nic_counters_read_sysfs_and_deltas(tmp_path):
    for iface, vals in (("eth9", (5, 2, 1)), ("eth8", (1, 0, 0))):
        d = tmp_path / iface / "statistics"
        d.mkdir(parents=True)
        for name, v in zip(("rx_dropped", "rx_missed_errors", "rx_fifo_errors"), vals):
            (d / name).write_text(f"{v}\n")
    assert nic_counters("eth9", str(tmp_path)) == {"rx_dropped": 5, "rx_missed_errors": 2, "rx_fifo_errors": 1}
    assert nic_counters("any", str(tmp_path)) == {"rx_dropped": 6, "rx_missed_errors": 2, "rx_fifo_errors": 1}
    assert nic_counters("nosuch", str(tmp_path)) is None
    assert nic_counters("../etc", str(tmp_path)) is None
    base = {"rx_dropped": 5, "rx_missed_errors": 2, "rx_fifo_errors": 1}
    assert nic_dropped_since(base, {"rx_dropped": 9, "rx_missed_errors": 3, "rx_fifo_errors": 1}) == 5
    assert nic_dropped_since(base, None) is None
    # A counter that went down (the interface was recreated) counts from zero, never negative.
    assert nic_dropped_since(base, {"rx_dropped": 2, "rx_missed_errors": 2, "rx_fifo_errors": 1}) == 2


def test_a_files_own_loss_is_reported_apart(tmp_path):
    """file_dropped: what the capturer that wrote the file says it dropped (FileReader.capturer_drops,
    from pcapng statistics), apart from the live ring's drops; null when the file says nothing."""
    f = tmp_path / "f.pcap"
    f.write_bytes(pcap_bytes([(T0, bytes(ETH / IP() / UDP()))]))
    out = CaptureEngine().load_file(str(f))
    assert out["file_dropped"] is None and out["dropped"] == 0 and out["nic_dropped"] is None
    from test_file_damage import epb, idb, isb, option, shb, u64

    lossy = tmp_path / "lossy.pcapng"  # an Interface Statistics Block: 5 dropped by the interface, 2 by the OS
    lossy.write_bytes(shb() + idb() + epb(0) + isb(0, option(5, u64(5)) + option(7, u64(2))))
    out = CaptureEngine().load_file(str(lossy))
    assert out["packets"] == 1 and out["file_dropped"] == 7 and out["dropped"] == 0


def test_acknowledged_alerts_come_back_unacknowledged_when_they_repeat(tmp_path):
    """The page acknowledges alerts on the engine's mirror of the worker's book: the mark holds until
    the worker reports a repeat (a higher count), as the alert book itself behaves."""
    from dataclasses import replace

    eng = CaptureEngine()
    eng.load_file(scan_file(tmp_path))
    (alert,) = eng.snapshot().alerts
    eng.alerts.acknowledge(alert)
    assert [a.acknowledged for a in eng.snapshot().alerts] == [True]
    eng.alerts.update(eng._gen, [replace(alert, count=alert.count + 1)], {})  # the worker's next report
    assert [a.acknowledged for a in eng.snapshot().alerts] == [False]
    eng.alerts.clear()
    assert eng.snapshot().alerts == ()
