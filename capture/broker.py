"""Privilege separation: a tiny helper keeps CAP_NET_RAW and opens capture sockets; the rest runs unprivileged.

Started as root (`sudo streamlit run dashboard.py`, `sudo python packet_processor.py capture`), the
process calls `separate()` once, before it reads any packet:

1. It starts this file as a separate program (the *broker*) with one end of a Unix socket pair.
   The broker switches to the unprivileged user, keeps CAP_NET_RAW and nothing else, and then
   only answers "open a raw|dgram packet socket for interface X": it validates the name, opens
   `socket(AF_PACKET, kind, 0)` (protocol 0: the socket receives nothing until its owner binds it)
   and hands the descriptor over with SCM_RIGHTS, keeping no copy. It never reads a packet. It also
   answers "compile this filter for interface X and snap length N" on a live libpcap handle (which
   needs CAP_NET_RAW): only a live handle has libpcap's Linux code for `vlan`, which tests the tag
   the kernel moved into the packet's metadata; a dead handle's program looks for it in the frame.
2. The process itself gives up root: supplementary groups cleared, real/effective/saved uid and gid
   of the unprivileged user (glibc applies them to every thread, and the kernel clears every
   capability of a thread whose uids all leave 0), no ambient or inheritable capabilities, and
   no_new_privs on every thread (a set-uid program such as sudo gives it nothing back).

Everything after the socket is opened (the filter, the ring, bind, promiscuous membership) needs no
privilege, so the capture thread, the parsers and the web server run as the unprivileged user.
Run by itself, this file is the broker; it imports only the standard library.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import platform
import pwd
import re
import socket
import struct
import subprocess
import sys
import sysconfig
import threading
from dataclasses import dataclass

log = logging.getLogger(__name__)

CAP_NET_RAW = 13
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_FILTER_FLAG_SPEC_ALLOW = 4
SECCOMP_RET_ALLOW = 0x7FFF0000
BPF_RET_K = 0x06
SYS_SECCOMP = {"x86_64": 317, "aarch64": 277, "riscv64": 277, "ppc64le": 358, "s390x": 348, "armv7l": 383}
CAP_VERSION_3 = 0x20080522
KINDS = {"raw": socket.SOCK_RAW, "dgram": socket.SOCK_DGRAM}
IFNAME = re.compile(r"[A-Za-z0-9_.:@+-]{1,15}")  # what the kernel accepts in a name (IFNAMSIZ - 1)
REQUEST_MAX = 64  # an `open` request
EXPR_MAX = 4096  # bytes of a filter expression the broker compiles (tcpdump's longest useful ones are far shorter)
COMPILE_MAX = EXPR_MAX + 64  # a `compile` request: verb, snap length, interface, expression
SNAPLEN_MAX = 262144
REPLY_MAX = 8 + 8 * 4096  # `ok ` + the program: BPF_MAXINSNS instructions of 8 bytes
INSN = struct.Struct("=HBBI")  # struct sock_filter
DLT_EN10MB = 1
PCAP_ERROR_PERM_DENIED = -8
PCAP_ERROR_IFACE_NOT_UP = -9
PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF
PCAP_LOCK = threading.Lock()  # libpcap's compiler kept global state in older versions: one compile at a time
REPLY_TIMEOUT_S = 5.0


class PrivilegeError(RuntimeError):
    """Privileges could not be given up as asked: the process must not go on as root."""


class CompileError(ValueError):
    """A filter could not be compiled on a live handle; `denied` when the process lacks CAP_NET_RAW."""

    def __init__(self, text: str, denied: bool = False) -> None:
        super().__init__(text)
        self.denied = denied


# -------------------------------------------------------------------------------------------------
# Kernel interfaces: prctl, capget/capset, seccomp, /proc/<pid>/status
# -------------------------------------------------------------------------------------------------

try:  # by its soname: find_library would run ldconfig, a program started as root for nothing
    _libc = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # pragma: no cover - not glibc
    _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise PrivilegeError(f"{what}: {os.strerror(err)}")
    return ret


def _prctl(option: int, arg: int = 0, arg3: int = 0) -> int:
    return _check(_libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(arg3), ctypes.c_ulong(0),
                              ctypes.c_ulong(0)), f"prctl({option})")


def _capset(effective: int, permitted: int, inheritable: int = 0) -> None:
    """Set this thread's capability sets (64-bit masks)."""
    head = _CapHeader(CAP_VERSION_3, 0)
    data = (_CapData * 2)(_CapData(effective & 0xFFFFFFFF, permitted & 0xFFFFFFFF, inheritable & 0xFFFFFFFF),
                          _CapData(effective >> 32, permitted >> 32, inheritable >> 32))
    _check(_libc.capset(ctypes.byref(head), data), "capset")


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap", encoding="ascii") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return 40


def _drop_bounding_set(keep: int = 0) -> None:
    """Drop every capability but the mask `keep` from this thread's bounding set (needs CAP_SETPCAP)."""
    for cap in range(_last_cap() + 1):
        if not keep & (1 << cap):
            _prctl(PR_CAPBSET_DROP, cap)


def _no_new_privs_all_threads() -> None:
    """no_new_privs on this thread, then on every thread of the process.

    The flag is per thread, and Streamlit's server threads exist before dashboard.py runs. A
    seccomp filter installed with SECCOMP_FILTER_FLAG_TSYNC is copied by the kernel to every
    thread, together with the caller's no_new_privs; the filter itself allows every system call
    (a constant filter, which the kernel caches), and SPEC_ALLOW leaves the speculation mitigations
    as they were: the filter is a carrier for the flag, not a sandbox."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    nr = SYS_SECCOMP.get(platform.machine())
    if nr is None:
        raise PrivilegeError(f"no seccomp system call number known for {platform.machine()}")
    insns = (_SockFilter * 1)(_SockFilter(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    prog = _SockFprog(1, insns)
    ret = _libc.syscall(ctypes.c_long(nr), ctypes.c_ulong(SECCOMP_SET_MODE_FILTER),
                        ctypes.c_ulong(SECCOMP_FILTER_FLAG_TSYNC | SECCOMP_FILTER_FLAG_SPEC_ALLOW), ctypes.byref(prog))
    if ret != 0:  # > 0: the id of a thread that could not be synchronised
        err = ctypes.get_errno() if ret < 0 else 0
        raise PrivilegeError(f"seccomp(TSYNC) failed: {os.strerror(err) if err else f'thread {ret}'}")


@dataclass(frozen=True)
class Creds:
    """The credentials of one thread, as /proc/<pid>/task/<tid>/status shows them."""

    uids: tuple[int, ...]
    gids: tuple[int, ...]
    groups: tuple[int, ...]
    cap_inh: int
    cap_prm: int
    cap_eff: int
    cap_bnd: int
    cap_amb: int
    no_new_privs: int


def read_creds(status_path: str) -> Creds:
    """Parse a /proc/.../status file into Creds."""
    fields: dict[str, str] = {}
    with open(status_path, encoding="ascii", errors="replace") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            fields[key] = value.strip()

    def ids(key: str) -> tuple[int, ...]:
        return tuple(int(v) for v in fields.get(key, "").split())

    return Creds(ids("Uid"), ids("Gid"), ids("Groups"), *(int(fields[k], 16) for k in
                 ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")), int(fields.get("NoNewPrivs", "0")))


def thread_creds(pid: int | str = "self") -> dict[int, Creds]:
    """Creds of every thread of a process (threads that end meanwhile are left out)."""
    out = {}
    base = f"/proc/{pid}/task"
    for tid in os.listdir(base):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            out[int(tid)] = read_creds(f"{base}/{tid}/status")
    return out


def _problems(creds: Creds, uid: int, gid: int, caps: int) -> list[str]:
    wrong = []
    if set(creds.uids) != {uid} or set(creds.gids) != {gid}:
        wrong.append(f"uids {creds.uids} gids {creds.gids}")
    if creds.groups:
        wrong.append(f"groups {creds.groups}")
    if creds.cap_prm != caps or creds.cap_eff != caps or creds.cap_inh or creds.cap_amb:
        wrong.append(f"capabilities prm {creds.cap_prm:#x} eff {creds.cap_eff:#x} inh {creds.cap_inh:#x} "
                     f"amb {creds.cap_amb:#x}")
    if creds.no_new_privs != 1:
        wrong.append("no_new_privs unset")
    return wrong


def _verify(uid: int, gid: int, caps: int) -> None:
    """Every thread has exactly these credentials and capabilities, or PrivilegeError."""
    for tid, creds in thread_creds().items():
        wrong = _problems(creds, uid, gid, caps)
        if wrong:
            raise PrivilegeError(f"thread {tid} still has {'; '.join(wrong)}")


# -------------------------------------------------------------------------------------------------
# Filters compiled on a live libpcap handle (in the broker, or in a process that has CAP_NET_RAW)
# -------------------------------------------------------------------------------------------------


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_SockFilter))]


_pcap: list[ctypes.CDLL] = []


def _libpcap() -> ctypes.CDLL:
    """Debian's libpcap0.8 by its soname, with the signatures used here; CompileError when missing."""
    if not _pcap:
        try:
            lib = ctypes.CDLL("libpcap.so.0.8")
        except OSError as exc:
            raise CompileError(f"libpcap is not available (install Debian's libpcap0.8): {exc}") from None
        vp, cp, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        for fn, res, args in (("pcap_create", vp, [cp, cp]), ("pcap_set_snaplen", i, [vp, i]),
                              ("pcap_set_buffer_size", i, [vp, i]), ("pcap_activate", i, [vp]),
                              ("pcap_datalink", i, [vp]), ("pcap_geterr", cp, [vp]), ("pcap_close", None, [vp]),
                              ("pcap_compile", i, [vp, ctypes.POINTER(_BpfProgram), cp, i, ctypes.c_uint32]),
                              ("pcap_freecode", None, [ctypes.POINTER(_BpfProgram)]),
                              ("pcap_lookupnet", i, [cp, ctypes.POINTER(ctypes.c_uint32),
                                                     ctypes.POINTER(ctypes.c_uint32), cp])):
            getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
        _pcap.append(lib)
    return _pcap[0]


def _netmask(lib: ctypes.CDLL, iface: str) -> int:
    net, mask = ctypes.c_uint32(), ctypes.c_uint32()
    if lib.pcap_lookupnet(iface.encode(), ctypes.byref(net), ctypes.byref(mask), ctypes.create_string_buffer(256)):
        return PCAP_NETMASK_UNKNOWN  # no IPv4 address: only `ip broadcast` needs the mask
    return mask.value


def _compile_on(lib: ctypes.CDLL, handle: int, expr: str, netmask: int) -> list[tuple[int, int, int, int]]:
    prog = _BpfProgram()
    if lib.pcap_compile(handle, ctypes.byref(prog), expr.encode(), 1, netmask) != 0:
        raise CompileError(f"bad BPF filter: {lib.pcap_geterr(handle).decode(errors='replace')}")
    try:
        return [(prog.bf_insns[i].code, prog.bf_insns[i].jt, prog.bf_insns[i].jf, prog.bf_insns[i].k & 0xFFFFFFFF)
                for i in range(prog.bf_len)]
    finally:
        lib.pcap_freecode(ctypes.byref(prog))


def compile_live(expr: str, iface: str, snaplen: int) -> list[tuple[int, int, int, int]]:
    """Compile `expr` as tcpdump -i IFACE -s SNAPLEN would, on a live Ethernet handle; CompileError if not."""
    lib = _libpcap()
    with PCAP_LOCK:
        errbuf = ctypes.create_string_buffer(256)
        handle = lib.pcap_create(iface.encode(), errbuf)
        if not handle:
            raise CompileError(f"cannot open a libpcap handle on {iface!r}: {errbuf.value.decode(errors='replace')}")
        try:
            lib.pcap_set_snaplen(handle, snaplen)
            lib.pcap_set_buffer_size(handle, 1 << 18)  # the handle only compiles: a small ring
            status = lib.pcap_activate(handle)
            if status < 0:  # as tcpdump: a down interface is refused too (its VLAN handling is unknown)
                hint = (f"; bring it up (ip link set {iface} up) or capture without a filter"
                        if status == PCAP_ERROR_IFACE_NOT_UP else "")
                raise CompileError(f"cannot compile the filter on a live handle of {iface!r} (libpcap: "
                                   f"{lib.pcap_geterr(handle).decode(errors='replace')}){hint}",
                                   denied=status == PCAP_ERROR_PERM_DENIED)
            if lib.pcap_datalink(handle) != DLT_EN10MB:
                raise CompileError(f"{iface!r} is not an Ethernet-like link for libpcap")
            return _compile_on(lib, handle, expr, _netmask(lib, iface))
        finally:
            lib.pcap_close(handle)


# -------------------------------------------------------------------------------------------------
# The broker (this file run as a program)
# -------------------------------------------------------------------------------------------------


def _become(uid: int, gid: int, keep: int) -> None:
    """Switch this single-threaded process to uid/gid keeping only the capabilities in `keep`.

    Not uid 0 with the other capabilities dropped: uid 0 still owns root's files (and /etc/passwd is
    writable by its owner), so the broker becomes the unprivileged user and keeps CAP_NET_RAW alone."""
    _prctl(PR_SET_KEEPCAPS, 1)  # so that the uid change keeps the permitted set for capset below
    _drop_bounding_set(keep)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _capset(keep, keep, 0)
    _prctl(PR_SET_KEEPCAPS, 0)
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _prctl(PR_SET_DUMPABLE, 0)  # no ptrace or /proc/<pid>/mem for processes of the same user
    _verify(uid, gid, keep)


def _check_iface(name: str, allow_any: bool = True) -> str:
    if name == "any" and allow_any:
        return name
    if not IFNAME.fullmatch(name) or name in (".", "..", "any"):
        raise ValueError(f"not an interface name: {name!r}")
    try:
        socket.if_nametoindex(name)
    except OSError:
        raise ValueError(f"no interface {name!r}") from None
    return name


def check_request(data: bytes) -> tuple[int, str]:
    """(socket type, interface) of a request `open raw|dgram NAME`; ValueError for anything else."""
    if len(data) > REQUEST_MAX:
        raise ValueError("request too long")
    try:
        verb, kind, name = data.decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise ValueError("expected: open raw|dgram INTERFACE") from None
    if verb != "open" or kind not in KINDS:
        raise ValueError("expected: open raw|dgram INTERFACE")
    return KINDS[kind], _check_iface(name)


def check_compile(data: bytes) -> tuple[int, str, str]:
    """(snap length, interface, expression) of `compile SNAPLEN NAME EXPRESSION`; ValueError for anything else."""
    if len(data) > COMPILE_MAX:
        raise ValueError(f"request too long (a filter expression has at most {EXPR_MAX} bytes)")
    try:
        verb, snap, name, expr = data.decode("ascii").split(" ", 3)
    except (UnicodeDecodeError, ValueError):
        raise ValueError("expected: compile SNAPLEN INTERFACE EXPRESSION (ASCII)") from None
    if verb != "compile" or not snap.isdigit() or not 0 < int(snap) <= SNAPLEN_MAX:
        raise ValueError("expected: compile SNAPLEN INTERFACE EXPRESSION, SNAPLEN 1.." + str(SNAPLEN_MAX))
    if len(expr) > EXPR_MAX:
        raise ValueError(f"filter expression longer than {EXPR_MAX} bytes")
    if not expr.strip() or not all(c.isprintable() or c in "\t\n" for c in expr):
        raise ValueError("the filter expression is empty or has control characters")
    return int(snap), _check_iface(name, allow_any=False), expr


def _refuse(conn: socket.socket, data: bytes, exc: Exception) -> None:
    log.warning("refused request %r: %s", data[:REQUEST_MAX], exc)
    conn.send(f"err {errno.EINVAL} {exc}".encode()[:512])


def _answer_compile(conn: socket.socket, data: bytes) -> None:
    """Serve `compile`: `ok ` and the program's instructions, or `err ERRNO libpcap's message`."""
    try:
        snaplen, name, expr = check_compile(data)
    except ValueError as exc:
        _refuse(conn, data, exc)
        return
    try:
        insns = compile_live(expr, name, snaplen)
    except CompileError as exc:
        conn.send(f"err {errno.EPERM if exc.denied else errno.EINVAL} {exc}".encode()[:1024])
        return
    conn.send(b"ok " + b"".join(INSN.pack(*insn) for insn in insns))
    log.info("compiled a %d-instruction filter for %s", len(insns), name)


def _answer(conn: socket.socket, data: bytes) -> None:
    """Serve one request: a new packet socket's descriptor, or `err ERRNO message`."""
    if data.startswith(b"compile "):
        _answer_compile(conn, data)
        return
    try:
        kind, name = check_request(data)
    except ValueError as exc:
        _refuse(conn, data, exc)
        return
    try:
        # Protocol 0: nothing enters this socket until the unprivileged side binds it to the
        # interface with ETH_P_ALL, after attaching its filter and ring.
        fd = socket.socket(socket.AF_PACKET, kind, 0).detach()
    except OSError as exc:
        conn.send(f"err {exc.errno or 0} {exc.strerror or exc}".encode()[:512])
        return
    try:
        socket.send_fds(conn, [b"ok"], [fd])
    finally:
        os.close(fd)  # the broker keeps no capture socket: it never reads a packet
    log.info("opened a %s packet socket for %s", "raw" if kind == socket.SOCK_RAW else "dgram", name)


def serve(conn: socket.socket) -> None:
    """Answer requests until the other end closes (its process exited) or the parent goes away."""
    parent = os.getppid()
    conn.settimeout(1.0)
    while True:
        try:
            data = conn.recv(COMPILE_MAX + 1)  # longer: refused as too long
        except TimeoutError:
            if os.getppid() != parent:  # re-parented: the process that started us is gone
                return
            continue
        except OSError:
            return
        if not data:
            return
        _answer(conn, data)


def _broker_main(argv: list[str]) -> int:
    fd, uid, gid, level = int(argv[0]), int(argv[1]), int(argv[2]), argv[3]
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s capture-broker: %(message)s")
    conn = socket.socket(fileno=fd)
    try:
        _become(uid, gid, 1 << CAP_NET_RAW)
    except (PrivilegeError, OSError) as exc:
        log.error("cannot drop to uid %d with CAP_NET_RAW only: %s", uid, exc)
        return 1
    serve(conn)
    return 0


# -------------------------------------------------------------------------------------------------
# The unprivileged side: start the broker, give up root, ask for sockets
# -------------------------------------------------------------------------------------------------


class Broker:
    """The client end of a running broker process; thread-safe."""

    def __init__(self, proc: subprocess.Popen, conn: socket.socket) -> None:
        self.proc = proc
        self._conn = conn
        self._lock = threading.Lock()

    def open(self, kind: int, iface: str) -> socket.socket:
        """A new AF_PACKET socket of `kind` (not bound yet) for `iface`, opened by the broker."""
        from capture.sources import CaptureError  # here: the broker program imports no project module

        name = "raw" if kind == socket.SOCK_RAW else "dgram"
        with self._lock:
            try:
                self._conn.send(f"open {name} {iface}".encode())
                msg, fds, _, _ = socket.recv_fds(self._conn, 512, 1)
            except OSError as exc:  # a late answer would be taken for the next request's: no next request
                self._conn.close()
                raise CaptureError(f"the capture helper (pid {self.proc.pid}) is gone ({exc}); restart to capture "
                                   "again") from exc
        if fds and msg == b"ok":
            return socket.socket(fileno=fds[0])
        for fd in fds:
            os.close(fd)
        if not msg:
            raise CaptureError(f"the capture helper (pid {self.proc.pid}) has exited; restart to capture again")
        _, code, text = [*msg.decode("ascii", "replace").split(" ", 2), "", ""][:3]
        if code == str(errno.EPERM) or code == str(errno.EACCES):
            raise PermissionError(int(code), text)
        raise CaptureError(f"the capture helper could not open a socket for {iface!r}: {text}")

    def compile(self, expr: str, iface: str, snaplen: int) -> list[tuple[int, int, int, int]]:
        """The broker's live-handle compile of `expr` for `iface`; CompileError with libpcap's text if not."""
        from capture.sources import CaptureError

        with self._lock:
            try:
                self._conn.send(f"compile {snaplen} {iface} {expr}".encode())
                msg = self._conn.recv(REPLY_MAX)
            except OSError as exc:
                self._conn.close()
                raise CaptureError(f"the capture helper (pid {self.proc.pid}) is gone ({exc}); restart to capture "
                                   "again") from exc
        if not msg:
            raise CaptureError(f"the capture helper (pid {self.proc.pid}) has exited; restart to capture again")
        if msg.startswith(b"ok ") and (len(msg) - 3) % INSN.size == 0:
            return list(INSN.iter_unpack(msg[3:]))
        _, code, text = [*msg.decode("ascii", "replace").split(" ", 2), "", ""][:3]
        raise CompileError(text, denied=code == str(errno.EPERM))

    def close(self) -> None:
        """Close our end: the broker sees end-of-file and exits."""
        self._conn.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(2)


def start_broker(uid: int, gid: int, level: str = "INFO") -> Broker:
    """Start the broker program (as root); it switches to uid/gid with CAP_NET_RAW only."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    mine.settimeout(REPLY_TIMEOUT_S)
    # A new program rather than a fork: the caller may run many threads (Streamlit's server). -I -B:
    # the broker imports nothing from the project folder or the environment, and writes nothing.
    proc = subprocess.Popen([sys.executable, "-I", "-B", os.path.abspath(__file__), str(theirs.fileno()), str(uid),
                             str(gid), level], pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    theirs.close()
    broker = Broker(proc, mine)
    # A forked child (multiprocessing) must not keep the broker alive or ask it for sockets.
    os.register_at_fork(after_in_child=mine.close)
    return broker


def target_user(run_as: str = "") -> tuple[int, int, str]:
    """(uid, gid, name) to run as: `run_as` if given, else the user who ran sudo, else nobody."""
    if run_as.isdigit():  # a bare uid needs no account: its group is the same number
        uid = int(run_as)
        try:
            entry = pwd.getpwuid(uid)
            gid, name = entry.pw_gid, entry.pw_name
        except KeyError:
            gid, name = uid, run_as
    elif run_as:
        try:
            entry = pwd.getpwnam(run_as)
        except KeyError:
            raise PrivilegeError(f"RUN_AS_USER: no user {run_as!r}") from None
        uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
    elif os.environ.get("SUDO_UID", "0").isdigit() and int(os.environ.get("SUDO_UID", "0")) > 0:
        uid, gid = int(os.environ["SUDO_UID"]), int(os.environ.get("SUDO_GID") or os.environ["SUDO_UID"])
        name = os.environ.get("SUDO_USER", str(uid))
    else:
        entry = pwd.getpwnam("nobody")
        uid, gid, name = entry.pw_uid, entry.pw_gid, entry.pw_name
    if uid == 0 or gid == 0:
        raise PrivilegeError(f"refusing to run as {name} (uid {uid}, gid {gid}): set RUN_AS_USER to an "
                             "unprivileged user")
    return uid, gid, name


def _may(st: os.stat_result, uid: int, gid: int, bits: int) -> bool:
    shift = 6 if st.st_uid == uid else 3 if st.st_gid == gid else 0
    return (st.st_mode >> shift) & bits == bits


def unreadable(paths: list[str], uid: int, gid: int) -> list[str]:
    """The paths that uid/gid (no other group) could not read, judged by mode bits along the way."""
    bad = []
    for path in paths:
        real = os.path.realpath(path)
        parts = real.split(os.sep)[1:]
        folders = ["/" + "/".join(parts[:i]) for i in range(len(parts))]
        try:
            ok = all(_may(os.stat(d), uid, gid, 1) for d in folders) and _may(os.stat(real), uid, gid, 4)
        except OSError:
            ok = False
        if not ok:
            bad.append(real)
    return bad


def needed_paths() -> list[str]:
    """What the process reads after the drop: the interpreter, its library, the packages, the project."""
    return [sys.executable, os.path.dirname(os.__file__), sysconfig.get_paths()["purelib"],
            os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]


def drop_privileges(uid: int, gid: int) -> None:
    """Give up root in every thread: uid/gid, no groups, no capabilities, no_new_privs; PrivilegeError if not."""
    _drop_bounding_set()  # this thread and the threads it starts later (the capture threads)
    os.setgroups([])  # glibc applies these three to every thread of the process
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # all uids leave 0: the kernel clears each thread's capabilities
    _capset(0, 0, 0)
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    _no_new_privs_all_threads()
    _verify(uid, gid, 0)
    _follow_home(uid)


def _follow_home(uid: int) -> None:
    """HOME and USER become the new user's: code that reads `~` later (Streamlit, each new viewer) must not
    find root's home, which the new user cannot enter (an error there broke every viewer after the first)."""
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        os.environ["HOME"] = "/nonexistent"
        return
    os.environ["HOME"], os.environ["USER"] = entry.pw_dir, entry.pw_name


@dataclass(frozen=True)
class Outcome:
    """What separate() did: `still_root` when it could not give up root (and why, in `text`)."""

    text: str
    still_root: bool = False


_state_lock = threading.Lock()
_broker: Broker | None = None
_outcome: Outcome | None = None  # what separate() did, once it has run
_failed: str | None = None  # a drop that failed half-way: every later call raises it again, never carry on


def separate() -> Outcome:
    """Once per process: as root, start the broker and give up root; else nothing. What happened, in words."""
    global _broker, _outcome, _failed
    with _state_lock:
        if _failed is not None:
            raise PrivilegeError(_failed)
        if _outcome is None:
            if not logging.getLogger().handlers:  # the page sets logging up later: this line must not be lost
                import config

                logging.basicConfig(level=config.get("LOG_LEVEL"),
                                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
            _outcome = _separate()
            log.log(logging.ERROR if _outcome.still_root else logging.INFO, "%s", _outcome.text)
        return _outcome


def _separate() -> Outcome:
    global _broker, _failed
    if os.geteuid() != 0:
        return Outcome("not root: capture sockets are opened by this process, with the privilege it has")
    import config
    import native

    uid, gid, name = target_user(config.get("RUN_AS_USER"))
    blocked = unreadable(needed_paths(), uid, gid)
    if blocked:  # nothing changed yet: say so rather than fail later with an ImportError mid-capture
        return Outcome(f"still running as root: user {name} could not read {', '.join(blocked)}. Install Python, "
                       "the venv and the project where that user can read them, or set RUN_AS_USER to a user "
                       "who can.", still_root=True)
    native.available()  # build and load the compiled helpers while .build/ is still writable
    broker = start_broker(uid, gid, config.get("LOG_LEVEL"))
    try:
        drop_privileges(uid, gid)
    except (PrivilegeError, OSError) as exc:
        broker.close()
        _failed = f"could not give up root: {exc}"
        log.critical("%s", _failed)
        raise PrivilegeError(_failed) from exc
    _broker = broker
    threads = len(os.listdir("/proc/self/task"))
    return Outcome(f"running as {name} (uid {uid}) without capabilities, in all {threads} threads; the capture "
                   f"helper (pid {broker.proc.pid}) holds CAP_NET_RAW and only opens capture sockets and compiles "
                   "filters")


def packet_socket(kind: int, iface: str) -> socket.socket:
    """A new AF_PACKET socket (protocol 0, unbound): from the broker after separate(), else opened here."""
    broker = _broker
    if broker is not None:
        return broker.open(kind, iface)
    return socket.socket(socket.AF_PACKET, kind, 0)


def compile_filter(expr: str, iface: str, snaplen: int) -> list[tuple[int, int, int, int]]:
    """A filter compiled on a live handle of `iface`: by the broker after separate(), else here (which needs
    CAP_NET_RAW); CompileError, never a dead handle's program, when neither can."""
    broker = _broker
    if broker is not None:
        return broker.compile(expr, iface, snaplen)
    if len(expr.encode()) > EXPR_MAX:  # the same bound as through the broker
        raise CompileError(f"filter expression longer than {EXPR_MAX} bytes")
    return compile_live(expr, iface, snaplen)


if __name__ == "__main__":
    sys.exit(_broker_main(sys.argv[1:]))
