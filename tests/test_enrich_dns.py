"""Reverse DNS against a real resolver (dnsmasq) in a test namespace: answers, time-outs, and silence when off."""

from __future__ import annotations

import time

from conftest import wait_for
from enrichhelp import HOSTILE, dnsmasq, packets_in, silent_resolver, tcpdump

from enrich.names import FAILED, ReverseDNS


def test_ptr_names_from_dnsmasq(veth):
    names = {veth.host_ip: "host.ntm.test", veth.ns_ip: "peer.ntm.test", veth.ns_ip6: "peer6.ntm.test",
             "10.213.0.66": HOSTILE}
    with dnsmasq(veth.ns, veth.ns_ip, names):
        rdns = ReverseDNS(server=veth.ns_ip, timeout_s=2.0, workers=2)
        try:
            assert rdns.lookup_nowait(veth.ns_ip) is None  # queued, never waited for
            assert wait_for(lambda: all(rdns.lookup_nowait(a) is not None for a in names), 10)
            for addr, name in names.items():
                assert rdns.lookup_nowait(addr) == name, addr
            # An address dnsmasq has no record for is a failure, cached as such (not asked again).
            assert wait_for(lambda: rdns.lookup_nowait("10.213.0.99") == FAILED, 10)
            sent = rdns.stats.sent
            assert rdns.lookup_nowait("10.213.0.99") == FAILED and rdns.stats.sent == sent
            assert rdns.stats.answered == len(names) and rdns.stats.failed == 1
        finally:
            rdns.stop()


def test_silent_resolver_times_out_in_the_pool_and_callers_never_wait(veth):
    with silent_resolver(veth.ns, veth.ns_ip):
        rdns = ReverseDNS(server=veth.ns_ip, timeout_s=1.0, workers=2, queue_max=50)
        addrs = [f"10.213.1.{i}" for i in range(1, 7)]
        try:
            t = time.monotonic()
            for _ in range(100):
                assert all(rdns.lookup_nowait(a) is None for a in addrs)
            assert time.monotonic() - t < 0.5  # 600 calls, none waits for the network
            # 6 lookups, 2 workers, 1 s each: about 3 s; every one ends as a cached time-out.
            assert wait_for(lambda: all(rdns.lookup_nowait(a) == FAILED for a in addrs), 15)
            assert rdns.stats.timed_out == len(addrs) and rdns.stats.answered == 0
        finally:
            t = time.monotonic()
            rdns.stop()
            assert time.monotonic() - t < 3


def _lookups(veth, enabled: bool, path: str) -> ReverseDNS:
    with dnsmasq(veth.ns, veth.ns_ip, {veth.host_ip: "host.ntm.test"}), \
            tcpdump(veth.host_if, "port 53", path):
        rdns = ReverseDNS(enabled=enabled, server=veth.ns_ip, timeout_s=1.0)
        for _ in range(3):
            rdns.lookup_nowait(veth.host_ip)
            rdns.lookup_nowait(veth.ns_ip)
            rdns.resolve_all([veth.host_ip, "10.213.7.7"], 2.0)
        time.sleep(1.0)
        rdns.stop()
    return rdns


def test_reverse_dns_off_sends_no_query(veth, tmp_path):
    on = _lookups(veth, True, str(tmp_path / "on.pcap"))
    # The same calls with the setting on do put queries (and answers) on the veth: the capture sees them.
    assert on.lookup_nowait(veth.host_ip) == "host.ntm.test"
    assert packets_in(str(tmp_path / "on.pcap")) >= 6
    off = _lookups(veth, False, str(tmp_path / "off.pcap"))
    assert off.lookup_nowait(veth.host_ip) is None and off.stats.sent == 0
    assert packets_in(str(tmp_path / "off.pcap")) == 0
