"""The socket table from sock_diag (enrich/sockdiag.py) against psutil.net_connections, which reads /proc: the
same sockets, owners, hidden ports and their users, as root and as an unprivileged user; the fd tables are read
again only when a new socket (or an ended owner) asks for it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import psutil
import pytest
from conftest import wait_for
from test_privilege import NOBODY, NOBODY_UID, root_env, venv, world_readable  # noqa: F401  - nobody's venv, app

from enrich import sockdiag
from enrich.processes import ProcessTable

_PROTO = {socket.SOCK_STREAM: "tcp", socket.SOCK_DGRAM: "udp"}


def _psutil_view(ports: set[int]) -> dict[tuple[str, int], tuple[int | None, str]]:
    """{(proto, port): (pid, status)} of the given local ports, as psutil reads /proc."""
    return {(_PROTO[c.type], c.laddr.port): (c.pid, c.status) for c in psutil.net_connections("inet")
            if c.laddr and c.laddr.port in ports}


@pytest.fixture
def sockets_of_every_kind():
    """A TCP listener and a connection on it (v4), a TCP connection in TIME_WAIT, UDP on v4 and v6, and a
    UDP socket held by a child process: {name: port}, and the child's pid."""
    held: list[socket.socket] = []
    child = None
    try:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        cli = socket.create_connection(srv.getsockname())
        conn, _ = srv.accept()
        held += [srv, cli, conn]
        with socket.socket() as tw_srv:  # the side that closes first waits in TIME_WAIT
            tw_srv.bind(("127.0.0.1", 0))
            tw_srv.listen()
            tw_cli = socket.create_connection(tw_srv.getsockname())
            tw_port = tw_cli.getsockname()[1]
            tw_conn, _ = tw_srv.accept()
            tw_cli.close()
            time.sleep(0.05)
            tw_conn.close()
        u4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u4.bind(("127.0.0.1", 0))
        u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        u6.bind(("::1", 0))
        held += [u4, u6]
        child = subprocess.Popen([sys.executable, "-c", "import socket, sys\ns = socket.socket(socket.AF_INET, "
                                  "socket.SOCK_DGRAM)\ns.bind(('127.0.0.1', 0))\nprint(s.getsockname()[1], "
                                  "flush=True)\nsys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
        ports = {"listener": srv.getsockname()[1], "client": cli.getsockname()[1], "time_wait": tw_port,
                 "udp4": u4.getsockname()[1], "udp6": u6.getsockname()[1], "child": int(child.stdout.readline())}
        assert wait_for(lambda: _psutil_view({tw_port}).get(("tcp", tw_port), (0, ""))[1] == psutil.CONN_TIME_WAIT, 5)
        yield ports, child.pid, held
    finally:
        for s in held:
            s.close()
        if child is not None:
            child.kill()
            child.wait()


def test_sock_diag_lists_the_sockets_psutil_lists_with_their_uid_and_inode(sockets_of_every_kind):
    """Every test socket, by protocol and local port, in both listings; each open one's inode is its file's, its
    uid ours; the TIME_WAIT socket has no file (inode 0)."""
    ports, _, held = sockets_of_every_kind
    listed = [s for s in sockdiag.sockets() if s.port in set(ports.values())]
    assert {(s.proto, s.port) for s in listed} == set(_psutil_view(set(ports.values())))
    by_port = {(s.proto, s.port): s for s in listed}
    assert {("tcp", ports["listener"]), ("tcp", ports["client"]), ("tcp", ports["time_wait"]),
            ("udp", ports["udp4"]), ("udp", ports["udp6"]), ("udp", ports["child"])} <= set(by_port)
    _srv, cli, _conn, u4, u6 = held
    for key, sock in ((("tcp", ports["client"]), cli), (("udp", ports["udp4"]), u4), (("udp", ports["udp6"]), u6)):
        assert by_port[key].inode == os.fstat(sock.fileno()).st_ino and by_port[key].uid == os.geteuid()
    assert by_port[("tcp", ports["time_wait"])].inode == 0
    assert by_port[("tcp", ports["time_wait"])].state == sockdiag.TCP_TIME_WAIT


def test_owners_match_psutil(sockets_of_every_kind):
    """The process table read through sock_diag names the same owners as through psutil: this process's
    sockets and the child's (TIME_WAIT: no owner in either)."""
    ports, child_pid, _ = sockets_of_every_kind
    diag, ref = ProcessTable(), ProcessTable(use_sock_diag=False)
    diag.refresh()
    ref.refresh()
    assert diag._diag is not None and diag._diag.scans == 1  # read through sock_diag, not its fallback
    ours = set(ports.values())
    pick = lambda t: {k: v[:2] for k, v in t.owners().items() if k[1] in ours}  # noqa: E731
    assert pick(diag) == pick(ref)
    me = psutil.Process().name()
    assert diag.owners()[("udp", ports["child"])][:2] == (child_pid, psutil.Process(child_pid).name())
    assert diag.owners()[("tcp", ports["listener"])][:2] == (os.getpid(), me)
    assert ("tcp", ports["time_wait"]) not in diag.owners()


def test_the_fd_tables_are_read_only_for_new_sockets_ended_owners_or_after_rescan_s(sockets_of_every_kind):
    """Owners.place over given socket lists (this test's own sockets, real inodes) and a clock the test moves:
    the same sockets again read no fd table; a new inode, or RESCAN_S later, reads them once."""
    ports, child_pid, _ = sockets_of_every_kind
    now = [0.0]
    owners = sockdiag.Owners(clock=lambda: now[0])
    rest = [s for s in sockdiag.sockets() if s.port in set(ports.values()) and s.inode]
    first = [s for s in rest if (s.proto, s.port) == ("tcp", ports["listener"])]  # the listener, the accepted
    assert len(first) == 2 and owners.place(first) == {s.inode: os.getpid() for s in first} and owners.scans == 1
    now[0] = 1.0
    owners.place(first)
    assert owners.scans == 1  # the same socket: no fd table read
    placed = owners.place(rest)
    assert owners.scans == 2 and set(placed) == {s.inode for s in rest}  # new inodes: one scan names them all
    assert set(placed.values()) == {os.getpid(), child_pid}
    now[0] = 2.0
    owners.place(rest)
    assert owners.scans == 2
    now[0] = 2.0 + sockdiag.RESCAN_S
    owners.place(rest)
    assert owners.scans == 3  # RESCAN_S after the last scan
    # An inode no fd table holds (made up: none is this large) is looked for once, then not at every read.
    ghost = sockdiag.Socket("tcp", 1, 1, 0, 1 << 62)
    owners.place([*rest, ghost])
    assert owners.scans == 4
    owners.place([*rest, ghost])
    assert owners.scans == 4 and ghost.inode not in owners.place([*rest, ghost])


def test_a_failing_sock_diag_read_goes_through_psutil_and_after_three_in_a_row_psutil_stays(monkeypatch):
    """A sock_diag read that fails (refused, timed out, a reply cut short) is that read through psutil, and the
    table still names owners; three failures in a row and it reads through psutil from then on."""
    calls = []

    def broken() -> list:
        calls.append(1)
        raise OSError("sock_diag: a reply cut short (test)")

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mine:
        mine.bind(("127.0.0.1", 0))
        port = mine.getsockname()[1]
        monkeypatch.setattr(sockdiag, "sockets", broken)
        table = ProcessTable()
        for n in range(1, 3):  # two failures, then a read that works: the count starts again
            table.refresh()
            assert table.error is None and table.owners()[("udp", port)][0] == os.getpid()
            assert len(calls) == n and table._diag is not None
        monkeypatch.undo()
        table.refresh()
        assert table._diag_failures == 0 and table._diag.scans == 1
        monkeypatch.setattr(sockdiag, "sockets", broken)
        for n in range(3, 7):
            table.refresh()
            assert table.error is None and table.owners()[("udp", port)][0] == os.getpid()
            assert len(calls) == min(n, 5)
        assert table._diag is None  # three in a row: psutil from then on


def test_a_socket_whose_process_ended_is_named_after_the_one_that_still_holds_it():
    """A parent opens a socket, starts a child that inherits it, and exits: the next read names the child (the
    inode is the same, but the placed process has ended, so the fd tables are read again)."""
    code = ("import socket, subprocess, sys\n"
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\ns.bind(('127.0.0.1', 0))\n"
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], pass_fds=[s.fileno()],"
            ")\nprint(s.getsockname()[1], c.pid, flush=True)\nsys.stdin.readline()\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    child_pid = None
    try:
        port, child_pid = map(int, parent.stdout.readline().split())
        table = ProcessTable()
        table.refresh()
        assert table.owners()[("udp", port)][0] in (parent.pid, child_pid)  # both hold it: either names it
        parent.stdin.write("end\n")
        parent.stdin.flush()
        parent.wait(10)
        table.refresh()
        assert table.owners()[("udp", port)][0] == child_pid
        assert table._diag is not None and table._diag.scans >= 1  # read through sock_diag, not its fallback
    finally:
        parent.kill()
        if child_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child_pid, 9)


UNPRIVILEGED = """
import json, socket, sys
from enrich.processes import ProcessTable
mine = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
mine.bind(("127.0.0.1", 0))
ports = {int(sys.argv[1]), mine.getsockname()[1]}
out = {}
for name, table in (("diag", ProcessTable()), ("psutil", ProcessTable(use_sock_diag=False))):
    seen, hidden, users = table._read_diag() if name == "diag" else table._read_psutil()
    out[name] = {"seen": sorted([k[0], k[1], v] for k, v in seen.items() if k[1] in ports),
                 "hidden": sorted(list(k) for k in hidden if k[1] in ports),
                 "users": sorted([k[0], k[1], v] for k, v in users.items() if k[1] in ports)}
from enrich import sockdiag
out["mine"] = mine.getsockname()[1]
out["mine_uid"] = [x.uid for x in sockdiag.sockets() if x.proto == "udp" and x.port == out["mine"]]
print(json.dumps(out))
"""


def test_as_an_unprivileged_user_hidden_ports_and_their_users_match_psutil(root_only, world_readable,  # noqa: F811
                                                                            venv):  # noqa: F811
    """Run as user nobody: root's listener is hidden (listed, owner not readable) with uid 0, nobody's own socket
    is named and listed with nobody's uid, in the sock_diag read as in psutil's."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        proc = subprocess.run([*NOBODY, str(venv / "bin" / "python3"), "-c", UNPRIVILEGED, str(port)],
                              cwd=world_readable / "app",
                              env=root_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["diag"] == got["psutil"], got
    assert got["diag"]["hidden"] == [["tcp", port]] and got["diag"]["users"] == [["tcp", port, 0]]
    assert [row[:2] for row in got["diag"]["seen"]] == [["udp", got["mine"]]]
    assert got["mine_uid"] == [NOBODY_UID]
