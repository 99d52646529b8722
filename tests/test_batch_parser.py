"""The vectorised batch parser gives exactly the rows of the scalar parser, on real and mutated frames."""

from __future__ import annotations

import random

import numpy as np
from conftest import IN_CI
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether

import native
from analysis.headers import LocalMatcher, pack_records, pack_records_scalar, parse_nets
from capture.sources import COOKED_BASE, FileReader

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
BASE = [bytes(f) for f in (
    ETH / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=443, flags="SA") / b"data",
    ETH / IP(src="10.0.0.1", dst="10.0.0.2", flags="MF") / UDP(sport=53, dport=5353) / (b"q" * 30),
    ETH / IP(src="10.0.0.1", dst="10.0.0.2", frag=100) / (b"z" * 20),
    ETH / IP(src="10.0.0.0", dst="224.0.0.1", options=b"\x94\x04\x00\x00") / ICMP(type=3, code=3),
    ETH / IP(src="10.0.0.1", dst="10.0.0.2", proto=47) / (b"\x00" * 12),
    ETH / IPv6(src="2001:db8::1", dst="2001:db8::") / TCP(sport=1, dport=2),
    ETH / IPv6(src="fe80::1", dst="ff02::1") / ICMPv6EchoRequest(),
    ETH / IPv6(src="::", dst="ff02::16") / IPv6ExtHdrHopByHop() / UDP(),
    ETH / IPv6() / IPv6ExtHdrFragment(offset=3, nh=17) / (b"f" * 16),
    ETH / Dot1Q(vlan=5) / IP(src="192.168.1.1", dst="192.168.1.2") / UDP(sport=9, dport=10),
    ETH / Dot1AD(vlan=5) / Dot1Q(vlan=6) / IP(src="192.168.1.1", dst="8.8.8.8") / TCP(),
    ETH / Dot1Q() / Dot1Q() / Dot1Q() / IP() / TCP(),
    ETH / ARP(psrc="10.0.0.1", pdst="10.0.0.2"),
    bytes(ETH)[:12] + b"\x88\xcc" + b"\x00" * 40,  # LLDP: a plain EtherType
    bytes(ETH)[:12] + b"\x00\x40" + b"\xaa\xaa\x03\x00\x00\x00\x08\x00" + bytes(IP() / UDP()),
)]
MATCHER = LocalMatcher(addrs=[bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])],
                       nets=parse_nets("192.168.0.0/16,fe80::/10,::1/128,2001:db8::/33"))


def same(records) -> None:
    """The batch parser, with native/fastparse.c and with numpy alone, gives the scalar parser's rows."""
    slow = pack_records_scalar(records, MATCHER)
    paths = {"numpy": pack_records(records, MATCHER, use_native=False)}
    if native.function("ntm_parse_fast") is not None:
        paths["native"] = pack_records(records, MATCHER)
    elif IN_CI:
        raise AssertionError("native/fastparse.c did not build in CI")
    for path, fast in paths.items():
        assert fast.dtype == slow.dtype and len(fast) == len(slow)
        for name in fast.dtype.names:
            bad = np.flatnonzero(fast[name] != slow[name])
            assert not len(bad), (path, name, bad[:5], [records[i] for i in bad[:2]])
    if "native" in paths:  # every byte, not only every field
        assert paths["native"].tobytes() == paths["numpy"].tobytes()


def test_base_frames_agree():
    same([(float(i), f, len(f), 1) for i, f in enumerate(BASE)])


def test_cooked_records_agree():
    recs = []
    for i, f in enumerate(BASE):
        et = int.from_bytes(f[12:14], "big")
        recs.append((float(i), f[14:], len(f) - 14, COOKED_BASE | et))
    same(recs)


def test_every_truncation_agrees():
    recs = [(0.0, f[:cut], len(f), 1) for f in BASE for cut in range(len(f) + 1)]
    same(recs)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(BASE) - 1), st.integers(0, 200), st.binary(max_size=8),
                          st.integers(0, 80), st.sampled_from([1, 1, 1, COOKED_BASE | 0x0800, 101, 113])),
                min_size=1, max_size=40))
def test_mutated_frames_agree(spec):
    recs = []
    for i, pos, junk, cut, lt in spec:
        f = bytearray(BASE[i])
        p = pos % max(1, len(f))
        f[p:p + len(junk)] = junk
        data = bytes(f[:max(0, len(f) - cut)])
        recs.append((float(i), data, len(data), lt))
    same(recs)


def test_shared_corpus_agrees(shared_pcaps):
    rng = random.Random(7)
    for path in sorted((shared_pcaps / "files").iterdir()):
        recs = list(FileReader(str(path)))
        same(recs)
        mutated = []
        for ts, data, wire, lt in recs[:300]:
            b = bytearray(data)
            if b:
                b[rng.randrange(len(b))] = rng.randrange(256)
            mutated.append((ts, bytes(b[:rng.randrange(len(b) + 1)]), wire, lt))
        same(mutated)


def test_vectorised_matcher_agrees_with_the_scalar_one():
    rng = random.Random(3)
    keys = [bytes(16), bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1]), bytes(10) + b"\xff\xff" + b"\xff" * 4]
    keys += [bytes(10) + b"\xff\xff" + bytes([rng.choice([10, 192, 224, 239, 8]), rng.choice([0, 168]), 1, 2])
             for _ in range(200)]
    keys += [bytes([0xfe, 0x80]) + bytes(14), b"\xff\x02" + bytes(14), bytes(15) + b"\x01"]
    keys += [bytes.fromhex("20010db8") + bytes([rng.randrange(256)]) + bytes(11) for _ in range(50)]
    arr = np.array(keys, dtype="S16")
    assert MATCHER.kinds(arr).tolist() == [MATCHER(k) for k in keys]
