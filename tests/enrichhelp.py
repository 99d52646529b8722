"""A real resolver for the enrichment tests: dnsmasq serving PTR records inside a test namespace."""

from __future__ import annotations

import ipaddress
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from conftest import PYTHON, need

HOSTILE = "**bold**<b>x</b>[a](javascript:alert(1))"  # printable text a PTR record can carry


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


def packets_in(path: str) -> int:
    """Packets in a pcap file (tcpdump -r)."""
    out = subprocess.run(["tcpdump", "-n", "-r", path], capture_output=True, text=True).stdout
    return len([line for line in out.splitlines() if line.strip()])
