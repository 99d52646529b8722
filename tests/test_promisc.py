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
