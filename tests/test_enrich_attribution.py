"""'By process' over all traffic, not only the buffer: the engine's attribution stage counts every packet.

The reference is tcpdump writing the same filter's packets to a file and tshark reading it back, not the
engine's own numbers; the buffer is set far smaller than the transfer so the buffer alone cannot answer.
"""

from __future__ import annotations

import ipaddress
import shutil
import threading
import time

import numpy as np
import psutil
import pytest
from conftest import need, wait_for
from enrichhelp import held_curl, pcap_totals, reference_dump
from test_enrich_process import SIZE, web  # noqa: F401  - the local web server fixture

import config
from analysis.headers import PACKET_DTYPE, TCP, UDP, V4_PREFIX
from analysis.stages import AlertMirror, DetectorStage, WorkerProcesses
from enrich.attribution import OTHERS, UNKNOWN, WAITING, WAITING_MAX, ProcessStage
from enrich.processes import ProcessTable, shared_table
from packet_processor import CaptureEngine, Source

BUFFER = 50  # packets: the transfer below is ~10 times this (~500 packets on lo)


@pytest.mark.parametrize("where", ["worker", "thread"])
def test_by_process_counts_all_traffic_beyond_the_buffer(root_only, web, monkeypatch, tmp_path, where):  # noqa: F811
    """In the detector worker process (the default: the capturing process does no per-packet attribution), or
    in a thread of the capturing process when the detectors run in a thread: the same totals, and Clear
    forgets them."""
    need(shutil.which("curl") and shutil.which("tcpdump") and shutil.which("tshark"),
         "curl makes the traffic, tcpdump + tshark count it independently")
    server, port = web
    monkeypatch.setenv("NTM_BUFFER_SIZE", str(BUFFER))
    monkeypatch.setenv("NTM_DETECTORS_PROCESS", "1" if where == "worker" else "0")
    assert config.get("ENRICHMENT")  # on by default
    pcap = tmp_path / "ref.pcap"
    with reference_dump(f"tcp port {port}", pcap):
        page_table = shared_table()
        fed_before = page_table.refreshes
        engine = CaptureEngine()
        try:
            assert engine.buffer_size == BUFFER
            assert engine.start(Source("live", iface="lo", bpf=f"tcp port {port}")), engine.status().error
            time.sleep(0.5)
            body = tmp_path / "body"
            # curl holds its connection open until the per-process totals name it, then fetches the blob.
            cpid, _ = held_curl("127.0.0.1", port, "/blob", lambda _pid, _port: any(
                r["process"] == "curl" for r in engine.snapshot().totals["by_process"]), out=str(body))
            got = body.read_bytes()
            assert got.startswith(b"HTTP/1.0 200 ") and got.endswith(b"\r\n\r\n" + b"x" * SIZE)  # headers, the file
            time.sleep(1.5)
            assert wait_for(lambda: not any(r["process"] == WAITING for r in engine.snapshot().totals["by_process"]),
                            timeout=10)
            snap = engine.snapshot()
            in_thread = any(t.name == "process-attribution" for t in threading.enumerate())
            assert in_thread == (where == "thread")
            assert isinstance(engine._proc_stage, WorkerProcesses) == (where == "worker")
            if where == "worker":  # the page's table mirrors the worker's reads: the page names the same owners
                assert page_table.fed() and page_table.refreshes > fed_before
                assert page_table.label("tcp", port) == f"{psutil.Process(server.pid).name()} ({server.pid})"
            engine.clear()  # the page's Clear: the totals start again (in the worker too)
            assert wait_for(lambda: engine.snapshot().totals["by_process"] == [], timeout=5)
            time.sleep(0.6)  # several of the worker's reports: none brings the old totals back
            after = engine.snapshot().totals
            assert after["by_process"] == [] and after["stages"]["processes"]["packets_analysed"] == 0
        finally:
            engine.stop()
    ref_packets, ref_bytes = pcap_totals(pcap)
    assert snap.totals["packets"] == ref_packets > 5 * BUFFER and len(snap.packets) == BUFFER
    st = snap.totals["stages"]["processes"]
    assert st["packets_skipped"] == 0 and st["packets_analysed"] == ref_packets
    rows = {r["process"]: r for r in snap.totals["by_process"]}
    server_name = psutil.Process(server.pid).name()
    assert set(rows) == {"curl", server_name}, rows
    assert rows[server_name]["pid"] == server.pid and rows["curl"]["pid"] == cpid
    # Both ends are this machine: every packet of the one connection belongs to both processes.
    for r in rows.values():
        assert (r["packets"], r["bytes"], r["connections"]) == (ref_packets, ref_bytes, 1), r
    assert ref_bytes > SIZE


@pytest.fixture(params=["native", "native-grow", "numpy"])
def grouping(request, monkeypatch) -> str:
    """The stage's unit tests run three times: with the compiled grouping and connection sets (native/grouprows.c,
    native/detect.c; every tally's ids in a native set from the first, or moved there after 3 ids) and with their
    numpy/Python references, which must give the same rows."""
    from enrich.attribution import _ConnIds
    monkeypatch.setattr(_ConnIds, "SMALL", {"native": 0, "native-grow": 3}.get(request.param, _ConnIds.SMALL))
    if request.param == "numpy":
        import analysis.detect
        import native
        monkeypatch.setattr(native, "conv_tally", lambda *a: None)
        monkeypatch.setattr(analysis.detect, "_native_tables", lambda: False)
    else:
        import analysis.detect
        import native
        # Built here, before the test's clock starts (a first build takes ~1 s, longer than a test's grace).
        need(native.function("ntm_conv_tally") is not None, "no C compiler here: only the numpy grouping runs")
        assert analysis.detect._native_tables() and native.function("ntm_hset_has") is not None
    return request.param


def _rows(specs: list[tuple[str, str, int, str, int, int]]) -> np.ndarray:
    """Packet rows (proto, src, sport, dst, dport, wire_len) for the stage's unit tests."""
    arr = np.zeros(len(specs), PACKET_DTYPE)
    for i, (proto, src, sport, dst, dport, size) in enumerate(specs):
        arr[i]["cls"] = TCP if proto == "tcp" else UDP
        arr[i]["src"] = V4_PREFIX + ipaddress.ip_address(src).packed
        arr[i]["dst"] = V4_PREFIX + ipaddress.ip_address(dst).packed
        arr[i]["sport"], arr[i]["dport"], arr[i]["wire_len"] = sport, dport, size
    return arr


class _FixedTable(ProcessTable):
    """A process table whose owners the test sets, as a socket-table read would (no psutil thread)."""

    def __init__(self, owners: dict[tuple[str, int], tuple[int, str]]) -> None:
        super().__init__(refresh_s=0.05)
        for (proto, port), (pid, name) in owners.items():
            self.own(proto, port, pid, name)

    def start(self) -> None:  # no psutil thread: the test decides who owns what
        pass

    def own(self, proto: str, port: int, pid: int, name: str) -> None:
        self._owners = {**self._owners, (proto, port): (pid, name, time.monotonic())}  # a new read


@pytest.mark.usefixtures("grouping")
def test_stage_waits_for_the_socket_table_then_names_or_says_unknown():
    """A port seen before the table knows it is kept apart, named when the table does, else 'unknown'."""
    table = _FixedTable({})
    stage = ProcessStage(table, 10_000, grace_s=1.0)  # the first settle() comes well within it, even loaded
    stage.tally(_rows([("tcp", "127.0.0.1", 5000, "127.0.0.1", 6000, 100),
                       ("tcp", "127.0.0.1", 6000, "127.0.0.1", 5000, 60),
                       ("udp", "127.0.0.1", 7000, "192.0.2.9", 53, 80)]))
    waiting = {r["process"]: r for r in stage.rows()}
    # The TCP conversation waits once (both its ends are unnamed), not once per port.
    assert waiting == {WAITING: {"process": WAITING, "pid": None, "packets": 3, "bytes": 240, "connections": 2,
                                 "connections_capped": False}}
    table.own("tcp", 5000, 11, "client")
    table.own("tcp", 6000, 22, "server")
    stage.settle()  # the TCP ports are named now; the UDP port waits out its grace
    got = {r["process"]: (r["pid"], r["packets"], r["bytes"], r["connections"]) for r in stage.rows()}
    assert got == {"client": (11, 2, 160, 1), "server": (22, 2, 160, 1), WAITING: (None, 1, 80, 1)}
    time.sleep(1.05)
    stage.settle()
    got = {r["process"]: (r["pid"], r["packets"], r["bytes"]) for r in stage.rows()}
    assert got == {"client": (11, 2, 160), "server": (22, 2, 160), UNKNOWN: (None, 1, 80)}


@pytest.mark.usefixtures("grouping")
def test_connection_ids_grow_into_a_native_set_and_keep_the_first_new_ones_when_room_runs_out():
    """A tally's distinct connection ids: added again they count once, across the move from a Python set to a
    native one (SMALL is 3 in 'native-grow': 2 ids, then 5 more of which 2 are held); with room for 2 of 3 new
    ids, the first 2 new ones in the given order are kept and the tally says it is capped."""
    from enrich.attribution import _ConnIds
    ids = _ConnIds()
    u = lambda *v: np.array(v, np.uint64)  # noqa: E731
    assert ids.add(u(10, 20), 100) == (2, False)
    assert ids.add(u(20, 30, 10, 40, 50), 100) == (3, False)
    assert sorted(ids.ids().tolist()) == [10, 20, 30, 40, 50] and len(ids) == 5
    assert ids.add(u(70, 10, 60, 80), 2) == (2, True)
    assert sorted(ids.ids().tolist()) == [10, 20, 30, 40, 50, 60, 70]
    assert ids.add(u(10, 20, 30), 0) == (0, False)  # nothing new: no room needed


@pytest.mark.usefixtures("grouping")
def test_stage_counts_one_process_at_both_ends_once_and_ignores_remote_ends():
    table = _FixedTable({("tcp", 5000): (7, "loop"), ("tcp", 6000): (7, "loop")})
    stage = ProcessStage(table, 10_000)
    stage.tally(_rows([("tcp", "127.0.0.1", 5000, "127.0.0.1", 6000, 100),
                       ("tcp", "192.0.2.1", 443, "198.51.100.2", 5000, 999)]))  # neither end is this machine
    assert [(r["process"], r["packets"], r["bytes"]) for r in stage.rows()] == [("loop", 1, 100)]


@pytest.mark.usefixtures("grouping")
def test_stage_connections_are_bounded_over_all_processes_and_say_so():
    table = _FixedTable({("udp", 53): (1, "dns"), ("udp", 123): (2, "ntp")})
    stage = ProcessStage(table, 10_000, conn_max=30)
    stage.tally(_rows([("udp", "192.0.2.1", 1000 + i, "127.0.0.1", 53, 70) for i in range(20)]))
    stage.tally(_rows([("udp", "192.0.2.1", 1000 + i, "127.0.0.1", 123, 70) for i in range(20)]))
    rows = {r["process"]: r for r in stage.rows()}
    assert (rows["dns"]["packets"], rows["dns"]["connections"], rows["dns"]["connections_capped"]) == (20, 20, False)
    # The second process gets what is left of the bound: its packets all count, its connections are "at least".
    assert (rows["ntp"]["packets"], rows["ntp"]["connections"], rows["ntp"]["connections_capped"]) == (20, 10, True)
    assert stage._conns_held == 30
    # The bound is reached: the first process's known connections again, and one new one, count their
    # packets; only the new connection finds no room (then "at least").
    stage.tally(_rows([("udp", "192.0.2.1", 1000 + i, "127.0.0.1", 53, 70) for i in range(20)]))
    assert [(r["packets"], r["connections"], r["connections_capped"]) for r in stage.rows()
            if r["process"] == "dns"] == [(40, 20, False)]
    stage.tally(_rows([("udp", "192.0.2.1", 999, "127.0.0.1", 53, 70)]))
    assert [(r["packets"], r["connections"], r["connections_capped"]) for r in stage.rows()
            if r["process"] == "dns"] == [(41, 20, True)] and stage._conns_held == 30


@pytest.mark.usefixtures("grouping")
def test_stage_a_scan_of_unowned_ports_waits_in_bounds_then_is_unknown():
    """Thousands of unowned ports in one batch: WAITING_MAX wait for the table, the rest are 'unknown' at once;
    every packet is counted either way."""
    table = _FixedTable({("tcp", 22): (5, "sshd")})
    stage = ProcessStage(table, 1 << 20, grace_s=3600)
    rows = [("tcp", "192.0.2.1", 40000, "127.0.0.1", p, 60) for p in range(1, 5001)]
    stage.tally(_rows(rows))
    got = {r["process"]: r for r in stage.rows()}
    assert got["sshd"]["packets"] == 1 and len(stage._waiting) == WAITING_MAX
    assert got[WAITING]["packets"] == WAITING_MAX and got[UNKNOWN]["packets"] == 5000 - 1 - WAITING_MAX
    assert sum(r["packets"] for r in got.values()) == 5000


@pytest.mark.usefixtures("grouping")
def test_stage_counts_a_packet_between_two_unnamed_local_ports_once():
    """One 100-byte packet between two local ports neither of which is ever named: 1 packet, 100 bytes of
    'unknown' (it was 2 packets, 200 bytes: each port waited apart and both were merged into 'unknown')."""
    stage = ProcessStage(_FixedTable({}), 10_000, grace_s=0.0)
    stage.tally(_rows([("tcp", "127.0.0.1", 5000, "127.0.0.1", 6000, 100)]))
    assert [(r["process"], r["packets"], r["bytes"]) for r in stage.rows()] == [(WAITING, 1, 100)]
    time.sleep(0.01)
    stage.settle()
    assert [(r["process"], r["packets"], r["bytes"], r["connections"]) for r in stage.rows()] == \
        [(UNKNOWN, 1, 100, 1)]


@pytest.mark.usefixtures("grouping")
def test_stage_waiting_pair_named_later_counts_for_each_process_once():
    """Two unnamed ports that the table names later: each process gets the packets once; when both ports turn
    out to be one process, that process counts them once; an end named at once and its unnamed partner later
    named as the same process: once."""
    table = _FixedTable({})
    stage = ProcessStage(table, 10_000, grace_s=5.0)
    stage.tally(_rows([("tcp", "127.0.0.1", 5000, "127.0.0.1", 6000, 100),
                       ("udp", "127.0.0.1", 7000, "127.0.0.1", 7001, 50)]))
    table.own("tcp", 5000, 11, "client")
    table.own("tcp", 6000, 22, "server")
    table.own("udp", 7000, 33, "loop")
    table.own("udp", 7001, 33, "loop")
    stage.settle()
    got = {r["process"]: (r["packets"], r["bytes"]) for r in stage.rows()}
    assert got == {"client": (1, 100), "server": (1, 100), "loop": (1, 50)}
    table2 = _FixedTable({("udp", 8000): (44, "half")})
    stage2 = ProcessStage(table2, 10_000, grace_s=5.0)
    stage2.tally(_rows([("udp", "127.0.0.1", 8000, "127.0.0.1", 8001, 70)]))
    table2.own("udp", 8001, 44, "half")
    stage2.settle()
    assert [(r["process"], r["packets"], r["bytes"]) for r in stage2.rows()] == [("half", 1, 70)]


def test_in_the_worker_batches_gather_then_tally_and_a_failure_ends_only_attribution(monkeypatch):
    """The detector worker's side: batches wait up to GATHER_S (one call for many small live batches), then
    count; Clear forgets them; a failing tally is reported as an error and the worker's loop goes on."""
    from analysis.stages import _WANT_TABLE, _Attribution, _command
    from enrich.attribution import GATHER_MAX, GATHER_S, WorkerAttribution

    table = _FixedTable({("tcp", 5000): (11, "client"), ("tcp", 6000): (22, "server")})
    attr = _Attribution()
    attr.impl = WorkerAttribution(1.0, 100, table=table).start()
    batch = _rows([("tcp", "127.0.0.1", 5000, "127.0.0.1", 6000, 100)] * 3)
    attr.add(batch, 1)
    attr.add(batch[:1], 1)
    assert attr.report()["rows"] == [] and attr.report()["packets"] == 0  # gathering
    assert not attr.tick(time.monotonic())  # not yet GATHER_S
    assert attr.tick(time.monotonic() + GATHER_S + 0.01)  # a report is due
    rep = attr.report()
    got = {r["process"]: (r["pid"], r["packets"], r["bytes"], r["connections"]) for r in rep["rows"]}
    assert got == {"client": (11, 4, 400, 1), "server": (22, 4, 400, 1)}
    assert (rep["batches"], rep["packets"], rep["error"], rep["epoch"]) == (2, 4, None, 0)
    attr.reset(1)
    rep = attr.report()
    assert (rep["rows"], rep["packets"], rep["epoch"]) == ([], 0, 1)
    table._wanted = False
    _command(_WANT_TABLE, None, None, attr)  # the page's mirror missed a port: the worker's table reads next
    assert table._wanted
    big = _rows([("tcp", "127.0.0.1", 5000, "127.0.0.1", 6000, 1)] * (GATHER_MAX // 2))
    attr.add(big, 3)  # half a call's worth: tallied at once, whatever the time
    assert (attr.report()["packets"], attr.report()["batches"]) == (GATHER_MAX // 2, 3)

    def broken(arr):
        raise ValueError("bad batch")

    monkeypatch.setattr(attr.impl.tallies, "tally", broken)
    attr.add(batch, 1)
    attr.tick(time.monotonic() + GATHER_S + 0.01)
    rep = attr.report()
    assert rep["error"] == "process attribution failed: ValueError: bad batch"
    assert rep["packets"] == GATHER_MAX // 2  # the failed batch is not counted as attributed
    attr.add(batch, 1)  # ignored from now on, no exception
    assert not attr.tick(time.monotonic() + 10)
    attr.stop()


def test_a_report_from_before_a_clear_does_not_bring_old_totals_back():
    """The worker's report and the page's Clear cross on the pipes: the engine shows only reports of the
    latest Clear (the worker counts the Clears it has applied)."""
    stage = DetectorStage(1, AlertMirror(), 1000, mode="process")  # not started: reports are fed by hand
    stage._attribution = {"rows": [], "batches": 0, "packets": 0, "error": None}
    old = {"process": "curl", "pid": 1, "packets": 9, "bytes": 900, "connections": 1, "connections_capped": False}
    stage._apply_report(("report", 1, 9, [], {}, ({}, []), {"rows": [old], "batches": 1, "packets": 9,
                                                             "error": None, "epoch": 0}))
    assert stage.attribution()["rows"] == [old]
    stage.reset()  # the page's Clear (its command waits in the queue: no worker here)
    assert stage.attribution()["rows"] == []
    stage._apply_report(("report", 1, 9, [], {}, ({}, []), {"rows": [old], "batches": 1, "packets": 9,
                                                             "error": None, "epoch": 0}))
    assert stage.attribution()["rows"] == []  # sent before the worker applied the Clear
    new = dict(old, packets=2, bytes=200)
    stage._apply_report(("report", 2, 11, [], {}, ({}, []), {"rows": [new], "batches": 1, "packets": 2,
                                                              "error": None, "epoch": 1}))
    assert stage.attribution()["rows"] == [new]



def test_the_worker_attributes_what_follows_the_last_clear_and_reports_it_at_the_end():
    """The real worker process, fed by hand (no capture): two Clears in a row (the first one's command dropped
    from the queue by the second), a Clear alerts (which keeps the totals), then a batch held in the worker's
    gather (30 s: only the end can flush it) when the stage closes: the last report has exactly that batch."""
    # Ports 1-4: no process here listens on them, so every end waits (one pair per conversation) and the rows'
    # packets add up to the batch's.
    local = [("tcp", "127.0.0.1", 1, "127.0.0.1", 2, 100), ("udp", "127.0.0.1", 3, "127.0.0.1", 4, 50)]
    before, after = _rows(local * 40), _rows(local * 3 + local[:1])
    stage = DetectorStage(1, AlertMirror(), 100_000, mode="process").start()
    try:
        assert stage.pid() is not None, stage.error
        procs = stage.attribute(1.0, 1000, gather_s=30.0)
        assert isinstance(procs, WorkerProcesses)
        assert stage.offer(before) and stage.drain(20)
        stage.reset()
        stage.reset()
        stage.reset_alerts()
        assert stage.offer(after) and stage.drain(20)
        time.sleep(0.5)  # reports come and go: the batch stays gathered (30 s), nothing is attributed yet
        assert procs.as_dict()["packets_analysed"] == 0 and procs.rows() == []
    finally:
        stage.close()
    d = procs.as_dict()
    assert (d["packets_in"], d["packets_analysed"], d["packets_skipped"]) == (7, 7, 0), d
    assert sum(r["packets"] for r in procs.rows()) == 7 and sum(r["bytes"] for r in procs.rows()) == 4 * 100 + 3 * 50


@pytest.mark.usefixtures("grouping")
def test_stage_names_at_most_max_entries_processes_and_counts_the_rest_as_others():
    """More processes talking than the bound: max_entries of them get a row of their own, every other's packets
    and bytes go to one 'others' row; nothing is lost."""
    owners = {("udp", 2000 + i): (100 + i, f"proc{i}") for i in range(12)}
    stage = ProcessStage(_FixedTable(owners), 10_000, max_entries=5)
    stage.tally(_rows([("udp", "192.0.2.1", 40000, "127.0.0.1", 2000 + i, 70 + i) for i in range(12)]))
    rows = {r["process"]: r for r in stage.rows()}
    named = {k for k in rows if k.startswith("proc")}
    assert len(named) == 5 and set(rows) == named | {OTHERS}
    assert rows[OTHERS]["packets"] == 7 and sum(r["packets"] for r in rows.values()) == 12
    assert sum(r["bytes"] for r in rows.values()) == sum(70 + i for i in range(12))
