"""BPF filters as tcpdump means them (issue 12.2): VLAN tags the kernel moved into the packet's metadata,
link-level filters on `any`, and the snap length with a filter; each compared with tcpdump on the same
traffic, and the VLAN id kept in our records.

The traffic comes from VLAN sub-interfaces (ids 100 and 200) of the namespace's end of a veth pair;
the capture runs on the host's end, where the kernel takes each tag off the frame before any capturer
sees it.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest
from conftest import ROOT, VethNet, make_veth, need, remove_veth, run, wait_for
from test_privilege import packet_inodes, root_env, socket_inodes, venv  # noqa: F401 - venv is a fixture

from analysis.headers import LocalMatcher, parse_batch
from capture.sources import CaptureError, LiveRing, validate_bpf


@dataclass
class VlanNet:
    """The veth pair, and the addresses of the tagged traffic sent from its namespace."""

    net: VethNet
    host_mac: str
    ns_mac: str
    v100: tuple[str, str]  # (source in the namespace, destination) of VLAN 100's ICMP
    v200: tuple[str, str]  # the same for VLAN 200's ARP requests


@pytest.fixture
def vlan_net(root_only) -> Iterator[VlanNet]:
    need(shutil.which("tcpdump") is not None, "these tests compare with tcpdump (apt-get install tcpdump)")
    net = make_veth("v")
    try:
        # IPv6 router and neighbour chatter would come at random times: off on both ends.
        run(["sysctl", "-qw", f"net.ipv6.conf.{net.host_if}.disable_ipv6=1"])
        run(["sysctl", "-qw", f"net.ipv6.conf.{net.ns_if}.disable_ipv6=1"], ns=net.ns)
        host_mac = run(["cat", f"/sys/class/net/{net.host_if}/address"]).stdout.strip()
        ns_mac = run(["cat", f"/sys/class/net/{net.ns_if}/address"], ns=net.ns).stdout.strip()
        n = net.prefix.split(".")[2]
        yield VlanNet(net, host_mac, ns_mac, (f"10.214.{n}.2", f"10.214.{n}.1"), (f"10.215.{n}.2", f"10.215.{n}.1"))
    finally:
        remove_veth(net)


@dataclass
class OurCapture:
    """A LiveRing read by a thread; the records it parsed."""

    ring: LiveRing
    stop: threading.Event = field(default_factory=threading.Event)
    rows: list = field(default_factory=list)
    thread: threading.Thread | None = None

    def start(self) -> OurCapture:
        def loop() -> None:
            for batch in self.ring.batches(self.stop, poll_ms=50):
                self.rows.append(parse_batch(batch, LocalMatcher()).copy())

        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()
        return self

    def finish(self) -> np.ndarray:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(5)
        self.ring.close()
        return np.concatenate(self.rows) if self.rows else np.zeros(0)


def tcpdump(iface: str, expr: str, snaplen: int = 262144) -> subprocess.Popen:
    """tcpdump with the same filter; returns once it is listening."""
    cmd = ["tcpdump", "--immediate-mode", "-i", iface, "-nn", "-s", str(snaplen), "-w", "/dev/null", expr]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    if line.startswith("tcpdump: data link type"):  # on `any` it first says which one
        line = proc.stderr.readline()
    assert "listening on" in line, line
    return proc


def tcpdump_count(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    for line in err.splitlines():
        if line.endswith("packets captured"):
            return int(line.split()[0])
    raise AssertionError(err)


# Tagged frames sent by Scapy from inside the namespace. (This kernel has no 8021q module, so no VLAN
# sub-interface can be made; the receiving side is the same: the kernel takes the outer tag off every
# frame it receives, into the packet's metadata, before any capturer sees it.)
SEND = """
import sys
from scapy.all import ARP, ICMP, IP, UDP, Dot1AD, Dot1Q, Ether, sendp
iface, host_mac, ns_mac, s100, d100, s200, d200 = sys.argv[1:]
eth = Ether(src=ns_mac, dst=host_mac)
frames = [eth / Dot1Q(vlan=100) / IP(src=s100, dst=d100) / ICMP(seq=i) for i in range(6)]
frames += [Ether(src=ns_mac, dst="ff:ff:ff:ff:ff:ff") / Dot1Q(vlan=200) / ARP(psrc=s200, pdst=d200, hwsrc=ns_mac)
           for _ in range(3)]
frames += [eth / Dot1AD(vlan=300) / Dot1Q(vlan=301) / IP(src=s100, dst=d100) / UDP(sport=4000, dport=4001)
           for _ in range(2)]
sendp(frames, iface=iface, verbose=False)
"""


def traffic(v: VlanNet) -> None:
    """Tagged ICMP (VLAN 100), tagged ARP (VLAN 200), QinQ UDP (300 outside 301), then untagged ARP and
    ICMP both ways from a real ping."""
    run([sys.executable, "-c", SEND, v.net.ns_if, v.host_mac, v.ns_mac, *v.v100, *v.v200], ns=v.net.ns)
    run(["ping", "-c", "4", "-i", "0.2", "-W", "1", v.net.host_ip], ns=v.net.ns)
    time.sleep(0.5)


FILTERS = ["vlan", "vlan 100", "vlan 200", "vlan 300", "not vlan", "arp", "host {ns_ip}", "vlan 100 and icmp",
           "vlan 300 and vlan 301 and udp port 4001"]


def test_vlan_and_link_filters_count_what_tcpdump_counts(vlan_net):
    v = vlan_net
    iface = v.net.host_if
    exprs = [f.format(ns_ip=v.net.ns_ip) for f in FILTERS]
    ours = [OurCapture(LiveRing(iface, e, block_size=1 << 16, block_nr=8, block_timeout_ms=20)).start()
            for e in exprs]
    theirs = [tcpdump(iface, e) for e in exprs]
    traffic(v)
    counts = {e: tcpdump_count(p) for e, p in zip(exprs, theirs, strict=True)}
    rows = {e: c.finish() for e, c in zip(exprs, ours, strict=True)}
    got = {e: len(r) for e, r in rows.items()}
    assert got == counts, (got, counts)
    # What was sent, so the comparison is not between two captures that both missed everything.
    assert (counts["vlan 100"], counts["vlan 200"], counts["vlan 300"], counts["vlan"]) == (6, 3, 2, 11)
    assert counts["vlan 100 and icmp"] == 6 and counts["not vlan"] >= 8, counts
    assert counts["vlan 300 and vlan 301 and udp port 4001"] == 2
    assert counts["not vlan"] >= 8 and counts["arp"] >= 3 + 2
    # The VLAN id of each packet is in our records: the outer tag from the kernel's metadata.
    assert sorted(rows["vlan"]["vlan"].tolist()) == [100] * 6 + [200] * 3 + [300] * 2
    assert set(rows["not vlan"]["vlan"].tolist()) == {0}
    assert int((rows["arp"]["vlan"] == 200).sum()) == 3
    assert set(rows["vlan 200"]["wire_len"].tolist()) == {14 + 4 + 28}  # the size on the wire, tag included
    qinq = rows["vlan 300 and vlan 301 and udp port 4001"]
    assert qinq["dport"].tolist() == [4001, 4001]  # the inner tag, still in the frame, is walked


def test_link_level_filters_on_any_behave_as_in_tcpdump(vlan_net):
    v = vlan_net
    exprs = [f"arp host {v.v200[1]}", f"host {v.net.ns_ip}", f"arp and ether src {v.ns_mac}"]
    # tcpdump -i any compiles for Linux cooked v2: Ethernet addresses and VLAN tests do not compile.
    for bad in (exprs[2], "vlan", "vlan 100"):
        assert validate_bpf(bad, "any") is not None
        assert subprocess.run(["tcpdump", "-d", "-i", "any", bad], capture_output=True).returncode != 0
        with pytest.raises(CaptureError, match="bad BPF filter"):
            LiveRing("any", bad)
    exprs = exprs[:2]
    ours = [OurCapture(LiveRing("any", e, block_size=1 << 16, block_nr=8, block_timeout_ms=20)).start()
            for e in exprs]
    theirs = [tcpdump("any", e) for e in exprs]
    traffic(v)
    counts = [tcpdump_count(p) for p in theirs]
    rows = [c.finish() for c in ours]
    assert [len(r) for r in rows] == counts
    assert counts[0] == 3 and counts[1] >= 8
    assert set(rows[0]["vlan"].tolist()) == {200}  # tagged ARP, its id from the metadata on `any` too
    assert set(rows[0]["wire_len"].tolist()) == {14 + 4 + 28}  # the size on the wire, tag included


def test_snaplen_is_honoured_when_a_filter_is_set(vlan_net):
    v = vlan_net
    cap = OurCapture(LiveRing(v.net.host_if, "icmp", snaplen=96, block_size=1 << 16, block_nr=8,
                              block_timeout_ms=20)).start()
    run(["ping", "-c", "3", "-i", "0.2", "-s", "600", v.net.ns_ip], ns=None)
    time.sleep(0.3)
    rows = cap.finish()
    assert len(rows) == 6  # three requests and three replies
    assert set(rows["cap_len"].tolist()) == {96} and set(rows["wire_len"].tolist()) == {14 + 20 + 8 + 600}


def test_validation_compiles_for_the_interface_the_capture_will_use(monkeypatch):
    """An empty interface means the default route's: an Ethernet one accepts `vlan`, `any` refuses it."""
    from capture import sources

    monkeypatch.setattr(sources, "default_interface", lambda: "lo")
    assert validate_bpf("vlan 100", "") is None and validate_bpf("vlan 100", "lo") is None
    assert "no VLAN support" in validate_bpf("vlan 100", "any")
    assert "syntax error" in validate_bpf("udp port", "lo")


def test_vlan_filters_after_the_drop_from_root_count_what_tcpdump_counts(vlan_net, venv):  # noqa: F811
    """The `capture` CLI started as root gives up root before it captures: the filter is compiled by the capture
    helper on a live handle, so `vlan 100` and `not vlan` test the tag the kernel moved into the metadata."""
    v = vlan_net
    iface = v.net.host_if
    # `icmp and not vlan`: the host's own later ARP probes (`not vlan`) would fall in the CLI's run but outside
    # tcpdump's, and after `vlan` libpcap reads later fields past a tag (`not vlan and icmp` matches nothing).
    exprs = ["vlan 100", "icmp and not vlan", "vlan"]
    procs = [subprocess.Popen([str(venv / "bin" / "python3"), "packet_processor.py", "capture", "--iface", iface,
                               "--filter", e, "--seconds", "12"], cwd=ROOT, env=root_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for e in exprs]
    try:
        for p in procs:
            assert wait_for(lambda p=p: p.poll() is not None or bool(socket_inodes(p.pid) & packet_inodes(True)),
                            20), "no capture socket"
            assert p.poll() is None, p.communicate()
        theirs = [tcpdump(iface, e) for e in exprs]
        traffic(v)
        counts = {e: tcpdump_count(p) for e, p in zip(exprs, theirs, strict=True)}
        outs = [p.communicate(timeout=40) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    summaries = {e: json.loads(out) for e, (out, _) in zip(exprs, outs, strict=True)}
    for e, (_, err) in zip(exprs, outs, strict=True):
        assert "running as nobody" in err and summaries[e]["error"] is None, (e, err)
    got = {e: summaries[e]["packets"] for e in exprs}
    assert got == counts, (got, counts)
    assert (counts["vlan 100"], counts["icmp and not vlan"], counts["vlan"]) == (6, 8, 11), counts
