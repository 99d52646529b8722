"""Promiscuous mode (issue 12.1): a live capture joins its interface promiscuously, as tcpdump does,
and the kernel leaves the mode when the capture stops; with it turned off the interface is untouched."""

from __future__ import annotations

import re
import socket
import time

import pytest
from conftest import run, wait_for

import config
from capture.sources import LiveRing
from packet_processor import CaptureEngine, Source


def promiscuity(iface: str) -> int:
    """The kernel's promiscuity count of an interface, as `ip -d link show` prints it."""
    out = run(["ip", "-d", "link", "show", "dev", iface]).stdout
    m = re.search(r"promiscuity (\d+)", out)
    assert m, out
    return int(m.group(1))


def test_live_ring_joins_promiscuously_and_the_kernel_undoes_it(root_only, veth):
    before = promiscuity(veth.host_if)
    ring = LiveRing(veth.host_if)
    try:
        assert ring.promisc and promiscuity(veth.host_if) == before + 1
    finally:
        ring.close()
    assert promiscuity(veth.host_if) == before
    off = LiveRing(veth.host_if, promisc=False)
    try:
        assert not off.promisc and promiscuity(veth.host_if) == before
    finally:
        off.close()


def listed(inode: int) -> bool:
    """Whether a packet socket with this inode exists (/proc/net/packet)."""
    return any(int(line.split()[-1]) == inode for line in open("/proc/net/packet").read().splitlines()[1:])


def taken(sock: socket.socket) -> int:
    """Packets the kernel gave this packet socket since the last call (PACKET_STATISTICS, reset on read)."""
    import struct

    return struct.unpack("=III", sock.getsockopt(263, 6, 12))[0]  # SOL_PACKET, PACKET_STATISTICS


def test_a_ring_kept_mapped_by_a_view_stops_receiving_and_leaves_promiscuous_mode(root_only, veth, caplog):
    """close() while something still holds a view of the ring (so the mapping, and with it the socket,
    stays): the socket no longer receives and the interface leaves promiscuous mode at once."""
    import contextlib
    import gc
    import os
    import threading

    before = promiscuity(veth.host_if)
    ring = LiveRing(veth.host_if)
    inode = os.fstat(ring.sock.fileno()).st_ino
    probe = socket.socket(fileno=os.dup(ring.sock.fileno()))  # the test's own look at the same socket
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    batches = ring.batches(threading.Event(), 100)
    held = None
    try:
        tx.sendto(b"x", (veth.ns_ip, 9))
        held = next(batches)  # a view into the ring, kept across close()
        assert len(held) >= 1 and promiscuity(veth.host_if) == before + 1
        ring.close()
        assert "stays mapped while a view of it is alive" in caplog.text
        assert promiscuity(veth.host_if) == before
        taken(probe)  # from here on (a fresh veth's own IPv6 chatter may have arrived during close())
        for _ in range(20):
            tx.sendto(b"x", (veth.ns_ip, 9))
        time.sleep(0.2)
        assert taken(probe) == 0, "the socket still receives"
    finally:
        tx.close()
        batches.close()
        del held
        probe.close()
        gc.collect()  # a failed assertion's traceback may have held the batch until now
        with contextlib.suppress(BufferError):
            ring.ring.close()  # the views are gone: the mapping, and the socket with it, go now
    assert not listed(inode)


def test_a_view_kept_only_by_a_reference_cycle_does_not_keep_the_ring(root_only, veth, caplog):
    """close() collects a view of the ring that only a reference cycle keeps (the collector would, some time
    later): the mapping and the socket go at once, with no warning."""
    import gc
    import os
    import threading

    ring = LiveRing(veth.host_if)
    inode = os.fstat(ring.sock.fileno()).st_ino
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    batches = ring.batches(threading.Event(), 100)
    gc.disable()  # no automatic collection in between: only close() may collect the cycle
    try:
        tx.sendto(b"x", (veth.ns_ip, 9))
        cycle: list = [next(batches)]
        cycle.append(cycle)
        batches.close()  # the reader's own views go; the batch lives on in the cycle only
        del cycle
        ring.close()
        assert ring.ring.closed and not listed(inode)
        assert "stays mapped" not in caplog.text
    finally:
        gc.enable()
        tx.close()
        if not ring.ring.closed:
            gc.collect()
            ring.ring.close()


def test_any_is_never_promiscuous(root_only, veth):
    """libpcap does not set promiscuous mode on `any`: no interface's count moves."""
    before = promiscuity(veth.host_if)
    ring = LiveRing("any")
    try:
        assert not ring.promisc and promiscuity(veth.host_if) == before
    finally:
        ring.close()


@pytest.mark.parametrize("setting,source_promisc,expect", [
    (None, True, 1),  # the default: promiscuous
    (None, False, 0),  # the sidebar toggle off, for one capture
    ("false", True, 0),  # PROMISC=false: never
])
def test_engine_capture_promiscuity_while_running_and_after_stop(root_only, veth, monkeypatch, setting,
                                                                 source_promisc, expect):
    if setting is not None:
        monkeypatch.setenv(config.ENV_PREFIX + "PROMISC", setting)
    before = promiscuity(veth.host_if)
    engine = CaptureEngine(buffer_size=1000)
    assert engine.start(Source("live", iface=veth.host_if, bpf="udp port 47001", promisc=source_promisc))
    try:
        assert wait_for(lambda: engine.status().state == "running")
        assert promiscuity(veth.host_if) == before + expect
        run(["ping", "-c", "3", "-i", "0.2", "-W", "1", "-p", "ab", veth.ns_ip])
        # One datagram the filter matches, after the pings: it must be counted (so the capture works)
        # and alone (so the pings were filtered out, not merely not yet handed over).
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            tx.sendto(b"promisc", (veth.ns_ip, 47001))
        assert wait_for(lambda: engine.snapshot().totals["packets"] >= 1, timeout=5)
        time.sleep(0.5)  # past the ring's block timeout: anything else would have arrived by now
        assert engine.snapshot().totals["packets"] == 1
    finally:
        engine.stop()
    assert wait_for(lambda: promiscuity(veth.host_if) == before, timeout=5)
