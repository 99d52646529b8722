"""The record's vlan, ip_id and frag fields, from every parser, against the values Scapy wrote."""

from __future__ import annotations

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
from scapy.layers.l2 import ARP, CookedLinux, Dot1AD, Dot1Q, Ether

import native
from analysis.headers import PACKET_DTYPE, LocalMatcher, pack_records, pack_records_scalar, parse_batch
from capture.sources import COOKED_BASE, RawBatch

ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
V4 = IP(src="10.0.0.1", dst="10.0.0.2")


def rows(frames: list[bytes], linktype: int = 1) -> dict[str, np.ndarray]:
    """The records of `frames` from the scalar parser, numpy and (when built) native/fastparse.c."""
    recs = [(float(i), f, len(f), linktype) for i, f in enumerate(frames)]
    out = {"scalar": pack_records_scalar(recs, LocalMatcher()),
           "numpy": pack_records(recs, LocalMatcher(), use_native=False)}
    if native.function("ntm_parse_fast") is not None:
        out["native"] = pack_records(recs, LocalMatcher())
    return out


def fields(frames, linktype: int = 1) -> list[tuple[int, int, int]]:
    """(vlan, ip_id, frag) of each frame, the same from every parser."""
    got = {path: [(int(r["vlan"]), int(r["ip_id"]), int(r["frag"])) for r in arr]
           for path, arr in rows([bytes(f) for f in frames], linktype).items()}
    assert len({tuple(v) for v in got.values()}) == 1, got
    return got["scalar"]


def test_layout_keeps_src_and_dst_adjacent_and_the_new_fields_typed():
    names = PACKET_DTYPE.names
    assert names.index("dst") == names.index("src") + 1
    assert PACKET_DTYPE.fields["dst"][1] == PACKET_DTYPE.fields["src"][1] + 16
    assert (PACKET_DTYPE["vlan"].str, PACKET_DTYPE["ip_id"].str, PACKET_DTYPE["frag"].str) == ("<u2", "<u4", "<u2")
    assert PACKET_DTYPE.itemsize == 86


def test_vlan_is_the_outermost_tag_id():
    frames = [
        ETH / V4 / UDP(),
        ETH / Dot1Q(vlan=100) / V4 / UDP(),
        ETH / Dot1Q(vlan=4095) / V4 / TCP(),
        ETH / Dot1AD(vlan=200) / Dot1Q(vlan=300) / V4 / UDP(),  # QinQ: the service tag
        ETH / Dot1Q(vlan=7) / Dot1Q(vlan=8) / Dot1Q(vlan=9) / V4 / UDP(),  # a deep stack (scalar path)
        ETH / Dot1Q(vlan=42, prio=5) / ARP(psrc="10.0.0.1", pdst="10.0.0.2"),
        ETH / Dot1Q(vlan=43) / IPv6() / UDP(),
        ETH / Dot1Q(vlan=44, type=0x88CC) / (b"\x00" * 30),  # a plain EtherType under a tag
    ]
    assert [v for v, _, _ in fields(frames)] == [0, 100, 4095, 200, 7, 42, 43, 44]


def test_ipv4_identification_and_fragments():
    whole = ETH / IP(src="10.0.0.1", dst="10.0.0.2", id=0xBEEF, flags="DF") / UDP(sport=1, dport=2)
    pieces = fragment(IP(src="10.0.0.1", dst="10.0.0.2", id=4242) / UDP(sport=53, dport=9) / (b"x" * 3000),
                      fragsize=1000)
    assert len(pieces) == 4
    got = fields([whole, *(ETH / p for p in pieces)])
    assert got[0] == (0, 0xBEEF, 0)  # DF is not a fragment
    expected = [(0, 4242, (p.frag | (0x2000 if p.flags.MF else 0))) for p in pieces]
    assert got[1:] == expected
    assert [f for _, _, f in got[1:]] == [0x2000 | 0, 0x2000 | 125, 0x2000 | 250, 375]


def test_ipv6_fragment_header_identification():
    first = ETH / IPv6() / IPv6ExtHdrFragment(id=0xDEADBEEF, offset=0, m=1, nh=17) / UDP(sport=5, dport=6)
    later = ETH / IPv6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment(id=7, offset=185, m=0, nh=17) / (b"y" * 8)
    plain = ETH / IPv6() / UDP()
    assert fields([first, later, plain]) == [(0, 0xDEADBEEF, 0x2000), (0, 7, 185), (0, 0, 0)]
    arr = rows([bytes(first), bytes(later)])["scalar"]
    assert arr["sport"].tolist() == [5, -1]  # a non-first fragment has no ports


def test_cooked_records_carry_the_tag_that_is_still_in_the_frame():
    # SLL with an 802.1Q tag left in the frame, and a live cooked record (network header first).
    sll = CookedLinux(proto=0x8100) / Dot1Q(vlan=12) / V4 / UDP()
    assert fields([sll], 113) == [(12, 1, 0)]
    inner = bytes(Dot1Q(vlan=13) / IP(src="10.0.0.1", dst="10.0.0.2", id=99) / UDP())
    assert fields([inner], COOKED_BASE | 0x8100) == [(13, 99, 0)]


@pytest.mark.parametrize("use_native", [False, True])
def test_live_metadata_vlan_overrides_the_frame(use_native):
    """The kernel took the outer tag off the frame: tp_vlan_tci (RawBatch.vlan) is the outermost id."""
    frames = [bytes(ETH / V4 / UDP()), bytes(ETH / Dot1Q(vlan=300) / V4 / UDP()), bytes(ETH / V4 / UDP())]
    b = RawBatch.from_records([(0.0, f, len(f), 1) for f in frames])
    b.vlan = np.array([100, 200, -1], np.int64)
    out = parse_batch(b, LocalMatcher(), use_native=use_native)
    assert out["vlan"].tolist() == [100, 200, 0]


def test_packets_frame_has_the_vlan_column():
    """The table and CSV show each packet's VLAN id (0: untagged)."""
    from packet_processor import packets_frame

    frames = [bytes(ETH / Dot1Q(vlan=100) / V4 / UDP()), bytes(ETH / V4 / UDP()),
              bytes(ETH / Dot1AD(vlan=7) / Dot1Q(vlan=8) / V4 / TCP())]
    arr = pack_records([(1.0, f, len(f), 1) for f in frames], LocalMatcher())
    assert packets_frame(arr)["vlan"].tolist() == [100, 0, 7]
