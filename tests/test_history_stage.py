"""The store stage on its own: skipped batches are history's counted loss, alerts reach the store
when they change, a file source is not recorded, and a store held by another process is a state."""

from __future__ import annotations

import subprocess
import sys
import time

from conftest import ROOT
from storehelp import udp_burst

from analysis.detect import Alert
from analysis.stages import AlertMirror
from packet_processor import CaptureEngine, Source
from store.embedded import EmbeddedStore
from store.history import history_summary
from store.stage import StoreStage


def test_skipped_batches_are_counted_as_history_loss_and_the_rest_is_exact(tmp_path):
    store = EmbeddedStore(str(tmp_path / "h.duckdb"))
    stage = StoreStage(store, max_packets=10)
    t0 = 1_700_000_000.0
    # Before the writer thread runs, the queue holds one 8-packet batch; the next does not fit.
    assert stage.offer(udp_burst(t0, 8))
    assert not stage.offer(udp_burst(t0 + 1, 8))
    stage.start()
    assert stage.drain(10)
    assert stage.offer(udp_burst(t0 + 2, 5))
    stage.close()
    state = stage.state()
    assert state["history_skipped"] == 8 and state["state"] == "ok" and not state["recording"]
    assert stage.recorder.status()[1] == 8  # the recorder was told
    assert history_summary(store)["packets"] == 13
    assert stage.as_dict()["packets_skipped"] == 8 and stage.as_dict()["packets_analysed"] == 13
    store.close()


def test_alerts_reach_the_store_when_they_change(tmp_path):
    store = EmbeddedStore(str(tmp_path / "h.duckdb"))
    mirror = AlertMirror()
    mirror.reset(1)
    stage = StoreStage(store, max_packets=1000, mirror=mirror).start()
    a = Alert("port_scan", "high", "127.0.0.2", "127.0.0.1", 1_700_000_000.0, 1_700_000_001.0, 10, "10 ports", "m")
    mirror.update(1, [a], {})
    stage.offer(udp_burst(1_700_000_000.0, 3))
    time.sleep(1.2)  # a few ticks
    mirror.update(1, [Alert(**{**a.__dict__, "count": 25, "last_ts": 1_700_000_005.0})], {})
    stage.close()
    stored = history_summary(store)["alerts"]
    assert len(stored) == 1 and stored[0]["count"] == 25 and stored[0]["last_ts"] == 1_700_000_005.0
    store.close()


def test_a_file_source_is_not_recorded(tmp_path):
    from pcapgen import pcap_bytes
    from test_files import sample_frames

    path = tmp_path / "x.pcap"
    path.write_bytes(pcap_bytes(sample_frames()))
    engine = CaptureEngine(record=True, store_path=str(tmp_path / "h.duckdb"))
    out = engine.load_file(str(path))
    assert out["packets"] == 8 and "store" not in out["stages"]
    assert history_summary(engine.store)["packets"] == 0  # files enter history through import only
    engine.close_store()


def test_a_file_after_a_live_capture_is_not_counted_as_history_loss(tmp_path, root_only):
    from pcapgen import pcap_bytes
    from test_files import sample_frames

    path = tmp_path / "x.pcap"
    path.write_bytes(pcap_bytes(sample_frames()))
    engine = CaptureEngine(record=True, store_path=str(tmp_path / "h.duckdb"))
    assert engine.start(Source("live", iface="lo", bpf="udp dst port 47403"))
    engine.stop()
    assert engine.load_file(str(path))["packets"] == 8
    state = engine.snapshot().totals["store"]
    assert state["history_skipped"] == 0 and not state["recording"]
    engine.close_store()


def test_store_held_by_another_process_is_a_state_and_capture_goes_on(tmp_path, root_only):
    path = str(tmp_path / "h.duckdb")
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys; c = duckdb.connect(sys.argv[1]); "
                               "print('open', flush=True); sys.stdin.read()", path],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "open"
        engine = CaptureEngine(record=True, store_path=path)
        state = engine.snapshot().totals["store"]
        assert state["state"] == "in_use" and f"PID {holder.pid}" in state["message"]
        assert engine.start(Source("live", iface="lo", bpf="udp dst port 47401"))
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            time.sleep(0.5)
            for _ in range(20):
                s.sendto(b"x", ("127.0.0.1", 47401))
        deadline = time.monotonic() + 10
        while engine.snapshot().totals["packets"] < 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        totals = engine.snapshot().totals
        assert totals["packets"] == 20 and totals["store"]["state"] == "in_use"
        engine.close_store()
    finally:
        holder.communicate("", timeout=10)


def test_default_store_is_in_the_effective_users_home_not_roots(monkeypatch):
    """After `sudo` gives up root, $HOME still names root's home, which the page's user cannot write."""
    import pwd

    import store.embedded as embedded

    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", "/root")
    monkeypatch.setattr(embedded.os, "geteuid", lambda: 65534)
    home = pwd.getpwuid(65534).pw_dir
    assert embedded.default_path() == f"{home}/.local/share/network-traffic-monitor/history.duckdb"
