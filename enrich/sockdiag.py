"""This machine's TCP and UDP sockets from the kernel's sock_diag netlink interface, and their owning processes.

Why not psutil.net_connections(): it reads /proc/net/{tcp,tcp6,udp,udp6}, and the kernel writes those by
walking its whole socket hash tables (~4 ms each for TCP here, on an idle machine), then it reads every
process's fd table on every call. A sock_diag dump lists only the sockets that exist, with each socket's uid
and inode; the fd tables are read again only when a socket inode appears that the last scan did not see, a
process placed before has ended, or RESCAN_S passed (Owners). Costs: benchmarks/attribution_cost.py. The
process table (enrich/processes.py) makes of it (proto, local port) -> owner, the ports whose owner this
process may not see, and those sockets' uids.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_TIME_WAIT = 6  # include/net/tcp_states.h
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
# inet_diag_req_v2: family, protocol, extensions, pad, states; inet_diag_sockid: ports (big-endian), two
# 16-byte addresses, interface, cookie.
_REQUEST = struct.Struct("=BBBBI4s16s16sI8s")
# inet_diag_msg: family, state, timer, retransmits, then the sockid (its local port first, big-endian), then
# expires, receive queue, send queue, uid, inode.
_MESSAGE = struct.Struct("=BBBB")
_PORT = struct.Struct("!H")
_TAIL = struct.Struct("=IIIII")
_MESSAGE_SIZE = 72  # sizeof(struct inet_diag_msg)
_TAIL_AT = 52


@dataclass(frozen=True)
class Socket:
    """One socket as the kernel lists it."""

    proto: str  # "tcp" or "udp"
    port: int  # local port
    state: int  # TCP state (include/net/tcp_states.h); UDP sockets report 7 (closed) or 1 (connected)
    uid: int
    inode: int  # 0: no file holds it any more (TIME_WAIT)


def _dump(sock: socket.socket, family: int, protocol: int, seq: int) -> list[Socket]:
    """One dump request and its replies."""
    body = _REQUEST.pack(family, protocol, 0, 0, 0xFFFFFFFF, b"", b"", b"", 0, b"")
    sock.send(_HEADER.pack(_HEADER.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
    proto = "tcp" if protocol == socket.IPPROTO_TCP else "udp"
    out: list[Socket] = []
    while True:
        data = sock.recv(1 << 16)
        if not data:
            raise OSError("sock_diag: the kernel closed the socket")
        off = 0
        while off + _HEADER.size <= len(data):
            length, kind, _flags, got_seq, _pid = _HEADER.unpack_from(data, off)
            if length < _HEADER.size:
                raise OSError(f"sock_diag: a message of {length} bytes")
            body_at = off + _HEADER.size
            off += (length + 3) & ~3
            if got_seq != seq:
                continue
            if kind == NLMSG_DONE:
                if length >= _HEADER.size + 4 and struct.unpack_from("=i", data, body_at)[0] < 0:
                    err = -struct.unpack_from("=i", data, body_at)[0]
                    raise OSError(err, f"sock_diag: the dump ended with {os.strerror(err)}")
                return out
            if kind == NLMSG_ERROR:
                err = struct.unpack_from("=i", data, body_at)[0]
                raise OSError(-err, f"sock_diag: {os.strerror(-err)}")
            if kind != SOCK_DIAG_BY_FAMILY or length < _HEADER.size + _MESSAGE_SIZE:
                continue
            _fam, state, _timer, _retrans = _MESSAGE.unpack_from(data, body_at)
            port = _PORT.unpack_from(data, body_at + _MESSAGE.size)[0]
            _expires, _rq, _wq, uid, inode = _TAIL.unpack_from(data, body_at + _TAIL_AT)
            out.append(Socket(proto, port, state, uid, inode))


def sockets() -> list[Socket]:
    """Every TCP and UDP socket (IPv4 and IPv6) of this network namespace; OSError when sock_diag is refused or
    answers with something it cannot read."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG) as sock:
        sock.settimeout(5.0)  # the kernel answers at once; never hang the table's thread
        out: list[Socket] = []
        for seq, (family, protocol) in enumerate(((socket.AF_INET, socket.IPPROTO_TCP),
                                                  (socket.AF_INET6, socket.IPPROTO_TCP),
                                                  (socket.AF_INET, socket.IPPROTO_UDP),
                                                  (socket.AF_INET6, socket.IPPROTO_UDP)), start=1):
            try:
                out.extend(_dump(sock, family, protocol, seq))
            except struct.error as exc:  # a truncated reply: a read that failed, not a thread that dies
                raise OSError(f"sock_diag: a reply cut short ({exc})") from exc
        return out


def socket_inodes() -> tuple[dict[int, int], bool]:
    """({socket inode: pid} over every fd table this process may read, whether some could not be read)."""
    found: dict[int, int] = {}
    denied = False
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fd_dir = f"/proc/{name}/fd"
        try:
            fds = os.listdir(fd_dir)
        except PermissionError:
            denied = True
            continue
        except OSError:  # the process ended
            continue
        pid = int(name)
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                found.setdefault(int(target[8:-1]), pid)
    return found, denied


RESCAN_S = 30.0  # the fd tables are read at least this often while reads happen (a socket changing hands)


class Owners:
    """Socket inode -> pid. The fd tables are read only when a read lists an inode the last scan did not see
    (placed or not), a placed process has ended, or RESCAN_S passed since the last scan; bounded by the live
    sockets. Between scans a socket handed to another process (fd passing, a fork whose parent then lives on as
    a zombie) keeps its former owner's name, and an inode that a scan could not place (in flight between two
    processes) stays unplaced: at most RESCAN_S."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._pids: dict[int, int] = {}
        self._unplaced: set[int] = set()  # inodes the last scan found in no fd table this process may read
        self._clock = clock
        self._scanned_at = float("-inf")
        self.scans = 0  # fd-table scans so far (the costly part of a read)

    def place(self, socks: list[Socket]) -> dict[int, int]:
        """{inode: pid} for the listed sockets' inodes (those no readable fd table holds are absent)."""
        wanted = {s.inode for s in socks if s.inode}
        now = self._clock()
        stale = now - self._scanned_at >= RESCAN_S or \
            any(i not in self._pids and i not in self._unplaced for i in wanted) or \
            any(not os.path.exists(f"/proc/{pid}") for pid in set(self._pids.values()))
        if stale:
            found, _ = socket_inodes()
            self._pids = {i: found[i] for i in wanted if i in found}
            self._unplaced = wanted.difference(self._pids)
            self._scanned_at = now
            self.scans += 1
        else:  # keep only what still exists: bounded by the live sockets
            self._pids = {i: p for i, p in self._pids.items() if i in wanted}
            self._unplaced &= wanted
        return self._pids
