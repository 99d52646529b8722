"""Capture engine: header parsing, the rolling buffer, cumulative counters and the capture thread.

One ``CaptureEngine`` per process reads a live interface or a capture file through the
same pipeline: records -> ``parse_frame`` (headers from raw bytes, never payload) ->
packed batch -> ring buffer + counters. Readers get immutable ``Snapshot`` objects.

Command line::

    python packet_processor.py summary FILE
    python packet_processor.py capture --iface lo [--filter BPF] --seconds 10
"""

from __future__ import annotations

import argparse
import heapq
import ipaddress
import json
import logging
import socket
import struct
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

import config
from capture_sources import (
    COOKED_BASE,
    V4_PREFIX,
    CaptureError,
    FileReader,
    LiveRing,
    Record,
    default_interface,
    local_addresses,
)

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
    ("hw_src", "S6"), ("malformed", "u1"), ("direction", "u1"),
])
RECORD = struct.Struct("<dIIBBhH16s16siiHhhH6sBB")
assert RECORD.size == PACKET_DTYPE.itemsize

# parse_frame's result: every field of the record except ts, lengths and direction.
Parsed = tuple[int, int, int, int, bytes, bytes, int, int, int, int, int, int, bytes, int]

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
    return (NON_IP, 0, -1, ethertype, NO_ADDR, NO_ADDR, -1, -1, 0, -1, -1, 0, hw_src, malformed)


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
    frag = U16(data, off + 6)[0]
    proto = data[off + 9]
    src = V4_PREFIX + data[off + 12:off + 16]
    dst = V4_PREFIX + data[off + 16:off + 20]
    cls = PROTO_CLASS.get(proto, OTHER_IP)
    if ihl < 20:
        return (cls, 4, proto, ethertype, src, dst, -1, -1, 0, -1, -1, 0, hw_src, 1)
    # A zero total length is legal for segmentation-offloaded frames: trust the capture then.
    end = min(n, off + total) if total >= ihl else n
    if frag & 0x1FFF:  # non-first fragment: it carries no transport header
        return (cls, 4, proto, ethertype, src, dst, -1, -1, 0, -1, -1, 0, hw_src, int(off + ihl > n))
    if off + ihl > n:
        return (cls, 4, proto, ethertype, src, dst, -1, -1, 0, -1, -1, 0, hw_src, 1)
    sport, dport, flags, itype, icode, bad = _transport(data, off + ihl, end, proto)
    return (cls, 4, proto, ethertype, src, dst, sport, dport, flags, itype, icode, 0, hw_src, bad)


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
    bad = 0
    # Each extension header moves p forward by at least 8 bytes, so this walk always ends.
    while nh in IPV6_EXT:
        if p + 8 > n:
            bad = 1
            break
        if nh == 44:
            if U16(data, p + 2)[0] & 0xFFF8:
                first_fragment = False
            nh, p = data[p], p + 8
        else:
            nh, p = data[p], p + (data[p + 1] + 1) * 8
    cls = PROTO_CLASS.get(nh, OTHER_IP)
    if bad or not first_fragment:
        return (cls, 6, nh, ethertype, src, dst, -1, -1, 0, -1, -1, 0, hw_src, bad)
    if p > n:
        return (cls, 6, nh, ethertype, src, dst, -1, -1, 0, -1, -1, 0, hw_src, 1)
    sport, dport, flags, itype, icode, bad = _transport(data, p, max(end, p), nh)
    return (cls, 6, nh, ethertype, src, dst, sport, dport, flags, itype, icode, 0, hw_src, bad)


def _arp(data: bytes, off: int, hw_src: bytes) -> Parsed:
    n = len(data)
    if n - off < 8:
        return _non_ip(ETH_ARP, 1, hw_src)
    ptype = U16(data, off + 2)[0]
    hlen, plen = data[off + 4], data[off + 5]
    op = U16(data, off + 6)[0]
    if ptype != ETH_IPV4 or plen != 4:
        return (NON_IP, 0, -1, ETH_ARP, NO_ADDR, NO_ADDR, -1, -1, 0, -1, -1, op, hw_src, 0)
    need = off + 8 + 2 * hlen + 8
    if n < need:
        return (NON_IP, 0, -1, ETH_ARP, NO_ADDR, NO_ADDR, -1, -1, 0, -1, -1, op, hw_src, 1)
    sha = data[off + 8:off + 8 + hlen][:6]
    spa = data[off + 8 + hlen:off + 12 + hlen]
    tpa = data[off + 12 + 2 * hlen:off + 16 + 2 * hlen]
    return (NON_IP, 0, -1, ETH_ARP, V4_PREFIX + spa, V4_PREFIX + tpa, -1, -1, 0, -1, -1, op, sha, 0)


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
    """Dispatch on an EtherType, walking VLAN tags, LLC/SNAP, PPPoE and MPLS down to the network header."""
    n = len(data)
    while True:
        if et == ETH_IPV4:
            return _ipv4(data, off, et, hw_src)
        if et == ETH_IPV6:
            return _ipv6(data, off, et, hw_src)
        if et == ETH_ARP:
            return _arp(data, off, hw_src)
        if et in ETH_VLAN:  # 802.1Q / 802.1ad tags, however many are stacked
            if off + 4 > n:
                return _non_ip(et, 1, hw_src)
            et = U16(data, off + 2)[0]
            off += 4
        elif et <= 1500:  # an 802.3 length: LLC follows; only SNAP can carry an EtherType
            if data[off:off + 3] == b"\xaa\xaa\x03" and off + 8 <= n:
                et = U16(data, off + 6)[0]
                off += 8
            else:
                return _non_ip(0, 0, hw_src)
        elif et in ETH_MPLS:
            return _mpls(data, off, et, hw_src)
        elif et == ETH_PPPOE_SESSION:
            if off + 8 > n:
                return _non_ip(et, 1, hw_src)
            ppp = PPP_TO_ETHERTYPE.get(U16(data, off + 6)[0])
            if ppp is None:
                return _non_ip(et, 0, hw_src)
            et, off = ppp, off + 8
        else:
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


def addr_text(key: bytes) -> str:
    """A 16-byte address key as tshark writes it (dotted quad, or RFC 5952 IPv6)."""
    key = key.ljust(16, b"\x00")  # numpy's S16 strips trailing zero bytes
    if key[:12] == V4_PREFIX:
        return socket.inet_ntop(socket.AF_INET, key[12:])
    return socket.inet_ntop(socket.AF_INET6, key)


def parse_nets(spec: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """'10.0.0.0/8,fe80::/10' -> a list of networks (bad entries are logged and skipped)."""
    nets = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            log.warning("LOCAL_NETS: %r is not a network; ignored", part)
    return nets


class LocalMatcher:
    """Says whether an address is this host's (a set of addresses) or a local network's."""

    NONE, OURS, GROUP = 0, 1, 2
    CACHE_MAX = 65536

    def __init__(self, addrs: Iterable[bytes] = (), nets: Iterable[Any] = ()) -> None:
        self.addrs = frozenset(addrs)
        self.nets = list(nets)
        self._cache: dict[bytes, int] = {}

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


def pack_records(records: Iterable[Record], matcher: LocalMatcher) -> np.ndarray:
    """Parse records into a packed PACKET_DTYPE array (the hot path: one loop, no per-packet objects kept)."""
    parse, pack, dir_table = parse_frame, RECORD.pack, _DIR_TABLE
    out = []
    append = out.append
    for ts, data, wire, lt in records:
        p = parse(lt, data)
        append(pack(ts, wire, len(data), *p, dir_table[matcher(p[4])][matcher(p[5])]))
    return np.frombuffer(b"".join(out), dtype=PACKET_DTYPE)


_DIR_TABLE = [[direction_of(s, d) for d in range(3)] for s in range(3)]

# ----------------------------------------------------------------------------------------
# Cumulative state
# ----------------------------------------------------------------------------------------

BIN_FIELDS = [f"pk_{d}" for d in DIRECTIONS] + [f"by_{d}" for d in DIRECTIONS] + [f"pk_{c}" for c in CLASSES]


def _prune(table: dict, cap: int) -> None:
    """Keep a top-N table bounded: beyond `cap`, drop the smallest entries down to 90 %."""
    if len(table) <= cap:
        return
    keep = heapq.nlargest(int(cap * 0.9), table.items(), key=lambda kv: kv[1][0])
    table.clear()
    table.update(keep)


@dataclass
class Counters:
    """Whole-capture state, updated batch by batch; never capped by the buffer size."""

    packets: int = 0
    bytes: int = 0
    bytes_captured: int = 0
    malformed: int = 0
    cls_packets: np.ndarray = field(default_factory=lambda: np.zeros(6, np.int64))
    cls_bytes: np.ndarray = field(default_factory=lambda: np.zeros(6, np.int64))
    dir_packets: np.ndarray = field(default_factory=lambda: np.zeros(4, np.int64))
    dir_bytes: np.ndarray = field(default_factory=lambda: np.zeros(4, np.int64))
    first_ts: float | None = None
    last_ts: float | None = None
    min_ts: float | None = None
    max_ts: float | None = None
    src: dict[bytes, list[int]] = field(default_factory=dict)  # addr -> [packets, bytes]
    dst: dict[bytes, list[int]] = field(default_factory=dict)
    tcp_dports: dict[int, list[int]] = field(default_factory=dict)  # port -> [packets, bytes]
    udp_dports: dict[int, list[int]] = field(default_factory=dict)
    other_protos: dict[int, list[int]] = field(default_factory=dict)
    conversations: dict[tuple, list] = field(default_factory=dict)  # key -> [pk, by, first, last]
    bins: dict[int, np.ndarray] = field(default_factory=dict)  # second -> BIN_FIELDS counts

    def add(self, arr: np.ndarray, top_max: int, bin_seconds: int) -> None:
        """Fold one packed batch into the counters."""
        if not len(arr):
            return
        wire = arr["wire_len"].astype(np.int64)
        cls, dirs, ts = arr["cls"], arr["direction"], arr["ts"]
        self.packets += len(arr)
        self.bytes += int(wire.sum())
        self.bytes_captured += int(arr["cap_len"].sum(dtype=np.int64))
        self.malformed += int(arr["malformed"].sum(dtype=np.int64))
        self.cls_packets += np.bincount(cls, minlength=6)[:6]
        self.cls_bytes += np.bincount(cls, weights=wire, minlength=6)[:6].astype(np.int64)
        self.dir_packets += np.bincount(dirs, minlength=4)[:4]
        self.dir_bytes += np.bincount(dirs, weights=wire, minlength=4)[:4].astype(np.int64)
        if self.first_ts is None:
            self.first_ts = float(ts[0])
        self.last_ts = float(ts[-1])
        lo, hi = float(ts.min()), float(ts.max())
        self.min_ts = lo if self.min_ts is None else min(self.min_ts, lo)
        self.max_ts = hi if self.max_ts is None else max(self.max_ts, hi)
        ip = cls != NON_IP
        _add_grouped(self.src, arr["src"][ip], wire[ip], top_max)
        _add_grouped(self.dst, arr["dst"][ip], wire[ip], top_max)
        for klass, table in ((TCP, self.tcp_dports), (UDP, self.udp_dports)):
            sel = (cls == klass) & (arr["dport"] >= 0)
            _add_grouped(table, arr["dport"][sel], wire[sel], top_max)
        sel = cls == OTHER_IP
        _add_grouped(self.other_protos, arr["proto"][sel], wire[sel], top_max)
        self._add_conversations(arr[ip], wire[ip], top_max)
        self._add_bins(ts, dirs, cls, wire, bin_seconds)

    def _add_conversations(self, arr: np.ndarray, wire: np.ndarray, top_max: int) -> None:
        if not len(arr):
            return
        # One row per conversation in both directions: order the two ends canonically.
        swap = (arr["src"] > arr["dst"]) | ((arr["src"] == arr["dst"]) & (arr["sport"] > arr["dport"]))
        keys = np.empty(len(arr), dtype=[("proto", "<i2"), ("a", "S16"), ("ap", "<i4"),
                                         ("b", "S16"), ("bp", "<i4")])
        keys["proto"] = arr["proto"]
        keys["a"] = np.where(swap, arr["dst"], arr["src"])
        keys["b"] = np.where(swap, arr["src"], arr["dst"])
        keys["ap"] = np.where(swap, arr["dport"], arr["sport"])
        keys["bp"] = np.where(swap, arr["sport"], arr["dport"])
        uniq, inv = np.unique(keys, return_inverse=True)
        pk = np.bincount(inv)
        by = np.bincount(inv, weights=wire)
        ts = arr["ts"]
        first = np.full(len(uniq), np.inf)
        last = np.full(len(uniq), -np.inf)
        np.minimum.at(first, inv, ts)
        np.maximum.at(last, inv, ts)
        conv = self.conversations
        for i, k in enumerate(uniq.tolist()):
            row = conv.get(k)
            if row is None:
                conv[k] = [int(pk[i]), int(by[i]), float(first[i]), float(last[i])]
            else:
                row[0] += int(pk[i])
                row[1] += int(by[i])
                row[2] = min(row[2], float(first[i]))
                row[3] = max(row[3], float(last[i]))
        _prune(conv, top_max)

    def _add_bins(self, ts, dirs, cls, wire, bin_seconds: int) -> None:
        # Capture files can jump by years between packets, so group by the seconds present.
        secs, rel = np.unique(np.floor(ts).astype(np.int64), return_inverse=True)
        grid = np.zeros((len(secs), len(BIN_FIELDS)), np.int64)
        np.add.at(grid, (rel, dirs), 1)
        np.add.at(grid, (rel, 4 + dirs), wire)
        np.add.at(grid, (rel, 8 + cls.astype(np.int64)), 1)
        bins = self.bins
        for s, row in zip(secs.tolist(), grid):
            cur = bins.get(s)
            if cur is None:
                bins[s] = row.copy()
            else:
                cur += row
        if len(bins) > bin_seconds:
            newest = max(bins)
            for s in [s for s in bins if s <= newest - bin_seconds]:
                del bins[s]


def _add_grouped(table: dict, keys: np.ndarray, wire: np.ndarray, top_max: int) -> None:
    """table[key] += [packets, bytes] for each distinct key of a batch."""
    if not len(keys):
        return
    uniq, inv = np.unique(keys, return_inverse=True)
    pk = np.bincount(inv).tolist()
    by = np.bincount(inv, weights=wire).tolist()
    for k, p, b in zip(uniq.tolist(), pk, by):
        row = table.get(k)
        if row is None:
            table[k] = [p, int(b)]
        else:
            row[0] += p
            row[1] += int(b)
    _prune(table, top_max)


# ----------------------------------------------------------------------------------------
# Snapshot: what readers get
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Status:
    """Where the capture stands, for the page and the CLI."""

    state: str  # idle, running, paused, stopped, finished, error
    source: str = ""
    error: str | None = None
    generation: int = 0
    alive: bool = False
    last_packet_ts: float | None = None
    last_batch_wall: float | None = None
    started_wall: float | None = None


@dataclass(frozen=True)
class Snapshot:
    """An immutable copy of the engine's state at one moment."""

    packets: np.ndarray  # PACKET_DTYPE rows, oldest first, read-only
    totals: dict[str, Any]
    bins: np.ndarray  # (n, 1 + len(BIN_FIELDS)) int64: second, then BIN_FIELDS
    src: dict[bytes, list[int]]
    dst: dict[bytes, list[int]]
    tcp_dports: dict[int, list[int]]
    udp_dports: dict[int, list[int]]
    other_protos: dict[int, list[int]]
    conversations: dict[tuple, list]
    status: Status
    buffer_size: int

    def top_addresses(self, which: str = "src", by: str = "packets", n: int = 10) -> list[dict[str, Any]]:
        """Top n addresses (outer IP source or destination), count descending then address ascending."""
        table = self.src if which == "src" else self.dst
        idx = 0 if by == "packets" else 1
        rows = [(v[idx], addr_text(k), v) for k, v in table.items()]
        rows.sort(key=lambda r: (-r[0], r[1]))
        return [{"addr": a, "packets": v[0], "bytes": v[1]} for _, a, v in rows[:n]]

    def top_ports(self, klass: str = "tcp", n: int = 10, by: str = "packets") -> list[tuple[int, int, int]]:
        """Top destination ports as (port, packets, bytes)."""
        table = self.tcp_dports if klass == "tcp" else self.udp_dports
        idx = 0 if by == "packets" else 1
        rows = sorted(table.items(), key=lambda kv: (-kv[1][idx], kv[0]))
        return [(int(p), v[0], v[1]) for p, v in rows[:n]]

    def top_conversations(self, n: int = 20, by: str = "bytes") -> list[dict[str, Any]]:
        """Top conversations (both directions together)."""
        idx = 0 if by == "packets" else 1
        rows = heapq.nlargest(n, self.conversations.items(), key=lambda kv: kv[1][idx])
        out = []
        for (proto, a, ap, b, bp), (pk, byt, first, last) in rows:
            out.append({"a": addr_text(a), "a_port": ap if ap >= 0 else None, "b": addr_text(b),
                        "b_port": bp if bp >= 0 else None, "proto": proto_name(proto),
                        "packets": pk, "bytes": byt, "first_ts": first, "last_ts": last})
        return out

    def rate(self, window_s: int, now: float | None = None) -> tuple[float, float]:
        """(packets/s, bits/s) over the last `window_s` whole seconds of capture time."""
        if not len(self.bins):
            return 0.0, 0.0
        end = int(now) if now is not None else int(self.bins[-1, 0])
        sel = (self.bins[:, 0] > end - window_s) & (self.bins[:, 0] <= end)
        pk = self.bins[sel, 1:5].sum()
        by = self.bins[sel, 5:9].sum()
        return pk / window_s, by * 8 / window_s


def proto_name(proto: int) -> str:
    """A short protocol name for an IP protocol number."""
    return _PROTO_NAMES.get(proto) or f"ip-{proto}"


_PROTO_NAMES = {6: "TCP", 17: "UDP", 1: "ICMP", 58: "ICMPv6", 2: "IGMP", 4: "IPIP", 41: "IPv6",
                47: "GRE", 50: "ESP", 51: "AH", 89: "OSPF", 103: "PIM", 112: "VRRP", 132: "SCTP"}


# ----------------------------------------------------------------------------------------
# Packets as a table
# ----------------------------------------------------------------------------------------

TCP_FLAG_NAMES = ((0x02, "SYN"), (0x10, "ACK"), (0x01, "FIN"), (0x04, "RST"), (0x08, "PSH"), (0x20, "URG"),
                  (0x40, "ECE"), (0x80, "CWR"), (0x100, "NS"))
ETHERTYPE_NAMES = {0x0806: "ARP", 0x88CC: "LLDP", 0x8035: "RARP", 0x88E5: "MACsec", 0x888E: "EAPOL",
                   0x8863: "PPPoE-D", 0x8864: "PPPoE", 0x8847: "MPLS", 0x88F7: "PTP", 0x0842: "WoL"}
CLASS_LABELS = ("TCP", "UDP", "ICMP", "ICMPv6")


def tcp_flags_text(flags: int) -> str:
    """'SYN ACK' style text for a TCP flags value."""
    return " ".join(name for bit, name in TCP_FLAG_NAMES if flags & bit)


def _protocol_label(cls: int, proto: int, ethertype: int) -> str:
    if cls < OTHER_IP:
        return CLASS_LABELS[cls]
    if cls == OTHER_IP:
        return proto_name(proto)
    if ethertype in ETHERTYPE_NAMES:
        return ETHERTYPE_NAMES[ethertype]
    return f"0x{ethertype:04x}" if ethertype > 1500 else "LLC"


def _text_column(values: np.ndarray, convert) -> np.ndarray:
    """Convert each distinct value once (addresses repeat a lot), then spread the texts back."""
    if not len(values):
        return np.array([], dtype=object)
    uniq, inv = np.unique(values, return_inverse=True)
    texts = np.array([convert(u) for u in uniq.tolist()], dtype=object)
    return texts[inv]


def _ports(values: np.ndarray) -> pd.arrays.IntegerArray:
    # Nullable integers: a missing port as None would turn the column into floats.
    return pd.arrays.IntegerArray(values.astype(np.int32), values < 0)


def packets_frame(p: np.ndarray, tz: Any = None) -> pd.DataFrame:
    """Packed packet rows as a DataFrame for tables and CSV (one column per header field)."""
    has_addr = (p["cls"] != NON_IP) | (p["arp_op"] != 0)
    src = _text_column(p["src"], addr_text)
    dst = _text_column(p["dst"], addr_text)
    if len(p):
        src[~has_addr] = ""
        dst[~has_addr] = ""
    keys = (p["cls"].astype(np.int64) << 32) | (p["proto"].astype(np.int64) & 0xFFFF) << 16 | p["ethertype"]
    proto = _text_column(keys, lambda k: _protocol_label(k >> 32, ((k >> 16) & 0xFFFF), k & 0xFFFF))
    is_tcp = p["cls"] == TCP
    flags = _text_column(np.where(is_tcp, p["tcp_flags"], 0), tcp_flags_text)
    t = pd.to_datetime(p["ts"], unit="s", utc=True)
    if tz is not None:
        t = t.tz_convert(tz)
    return pd.DataFrame({
        "time": t.strftime("%Y-%m-%d %H:%M:%S.%f").str[:-3] if len(p) else pd.Series([], dtype=object),
        "ts": p["ts"],
        "direction": np.array(DIRECTIONS, dtype=object)[p["direction"]] if len(p) else [],
        "protocol": proto,
        "source": src,
        "src port": _ports(p["sport"]),
        "destination": dst,
        "dst port": _ports(p["dport"]),
        "size": p["wire_len"].astype(np.int64),
        "captured": p["cap_len"].astype(np.int64),
        "TCP flags": flags,
        "ICMP type": _ports(p["icmp_type"].astype(np.int32)),
        "malformed": p["malformed"].astype(bool),
    })


# ----------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """What to capture from: a live interface (with a BPF filter) or a capture file."""

    kind: str  # "live" or "file"
    iface: str = ""
    bpf: str = ""
    path: str = ""
    speed: float = 0.0  # files: 0 = as fast as possible, else original pace x speed

    def describe(self) -> str:
        """A one-line description for the page."""
        if self.kind == "file":
            pace = "at once" if self.speed <= 0 else f"replayed at {self.speed:g}x"
            return f"file {self.path} ({pace})"
        flt = f" filter {self.bpf!r}" if self.bpf else ""
        return f"interface {self.iface}{flt}"


_ENGINES: weakref.WeakSet[CaptureEngine] = weakref.WeakSet()


def stop_all() -> None:
    """Stop every engine of this process (tests, and a clean exit)."""
    for engine in list(_ENGINES):
        engine.stop()


class CaptureEngine:
    """One capture (live or file) feeding a rolling buffer and cumulative counters; thread-safe."""

    def __init__(self, buffer_size: int | None = None, local_nets: str | None = None) -> None:
        _ENGINES.add(self)
        self.buffer_size = int(buffer_size or config.get("BUFFER_SIZE"))
        self._nets = parse_nets(local_nets if local_nets is not None else config.get("LOCAL_NETS"))
        self._lock = threading.Lock()
        self._ring = np.zeros(self.buffer_size, dtype=PACKET_DTYPE)
        self._ring_pos = 0
        self._ring_len = 0
        self._counters = Counters()
        self._gen = 0
        self._state = "idle"
        self._error: str | None = None
        self._source: Source | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._live: LiveRing | None = None
        self._kernel_received = 0
        self._kernel_dropped = 0
        self._paused_skipped = 0
        self._last_batch_wall: float | None = None
        self._started_wall: float | None = None
        self._control = threading.Lock()  # serialises start/stop from many browser tabs

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, source: Source) -> bool:
        """Stop any running capture, reset the state and start `source`; False (with the error kept) on failure."""
        with self._control:
            self._stop_locked()
            with self._lock:
                self._gen += 1
                self._reset_locked()
                self._source = source
                self._error = None
                self._started_wall = time.time()
            live = None
            if source.kind == "live":
                iface = source.iface or config.get("INTERFACE") or default_interface()
                source = Source("live", iface=iface, bpf=source.bpf)
                try:
                    live = LiveRing(iface, source.bpf, block_size=config.get("RING_BLOCK_KB") * 1024,
                                    block_nr=config.get("RING_BLOCKS"), snaplen=config.get("SNAPLEN"),
                                    block_timeout_ms=config.get("RING_BLOCK_TIMEOUT_MS"))
                except CaptureError as exc:
                    self._set_error(str(exc))
                    return False
            with self._lock:
                self._source = source
                self._state = "running"
                self._live = live
            self._stop = threading.Event()
            self._paused.clear()
            self._thread = threading.Thread(target=self._run, args=(source, live, self._gen, self._stop),
                                            name=f"capture-{self._gen}", daemon=True)
            self._thread.start()
            return True

    def stop(self) -> None:
        """Stop the capture; returns within about a second, also on a silent link; safe to call twice."""
        with self._control:
            self._stop_locked()

    def _stop_locked(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1.0)
            if thread.is_alive():
                log.warning("capture thread %s did not stop within 1 s; its late data will be dropped",
                            thread.name)
        self._thread = None
        with self._lock:
            if self._state in ("running", "paused"):
                self._state = "stopped"

    def pause(self) -> None:
        """Stop adding packets (live packets are read and skipped; a file replay waits)."""
        self._paused.set()
        with self._lock:
            if self._state == "running":
                self._state = "paused"

    def resume(self) -> None:
        """Add packets again after pause()."""
        self._paused.clear()
        with self._lock:
            if self._state == "paused":
                self._state = "running"

    def clear(self) -> None:
        """Empty the buffer and counters; the capture itself goes on."""
        with self._lock:
            self._reset_locked()

    def _reset_locked(self) -> None:
        self._ring_pos = 0
        self._ring_len = 0
        self._counters = Counters()
        self._paused_skipped = 0
        if self._live is None:
            self._kernel_received = self._kernel_dropped = 0

    def _set_error(self, message: str) -> None:
        log.error("capture: %s", message)
        with self._lock:
            self._error = message
            self._state = "error"

    # -- the capture thread ------------------------------------------------------------

    def _run(self, source: Source, live: LiveRing | None, gen: int, stop: threading.Event) -> None:
        try:
            if live is not None:
                self._run_live(live, gen, stop)
            else:
                self._run_file(source, gen, stop)
        except CaptureError as exc:
            self._set_error(str(exc))
        except Exception as exc:  # the thread must never die silently
            log.exception("capture thread failed")
            self._set_error(f"capture stopped: {type(exc).__name__}: {exc}")
        finally:
            if live is not None:
                self._update_kernel_stats(live, gen)
                live.close()
                with self._lock:
                    if self._live is live:
                        self._live = None

    def _run_live(self, live: LiveRing, gen: int, stop: threading.Event) -> None:
        matcher = LocalMatcher(local_addresses(), LOOPBACK_NETS)
        refresh = config.get("ADDR_REFRESH_S")
        next_refresh = next_stats = time.monotonic()
        for records in live.batches(stop, config.get("POLL_MS")):
            now = time.monotonic()
            if now >= next_refresh:  # interfaces and addresses come and go during a capture
                matcher = LocalMatcher(local_addresses(), LOOPBACK_NETS)
                next_refresh = now + refresh
            if now >= next_stats:
                self._update_kernel_stats(live, gen)
                next_stats = now + 1.0
            if self._paused.is_set():
                with self._lock:
                    self._paused_skipped += len(records)
                continue
            self._ingest(pack_records(records, matcher), gen)

    def _update_kernel_stats(self, live: LiveRing, gen: int) -> None:
        received, dropped = live.stats()
        with self._lock:
            if gen == self._gen:
                self._kernel_received, self._kernel_dropped = received, dropped

    def _run_file(self, source: Source, gen: int, stop: threading.Event) -> None:
        reader = FileReader(source.path)
        self.ingest_records(self._paced(reader, source.speed, stop), gen, stop)
        with self._lock:
            if gen != self._gen:
                return
            if reader.error:
                self._error = reader.error
                self._state = "error"
            elif self._state in ("running", "paused") and not stop.is_set():
                self._state = "finished"

    def _paced(self, records: Iterable[Record], speed: float, stop: threading.Event) -> Iterator[Record]:
        """Replay records at their original pace x speed (speed <= 0: as fast as possible)."""
        if speed <= 0:
            yield from records
            return
        t0 = first = None
        for rec in records:
            while self._paused.is_set() and not stop.is_set():
                stop.wait(0.1)
                t0 = None  # resume the pace from here, not from before the pause
            if t0 is None or first is None:
                t0, first = time.monotonic(), rec[0]
            delay = (rec[0] - first) / speed - (time.monotonic() - t0)
            if delay > 0 and stop.wait(min(delay, 5.0)):
                return
            yield rec

    def ingest_records(self, records: Iterable[Record], gen: int | None = None,
                       stop: threading.Event | None = None) -> None:
        """Feed records through the pipeline in batches (the file path, and tests' crafted frames)."""
        gen = self._gen if gen is None else gen
        matcher = LocalMatcher(nets=self._nets)
        size = config.get("BATCH_SIZE")
        batch: list[Record] = []
        last_flush = time.monotonic()
        for rec in records:
            batch.append(rec)
            # Flush full batches, and paced replays at least every 0.2 s so the page moves.
            if len(batch) >= size or time.monotonic() - last_flush > 0.2:
                self._ingest(pack_records(batch, matcher), gen)
                batch, last_flush = [], time.monotonic()
                if stop is not None and stop.is_set():
                    return
        if batch:
            self._ingest(pack_records(batch, matcher), gen)

    def _ingest(self, arr: np.ndarray, gen: int) -> None:
        """Append a packed batch to the ring and the counters; batches of an old generation are dropped."""
        top_max, bin_s = config.get("TOP_TABLE_MAX"), config.get("BIN_SECONDS")
        with self._lock:
            if gen != self._gen:
                return
            self._write_ring(arr)
            self._counters.add(arr, top_max, bin_s)
            self._last_batch_wall = time.time()

    def _write_ring(self, arr: np.ndarray) -> None:
        cap = self.buffer_size
        if len(arr) >= cap:
            self._ring[:] = arr[-cap:]
            self._ring_pos, self._ring_len = 0, cap
            return
        end = self._ring_pos + len(arr)
        if end <= cap:
            self._ring[self._ring_pos:end] = arr
        else:
            first = cap - self._ring_pos
            self._ring[self._ring_pos:] = arr[:first]
            self._ring[:end - cap] = arr[first:]
        self._ring_pos = end % cap
        self._ring_len = min(cap, self._ring_len + len(arr))

    # -- readers -----------------------------------------------------------------------

    @property
    def source(self) -> Source | None:
        """What the capture reads (the last one started)."""
        with self._lock:
            return self._source

    def status(self) -> Status:
        """The capture's state, error and health."""
        with self._lock:
            return self._status_locked()

    def _status_locked(self) -> Status:
        thread = self._thread
        c = self._counters
        return Status(state=self._state, source=self._source.describe() if self._source else "",
                      error=self._error, generation=self._gen, alive=bool(thread and thread.is_alive()),
                      last_packet_ts=c.last_ts, last_batch_wall=self._last_batch_wall,
                      started_wall=self._started_wall)

    def snapshot(self) -> Snapshot:
        """An immutable copy of the buffer and counters; the lock is held only for the copies."""
        with self._lock:
            if self._ring_len < self.buffer_size:
                rows = self._ring[:self._ring_len].copy()
            else:
                rows = np.concatenate((self._ring[self._ring_pos:], self._ring[:self._ring_pos]))
            c = self._counters
            totals = self._totals_locked(c)
            bins = sorted(c.bins.items())
            tables = (dict(c.src), dict(c.dst), dict(c.tcp_dports), dict(c.udp_dports),
                      dict(c.other_protos), dict(c.conversations))
            status = self._status_locked()
        rows.flags.writeable = False
        grid = np.array([[s, *v] for s, v in bins], dtype=np.int64).reshape(-1, 1 + len(BIN_FIELDS))
        grid.flags.writeable = False
        return Snapshot(rows, totals, grid, *tables, status=status, buffer_size=self.buffer_size)

    def _totals_locked(self, c: Counters) -> dict[str, Any]:
        return {
            "packets": c.packets, "bytes": c.bytes, "bytes_captured": c.bytes_captured,
            "malformed": c.malformed, "dropped": self._kernel_dropped,
            "kernel_received": self._kernel_received, "paused_skipped": self._paused_skipped,
            "transport_counts": dict(zip(CLASSES, c.cls_packets.tolist())),
            "transport_bytes": dict(zip(CLASSES, c.cls_bytes.tolist())),
            "direction_counts": dict(zip(DIRECTIONS, c.dir_packets.tolist())),
            "direction_bytes": dict(zip(DIRECTIONS, c.dir_bytes.tolist())),
            "first_ts": c.first_ts, "last_ts": c.last_ts, "min_ts": c.min_ts, "max_ts": c.max_ts,
            "buffer_len": self._ring_len,
        }

    def summary(self) -> dict[str, Any]:
        """The whole capture as one JSON-ready dict (the keys check_accuracy.py compares, and more)."""
        snap = self.snapshot()
        t = snap.totals
        duration = (t["last_ts"] - t["first_ts"]) if t["packets"] else 0.0
        return {
            "packets": t["packets"], "bytes_wire": t["bytes"], "bytes_captured": t["bytes_captured"],
            "transport_counts": t["transport_counts"], "transport_bytes": t["transport_bytes"],
            "direction_counts": t["direction_counts"], "direction_bytes": t["direction_bytes"],
            "other_ip_protocols": {str(k): v[0] for k, v in sorted(snap.other_protos.items())},
            "top10_src_by_packets": snap.top_addresses("src", "packets"),
            "top10_src_by_bytes": snap.top_addresses("src", "bytes"),
            "top10_dst_by_packets": snap.top_addresses("dst", "packets"),
            "top10_tcp_dst_ports": [[p, c] for p, c, _ in snap.top_ports("tcp")],
            "top10_udp_dst_ports": [[p, c] for p, c, _ in snap.top_ports("udp")],
            "first_ts": t["first_ts"], "last_ts": t["last_ts"], "min_ts": t["min_ts"], "max_ts": t["max_ts"],
            "duration_s": duration, "malformed": t["malformed"], "dropped": t["dropped"],
            "error": snap.status.error,
        }

    def load_file(self, path: str) -> dict[str, Any]:
        """Read a whole capture file in the calling thread and return the summary."""
        with self._control:
            self._stop_locked()
            with self._lock:
                self._gen += 1
                self._reset_locked()
                self._source = Source("file", path=path)
                self._state = "running"
                self._error = None
            self._run_file(self._source, self._gen, threading.Event())
        return self.summary()


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------


def _cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Network Traffic Monitor capture engine")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summary", help="read a pcap/pcapng file and print its JSON summary")
    s.add_argument("file")
    s.add_argument("--local-nets", default=None, help="networks counted as local (default: config LOCAL_NETS)")
    c = sub.add_parser("capture", help="capture live for N seconds and print the JSON summary")
    c.add_argument("--iface", default="", help="interface (default: the default route's)")
    c.add_argument("--filter", default="", help="BPF capture filter")
    c.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=config.get("LOG_LEVEL"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.cmd == "summary":
        engine = CaptureEngine(local_nets=args.local_nets)
        out = engine.load_file(args.file)
    else:
        engine = CaptureEngine()
        ok = engine.start(Source("live", iface=args.iface, bpf=args.filter))
        if ok:
            engine._stop.wait(args.seconds)
        engine.stop()
        out = engine.summary()
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0 if not out["error"] or args.cmd == "summary" else 1


if __name__ == "__main__":
    sys.exit(_cli())
