"""History wired into the engine: capture --store, restart, kill -9, disk faults, the page's ranges,
the import action and the downloads. Real packets on lo, isolated by distinctive UDP ports."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import streamlit as st
from conftest import PYTHON, ROOT, need
from streamlit.testing.v1 import AppTest

import history_page
from packet_processor import CaptureEngine, engines, stop_all
from store.export import to_csv, to_parquet

APP = "../dashboard.py"
MARKER = b"NTM-PAYLOAD-MARKER-7f3a"  # must never reach any output
PAYLOAD = MARKER + b"x" * (100 - len(MARKER))
WIRE = 14 + 20 + 8 + len(PAYLOAD)  # Ethernet (lo) + IPv4 + UDP + payload


def send_udp(port: int, n: int, gap: float = 0.002) -> None:
    """n real UDP datagrams to 127.0.0.1:port (nobody listens: ICMP errors are not UDP, the filter drops them)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(n):
            s.sendto(PAYLOAD, ("127.0.0.1", port))
            time.sleep(gap)


def shared_dir() -> str:
    """A folder the capture command can write after it gives up root (it may run as nobody)."""
    d = tempfile.mkdtemp(prefix="ntm-history-")
    os.chmod(d, 0o777)
    return d


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "packet_processor.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def start_capture(store: str, port: int, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([PYTHON, "packet_processor.py", "capture", "--iface", "lo", "--filter",
                             f"udp dst port {port}", "--seconds", str(seconds), "--store", store],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_capture(proc)
    return proc


def wait_for_capture(proc: subprocess.Popen, limit: float = 20.0) -> None:
    """Until the capture command has its ring open (its store opened first: the log says so)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        time.sleep(0.2)
        if _ring_open(proc.pid):
            time.sleep(0.5)
            return
    raise AssertionError("capture did not start")


def _ring_open(pid: int) -> bool:
    """Whether the process holds a packet socket (the capture ring) now."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    inodes = {link[8:-1] for link in links if link.startswith("socket:[")}
    packet = Path("/proc/net/packet").read_text().splitlines()[1:]
    return any(line.split()[-1] in inodes for line in packet)


def history(store: str, since: float, until: float) -> dict:
    out = cli("history", "--store", store, "--since", str(int(since)), "--until", str(int(until)))
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


# -- restart and kill -9 ----------------------------------------------------------------------


@pytest.fixture
def fresh() -> Iterator[None]:
    """A new process-wide engine for each page test (the page keeps one in st.cache_resource)."""
    stop_all()
    st.cache_resource.clear()
    yield
    for e in engines():
        e.close_store()
    st.cache_resource.clear()


def array(v) -> np.ndarray:
    """A figure array from Plotly's JSON, plain list or binary 'bdata'."""
    if isinstance(v, dict) and "bdata" in v:
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"])
    return np.asarray(v)


def app() -> AppTest:
    return AppTest.from_file(APP, default_timeout=60)


def metric(at: AppTest, label: str) -> int:
    return int(next(m for m in at.metric if m.label == label).value.replace(",", ""))


def page_engine() -> CaptureEngine:
    """The page's engine: the one recording into NTM_STORE (engines of earlier tests may linger)."""
    path = os.environ["NTM_STORE"]
    return next(e for e in engines() if e.store is not None and e.store.path == path)


def quiet_page_env(monkeypatch, store: str, port: int) -> None:
    """The page's own engine records on lo with a filter no test traffic matches, into `store`."""
    monkeypatch.setenv("NTM_STORE", store)
    monkeypatch.setenv("NTM_INTERFACE", "lo")
    monkeypatch.setenv("NTM_BPF_FILTER", f"udp dst port {port}")


def test_restart_history_and_page_give_exact_totals(root_only, fresh, monkeypatch):
    store = os.path.join(shared_dir(), "h.duckdb")
    port, n = 47_311, 400
    t0 = time.time()
    proc = start_capture(store, port, seconds=4)
    send_udp(port, n)
    out, err = proc.communicate(timeout=60)
    t1 = time.time()
    live = json.loads(out)
    assert live["packets"] == n, err
    # The JSON is made after the store's final flush and close: "closed", with nothing failed or lost.
    assert live["store"]["state"] == "closed" and live["store"]["message"] is None, live["store"]
    assert live["store"]["history_skipped"] == 0 and live["store"]["packets_dropped"] == 0
    # A new process on the same store: exact totals for the range, as the capture itself counted them.
    h = history(store, t0 - 1, t1 + 1)
    assert h["packets"] == n and h["bytes_wire"] == n * WIRE
    assert h["transport_counts"]["udp"] == n and h["direction_counts"] == live["direction_counts"]
    assert h["top10_udp_dst_ports"] == [[port, n]]
    assert h["top10_src_by_packets"][0]["addr"] == "127.0.0.1"
    # The page of another new process, pointed at that store: the last hour shows the traffic from before.
    quiet_page_env(monkeypatch, store, port + 1)
    at = app().run()
    at.radio(key="time_range").set_value("1 h").run()
    assert not at.exception
    assert metric(at, "Packets") == n
    specs = {json.loads(c.proto.spec)["layout"]["title"]["text"]: json.loads(c.proto.spec)
             for c in at.get("plotly_chart")}
    tl = specs["Traffic by capture time"]
    assert "bin width 5 s" in tl["layout"]["xaxis2"]["title"]["text"]  # 3,600 s in <= 1,500 points
    drawn = sum(float(array(d["y"]).sum()) for d in tl["data"] if d["yaxis"] == "y")  # packets/s per 5 s bin
    assert round(drawn * 5) == n  # every packet from before the restart is on the last hour's timeline
    labels = [b.proto.label for b in at.get("download_button")]
    assert {"seconds (CSV)", "conversations (Parquet)", "alerts (CSV)"} <= set(labels)


def test_kill_9_after_traffic_loses_nothing(root_only, monkeypatch):
    store = os.path.join(shared_dir(), "h.duckdb")
    port, n = 47_313, 300
    t0 = time.time()
    # A 1 s flush (the default is 5 s) and 4 s after the traffic: the rows have been flushed when the
    # kill comes, as with the default and 8 s, and the run is 4 s shorter.
    monkeypatch.setenv("NTM_STORE_FLUSH_S", "1")
    proc = start_capture(store, port, seconds=120)
    send_udp(port, n)
    time.sleep(4)  # STORE_FLUSH_S is 1: the rows are durable by now
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    h = history(store, t0 - 1, time.time() + 1)
    assert h["packets"] == n and h["bytes_wire"] == n * WIRE and h["top10_udp_dst_ports"] == [[port, n]]


# -- disk faults, through the engine and the page ----------------------------------------------


@pytest.fixture
def tmpfs() -> Iterator[str]:
    """A small tmpfs the test mounts and always unmounts."""
    need(os.geteuid() == 0, "mounting a tmpfs needs root")
    d = tempfile.mkdtemp(prefix="ntm-tmpfs-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", d], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", d], check=False)
        os.rmdir(d)


def _page_until(at: AppTest, pred, timeout: float = 15.0) -> AppTest:
    end = time.monotonic() + timeout
    at.run()
    while not pred(at) and time.monotonic() < end:
        time.sleep(0.3)
        at.run()
    return at


def _history_error(at: AppTest) -> bool:
    return any("History is not being written" in e.value for e in at.error)


def test_read_only_folder_error_state_while_capture_goes_on(root_only, tmpfs, fresh, monkeypatch):
    subprocess.run(["mount", "-o", "remount,ro", tmpfs], check=True)  # root ignores modes: a read-only mount
    port, n = 47_315, 200
    quiet_page_env(monkeypatch, os.path.join(tmpfs, "h.duckdb"), port)
    at = app().run()
    send_udp(port, n)
    at = _page_until(at, lambda a: metric(a, "Packets") == n and _history_error(a))
    assert metric(at, "Packets") == n  # capture goes on, exact
    assert _history_error(at), [e.value for e in at.error]
    engine = page_engine()
    assert engine.snapshot().totals["store"]["state"] == "error"
    at.radio(key="time_range").set_value("1 h").run()  # a range the store cannot answer: a message
    assert not at.exception and any("History cannot be read" in e.value for e in at.error)


def test_full_disk_error_state_while_capture_goes_on(root_only, tmpfs, fresh, monkeypatch):
    port, n = 47_317, 300
    monkeypatch.setenv("NTM_STORE_FLUSH_S", "0.5")
    quiet_page_env(monkeypatch, os.path.join(tmpfs, "h.duckdb"), port)
    at = app().run()
    engine = page_engine()
    assert engine.snapshot().totals["store"]["state"] == "ok"
    # Fill the filesystem: every write from here on fails with ENOSPC.
    with open(os.path.join(tmpfs, "filler"), "wb") as fh, pytest.raises(OSError):
        while True:
            fh.write(b"\0" * (1 << 20))
            fh.flush()
    for _ in range(3):
        send_udp(port, n // 3)
        time.sleep(1.5)
    at = _page_until(at, lambda a: metric(a, "Packets") == n and _history_error(a), timeout=20)
    assert metric(at, "Packets") == n
    assert _history_error(at), [e.value for e in at.error]
    state = engine.snapshot().totals["store"]
    assert state["state"] == "error" and state["pending"] >= 1, state


# -- exports ------------------------------------------------------------------------------------


def test_live_exports_equal_the_page_and_header_pcap_reads_in_tshark(root_only, fresh, monkeypatch, tmp_path):
    need(bool(subprocess.run(["which", "tshark"], capture_output=True).stdout), "tshark is not installed")
    port, n = 47_319, 250
    quiet_page_env(monkeypatch, os.path.join(shared_dir(), "h.duckdb"), port)
    at = app().run()
    send_udp(port, n)
    at = _page_until(at, lambda a: metric(a, "Packets") == n)
    assert metric(at, "Packets") == n
    labels = {b.proto.label for b in at.get("download_button")}
    assert {"packets (CSV)", "packets (Parquet)", "seconds (Parquet)", "conversations (CSV)",
            "Buffered packets' headers (pcap, no payload)"} <= labels
    snap = page_engine().snapshot()
    # What the buttons serve, read back with pandas, equals the page's numbers.
    pk = pd.read_csv(io.BytesIO(to_csv(history_page.live_seconds(snap))))
    assert int(pk["packets"].sum()) == metric(at, "Packets") and int(pk["bytes"].sum()) == n * WIRE
    conv = pd.read_parquet(io.BytesIO(to_parquet(history_page.live_conversations(snap))))
    assert int(conv["packets"].sum()) == n and int(conv["bytes"].sum()) == n * WIRE
    buf = pd.read_parquet(io.BytesIO(to_parquet(_packets(snap))))
    assert len(buf) == n and set(buf["dst port"]) == {port}
    pcap = history_page._header_pcap(snap.packets)
    assert MARKER not in pcap and MARKER not in to_csv(_packets(snap))
    path = tmp_path / "headers.pcap"
    path.write_bytes(pcap)
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "ip.src", "-e", "ip.dst", "-e",
                          "udp.dstport"], capture_output=True, text=True, check=True)
    rows = [line.split("\t") for line in out.stdout.splitlines()]
    assert len(rows) == n and {tuple(r) for r in rows} == {("127.0.0.1", "127.0.0.1", str(port))}


def _packets(snap) -> pd.DataFrame:
    from packet_processor import packets_frame

    return packets_frame(snap.packets)


def test_history_range_exports_equal_the_page(fresh, monkeypatch, tmp_path):
    """Import a crafted file through the page's import action, then the range's downloads equal its metrics."""
    from pcapgen import pcap_bytes
    from test_files import sample_frames

    monkeypatch.setenv("NTM_STORE", str(tmp_path / "h.duckdb"))
    monkeypatch.setenv("NTM_PCAP", "")
    monkeypatch.setenv("NTM_INTERFACE", "lo")
    monkeypatch.setenv("NTM_BPF_FILTER", "udp dst port 47321")
    at = app().run()
    assert at.button(key="hist_import") is not None  # the action is on the page
    engine = page_engine()
    frames = sample_frames()
    ts0 = time.time() - 600  # ten minutes ago: inside the '1 h' range
    uploads = []
    for i in range(3):
        data = io.BytesIO(pcap_bytes([(ts0 + i * 60 + j * 0.01, f) for j, (_, f) in enumerate(frames)]))
        data.name = f"part{i}.pcap"
        uploads.append(data)
    result = history_page.import_uploads(engine, uploads)
    assert result["files"] == 3 and result["packets"] == 3 * len(frames) and not result["errors"]
    at.radio(key="time_range").set_value("1 h").run()
    assert not at.exception
    shown = metric(at, "Packets")
    assert shown == 3 * len(frames)
    now = int(time.time())
    from store import export
    from store.history import history_summary

    sec = pd.read_parquet(io.BytesIO(to_parquet(export.seconds_frame(engine.store, now - 3599, now))))
    assert int(sec["packets"].sum()) == shown
    conv = pd.read_csv(io.BytesIO(to_csv(export.conversations_frame(engine.store, now - 3599, now))))
    non_ip = history_summary(engine.store, now - 3599, now)["transport_counts"]["non_ip"]
    assert non_ip == 3  # conversations are IP 5-tuples: the ARP frames are in the totals only
    assert int(conv["packets"].sum()) == shown - non_ip
    table = next(d.value for d in at.dataframe if "endpoint A" in d.value.columns)  # the page's table
    assert int(table["packets"].sum()) == int(conv["packets"].head(20).sum())


def test_import_and_history_subcommands_window_one_file(tmp_path):
    """`import` two files, then `history` over all time is their sum and a window names one file's."""
    from pcapgen import pcap_bytes
    from test_files import sample_frames

    frames = [f for _, f in sample_frames()]
    paths = []
    for i, t0 in enumerate((1_600_000_000, 1_600_100_000)):
        p = tmp_path / f"f{i}.pcap"
        p.write_bytes(pcap_bytes([(t0 + j, f) for j, f in enumerate(frames[: 5 + i])]))
        paths.append(str(p))
    store = str(tmp_path / "h.duckdb")
    out = cli("import", *paths, "--store", store)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["files"] == 2 and got["packets"] == 11 and got["errors"] == []
    assert history(store, 0, 2_000_000_000)["packets"] == 11
    one = history(store, 1_600_100_000, 1_600_100_005)
    assert one["packets"] == 6 and one["first_ts"] == 1_600_100_000
    iso = cli("history", "--store", store, "--since", "2020-09-13T12:26:40Z", "--until", "2020-09-13T12:26:44Z")
    assert json.loads(iso.stdout)["packets"] == 5  # ISO 8601 bounds, both seconds included
