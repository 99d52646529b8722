"""The 'by process' view: curl fetching from a local web server, captured live on lo, named per process."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time

import psutil
import pytest
from conftest import PYTHON, need, wait_for
from enrichhelp import held_curl

from enrich.attribution import by_process
from enrich.processes import ProcessTable
from packet_processor import CaptureEngine, Source

SIZE = 20_000_000  # more than the socket buffers hold: the capture sees a long transfer


def _free_port() -> int:
    for _ in range(50):
        port = random.randint(42000, 48000)
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return port
    raise RuntimeError("no free port")


@pytest.fixture
def web(tmp_path):
    """python -m http.server on 127.0.0.1 with one file of SIZE bytes."""
    (tmp_path / "blob").write_bytes(b"x" * SIZE)
    port = _free_port()
    proc = subprocess.Popen([PYTHON, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", port)) == 0, 10)
        yield proc, port
    finally:
        proc.kill()
        proc.wait(5)


def test_by_process_names_client_and_server_with_their_bytes(root_only, web, tmp_path):
    need(subprocess.run(["which", "curl"], capture_output=True).returncode == 0, "curl is not installed")
    server, port = web
    table = ProcessTable(refresh_s=0.2)
    table.start()
    engine = CaptureEngine()
    try:
        assert engine.start(Source("live", iface="lo", bpf=f"tcp port {port}")), engine.status().error
        time.sleep(0.5)
        # curl holds its connection open until the table (its idle reads: nobody asks it) names its port, then
        # fetches the blob.
        body = tmp_path / "body"
        held_curl("127.0.0.1", port, "/blob", lambda _pid, p: ("tcp", p) in table.owners(), out=str(body))
        got = body.read_bytes()
        assert got.startswith(b"HTTP/1.0 200 ") and got.endswith(b"\r\n\r\n" + b"x" * SIZE)
        time.sleep(1.0)
        snap = engine.snapshot()
    finally:
        engine.stop()
        table.stop()
    p = snap.packets
    assert len(p) == snap.totals["packets"] > 0
    rows = {r["process"]: r for r in by_process(p, table)}
    server_name = psutil.Process(server.pid).name()
    assert set(rows) == {"curl", server_name}, rows
    assert rows[server_name]["pid"] == server.pid
    # Both ends are this machine: every packet of the one connection belongs to both processes.
    for r in rows.values():
        assert r["packets"] == len(p) and r["bytes"] == int(p["wire_len"].sum()) == snap.totals["bytes"]
        assert r["connections"] == 1
    assert snap.totals["bytes"] > SIZE  # the file plus headers went through the capture


def test_the_table_is_read_every_interval_only_while_a_port_asked_for_is_unknown():
    """A read costs ~20 ms on a busy machine: with every port asked for named, the thread reads only every
    IDLE_READS intervals; a miss (a port it does not know) brings a read within an interval."""
    from enrich.processes import IDLE_READS

    table = ProcessTable(refresh_s=0.2)
    table.start()
    try:
        assert wait_for(lambda: table.refreshes >= 1, 10)
        assert wait_for(lambda: table.skipped >= IDLE_READS // 2, 10)
        assert table.refreshes == 1  # half the idle stretch went by without a read
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()  # a port opened after the read: the table does not know it yet
            port = s.getsockname()[1]
            assert table.owner("tcp", port) is None  # the miss asks for a read
            assert wait_for(lambda: table.owner("tcp", port) is not None, 5)
        assert table.refreshes == 2 and table.skipped < IDLE_READS - 1  # read at once, not at the idle read
    finally:
        table.stop()


def test_a_miss_is_read_at_once_when_the_last_read_is_an_interval_old_and_reads_stay_one_an_interval():
    """A connection shorter than the interval was closed by the next interval's read (its owner "unknown"):
    a miss now wakes the thread when the last read is an interval old; a second miss right after the read
    waits for the interval (at most one read an interval)."""
    table = ProcessTable(refresh_s=2.0)
    reads: list[float] = []
    real = table.refresh

    def counted() -> None:
        reads.append(time.monotonic())
        real()

    table.refresh = counted  # type: ignore[method-assign]
    table.start()
    try:
        assert wait_for(lambda: len(reads) == 1, 5)
        time.sleep(2.3)  # past the interval's end (a tick at 2.0 s, idle: no read) and 1.7 s before the next
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen()
            port = s.getsockname()[1]
            asked = time.monotonic()
            assert table.owner("tcp", port) is None
            assert wait_for(lambda: table.owner("tcp", port) is not None, 5)
        assert len(reads) == 2 and reads[1] - asked < 0.5  # not at the next tick, 1.7 s later
        assert table.owner("tcp", 1) is None  # a miss just after a read
        assert wait_for(lambda: len(reads) == 3, 5)
        assert reads[2] - reads[1] >= 2.0 - 0.05  # one read an interval
    finally:
        table.stop()


def test_a_table_fed_another_processes_reads_names_from_them_and_reads_nothing_itself(monkeypatch):
    """During a live capture the page's table mirrors the detector worker's reads (feed): it names what that
    read found; its own thread reads nothing while the feed is recent, and a port asked for that it lacks is
    passed on to the feeder (forward_want) instead; a stale feed, or its end, and it reads for itself again."""
    import enrich.processes as processes
    from enrich.processes import HIDDEN, IDLE_READS

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        worker = ProcessTable(refresh_s=0.1)
        worker.refresh()  # the worker's read (here in this process: the same owners)
        state = worker.state()
    state["hidden"] = frozenset({("udp", 9)})  # as a read after the privilege drop lists one
    state["hidden_users"] = {("udp", 9): 0}
    monkeypatch.setattr(processes, "FED_SLACK_S", 0.5)  # the feed goes stale after IDLE_READS x 0.1 + 0.5 s
    page = ProcessTable(refresh_s=0.1)
    reads: list[float] = []
    forwarded: list[float] = []
    page.refresh = lambda: reads.append(time.monotonic())  # type: ignore[method-assign]
    page.forward_want = lambda: forwarded.append(time.monotonic())
    page.feed(state)
    page.start()
    try:
        assert page.label("tcp", port) == f"{psutil.Process().name()} ({os.getpid()})"
        assert page.label("udp", 9) == HIDDEN and page.hidden_users() == {"root": 1}
        time.sleep(0.25)  # (a hidden port's label asks too: no owner is listed for it)
        forwarded.clear()
        assert page.owner("tcp", 1) is None  # a miss: passed on to the feeder, not read here
        assert wait_for(lambda: len(forwarded) == 1, 2)
        time.sleep(0.3)
        assert reads == [] and len(forwarded) == 1 and page.refreshes == 1  # once per miss, one feed
        # The feeder stopped feeding: once the feed is stale the table reads for itself again.
        assert wait_for(lambda: reads, 5)
        assert reads[0] - page._fed_at >= IDLE_READS * page.refresh_s + 0.5
        page.feed(state)
        n = len(reads)
        page.feed(None)  # the capture stopped: it reads at its next interval, passing nothing on
        assert wait_for(lambda: len(reads) > n, 2) and page.forward_want is None
    finally:
        page.stop()


def test_the_socket_table_keeps_at_most_max_entries_ports():
    """A read of a machine with more sockets than the bound (40 of this test's own, besides the machine's)
    keeps max_entries of them: the table is bounded whatever the machine runs."""
    socks = []
    try:
        for _ in range(40):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        bounded, whole = ProcessTable(max_entries=10), ProcessTable()
        bounded.refresh()
        whole.refresh()
        assert len(whole._owners) >= 40 and len(bounded._owners) == 10
        assert set(bounded._owners) <= set(whole._owners) | set(whole._hidden)
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("sees_all", [True, False])
def test_a_socket_in_time_wait_has_no_owner_to_hide(monkeypatch, sees_all):
    """A TIME_WAIT socket is listed without a pid because no process holds it any more: its port is "unknown",
    not "owner not visible (no privilege)", for root and for an unprivileged reader alike (which may not read
    other users' fd tables, so only there a pid-less socket in another state is said to be hidden). Root here
    reads every fd table (CAP_SYS_PTRACE), as sees_every_owner() says."""
    import enrich.processes as processes
    from enrich.processes import UNKNOWN

    assert processes.sees_every_owner() == (os.geteuid() == 0)  # root here has CAP_SYS_PTRACE, in CI too

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        cli = socket.create_connection(srv.getsockname())
        port = cli.getsockname()[1]
        conn, _ = srv.accept()
        cli.close()  # the side that closes first waits in TIME_WAIT
        time.sleep(0.1)
        conn.close()
        assert wait_for(lambda: any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_TIME_WAIT
                                    for c in psutil.net_connections("tcp")), 5)
        monkeypatch.setattr(processes, "sees_every_owner", lambda: sees_all)
        table = ProcessTable()
        table.refresh()
    assert not table.hidden("tcp", port) and table.label("tcp", port) == UNKNOWN
