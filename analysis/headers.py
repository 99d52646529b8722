"""Packet headers from raw bytes: the packed record, the scalar parser, and what is local.

``parse_frame`` reads one frame of any supported link type; ``pack_records`` turns records
into the packed ``PACKET_DTYPE`` rows the engine stores. Only header fields are read and kept,
never payload. No Streamlit, no threads: pure functions over bytes.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from collections.abc import Iterable
from typing import Any

import numpy as np

import native
from capture.sources import COOKED_BASE, V4_PREFIX, RawBatch, Record

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------
# Classes, directions and the packed record
# ----------------------------------------------------------------------------------------

TCP, UDP, ICMP, ICMPV6, OTHER_IP, NON_IP = range(6)
CLASSES = ("tcp", "udp", "icmp", "icmpv6", "other_ip", "non_ip")
PROTO_CLASS = {6: TCP, 17: UDP, 1: ICMP, 58: ICMPV6}
IN, OUT, LOCAL, TRANSIT = range(4)
DIRECTIONS = ("in", "out", "local", "transit")

NO_ADDR = b"\x00" * 16
NO_MAC = b""

# One packed record per packet: header metadata only, never payload.
PACKET_DTYPE = np.dtype([
    ("ts", "<f8"), ("wire_len", "<u4"), ("cap_len", "<u4"),
    ("cls", "u1"), ("ipver", "u1"), ("proto", "<i2"), ("ethertype", "<u2"),
    ("src", "S16"), ("dst", "S16"), ("sport", "<i4"), ("dport", "<i4"),
    ("tcp_flags", "<u2"), ("icmp_type", "<i2"), ("icmp_code", "<i2"), ("arp_op", "<u2"),
    ("hw_src", "S6"),
    # vlan: VID of the outermost 802.1Q/802.1ad tag (0: untagged); ip_id: IPv4 Identification or the
    # IPv6 Fragment header's; frag: offset in 8-byte units (bits 0-12) | 0x2000 more fragments (0: whole).
    ("vlan", "<u2"), ("ip_id", "<u4"), ("frag", "<u2"),
    ("malformed", "u1"), ("direction", "u1"),
])
RECORD = struct.Struct("<dIIBBhH16s16siiHhhH6sHIHBB")
assert RECORD.size == PACKET_DTYPE.itemsize == native.RECORD_SIZE
# native/fastparse.c and grouprows.c write and read these offsets.
assert [PACKET_DTYPE.fields[f][1] for f in ("src", "sport", "hw_src", "vlan", "ip_id", "frag", "malformed")] == \
    [22, 54, 70, 76, 78, 82, 84]

# parse_frame's result: every field of the record except ts, lengths and direction (malformed last).
Parsed = tuple[int, int, int, int, bytes, bytes, int, int, int, int, int, int, bytes, int, int, int, int]
VLAN_AT = 13  # the index of vlan in Parsed

# ----------------------------------------------------------------------------------------
# Header parsing from raw bytes
# ----------------------------------------------------------------------------------------

U16 = struct.Struct("!H").unpack_from
U16LE = struct.Struct("<H").unpack_from
U32LE = struct.Struct("<I").unpack_from
U32BE = struct.Struct("!I").unpack_from
PORTS = struct.Struct("!HH").unpack_from

ETH_IPV4, ETH_IPV6, ETH_ARP = 0x0800, 0x86DD, 0x0806
ETH_VLAN = frozenset((0x8100, 0x88A8, 0x9100, 0x9200, 0x9300))
ETH_MPLS = frozenset((0x8847, 0x8848))
ETH_PPPOE_SESSION = 0x8864
IPV6_EXT = frozenset((0, 43, 44, 60))  # Hop-by-Hop, Routing, Fragment, Destination Options
PPP_TO_ETHERTYPE = {0x0021: ETH_IPV4, 0x0057: ETH_IPV6, 0x0281: 0x8847, 0x0283: 0x8848}
NULL_AF_INET6 = frozenset((10, 24, 28, 30))  # Linux, NetBSD/OpenBSD, FreeBSD, macOS

_warned_linktypes: set[int] = set()


def _non_ip(ethertype: int = 0, malformed: int = 0, hw_src: bytes = NO_MAC) -> Parsed:
    return (NON_IP, 0, -1, ethertype, NO_ADDR, NO_ADDR, -1, -1, 0, -1, -1, 0, hw_src, 0, 0, 0, malformed)


def _transport(data: bytes, p: int, end: int, proto: int) -> tuple[int, int, int, int, int, int]:
    """(sport, dport, tcp_flags, icmp_type, icmp_code, malformed) from the transport header at p."""
    avail = end - p
    if proto == 6:
        if avail >= 14:
            sport, dport = PORTS(data, p)
            flags = data[p + 13] | ((data[p + 12] & 1) << 8)
            return sport, dport, flags, -1, -1, int(avail < 20)
        if avail >= 4:
            sport, dport = PORTS(data, p)
            return sport, dport, 0, -1, -1, 1
        return -1, -1, 0, -1, -1, 1
    if proto == 17:
        if avail >= 4:
            sport, dport = PORTS(data, p)
            return sport, dport, 0, -1, -1, int(avail < 8)
        return -1, -1, 0, -1, -1, 1
    if proto == 1 or proto == 58:
        if avail >= 2:
            return -1, -1, 0, data[p], data[p + 1], int(avail < 4)
        return -1, -1, 0, -1, -1, 1
    return -1, -1, 0, -1, -1, 0


def _ipv4(data: bytes, off: int, ethertype: int, hw_src: bytes) -> Parsed:
    n = len(data)
    if n - off < 20 or data[off] >> 4 != 4:
        return _non_ip(ethertype, 1, hw_src)
    ihl = (data[off] & 0x0F) * 4
    total = U16(data, off + 2)[0]
    ip_id = U16(data, off + 4)[0]
    frag = U16(data, off + 6)[0] & 0x3FFF  # MF (0x2000) and the offset: the record's frag as it is
    proto = data[off + 9]
    src = V4_PREFIX + data[off + 12:off + 16]
    dst = V4_PREFIX + data[off + 16:off + 20]
    cls = PROTO_CLASS.get(proto, OTHER_IP)
    if ihl < 20:
        return (cls, 4, proto, ethertype, src, dst, -1, -1, 0, -1, -1, 0, hw_src, 0, ip_id, frag, 1)
    # A zero total length is legal for segmentation-offloaded frames: trust the capture then.
    end = min(n, off + total) if total >= ihl else n
    if frag & 0x1FFF:  # non-first fragment: it carries no transport header
        return (cls, 4, proto, ethertype, src, dst, -1, -1, 0, -1, -1, 0, hw_src, 0, ip_id, frag, int(off + ihl > n))
    if off + ihl > n:
        return (cls, 4, proto, ethertype, src, dst, -1, -1, 0, -1, -1, 0, hw_src, 0, ip_id, frag, 1)
    sport, dport, flags, itype, icode, bad = _transport(data, off + ihl, end, proto)
    return (cls, 4, proto, ethertype, src, dst, sport, dport, flags, itype, icode, 0, hw_src, 0, ip_id, frag, bad)


def _ipv6(data: bytes, off: int, ethertype: int, hw_src: bytes) -> Parsed:
    n = len(data)
    if n - off < 40 or data[off] >> 4 != 6:
        return _non_ip(ethertype, 1, hw_src)
    plen = U16(data, off + 4)[0]
    nh = data[off + 6]
    src = data[off + 8:off + 24]
    dst = data[off + 24:off + 40]
    end = min(n, off + 40 + plen) if plen else n  # 0: jumbogram or offloaded, trust the capture
    p = off + 40
    first_fragment = True
    bad = ip_id = frag = 0
    fragment_seen = False
    # Each extension header moves p forward by at least 8 bytes, so this walk always ends.
    while nh in IPV6_EXT:
        if p + 8 > n:
            bad = 1
            break
        if nh == 44:
            word = U16(data, p + 2)[0]  # offset << 3 | M
            if word & 0xFFF8:
                first_fragment = False
            if not fragment_seen:  # the first Fragment header is the one that counts
                fragment_seen = True
                ip_id, frag = U32BE(data, p + 4)[0], (word >> 3) | ((word & 1) << 13)
            nh, p = data[p], p + 8
        else:
            nh, p = data[p], p + (data[p + 1] + 1) * 8
    cls = PROTO_CLASS.get(nh, OTHER_IP)
    if bad or not first_fragment:
        return (cls, 6, nh, ethertype, src, dst, -1, -1, 0, -1, -1, 0, hw_src, 0, ip_id, frag, bad)
    if p > n:
        return (cls, 6, nh, ethertype, src, dst, -1, -1, 0, -1, -1, 0, hw_src, 0, ip_id, frag, 1)
    sport, dport, flags, itype, icode, bad = _transport(data, p, max(end, p), nh)
    return (cls, 6, nh, ethertype, src, dst, sport, dport, flags, itype, icode, 0, hw_src, 0, ip_id, frag, bad)


def _arp(data: bytes, off: int, hw_src: bytes) -> Parsed:
    n = len(data)
    if n - off < 8:
        return _non_ip(ETH_ARP, 1, hw_src)
    ptype = U16(data, off + 2)[0]
    hlen, plen = data[off + 4], data[off + 5]
    op = U16(data, off + 6)[0]
    if ptype != ETH_IPV4 or plen != 4:
        return (NON_IP, 0, -1, ETH_ARP, NO_ADDR, NO_ADDR, -1, -1, 0, -1, -1, op, hw_src, 0, 0, 0, 0)
    need = off + 8 + 2 * hlen + 8
    if n < need:
        return (NON_IP, 0, -1, ETH_ARP, NO_ADDR, NO_ADDR, -1, -1, 0, -1, -1, op, hw_src, 0, 0, 0, 1)
    sha = data[off + 8:off + 8 + hlen][:6]
    spa = data[off + 8 + hlen:off + 12 + hlen]
    tpa = data[off + 12 + 2 * hlen:off + 16 + 2 * hlen]
    return (NON_IP, 0, -1, ETH_ARP, V4_PREFIX + spa, V4_PREFIX + tpa, -1, -1, 0, -1, -1, op, sha, 0, 0, 0, 0)


def _by_version(data: bytes, off: int, ethertype: int, hw_src: bytes) -> Parsed:
    """Raw IP with no link header: the version nibble says which."""
    if off >= len(data):
        return _non_ip(ethertype, 1, hw_src)
    version = data[off] >> 4
    if version == 4:
        return _ipv4(data, off, ethertype, hw_src)
    if version == 6:
        return _ipv6(data, off, ethertype, hw_src)
    return _non_ip(ethertype, 1, hw_src)


def _mpls(data: bytes, off: int, ethertype: int, hw_src: bytes) -> Parsed:
    n = len(data)
    while off + 4 <= n:
        bottom = data[off + 2] & 1
        off += 4
        if bottom:
            if off < n and data[off] >> 4 in (4, 6):
                return _by_version(data, off, ethertype, hw_src)
            return _non_ip(ethertype, 0, hw_src)
    return _non_ip(ethertype, 1, hw_src)


def _ethertype(data: bytes, off: int, et: int, hw_src: bytes) -> Parsed:
    """Dispatch on an EtherType, walking VLAN tags, LLC/SNAP, PPPoE and MPLS down to the network header;
    the outermost VLAN tag's VID goes into the record."""
    vlan = -1
    n = len(data)
    while True:
        if et in ETH_VLAN:  # 802.1Q / 802.1ad tags, however many are stacked
            if off + 4 > n:
                row = _non_ip(et, 1, hw_src)
                break
            if vlan < 0:
                vlan = U16(data, off)[0] & 0x0FFF
            et = U16(data, off + 2)[0]
            off += 4
            continue
        step = _ethertype_step(data, off, et, hw_src)
        if len(step) == 2:  # (EtherType, offset) of an encapsulated header: walk on
            et, off = step
            continue
        row = step
        break
    if vlan > 0:
        row = (*row[:VLAN_AT], vlan, *row[VLAN_AT + 1:])
    return row


def _ethertype_step(data: bytes, off: int, et: int, hw_src: bytes) -> Parsed | tuple[int, int]:
    """One non-VLAN step of _ethertype: the parsed row, or the (EtherType, offset) to walk on with."""
    n = len(data)
    if et == ETH_IPV4:
        return _ipv4(data, off, et, hw_src)
    if et == ETH_IPV6:
        return _ipv6(data, off, et, hw_src)
    if et == ETH_ARP:
        return _arp(data, off, hw_src)
    if et <= 1500:  # an 802.3 length: LLC follows; only SNAP can carry an EtherType
        if data[off:off + 3] == b"\xaa\xaa\x03" and off + 8 <= n:
            return U16(data, off + 6)[0], off + 8
        return _non_ip(0, 0, hw_src)
    if et in ETH_MPLS:
        return _mpls(data, off, et, hw_src)
    if et == ETH_PPPOE_SESSION:
        if off + 8 > n:
            return _non_ip(et, 1, hw_src)
        ppp = PPP_TO_ETHERTYPE.get(U16(data, off + 6)[0])
        if ppp is None:
            return _non_ip(et, 0, hw_src)
        return ppp, off + 8
    return _non_ip(et, 0, hw_src)


def _ppp(data: bytes, off: int) -> Parsed:
    n = len(data)
    if data[off:off + 2] == b"\xff\x03":  # HDLC address and control bytes
        off += 2
    if off >= n:
        return _non_ip(0, 1)
    if data[off] & 1:  # protocol-field compression: a one-byte protocol
        proto, off = data[off], off + 1
    elif off + 2 <= n:
        proto, off = U16(data, off)[0], off + 2
    else:
        return _non_ip(0, 1)
    et = PPP_TO_ETHERTYPE.get(proto)
    return _ethertype(data, off, et, NO_MAC) if et else _non_ip(0, 0)


def _null(data: bytes, big_endian: bool) -> Parsed:
    if len(data) < 4:
        return _non_ip(0, 1)
    if big_endian:  # DLT_LOOP: network byte order
        fam = U32BE(data, 0)[0]
    else:
        # DLT_NULL stores the address family in the capturing host's byte order; a value
        # with both halves set is, as Wireshark reads it, an EtherType in the last two bytes.
        fam = U32LE(data, 0)[0]
        if fam > 0xFFFF:
            if fam & 0xFFFF:
                return _ethertype(data, 4, U16(data, 2)[0], NO_MAC)
            fam >>= 16
    if fam == 2:
        return _ipv4(data, 4, ETH_IPV4, NO_MAC)
    if fam in NULL_AF_INET6:
        return _ipv6(data, 4, ETH_IPV6, NO_MAC)
    return _non_ip(0, 0)


def _eth(data: bytes) -> Parsed:
    if len(data) < 14:
        return _non_ip(0, 1)
    return _ethertype(data, 14, U16(data, 12)[0], data[6:12])


def _sll(data: bytes) -> Parsed:
    if len(data) < 16:
        return _non_ip(0, 1)
    return _ethertype(data, 16, U16(data, 14)[0], data[6:12] if data[5] == 6 else NO_MAC)


def _sll2(data: bytes) -> Parsed:
    if len(data) < 20:
        return _non_ip(0, 1)
    return _ethertype(data, 20, U16(data, 0)[0], data[12:18] if data[11] == 6 else NO_MAC)


def _ipnet(data: bytes) -> Parsed:
    return _by_version(data, 24, 0, NO_MAC) if len(data) > 24 else _non_ip(0, 1)


def _cisco_hdlc(data: bytes) -> Parsed:
    return _ethertype(data, 4, U16(data, 2)[0], NO_MAC) if len(data) >= 4 else _non_ip(0, 1)


# pcap LINKTYPE_* -> parser of a frame of that type.
LINK_PARSERS = {
    1: _eth,
    113: _sll,  # Linux cooked v1
    276: _sll2,  # Linux cooked v2
    101: lambda d: _by_version(d, 0, 0, NO_MAC),  # raw IP (and its old DLT numbers 12 and 14)
    12: lambda d: _by_version(d, 0, 0, NO_MAC),
    14: lambda d: _by_version(d, 0, 0, NO_MAC),
    228: lambda d: _ipv4(d, 0, ETH_IPV4, NO_MAC),
    229: lambda d: _ipv6(d, 0, ETH_IPV6, NO_MAC),
    0: lambda d: _null(d, False),  # BSD NULL, host byte order
    108: lambda d: _null(d, True),  # BSD LOOP, network byte order
    226: _ipnet,  # Solaris IPNET: 24-byte header, then IP
    9: lambda d: _ppp(d, 0),
    50: lambda d: _ppp(d, 0),  # PPP in HDLC-like framing
    104: _cisco_hdlc,
}


def _link(linktype: int, data: bytes) -> Parsed:
    handler = LINK_PARSERS.get(linktype)
    if handler is not None:
        return handler(data)
    if linktype >= COOKED_BASE:  # live cooked record: starts at the network header
        return _ethertype(data, 0, linktype - COOKED_BASE, NO_MAC)
    if linktype not in _warned_linktypes:
        _warned_linktypes.add(linktype)
        log.warning("unknown link type %d: its packets count as non-IP", linktype)
    return _non_ip(0, 0)


def parse_frame(linktype: int, data: bytes) -> Parsed:
    """Header fields of one frame; never raises: a frame it cannot read is marked malformed."""
    try:
        return _link(linktype, data)
    except (IndexError, struct.error, TypeError, ValueError):
        return _non_ip(0, 1)


# ----------------------------------------------------------------------------------------
# Addresses: local or not, and as text
# ----------------------------------------------------------------------------------------

BROADCAST4 = V4_PREFIX + b"\xff\xff\xff\xff"


def take(records: np.ndarray, which: np.ndarray) -> np.ndarray:
    """records[which] (indices or a boolean mask) for a 1-D structured array, copied as whole opaque records:
    numpy copies a structured array's rows field by field (a mask over 65,536 packed records: ~3.9 ms), a
    void view's as plain bytes (~0.26 ms)."""
    if records.dtype.names is None:
        return records[which]
    return records.view(f"V{records.dtype.itemsize}")[which].view(records.dtype)


def addr_text(key: bytes) -> str:
    """A 16-byte address key as tshark writes it (dotted quad, or RFC 5952 IPv6)."""
    key = key.ljust(16, b"\x00")  # numpy's S16 strips trailing zero bytes
    if key[:12] == V4_PREFIX:
        return socket.inet_ntop(socket.AF_INET, key[12:])
    return socket.inet_ntop(socket.AF_INET6, key)


def parse_nets(spec: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """'10.0.0.0/8,fe80::/10' -> a list of networks; ValueError naming every entry that is not one.

    config.validate() refuses a bad LOCAL_NETS at start-up; this refuses one passed by hand (--local-nets)
    rather than silently counting local traffic as remote."""
    nets, bad = [], []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            bad.append(part)
    if bad:
        raise ValueError("LOCAL_NETS: not networks: " + ", ".join(repr(b) for b in bad))
    return nets


class LocalMatcher:
    """Says whether an address is this host's (a set of addresses) or a local network's."""

    NONE, OURS, GROUP = 0, 1, 2
    CACHE_MAX = 65536

    def __init__(self, addrs: Iterable[bytes] = (), nets: Iterable[Any] = ()) -> None:
        self.addrs = frozenset(addrs)
        self.nets = list(nets)
        self._cache: dict[bytes, int] = {}
        pairs = [_halves(a) for a in sorted(self.addrs)]
        self._addr_hi = np.array([p[0] for p in pairs], np.uint64)
        self._addr_lo = np.array([p[1] for p in pairs], np.uint64)
        self._net_masks = [_net_mask(net) for net in self.nets]
        self._addrs_c = np.array(pairs, np.uint64).reshape(-1, 2)  # the same, as native.addr_kinds takes them
        self._nets_c = np.array(self._net_masks, np.uint64).reshape(-1, 4)

    def kinds(self, keys: np.ndarray) -> np.ndarray:
        """Vectorised __call__ over an array of 16-byte keys (S16 or V16): OURS, GROUP or NONE each.

        native/grouprows.c reads a field of packed records in place (no copy, one pass); kinds_numpy
        is the reference (tests/test_native.py keeps them equal)."""
        out = native.addr_kinds(keys, self._addrs_c, self._nets_c)
        return self.kinds_numpy(keys) if out is None else out

    def kinds_numpy(self, keys: np.ndarray) -> np.ndarray:
        """kinds in numpy: the reference of the compiled version."""
        u = np.ascontiguousarray(keys).view(">u8").reshape(-1, 2)
        hi, lo = u[:, 0], u[:, 1]
        ours = np.zeros(len(u), bool)
        for h, low in zip(self._addr_hi, self._addr_lo):
            ours |= (hi == h) & (lo == low)
        v4 = (hi == 0) & ((lo >> np.uint64(32)) == 0xFFFF)
        group = (v4 & ((lo >> np.uint64(24)) & np.uint64(0xFF) >= 224)) | (~v4 & (hi >> np.uint64(56) == 0xFF))
        in_net = np.zeros(len(u), bool)
        for h, low, mh, ml in self._net_masks:
            in_net |= ((hi & mh) == h) & ((lo & ml) == low)
        out = np.where(ours, self.OURS, np.where(group, self.GROUP, np.where(in_net, self.OURS, self.NONE)))
        out[(hi == 0) & (lo == 0)] = self.NONE
        return out

    def __call__(self, key: bytes) -> int:
        """OURS, GROUP (multicast/broadcast) or NONE for a 16-byte address key."""
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if len(self._cache) >= self.CACHE_MAX:
            self._cache.clear()
        res = self._classify(key)
        self._cache[key] = res
        return res

    def _classify(self, key: bytes) -> int:
        if key == NO_ADDR:
            return self.NONE
        if key in self.addrs:
            return self.OURS
        v4 = key[:12] == V4_PREFIX
        if (v4 and (key[12] >= 224 or key == BROADCAST4)) or (not v4 and key[0] == 0xFF):
            return self.GROUP
        if self.nets:
            ip = ipaddress.IPv4Address(key[12:]) if v4 else ipaddress.IPv6Address(key)
            if any(ip.version == net.version and ip in net for net in self.nets):
                return self.OURS
        return self.NONE


def _halves(key: bytes) -> tuple[int, int]:
    return int.from_bytes(key[:8], "big"), int.from_bytes(key[8:16], "big")


def _net_mask(net: Any) -> tuple[np.uint64, np.uint64, np.uint64, np.uint64]:
    """(hi, lo, hi mask, lo mask) of a network in the 16-byte key space (IPv4 mapped into ::ffff:0:0/96)."""
    if net.version == 4:
        base = (0xFFFF << 32) | int(net.network_address)
        plen = 96 + net.prefixlen
    else:
        base, plen = int(net.network_address), net.prefixlen
    mask = ((1 << 128) - 1) ^ ((1 << (128 - plen)) - 1)
    top = (1 << 64) - 1
    return (np.uint64(base >> 64), np.uint64(base & top), np.uint64(mask >> 64), np.uint64(mask & top))


# All of 127.0.0.0/8 is this host's, though only 127.0.0.1 is listed as an address.
LOOPBACK_NETS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


def direction_of(src_kind: int, dst_kind: int) -> int:
    """in/out/local/transit from what the matcher says of the two ends."""
    src_ours = src_kind == LocalMatcher.OURS
    dst_ours = dst_kind == LocalMatcher.OURS
    if src_ours:
        return LOCAL if dst_ours else OUT
    if dst_ours or dst_kind == LocalMatcher.GROUP:
        return IN
    return TRANSIT


def pack_records(records: Iterable[Record], matcher: LocalMatcher, use_native: bool = True) -> np.ndarray:
    """Parse (ts, data, wire_len, linktype) records into packed PACKET_DTYPE rows."""
    return parse_batch(RawBatch.from_records(list(records)), matcher, use_native)


def pack_records_scalar(records: Iterable[Record], matcher: LocalMatcher) -> np.ndarray:
    """The reference path: parse_frame on every record (parse_batch must give the same rows)."""
    parse, pack, dir_table = parse_frame, RECORD.pack, _DIR_TABLE
    out = [pack(ts, wire, len(data), *(p := parse(lt, data)), dir_table[matcher(p[4])][matcher(p[5])])
           for ts, data, wire, lt in records]
    return np.frombuffer(b"".join(out), dtype=PACKET_DTYPE)


# ----------------------------------------------------------------------------------------
# Vectorised parsing: whole batches with numpy, the common cases only
# ----------------------------------------------------------------------------------------
# Ethernet or cooked frames carrying IPv4, IPv6 without extension headers, or a plain
# EtherType, are parsed column-wise; every other frame (other link types, ARP, LLC, MPLS,
# extension headers, anything truncated or odd) goes through parse_frame. Both give the
# same rows: a test checks it on random and mutated frames.

_CLASS_OF = np.full(256, OTHER_IP, np.uint8)
for _proto, _cls in PROTO_CLASS.items():
    _CLASS_OF[_proto] = _cls
_VLAN_TYPES = np.array(sorted(ETH_VLAN))
_SLOW_TYPES = np.array(sorted({ETH_PPPOE_SESSION, *ETH_MPLS, *ETH_VLAN}))
_V6_EXT = np.array(sorted(IPV6_EXT))
_ARANGE16 = np.arange(16)


def _be16(buf: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return (buf[idx].astype(np.int64) << 8) | buf[idx + 1]


def _gather(buf: np.ndarray, start: np.ndarray, width: int) -> np.ndarray:
    return buf[start[:, None] + _ARANGE16[:width]]


def _link_layer(b: RawBatch) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(network offset, EtherType, fast-path candidate, is Ethernet, outer VLAN id) for every frame."""
    lt, off, end = b.linktype, b.off, b.off + b.cap
    eth = (lt == 1) & (b.cap >= 14)
    cooked = lt >= COOKED_BASE
    net = np.where(cooked, off, off + 14)
    et = np.where(cooked, lt - COOKED_BASE, 0)
    et[eth] = _be16(b.buf, off[eth] + 12)
    vlan = np.zeros(len(b), np.int64)
    for depth in range(2):  # up to two VLAN tags (QinQ); deeper stacks take the scalar path
        tag = (eth | cooked) & np.isin(et, _VLAN_TYPES) & (net + 4 <= end)
        if depth == 0:
            vlan[tag] = _be16(b.buf, net[tag]) & 0x0FFF
        et[tag] = _be16(b.buf, net[tag] + 2)
        net[tag] += 4
    return net, et, (eth | cooked) & (et > 1500) & ~np.isin(et, _SLOW_TYPES), eth, vlan


def _transport_columns(out, rows, buf, l4, pend, proto, first) -> None:
    """Ports, TCP flags, ICMP type/code and the malformed flag for rows whose transport starts at l4."""
    avail = pend - l4
    tcp, udp = first & (proto == 6), first & (proto == 17)
    icmp = first & ((proto == 1) | (proto == 58))
    ported = (tcp | udp) & (avail >= 4)
    sport = np.full(len(rows), -1, np.int64)
    dport = sport.copy()
    sport[ported] = _be16(buf, l4[ported])
    dport[ported] = _be16(buf, l4[ported] + 2)
    flags = np.zeros(len(rows), np.int64)
    fl = tcp & (avail >= 14)
    flags[fl] = buf[l4[fl] + 13] | ((buf[l4[fl] + 12].astype(np.int64) & 1) << 8)
    itype = np.full(len(rows), -1, np.int64)
    icode = itype.copy()
    ic = icmp & (avail >= 2)
    itype[ic], icode[ic] = buf[l4[ic]], buf[l4[ic] + 1]
    out["sport"][rows], out["dport"][rows], out["tcp_flags"][rows] = sport, dport, flags
    out["icmp_type"][rows], out["icmp_code"][rows] = itype, icode
    out["malformed"][rows] = (tcp & (avail < 20)) | (udp & (avail < 8)) | (icmp & (avail < 4))


def _ipv4_columns(out, b: RawBatch, net, et, cand, addr_src, addr_dst) -> np.ndarray:
    buf, end = b.buf, b.off + b.cap
    rows = np.flatnonzero(cand & (et == ETH_IPV4) & (net + 20 <= end))
    n4 = net[rows]
    vh = buf[n4]
    ihl = (vh & 0x0F).astype(np.int64) * 4
    ok = (vh >> 4 == 4) & (ihl >= 20) & (n4 + ihl <= end[rows])
    rows, n4, ihl = rows[ok], n4[ok], ihl[ok]
    proto = buf[n4 + 9].astype(np.int64)
    total = _be16(buf, n4 + 2)
    frag = _be16(buf, n4 + 6)
    first = (frag & 0x1FFF) == 0
    pend = np.where(total >= ihl, np.minimum(end[rows], n4 + total), end[rows])
    addr_src[rows, 10:12] = 0xFF
    addr_dst[rows, 10:12] = 0xFF
    addr_src[rows, 12:] = _gather(buf, n4 + 12, 4)
    addr_dst[rows, 12:] = _gather(buf, n4 + 16, 4)
    out["cls"][rows], out["ipver"][rows], out["proto"][rows] = _CLASS_OF[proto], 4, proto
    out["ip_id"][rows], out["frag"][rows] = _be16(buf, n4 + 4), frag & 0x3FFF
    _transport_columns(out, rows, buf, n4 + ihl, pend, proto, first)
    return rows


def _ipv6_columns(out, b: RawBatch, net, et, cand, addr_src, addr_dst) -> np.ndarray:
    buf, end = b.buf, b.off + b.cap
    rows = np.flatnonzero(cand & (et == ETH_IPV6) & (net + 40 <= end))
    n6 = net[rows]
    nh = buf[n6 + 6].astype(np.int64)
    ok = (buf[n6] >> 4 == 6) & ~np.isin(nh, _V6_EXT)
    rows, n6, nh = rows[ok], n6[ok], nh[ok]
    plen = _be16(buf, n6 + 4)
    pend = np.where(plen > 0, np.minimum(end[rows], n6 + 40 + plen), end[rows])
    addr_src[rows] = _gather(buf, n6 + 8, 16)
    addr_dst[rows] = _gather(buf, n6 + 24, 16)
    out["cls"][rows], out["ipver"][rows], out["proto"][rows] = _CLASS_OF[nh], 6, nh
    _transport_columns(out, rows, buf, n6 + 40, np.maximum(pend, n6 + 40), nh, np.ones(len(rows), bool))
    return rows


def _arp_columns(out, b: RawBatch, net, et, cand, addr_src, addr_dst, hw_bytes) -> np.ndarray:
    """ARP with 6-byte hardware addresses: opcode, and for IPv4 the sender/target addresses and sender MAC."""
    buf, end = b.buf, b.off + b.cap
    rows = np.flatnonzero(cand & (et == ETH_ARP) & (net + 8 <= end))
    na = net[rows]
    ok = buf[na + 4] == 6
    rows, na = rows[ok], na[ok]
    op = _be16(buf, na + 6)
    ipv4 = (_be16(buf, na + 2) == ETH_IPV4) & (buf[na + 5] == 4)
    whole = ipv4 & (na + 28 <= end[rows])
    full, fa = rows[whole], na[whole]
    addr_src[full, 10:12] = 0xFF
    addr_dst[full, 10:12] = 0xFF
    addr_src[full, 12:] = _gather(buf, fa + 14, 4)
    addr_dst[full, 12:] = _gather(buf, fa + 24, 4)
    hw_bytes[full] = _gather(buf, fa + 8, 6)
    out["arp_op"][rows] = op
    out["malformed"][rows] = ipv4 & ~whole
    # Rows with no IPv4 addresses keep the Ethernet source as their hardware address.
    eth_hw = rows[~whole & (b.linktype[rows] == 1)]
    hw_bytes[eth_hw] = _gather(buf, b.off[eth_hw] + 6, 6)
    return rows


def parse_batch(b: RawBatch, matcher: LocalMatcher, use_native: bool = True) -> np.ndarray:
    """Parse a whole batch into packed PACKET_DTYPE rows: the common cases at once (native/fastparse.c
    when it is built, else numpy), parse_frame for the rest."""
    fast = native.parse_fast(b, PACKET_DTYPE) if use_native and len(b) else None
    if fast is None:
        out, done = _fast_numpy(b)
    else:
        out, done = fast
    slow = np.flatnonzero(~done)
    if len(slow):
        out[slow] = _parse_rows(b, slow)
    if b.vlan is not None:  # live capture: the kernel took the outer tag off the frame
        out["vlan"] = np.where(b.vlan >= 0, b.vlan & 0x0FFF, out["vlan"])
    out["direction"] = _directions(out["src"], out["dst"], matcher)
    return out


def _fast_numpy(b: RawBatch) -> tuple[np.ndarray, np.ndarray]:
    """The common cases in numpy: (rows, which rows are done); the reference for native/fastparse.c."""
    n = len(b)
    out = np.zeros(n, PACKET_DTYPE)
    out["ts"], out["wire_len"], out["cap_len"] = b.ts, b.wire, b.cap
    net, et, cand, eth, vlan = _link_layer(b)
    addr_src = np.zeros((n, 16), np.uint8)
    addr_dst = np.zeros((n, 16), np.uint8)
    done = np.zeros(n, bool)
    done[_ipv4_columns(out, b, net, et, cand, addr_src, addr_dst)] = True
    done[_ipv6_columns(out, b, net, et, cand, addr_src, addr_dst)] = True
    hw_bytes = np.zeros((n, 6), np.uint8)
    arp = _arp_columns(out, b, net, et, cand, addr_src, addr_dst, hw_bytes)
    plain = cand & ~np.isin(et, (ETH_IPV4, ETH_IPV6, ETH_ARP))  # a plain EtherType: nothing more to read
    non_ip = plain.copy()
    non_ip[arp] = True
    out["cls"][non_ip], out["proto"][non_ip] = NON_IP, -1
    out["sport"][non_ip] = out["dport"][non_ip] = out["icmp_type"][non_ip] = out["icmp_code"][non_ip] = -1
    done |= non_ip
    out["ethertype"][done] = et[done]
    out["vlan"][done] = vlan[done]
    out["src"] = addr_src.view("S16").ravel()
    out["dst"] = addr_dst.view("S16").ravel()
    is_arp = np.zeros(n, bool)
    is_arp[arp] = True
    hw = np.flatnonzero(eth & done & ~is_arp)  # ARP rows have set their own hardware address
    hw_bytes[hw] = _gather(b.buf, b.off[hw] + 6, 6)
    out["hw_src"] = hw_bytes.view("S6").ravel()
    return out, done


def _parse_rows(b: RawBatch, rows: np.ndarray) -> np.ndarray:
    """parse_frame on the frames the vectorised path leaves alone (direction is filled in later)."""
    buf, pack = b.buf, RECORD.pack
    recs = []
    for i in rows.tolist():
        start = int(b.off[i])
        data = buf[start:start + int(b.cap[i])].tobytes()
        recs.append(pack(float(b.ts[i]), int(b.wire[i]), len(data), *parse_frame(int(b.linktype[i]), data), 0))
    return np.frombuffer(b"".join(recs), PACKET_DTYPE)


def _directions(src: np.ndarray, dst: np.ndarray, matcher: LocalMatcher) -> np.ndarray:
    """in/out/local/transit per row, asking the matcher once per distinct address."""
    if not len(src):
        return np.zeros(0, np.uint8)
    return _DIR_ARRAY[matcher.kinds(src), matcher.kinds(dst)]


_DIR_TABLE = [[direction_of(s, d) for d in range(3)] for s in range(3)]
_DIR_ARRAY = np.array(_DIR_TABLE, np.uint8)


_HASH_SEED = np.uint64(0x9E3779B97F4A7C15)
_HASH_MUL = np.uint64(0xFF51AFD7ED558CCD)


def group_rows(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group equal rows of a 2-D uint8 array: (index of each group's first row, ascending; group of each row).

    Exact, and linear time where np.unique would sort the rows byte by byte: a hash table in C
    (native/grouprows.c) when it can be built here, else rows hashed to 64 bits and grouped by
    pandas.factorize, then each row compared with its group's first row, so a hash collision can
    never merge two keys. Groups are numbered in order of first appearance.
    """
    if len(raw) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    grouped = native.group_rows(raw)
    if grouped is not None:
        return grouped
    return group_rows_numpy(raw)


def group_rows_numpy(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """group_rows without the compiled helper (its reference)."""
    n, width = raw.shape
    if n == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    padded = np.zeros((n, width + (-width % 8)), np.uint8)
    padded[:, :width] = raw
    words = padded.view("<u8")
    h = np.full(n, _HASH_SEED, np.uint64)
    for j in range(words.shape[1]):
        h ^= words[:, j]
        h *= _HASH_MUL
        h ^= h >> np.uint64(33)
    import pandas as pd  # the twin only: the compiled path and the summary CLI never pay for pandas

    codes, _ = pd.factorize(h)
    codes = codes.astype(np.int64, copy=False)
    running = np.maximum.accumulate(codes)
    first = np.flatnonzero(np.concatenate(([True], running[1:] > running[:-1])))
    if np.array_equal(padded[first][codes], padded):
        return first, codes
    _, first, inv = np.unique(padded.view(f"V{padded.shape[1]}").ravel(), return_index=True, return_inverse=True)
    order = np.argsort(first)  # renumber the groups in order of first appearance
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return first[order], rank[inv.ravel()]
