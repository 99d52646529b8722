"""The raw-byte header parser on frames built with Scapy, including malformed and truncated ones."""

from __future__ import annotations

import struct

import pytest
from scapy.contrib.mpls import MPLS
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, GRE, LLC, SNAP, CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Dot3, Ether
from scapy.layers.ppp import HDLC, PPP

from packet_processor import (
    ICMP as C_ICMP,
)
from packet_processor import (
    ICMPV6,
    NON_IP,
    OTHER_IP,
    PACKET_DTYPE,
    LocalMatcher,
    addr_text,
    pack_records,
    parse_frame,
)
from packet_processor import (
    TCP as C_TCP,
)
from packet_processor import (
    UDP as C_UDP,
)

FIELDS = ("cls", "ipver", "proto", "ethertype", "src", "dst", "sport", "dport", "tcp_flags",
          "icmp_type", "icmp_code", "arp_op", "hw_src", "vlan", "ip_id", "frag", "malformed")


def parsed(linktype: int, frame) -> dict:
    """parse_frame's result as a dict, addresses as text."""
    out = dict(zip(FIELDS, parse_frame(linktype, bytes(frame)), strict=True))
    for k in ("src", "dst"):
        out[k] = addr_text(out[k]) if out["cls"] != NON_IP or out["arp_op"] else ""
    return out


ETH = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def test_ipv4_tcp_ports_and_flags():
    p = parsed(1, ETH / IP(src="192.0.2.1", dst="198.51.100.7") / TCP(sport=40000, dport=443, flags="SA"))
    assert (p["cls"], p["ipver"], p["proto"]) == (C_TCP, 4, 6)
    assert (p["src"], p["dst"], p["sport"], p["dport"]) == ("192.0.2.1", "198.51.100.7", 40000, 443)
    assert p["tcp_flags"] == 0x12 and p["malformed"] == 0
    assert p["hw_src"] == bytes.fromhex("020000000001")


def test_ipv4_udp_and_icmp():
    u = parsed(1, ETH / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=5353, dport=53) / b"q")
    assert (u["cls"], u["sport"], u["dport"]) == (C_UDP, 5353, 53)
    i = parsed(1, ETH / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP(type=3, code=3))
    assert (i["cls"], i["icmp_type"], i["icmp_code"], i["sport"]) == (C_ICMP, 3, 3, -1)


def test_ipv6_walks_extension_headers_to_the_transport():
    frame = (ETH / IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting()
             / IPv6ExtHdrDestOpt() / UDP(sport=1000, dport=2000))
    p = parsed(1, frame)
    assert (p["cls"], p["ipver"], p["proto"], p["sport"], p["dport"]) == (C_UDP, 6, 17, 1000, 2000)
    assert (p["src"], p["dst"]) == ("2001:db8::1", "2001:db8::2")
    e = parsed(1, ETH / IPv6(src="fe80::1", dst="ff02::1") / ICMPv6EchoRequest())
    assert (e["cls"], e["icmp_type"]) == (ICMPV6, 128)


def test_fragments_keep_their_protocol_but_only_the_first_has_ports():
    frags = fragment(IP(src="10.1.1.1", dst="10.1.1.2") / UDP(sport=111, dport=2049) / (b"x" * 3000), 1000)
    rows = [parsed(1, ETH / f) for f in frags]
    assert all(r["cls"] == C_UDP for r in rows)
    assert (rows[0]["sport"], rows[0]["dport"]) == (111, 2049)
    assert all(r["sport"] == -1 and r["dport"] == -1 and r["malformed"] == 0 for r in rows[1:])
    v6 = ETH / IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrFragment(offset=100, nh=17) / (b"y" * 40)
    p = parsed(1, v6)
    assert (p["cls"], p["sport"]) == (C_UDP, -1)


def test_vlan_qinq_snap_and_mpls_reach_the_ip_header():
    inner = IP(src="10.9.9.9", dst="10.8.8.8") / TCP(sport=1, dport=22)
    assert parsed(1, ETH / Dot1Q(vlan=10) / inner)["dport"] == 22
    assert parsed(1, ETH / Dot1AD(vlan=5) / Dot1Q(vlan=10) / inner)["dport"] == 22
    deep = ETH
    for _ in range(100):  # a VLAN stack 100 deep is walked, not recursed
        deep = deep / Dot1Q(vlan=7)
    assert parsed(1, deep / inner)["src"] == "10.9.9.9"
    snap = Dot3(dst="02:00:00:00:00:02", src="02:00:00:00:00:01") / LLC() / SNAP(code=0x0800) / inner
    assert parsed(1, snap)["cls"] == C_TCP
    mpls = ETH / MPLS(label=16, s=0) / MPLS(label=17, s=1) / inner
    assert parsed(1, mpls)["dst"] == "10.8.8.8"


def test_arp_is_non_ip_but_carries_its_addresses():
    p = parsed(1, ETH / ARP(op=2, hwsrc="02:00:00:00:00:01", psrc="10.0.0.1", pdst="10.0.0.2"))
    assert (p["cls"], p["ethertype"], p["arp_op"]) == (NON_IP, 0x0806, 2)
    assert (p["src"], p["dst"]) == ("10.0.0.1", "10.0.0.2")
    assert p["hw_src"] == bytes.fromhex("020000000001")


def test_tunnels_count_by_their_outer_header():
    gre = parsed(1, ETH / IP(src="1.1.1.1", dst="2.2.2.2") / GRE() / IP(src="3.3.3.3", dst="4.4.4.4") / UDP())
    assert (gre["cls"], gre["proto"], gre["src"]) == (OTHER_IP, 47, "1.1.1.1")


@pytest.mark.parametrize("linktype,frame", [
    (113, CookedLinux(proto=0x0800) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(dport=53)),
    (276, CookedLinuxV2(proto=0x0800) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(dport=53)),
    (101, IP(src="10.0.0.1", dst="10.0.0.2") / UDP(dport=53)),
    (228, IP(src="10.0.0.1", dst="10.0.0.2") / UDP(dport=53)),
    (0, struct.pack("<I", 2) + bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(dport=53))),
    (108, struct.pack(">I", 2) + bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(dport=53))),
    (9, PPP(proto=0x0021) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(dport=53)),
    (50, HDLC() / PPP(proto=0x0021) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(dport=53)),
    (226, bytes(24) + bytes(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(dport=53))),
])
def test_every_link_type_reaches_udp(linktype, frame):
    p = parsed(linktype, frame)
    assert (p["cls"], p["src"], p["dst"], p["dport"]) == (C_UDP, "10.0.0.1", "10.0.0.2", 53)


def test_unknown_link_type_is_non_ip_not_malformed():
    p = parsed(147, b"\x00" * 60)
    assert (p["cls"], p["malformed"]) == (NON_IP, 0)


# Network-layer packets and the length of the headers the parser must see whole (IP header, extension
# headers, and the transport's fixed part: TCP 20, UDP 8, ICMP 4; ARP for Ethernet/IPv4 28), from the
# protocols' definitions. A frame cut anywhere before that end is malformed; cut after it, it is not
# (a short snap length that drops payload is normal).
NETWORK = {
    "tcp": (IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2, flags="S"), 0x0800, 20 + 20),
    "ipv6-hbh-udp": (IPv6(src="::1", dst="::2") / IPv6ExtHdrHopByHop() / UDP(sport=1, dport=2) / b"data",
                     0x86DD, 40 + 8 + 8),
    "icmp": (IP(src="10.0.0.1", dst="10.0.0.2") / ICMP() / b"echo", 0x0800, 20 + 4),
    "vlan-arp": (Dot1Q(vlan=3) / ARP(psrc="10.0.0.1", pdst="10.0.0.2"), 0x8100, 4 + 28),
}
# Link type -> (its header for a network packet of an EtherType, whether it can carry any EtherType).
LINKS = {
    1: (lambda et: bytes(ETH)[:12] + struct.pack("!H", et), True),
    113: (lambda et: bytes(CookedLinux(proto=et)), True),
    276: (lambda et: bytes(CookedLinuxV2(proto=et)), True),
    101: (lambda et: b"", False),
    0: (lambda et: struct.pack("<I", 2 if et == 0x0800 else 10), False),
    9: (lambda et: struct.pack("!H", 0x21 if et == 0x0800 else 0x57), False),
    226: (lambda et: bytes(24), False),
}


@pytest.mark.parametrize("linktype,kind", [(lt, kind) for lt in LINKS for kind in NETWORK
                                             if LINKS[lt][1] or NETWORK[kind][1] != 0x8100])  # IP-only links
def test_truncation_at_every_length_is_flagged_exactly_while_headers_are_cut(linktype, kind):
    packet, ethertype, headers = NETWORK[kind]
    header_of, _ = LINKS[linktype]
    link = header_of(ethertype)
    raw = link + bytes(packet)
    end = len(link) + headers  # the end of the headers the parser needs
    assert parse_frame(linktype, raw)[-1] == 0
    for cut in range(len(raw) + 1):
        row = parse_frame(linktype, raw[:cut])
        assert len(row) == len(FIELDS)
        assert row[-1] == int(cut < end), (cut, end, row)


def test_lying_length_fields_are_flagged_not_trusted():
    ip = bytearray(bytes(ETH / IP(src="10.0.0.1", dst="10.0.0.2") / TCP()))
    ip[14] = 0x4F  # IHL says 60 bytes of IP header in a 54-byte frame
    assert parse_frame(1, bytes(ip))[-1] == 1
    ip[14] = 0x43  # IHL below the minimum
    assert parse_frame(1, bytes(ip))[-1] == 1
    v6 = bytearray(bytes(ETH / IPv6() / IPv6ExtHdrHopByHop() / UDP()))
    v6[14 + 40 + 1] = 200  # a Hop-by-Hop header that claims 1608 bytes
    row = parse_frame(1, bytes(v6))
    assert row[-1] == 1 and row[6] == -1


def test_zero_length_frame_is_malformed_non_ip():
    for lt in (1, 113, 276, 101, 228, 229, 0, 108, 9, 226, 104):
        row = parse_frame(lt, b"")
        assert row[0] == NON_IP and row[-1] == 1


def test_pack_records_directions_and_dtype():
    me = LocalMatcher(addrs=[bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])])
    frames = [
        (1.0, bytes(ETH / IP(src="10.0.0.1", dst="10.0.0.9") / UDP()), 60, 1),  # out
        (2.0, bytes(ETH / IP(src="10.0.0.9", dst="10.0.0.1") / UDP()), 60, 1),  # in
        (3.0, bytes(ETH / IP(src="10.0.0.1", dst="10.0.0.1") / UDP()), 60, 1),  # local
        (4.0, bytes(ETH / IP(src="10.0.0.8", dst="10.0.0.9") / UDP()), 60, 1),  # transit
        (5.0, bytes(ETH / IP(src="10.0.0.9", dst="224.0.0.251") / UDP()), 60, 1),  # in (multicast)
    ]
    arr = pack_records(frames, me)
    assert arr.dtype == PACKET_DTYPE
    assert arr["direction"].tolist() == [1, 0, 2, 3, 0]
    assert arr["ts"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert arr["cap_len"].tolist() == [len(f[1]) for f in frames]


def test_no_payload_is_kept():
    marker = b"NTM-SECRET-PAYLOAD-7f3a"
    frame = bytes(ETH / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2) / marker)
    arr = pack_records([(1.0, frame, len(frame), 1)], LocalMatcher())
    assert marker not in arr.tobytes()
