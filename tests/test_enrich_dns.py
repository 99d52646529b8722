"""Reverse DNS against a real resolver (dnsmasq) in a test namespace: answers, time-outs, and silence when off."""

from __future__ import annotations

import json
import os
import subprocess
import time

from conftest import PYTHON, ROOT, wait_for
from enrichhelp import HOSTILE, dnsmasq, packets_in, silent_resolver, tcpdump
from pcapgen import pcap_bytes
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

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


def test_summary_enrich_names_from_the_configured_resolver(veth, tmp_path):
    frames = [Ether() / IP(src=veth.host_ip, dst="10.213.0.66") / UDP(sport=5000, dport=53) / b"q",
              Ether() / IP(src="10.213.0.66", dst=veth.host_ip) / UDP(sport=53, dport=5000) / b"r"]
    path = tmp_path / "n.pcap"
    path.write_bytes(pcap_bytes([(1_700_000_000.0 + i, bytes(f)) for i, f in enumerate(frames)]))
    env = {**os.environ, "NTM_DNS_SERVER": veth.ns_ip, "NTM_RDNS_TIMEOUT_S": "1"}
    with dnsmasq(veth.ns, veth.ns_ip, {veth.host_ip: "host.ntm.test"}):
        out = json.loads(subprocess.run([PYTHON, "packet_processor.py", "summary", str(path), "--enrich"],
                                        cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout)
    names = {e.get("address", e.get("addr")): e["name"] for e in out["top10_src_by_packets"]}
    assert names == {veth.host_ip: "host.ntm.test", "10.213.0.66": None}  # no record: null
    assert out["enrichment"]["rdns"]["answered"] == 1 and out["enrichment"]["rdns"]["failed"] == 1


def test_queue_full_is_counted_and_the_cache_is_bounded(veth):
    with silent_resolver(veth.ns, veth.ns_ip):
        rdns = ReverseDNS(server=veth.ns_ip, timeout_s=1.0, workers=1, cache_max=5, queue_max=3)
        try:
            for i in range(1, 11):
                assert rdns.lookup_nowait(f"10.213.2.{i}") is None
            # One worker holds at most 1 + 3 queued; the other 6 were not asked, and said so.
            assert rdns.stats.queued <= 4 and rdns.stats.dropped_queue_full >= 6
            assert wait_for(lambda: rdns.stats.timed_out == rdns.stats.queued, 10)
            for i in range(20, 40):
                rdns._cache.put(f"10.213.3.{i}", "x")
            assert len(rdns._cache) == 5
        finally:
            rdns.stop()
