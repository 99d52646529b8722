"""Which local process owns a port: the socket table (enrich/sockdiag.py; psutil.net_connections() where the
kernel refuses sock_diag) re-read on a short interval in one thread.

Keyed by (protocol, local port). A connection that closed between two reads, or one in another network
namespace, has no owner here: the page says "unknown" plainly. A socket listed without an owner because
this process may not read the owner's file descriptors (after the dashboard gives up root, other users'
processes) is "hidden", counted apart and said so: it is not closed, and naming it needs the privilege.
Entries stay for a few refreshes after the socket closes (short connections are still named), and the
table is bounded.

A read through sock_diag costs a fraction of psutil's when the sockets' owners are known (psutil reads
/proc/net, which the kernel writes by walking its whole socket hash, and every process's fd table at every
read; ~20 ms on a busy machine; benchmarks/attribution_cost.py), and the thread reads every `refresh_s` only
while someone is asking for a port it does not know (owner() missed: the attribution stage's waiting ports, a
page's row); when every port asked for is named it reads only
every IDLE_READS intervals (enrichment's largest fixed cost to the capturing process: benchmarks/RESULTS.md).
A miss wakes the thread at once when the last read is an interval old: a new connection is read while it
lasts, not up to an interval later (a short one had closed, and its owner was "unknown"); still at most
one read an interval.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from enrich import sockdiag

log = logging.getLogger(__name__)

DIAG_TRIES = 3  # sock_diag reads failing in a row before the table reads only through psutil
IDLE_READS = 10  # with no port asked for unknown, the table is re-read every IDLE_READS x refresh_s
# A table fed by another process's reads (feed(): the detector worker's, during a live capture) reads nothing
# itself while the last feed is younger than IDLE_READS intervals (the feeder reads at least that often) plus
# this slack (the feeder's read, its report's delay, a busy worker).
FED_SLACK_S = 5.0

UNKNOWN = "unknown"
HIDDEN = "owner not visible (no privilege)"
# Not "run as root" or RUN_AS_USER=root: started as root the dashboard always gives up root, and
# capture.broker.target_user refuses uid 0. A user may read the fd tables of its own processes only.
HIDDEN_NOTE = ("{n:,} ports owned by processes this unprivileged process cannot see (it runs as {user} and may "
               "read only that user's processes; set RUN_AS_USER to the user who owns them, or ask "
               "`sudo ss -tunap`: see README, Enrichment)")
_PROTO = {socket.SOCK_STREAM: "tcp", socket.SOCK_DGRAM: "udp"}


class ProcessTable:
    """(proto, local port) -> (pid, name), refreshed every `refresh_s` by a daemon thread."""

    def __init__(self, refresh_s: float = 1.0, keep_s: float = 30.0, max_entries: int = 65_536,
                 use_sock_diag: bool = True) -> None:
        self.refresh_s = refresh_s
        self.keep_s = keep_s
        self.max_entries = max_entries
        self._owners: dict[tuple[str, int], tuple[int, str, float]] = {}
        self._names: dict[int, str] = {}
        self._local: frozenset[str] = frozenset()
        self._hidden: frozenset[tuple[str, int]] = frozenset()  # listed sockets whose owner we may not see
        self._hidden_at: dict[tuple[str, int], float] = {}
        self._hidden_users: dict[tuple[str, int], int] = {}  # their sockets' uid (/proc/net, no privilege)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # want(): a port asked for is unknown
        self._thread: threading.Thread | None = None
        self.error: str | None = None
        self.refreshes = 0
        self.skipped = 0  # passes of the refresh loop without a read (an interval, or part of one a want() cut)
        self._wanted = True  # the first interval reads
        self._fed_at: float | None = None  # when feed() last gave this table another process's read
        # While fed: asks the feeder for a read (a port the page asked for is unknown), once an interval at most.
        self.forward_want: Callable[[], None] | None = None
        self._diag: sockdiag.Owners | None = sockdiag.Owners() if use_sock_diag else None
        self._diag_failures = 0

    def start(self) -> None:
        """Start the refresh thread (once); the first read happens at once."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="process-table", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Stop the refresh thread (safe to call twice)."""
        self._stop.set()
        self._wake.set()
        t = self._thread
        if t is not None:
            t.join(self.refresh_s + 5)

    def _run(self) -> None:
        idle, last = 0, float("-inf")
        while not self._stop.is_set():
            if self.fed():
                self.skipped += 1
                forward = self.forward_want
                if self._wanted and forward is not None:  # the feeder reads it for us
                    self._wanted = False
                    forward()
                    last = time.monotonic()
            elif self._wanted or idle >= IDLE_READS - 1:
                self._wanted, idle = False, 0
                self.refresh()
                last = time.monotonic()  # from the read's end: a slow read never runs into the next one
            else:
                idle += 1
                self.skipped += 1
            self._pause(last)

    def _pause(self, last: float) -> None:
        """Wait one interval; a want() ends the wait early once the last read (or forward) ended an interval ago."""
        end = time.monotonic() + self.refresh_s
        quiet = last + self.refresh_s - time.monotonic()  # at most one read an interval, wanted or not
        if quiet > 0 and self._stop.wait(min(quiet, self.refresh_s)):
            return
        left = max(0.0, end - time.monotonic())
        if self.fed() and self.forward_want is None:  # nobody to read for a want: the interval as it was
            self._stop.wait(left)
            return
        self._wake.clear()
        if self._wanted or self._stop.is_set():  # asked for (or stopped) before the clear: its set() was cleared
            return
        self._wake.wait(left)

    def fed(self) -> bool:
        """Whether another process's reads keep this table current (see FED_SLACK_S)."""
        at = self._fed_at
        return at is not None and time.monotonic() - at < IDLE_READS * self.refresh_s + FED_SLACK_S

    def state(self) -> dict[str, Any]:
        """What the last read found, for feed() in another process (every value a new object at each read)."""
        with self._lock:
            return {"owners": self._owners, "local": self._local, "hidden": self._hidden,
                    "hidden_users": dict(self._hidden_users), "error": self.error, "refreshes": self.refreshes}

    def feed(self, state: dict[str, Any] | None) -> None:
        """Take another process's read (state()) as this table's: during a live capture the detector worker
        reads the socket table for its per-process totals, and the page's table mirrors it instead of reading
        the same table again in the capturing process (~20 ms of CPU a read, holding the GIL). None: the feed
        ended (the capture stopped), this table reads for itself again from its next interval."""
        if state is None:
            self._fed_at = None
            self.forward_want = None
            self._wanted = True
            return
        now = time.monotonic()
        with self._lock:
            self._owners = state["owners"]  # a fresh dict from the report, never changed in place
            self._local = frozenset(state["local"])
            self._hidden = frozenset(state["hidden"])
            self._hidden_at = dict.fromkeys(self._hidden, now)
            self._hidden_users = dict(state["hidden_users"])
            self._names = {v[0]: v[1] for v in self._owners.values()}  # as the feeder named them
            self._fed_at = now
            self.error = state.get("error")
            self.refreshes += 1  # the page's memo keys its process labels on this: they are looked up again

    def want(self) -> None:
        """Ask for a read: at once if the last read is an interval old, else when it is (a port is not known yet)."""
        self._wanted = True
        self._wake.set()

    def refresh(self) -> None:
        """Read the socket table once (also callable directly)."""
        import psutil
        now = time.monotonic()
        try:
            seen_pids, hidden, users = self._read()
            local = frozenset(a.address.split("%")[0] for addrs in psutil.net_if_addrs().values()
                              for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6))
        except (psutil.Error, OSError) as exc:
            self.error = f"cannot read the socket table: {exc} (run as root to see every process)"
            log.warning("%s", self.error)
            return
        except Exception as exc:  # a read that fails for another reason is said, and the thread goes on
            self.error = f"cannot read the socket table: {type(exc).__name__}: {exc}"
            log.exception("socket table read failed")
            return
        seen = {k: (pid, self._name(pid), now) for k, pid in seen_pids.items()}
        with self._lock:
            kept = {k: v for k, v in self._owners.items() if now - v[2] < self.keep_s and k not in seen}
            kept.update(seen)
            if len(kept) > self.max_entries:  # keep the most recently seen
                kept = dict(sorted(kept.items(), key=lambda kv: kv[1][2])[-self.max_entries:])
            self._owners = kept
            self._local = local
            # Like owners, a hidden port is remembered keep_s after its socket closes (its last packets are
            # attributed a few reads later), and bounded.
            held = {k: at for k, at in self._hidden_at.items() if now - at < self.keep_s and k not in kept}
            held.update((k, now) for k in hidden)
            if len(held) > self.max_entries:
                held = dict(sorted(held.items(), key=lambda kv: kv[1])[-self.max_entries:])
            self._hidden_at = held
            self._hidden = frozenset(held)
            self._hidden_users = {k: u for k, u in {**self._hidden_users, **users}.items() if k in held}
            live = {v[0] for v in kept.values()}
            self._names = {p: n for p, n in self._names.items() if p in live}
            self.error = None
            self.refreshes += 1

    def _read(self) -> tuple[dict[tuple[str, int], int], set[tuple[str, int]], dict[tuple[str, int], int]]:
        """({(proto, port): pid}, the ports listed with an owner this process may not see, their uids): from
        sock_diag (enrich/sockdiag.py: the fd tables scanned only for new sockets, ended owners, or every RESCAN_S),
        or from psutil where sock_diag fails (for good after DIAG_TRIES failures in a row)."""
        if self._diag is not None:
            try:
                seen = self._read_diag()
                self._diag_failures = 0
                return seen
            except Exception as exc:  # refused, timed out, cut short, no netlink here: this read through psutil,
                # and after DIAG_TRIES in a row every read
                self._diag_failures += 1
                log.info("sock_diag failed (%s): this read goes through psutil", exc)
                if self._diag_failures >= DIAG_TRIES:
                    log.warning("sock_diag failed %d times in a row (%s): the socket table is read with psutil "
                                "from now on", DIAG_TRIES, exc)
                    self._diag = None
        return self._read_psutil()

    def _read_diag(self) -> tuple[dict[tuple[str, int], int], set[tuple[str, int]], dict[tuple[str, int], int]]:
        socks = sockdiag.sockets()
        pids = self._diag.place(socks)
        see_all = sees_every_owner()
        seen: dict[tuple[str, int], int] = {}
        hidden: set[tuple[str, int]] = set()
        users: dict[tuple[str, int], int] = {}
        for s in socks:
            if not s.port:
                continue
            pid = pids.get(s.inode)
            if pid is not None:
                seen[(s.proto, s.port)] = pid
            # A file holds it, but no fd table we may read: its owner's is not ours to read (hidden). Without a
            # file (inode 0: TIME_WAIT, an orphaned close), or read by one who sees every fd table: no owner.
            elif s.inode and not see_all:
                hidden.add((s.proto, s.port))
                users.setdefault((s.proto, s.port), s.uid)
        hidden.difference_update(seen)  # another socket on that port (v4/v6, or ours) names it
        return seen, hidden, {k: u for k, u in users.items() if k in hidden}

    def _read_psutil(self) -> tuple[dict[tuple[str, int], int], set[tuple[str, int]], dict[tuple[str, int], int]]:
        import psutil
        seen: dict[tuple[str, int], int] = {}
        hidden: set[tuple[str, int]] = set()
        see_all = sees_every_owner()  # then a socket listed without a pid has no owner
        for c in psutil.net_connections(kind="inet"):
            if not c.laddr or c.type not in _PROTO:
                continue
            if c.pid is None:
                # /proc/net lists it, but no fd table we may read holds it: either its owner's is not ours to
                # read (hidden), or it has no owner at all (TIME_WAIT, an orphaned close): that is "unknown".
                if not see_all and c.status != psutil.CONN_TIME_WAIT:
                    hidden.add((_PROTO[c.type], c.laddr.port))
                continue
            seen[(_PROTO[c.type], c.laddr.port)] = c.pid
        hidden.difference_update(seen)
        return seen, hidden, socket_users(hidden) if hidden else {}

    def _name(self, pid: int) -> str:
        name = self._names.get(pid)
        if name is None:
            import psutil
            try:
                name = psutil.Process(pid).name()
            except psutil.Error:
                name = UNKNOWN
            self._names[pid] = name
        return name

    def owner(self, proto: str, port: int) -> tuple[int, str] | None:
        """(pid, name) of the local socket on this port, or None (unknown)."""
        v = self._owners.get((proto.lower(), int(port)))
        if v is None:
            self.want()  # read the table again soon: this port may be new
            return None
        return v[0], v[1]

    def owners(self) -> dict[tuple[str, int], tuple[int, str, float]]:
        """The current {(proto, port): (pid, name, last seen)}; a new dict at each read, never changed in place."""
        return self._owners

    def hidden(self, proto: str, port: int) -> bool:
        """Whether the last read listed a socket on this port whose owner this process may not see."""
        return (proto.lower(), int(port)) in self._hidden

    def hidden_ports(self) -> frozenset[tuple[str, int]]:
        """The (proto, port) of sockets listed without an owner at the last read (a new set at each read)."""
        return self._hidden

    def hidden_users(self) -> dict[str, int]:
        """{user name: hidden ports} of the sockets listed without a visible owner (the kernel's table says
        which user owns a socket; only the PID needs the privilege)."""
        out: dict[str, int] = {}
        for uid in dict(self._hidden_users).values():
            name = _user_name(uid)
            out[name] = out.get(name, 0) + 1
        return out

    def label(self, proto: str, port: int | None) -> str:
        """'name (pid)', HIDDEN (owner not visible without the privilege) or 'unknown'."""
        if port is None or port < 0:
            return UNKNOWN
        o = self.owner(proto, port)
        if o:
            return f"{o[1]} ({o[0]})"
        return HIDDEN if self.hidden(proto, port) else UNKNOWN

    def local_addresses(self) -> frozenset[str]:
        """This machine's interface addresses as of the last refresh (loopback ranges aside)."""
        return self._local

    def is_local(self, addr: str) -> bool:
        """True for an address of this machine (as of the last refresh) or any loopback address."""
        return addr in self._local or addr.startswith("127.") or addr == "::1"


CAP_SYS_PTRACE = 19  # reading another user's /proc/PID/fd needs it (ptrace's read access), root or not


def sees_every_owner() -> bool:
    """Whether this process may read every process's fd table: root with CAP_SYS_PTRACE (a container's root may
    lack it)."""
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            eff = next(int(line.split()[1], 16) for line in fh if line.startswith("CapEff:"))
    except (OSError, StopIteration, ValueError):
        return False
    return bool(eff >> CAP_SYS_PTRACE & 1)


def socket_users(ports: set[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """The uid owning each (proto, local port), from /proc/net/{tcp,tcp6,udp,udp6} (readable by anyone)."""
    out: dict[tuple[str, int], int] = {}
    for proto, name in (("tcp", "tcp"), ("tcp", "tcp6"), ("udp", "udp"), ("udp", "udp6")):
        try:
            with open(f"/proc/net/{name}", encoding="ascii") as fh:
                lines = fh.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 8:
                continue
            key = (proto, int(f[1].rsplit(":", 1)[1], 16))
            if key in ports and key not in out:
                out[key] = int(f[7])
    return out


def _user_name(uid: int) -> str:
    import pwd
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


_SHARED: dict[str, ProcessTable] = {}
_SHARED_LOCK = threading.Lock()


def shared_table() -> ProcessTable:
    """The process-wide table (the page's Enricher and the engine's attribution stage read the same one)."""
    import config
    with _SHARED_LOCK:
        t = _SHARED.get("table")
        if t is None:
            t = _SHARED["table"] = ProcessTable(refresh_s=config.get("PROCESS_REFRESH_S"),
                                                max_entries=config.get("ENRICH_CACHE_MAX"))
        return t
