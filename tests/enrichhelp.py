"""A real resolver for the enrichment tests: dnsmasq serving PTR records inside a test namespace."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import streamlit as st
from conftest import PYTHON, need, wait_for

import enrich
from packet_processor import CaptureEngine, Snapshot, Source, stop_all

HOSTILE = "**bold**<b>x</b>[a](javascript:alert(1))"  # printable text a PTR record can carry


def _clear() -> None:
    stop_all()
    enrich.stop_shared()
    st.cache_resource.clear()


@contextmanager
def cleared() -> Iterator[None]:
    """No engine, no shared Enricher and no cached resource before and after the block (the page under
    AppTest builds its own): the `fresh` fixture of the enrichment page tests."""
    _clear()
    try:
        yield
    finally:
        _clear()


def file_snapshot(path: str, timeout_s: float = 20.0) -> Snapshot:
    """The snapshot of an engine that has read the whole file at `path` (and is stopped)."""
    eng = CaptureEngine()
    assert eng.start(Source("file", path=str(path)))
    deadline = time.monotonic() + timeout_s
    while eng.status().state == "running" and time.monotonic() < deadline:
        time.sleep(0.02)
    snap = eng.snapshot()
    eng.stop()
    return snap


def registered(port: int, proto: str) -> str:
    """The name /etc/services gives port/proto (read here, for a test's preconditions), else ''."""
    with open("/etc/services", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            fields = line.split("#")[0].split()
            if len(fields) >= 2 and fields[1] == f"{port}/{proto}":
                return fields[0]
    return ""


def ptr_name(addr: str) -> str:
    """The in-addr.arpa / ip6.arpa name of an address."""
    return ipaddress.ip_address(addr).reverse_pointer


@contextmanager
def dnsmasq(ns: str, listen: str, records: dict[str, str]) -> Iterator[subprocess.Popen]:
    """dnsmasq in namespace `ns` on `listen`:53, answering PTR for `records` only (no upstream, no hosts)."""
    need(shutil.which("dnsmasq") is not None, "dnsmasq is not installed (apt-get install dnsmasq)")
    args = ["ip", "netns", "exec", ns, "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
            "--no-poll", "--bind-interfaces", f"--listen-address={listen}", "--port=53", "--conf-file=/dev/null",
            "--pid-file=", "--user=root", "--log-facility=-"]
    args += [f"--ptr-record={ptr_name(a)},{name}" for a, name in records.items()]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()
        yield proc
    finally:
        proc.terminate()
        proc.wait(5)


BLACKHOLE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
print("ready", flush=True)
while True:
    s.recvfrom(4096)  # read every query, answer none
"""


@contextmanager
def silent_resolver(ns: str, listen: str) -> Iterator[subprocess.Popen]:
    """A 'resolver' in namespace `ns` that reads queries on `listen`:53 and never answers."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, PYTHON, "-c", BLACKHOLE, listen],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait(5)


HELD = """
import select, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
print("ready", flush=True)
held, released = [], False

def nxdomain(query):  # the query's id and question back, QR RD RA set, rcode NXDOMAIN, no answer
    return query[:2] + b"\\x81\\x83" + query[4:6] + b"\\x00\\x00\\x00\\x00" + query[10:]

while True:
    ready, _, _ = select.select([s, sys.stdin], [], [])
    if sys.stdin in ready:
        if not sys.stdin.readline():
            break
        released = True
        for q, peer in held:
            s.sendto(nxdomain(q), peer)
        held.clear()
        print("released", flush=True)
    if s in ready:
        q, peer = s.recvfrom(4096)
        if released:
            s.sendto(nxdomain(q), peer)
        else:
            held.append((q, peer))
"""


@contextmanager
def held_resolver(ns: str, listen: str) -> Iterator[Callable[[], None]]:
    """A resolver in namespace `ns` on `listen`:53 that holds every query unanswered until the test calls
    the yielded release(); then it answers each held and later query at once with NXDOMAIN. A test sees
    lookups outstanding for as long as it wants, and their end, without waiting on a time-out."""
    proc = subprocess.Popen(["ip", "netns", "exec", ns, PYTHON, "-c", HELD, listen],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def release() -> None:
        proc.stdin.write("release\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "released"

    try:
        assert proc.stdout.readline().strip() == "ready"
        yield release
    finally:
        proc.kill()
        proc.wait(5)


@contextmanager
def tcpdump(iface: str, bpf: str, path: str) -> Iterator[None]:
    """tcpdump writing what crosses `iface` to `path` while the block runs."""
    proc = subprocess.Popen(["tcpdump", "-i", iface, "-U", "-n", "-w", path, bpf],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)  # tcpdump is listening once it has opened the interface
        assert proc.poll() is None, proc.stderr.read()
        yield
    finally:
        time.sleep(0.3)
        proc.terminate()
        proc.wait(5)


def pcap_totals(path) -> tuple[int, int]:
    """(packets, bytes on the wire) of a capture file as tshark reads it."""
    out = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.len"], capture_output=True,
                         text=True, check=True).stdout.split()
    return len(out), sum(int(x) for x in out)


@contextmanager
def reference_dump(bpf: str, path) -> Iterator[None]:
    """tcpdump writing what crosses lo (matching `bpf`) to `path` while the block runs: the reference count
    (immediate mode, a 64 MB buffer: a download at lo's speed is not dropped)."""
    need(shutil.which("tcpdump") is not None and shutil.which("tshark") is not None,
         "tcpdump and tshark count the traffic independently")
    dump = subprocess.Popen(["tcpdump", "--immediate-mode", "-Z", "root", "-i", "lo", "-U", "-B", "65536",
                             "-w", str(path), bpf], stderr=subprocess.PIPE, text=True)
    try:
        assert "listening" in (dump.stderr.readline() if dump.stderr else "")
        yield
    finally:
        time.sleep(0.3)
        dump.terminate()
        dump.wait(10)


def packets_in(path: str) -> int:
    """Packets in a pcap file (tcpdump -r)."""
    out = subprocess.run(["tcpdump", "-n", "-r", path], capture_output=True, text=True).stdout
    return len([line for line in out.splitlines() if line.strip()])


def held_curl(server: str, port: int, path: str, named: Callable[[int, int], bool], client: str = "127.0.0.1",
              out: str = "/dev/null", timeout_s: float = 15.0) -> tuple[int, int]:
    """curl connects to the HTTP server and holds the connection open (telnet://: its request comes from stdin)
    until `named(pid, local port)` is true, then sends `GET path` and reads the answer to the end.

    The socket table is read within about a second of a new port's first packets (the detector worker's
    gathering, then the table's read); a connection that closes before is "unknown", as it should be. A
    paced download (curl --limit-rate) lasted 2-6 s here, and in a loaded CI once closed first. `named` must
    only watch (ProcessTable.owners(), the per-process rows): owner() asks for a read itself, and the test
    would then make the read the product should. Returns (curl's pid, its local port) as `ss -tnp` lists it."""
    need(shutil.which("curl") is not None and shutil.which("ss") is not None, "curl and ss (iproute2) are needed")
    proc = subprocess.Popen(["curl", "-s", "-o", out, "--interface", client, f"telnet://{server}:{port}"],
                            stdin=subprocess.PIPE)
    try:
        local = None
        deadline = time.monotonic() + 10
        while local is None and time.monotonic() < deadline:
            listing = subprocess.run(["ss", "-tnpH", "dst", f"{server}:{port}"], capture_output=True,
                                     text=True).stdout
            for line in listing.splitlines():
                if f"pid={proc.pid}," in line:
                    local = int(line.split()[3].rsplit(":", 1)[1])
            time.sleep(0.05)
        assert local is not None, "ss never listed curl's socket"
        assert wait_for(lambda: named(proc.pid, local), timeout_s), f"curl's port {local} was never named"
        assert proc.stdin is not None
        proc.stdin.write(f"GET {path} HTTP/1.0\r\nHost: {server}\r\n\r\n".encode())
        proc.stdin.close()  # curl ends when the server has answered and closed
        assert proc.wait(30) == 0
        return proc.pid, local
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
