"""Byte sources for the capture engine: pcap/pcapng files and live Linux interfaces.

Each source yields *records* ``(ts, data, wire_len, linktype)``: the capture timestamp
(epoch seconds, from the file record or the kernel), the captured bytes, the original
length on the wire and the link type (a pcap LINKTYPE_* number) of ``data``.

Files are read with our own small readers instead of Scapy's: they report exactly
where a damaged file breaks (record number and byte offset) and keep every record
before it. Live capture uses a TPACKET_V3 memory-mapped ring (one wake-up per block
of packets), promiscuous as tcpdump's, with libpcap (through ctypes) compiling the BPF
filter as tcpdump would for the same interface, and Scapy listing interfaces. Nothing
here imports Streamlit.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import gc
import logging
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

import native

log = logging.getLogger(__name__)

Record = tuple[float, bytes, int, int]

# pcap LINKTYPE_* values the parser understands (see packet_processor.parse_frame).
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_PPP = 9
LINKTYPE_RAW = 101
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
# Not pcap link types: COOKED_BASE | EtherType marks a record that starts at the network
# header (live "cooked" capture on `any` and on non-Ethernet links), so no header is copied.
COOKED_BASE = 0x10000
LINKTYPE_COOKED = COOKED_BASE

_ARANGE16 = np.arange(16)
MAX_RECORD = 16 * 1024 * 1024  # a record larger than this is damage, whatever the header says
DEFAULT_MAX_CAPLEN = 262144  # libpcap/Wireshark's standard maximum snapshot length


@dataclass
class RawBatch:
    """Many frames at once: frame i is buf[off[i]:off[i] + cap[i]] (buf is read-only and may be shared)."""

    buf: np.ndarray  # uint8
    off: np.ndarray  # int64
    cap: np.ndarray  # int64
    wire: np.ndarray  # int64
    ts: np.ndarray  # float64
    linktype: np.ndarray  # int64, one per frame
    # Live capture only: the VLAN id the kernel took off each frame (TPACKET_V3 tp_vlan_tci), -1 when
    # none; it is the outermost tag, so it overrides any tag still in the frame. None: no metadata.
    vlan: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.off)

    @classmethod
    def from_records(cls, records: list[Record]) -> RawBatch:
        """Pack (ts, data, wire_len, linktype) tuples into one batch."""
        n = len(records)
        caps = np.fromiter((len(r[1]) for r in records), np.int64, n)
        off = np.zeros(n, np.int64)
        if n:
            np.cumsum(caps[:-1], out=off[1:])
        buf = np.frombuffer(b"".join(r[1] for r in records), np.uint8)
        return cls(buf, off, caps, np.fromiter((r[2] for r in records), np.int64, n),
                   np.fromiter((r[0] for r in records), np.float64, n),
                   np.fromiter((r[3] for r in records), np.int64, n))


class CaptureError(Exception):
    """A capture that cannot start or went away; the message says what to do."""


# --------------------------------------------------------------------------------------
# Capture files
# --------------------------------------------------------------------------------------

PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1e-6),
    b"\xa1\xb2\xc3\xd4": (">", 1e-6),
    b"\x4d\x3c\xb2\xa1": ("<", 1e-9),
    b"\xa1\xb2\x3c\x4d": (">", 1e-9),
}
PCAPNG_SHB = b"\x0a\x0d\x0d\x0a"
# pcapng text options kept for the page: section header (shb_*) and interface (if_*) options.
# Comments are not kept: tools put anything there (pcapng_eth_and_sll.pcapng carries TLS keys).
SHB_NOTES = {4: "application", 3: "os", 2: "hardware"}
IDB_NOTES = {2: "interface", 3: "interface_description"}
NOTE_LABELS = (("application", "written by"), ("os", "OS"), ("hardware", "hardware"),
               ("interface", "interfaces"), ("interface_description", "described as"))
NOTES_MAX = 8  # values kept per option: a file may describe thousands of interfaces
NOTE_CHARS = 120


def walk_records(buf, off: int, size: int, order: str, limit: int,
                 maybe_swapped: bool) -> tuple[np.ndarray, int, bool]:
    """Follow pcap record lengths from `off` for up to `size` records: (offsets, offset after them,
    stopped at a captured length above `limit`). The reference for native/pcapwalk.c."""
    last_header = len(buf) - 16
    u32 = struct.Struct(order + "I").unpack_from
    starts: list[int] = []
    append = starts.append
    bad = False
    for _ in range(size):
        if off > last_header:
            break
        caplen = u32(buf, off + 8)[0]
        if maybe_swapped:
            caplen = min(caplen, u32(buf, off + 12)[0])
        if caplen > limit:
            bad = True
            break
        append(off)
        off += 16 + caplen
    return np.array(starts, np.int64), off, bad


@dataclass
class FileReader:
    """Iterates the records of a pcap or pcapng file; ``error`` says where it broke."""

    path: str
    error: str | None = None
    records: int = 0
    linktypes: set[int] = field(default_factory=set)
    # Text a pcapng file says about itself (application, OS, hardware, interface names). It comes
    # from the file's bytes, so it is untrusted: bounded here, escaped wherever it is shown.
    notes: dict[str, list[str]] = field(default_factory=dict)
    # Packets the capturer that wrote a pcapng file says it lost (Interface Statistics Blocks'
    # isb_ifdrop + isb_osdrop, or the packets' epb_dropcount); None when the file says nothing.
    capturer_drops: int | None = None

    def describe_file(self) -> str:
        """The pcapng file's own description in one line ('' for pcap, or when it says nothing)."""
        parts = [f"{label}: {', '.join(self.notes[key])}" for key, label in NOTE_LABELS if self.notes.get(key)]
        if self.capturer_drops is not None:
            parts.append(f"the capturer that wrote this file dropped {self.capturer_drops:,} packets")
        return "; ".join(parts)

    def _note(self, key: str, raw: bytes) -> None:
        values = self.notes.setdefault(key, [])
        text = "".join(ch if ch.isprintable() else " " for ch in raw.decode("utf-8", "replace")).strip()
        if text and len(values) < NOTES_MAX and text[:NOTE_CHARS] not in values:
            values.append(text[:NOTE_CHARS])

    def _map(self) -> mmap.mmap | None:
        """The whole file, mapped read-only; None (with `error` set) when it cannot be."""
        try:
            with open(self.path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size == 0:
                    self.error = "empty file: not a pcap or pcapng capture (0 bytes)"
                    return None
                mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                with contextlib.suppress(AttributeError, OSError):  # read ahead: the file is read once, in order
                    mapped.madvise(mmap.MADV_SEQUENTIAL)
                return mapped
        except OSError as exc:
            self.error = f"cannot read {self.path}: {exc.strerror or exc}"
            return None

    def __iter__(self) -> Iterator[Record]:
        buf = self._map()
        if buf is None:
            return
        try:
            yield from self._iter_buf(buf)
        finally:
            _close(buf)

    def _iter_buf(self, buf: mmap.mmap) -> Iterator[Record]:
        magic = buf[:4]
        if magic == PCAPNG_SHB:
            yield from self._pcapng(buf)
        elif magic in PCAP_MAGICS:
            yield from self._pcap(buf)
        else:
            self._fail(f"not a pcap or pcapng file: unknown magic number {magic.hex()} at byte offset 0")

    def _fail(self, message: str) -> None:
        self.error = message
        log.warning("%s: %s", self.path, message)

    def _pcap(self, buf: mmap.mmap) -> Iterator[Record]:
        for batch in self._pcap_batches(buf, 4096):
            data = batch.buf
            for i in range(len(batch)):
                start = int(batch.off[i])
                yield (float(batch.ts[i]), data[start:start + int(batch.cap[i])].tobytes(), int(batch.wire[i]),
                       int(batch.linktype[i]))

    def batches(self, size: int = 65536) -> Iterator[RawBatch]:
        """The file as RawBatch slices over one read-only mapping (no per-packet copies)."""
        buf = self._map()
        if buf is None:
            return
        try:
            if buf[:4] in PCAP_MAGICS:
                yield from self._pcap_batches(buf, size)
            else:
                # pcapng is block-structured and rare at high volume: batch its records.
                recs: list[Record] = []
                self.records = 0
                for rec in self._iter_buf(buf):
                    recs.append(rec)
                    if len(recs) >= size:
                        yield RawBatch.from_records(recs)
                        recs = []
                if recs:
                    yield RawBatch.from_records(recs)
        finally:
            _close(buf)

    def _pcap_batches(self, buf: mmap.mmap, size: int) -> Iterator[RawBatch]:
        order, unit = PCAP_MAGICS[buf[:4]]
        total = len(buf)
        if total < 24:
            self._fail(f"file cut short: the pcap header needs 24 bytes, the file has {total}")
            return
        major, minor = struct.unpack_from(order + "HH", buf, 4)
        snaplen, network = struct.unpack_from(order + "II", buf, 16)
        # Files written before pcap 2.3 may have the two lengths swapped; libpcap and
        # Wireshark swap them back when the captured length exceeds the original one.
        maybe_swapped = (major, minor) < (2, 3)
        # The upper bits of the link-type field carry FCS information, not the type.
        linktype = network & 0xFFFF
        self.linktypes.add(linktype)
        limit = min(max(snaplen, DEFAULT_MAX_CAPLEN), MAX_RECORD)
        data = np.frombuffer(buf, np.uint8)
        off = 24
        while off < total and not self.error:
            starts, off = self._walk(buf, data, off, size, order, limit, maybe_swapped)
            if not len(starts):
                break
            heads = native.pcap_heads(data, starts, order == ">")
            if heads is None:
                heads = data[starts[:, None] + _ARANGE16].view(order + "u4")
            cap, wire = heads[:, 2].astype(np.int64), heads[:, 3].astype(np.int64)
            if maybe_swapped:
                swap = cap > wire
                cap, wire = np.where(swap, wire, cap), np.where(swap, cap, wire)
            self.records += len(starts)
            yield RawBatch(data, starts + 16, cap, wire, heads[:, 0] + heads[:, 1] * unit,
                           np.full(len(starts), linktype, np.int64))

    @staticmethod
    def _record_error(n: int, off: int, caplen: int, limit: int, total: int) -> str:
        if caplen > limit:
            return f"corrupt record {n} at byte offset {off}: captured length {caplen} exceeds the maximum {limit}"
        return (f"file cut short in the middle of a packet: record {n} at byte offset {off} "
                f"claims {caplen} bytes, only {total - off - 16} remain")

    def _walk(self, buf, data: np.ndarray, off: int, size: int, order: str, limit: int,
              maybe_swapped: bool) -> tuple[np.ndarray, int]:
        """Offsets of up to `size` record headers from `off`, and the offset after them."""
        walked = native.pcap_walk(data, off, size, order == ">", limit, maybe_swapped)
        if walked is None:
            walked = walk_records(buf, off, size, order, limit, maybe_swapped)
        starts, off, bad = walked
        total = len(buf)

        def caplen_at(o: int) -> int:
            cap, wire = struct.unpack_from(order + "II", buf, o + 8)
            return min(cap, wire) if maybe_swapped else cap

        if bad:
            self._fail(self._record_error(self.records + len(starts) + 1, off, caplen_at(off), limit, total))
        # Bounds are checked once here, not per record: only the last record can run past the end.
        elif off > total and len(starts):
            off, starts = int(starts[-1]), starts[:-1]
            self._fail(self._record_error(self.records + len(starts) + 1, off, caplen_at(off), limit, total))
        elif total - 16 < off < total:
            self._fail(f"file cut short in the middle of a packet: record {self.records + len(starts) + 1} "
                       f"at byte offset {off} has only {total - off} of 16 header bytes")
        return starts, off

    def _pcapng(self, buf: mmap.mmap) -> Iterator[Record]:
        """The records of a pcapng file, block by block; any damage stops it with an error naming the block."""
        self.capturer_drops = None
        sec = _Section()
        off = number = 0
        try:
            while off < len(buf):
                number += 1
                head = self._block_head(buf, off, number, sec)
                if head is None:
                    return
                btype, blen = head
                if btype == SHB_TYPE:
                    self._end_section(sec)
                    sec = _Section(sec.order)
                block = _Block(btype, number, off, off + 8, off + blen - 4, sec.order)
                rec = self._read_block(buf, block, sec)
                if rec is False:
                    return
                if rec is not None:
                    sec.last_ts = rec[0]
                    self.records += 1
                    yield rec
                off += blen
        finally:
            self._end_section(sec)

    def _block_head(self, buf: mmap.mmap, off: int, number: int, sec: _Section) -> tuple[int, int] | None:
        """(type, length) of the block at `off` once its framing is checked; None (with `error` set) if damaged."""
        remain = len(buf) - off
        if remain < 12:
            self._fail(f"file cut short: block {number} at byte offset {off} has only {remain} of its 12 "
                       f"framing bytes")
            return None
        if buf[off:off + 4] == PCAPNG_SHB:
            bom = buf[off + 8:off + 12]
            if bom not in SHB_BOMS:
                self._fail(f"corrupt {_block_what(SHB_TYPE, number, off)}: bad byte-order magic {bom.hex()}")
                return None
            sec.order = SHB_BOMS[bom]
        btype, blen = struct.unpack_from(sec.order + "II", buf, off)
        least = BLOCK_MIN.get(btype, 12)
        if blen < least or blen % 4:
            self._fail(f"corrupt {_block_what(btype, number, off)}: bad block length {blen} (a multiple of 4, "
                       f"at least {least})")
            return None
        if blen > remain:
            self._fail(f"file cut short: {_block_what(btype, number, off)} claims {blen} bytes, only {remain} "
                       f"remain")
            return None
        (trailer,) = struct.unpack_from(sec.order + "I", buf, off + blen - 4)
        if trailer != blen:
            self._fail(f"corrupt {_block_what(btype, number, off)}: block lengths disagree ({blen} vs {trailer})")
            return None
        return btype, blen

    def _read_block(self, buf: mmap.mmap, block: _Block, sec: _Section) -> Record | bool | None:
        """One framed block: a record for a packet block, None for other blocks, False after an error."""
        btype = block.btype
        if btype == SHB_TYPE:
            self._text_options(buf, block.body + 16, block.end, block.order, SHB_NOTES)
        elif btype == 1:
            sec.ifaces.append(self._idb(buf, block.body, block.end, block.order))
            self._text_options(buf, block.body + 8, block.end, block.order, IDB_NOTES)
            self.linktypes.add(sec.ifaces[-1].linktype)
        elif btype in (6, 2, 3):
            return self._packet_block(buf, block, sec)
        elif btype == 5:
            return self._isb(buf, block, sec)
        return None

    def _text_options(self, buf: mmap.mmap, p: int, end: int, order: str, wanted: dict[int, str]) -> None:
        """Keep the text options of a block that the page shows (the rest are skipped)."""
        for code, val, length in _options(buf, p, end, order):
            if code in wanted:
                self._note(wanted[code], buf[val:val + min(length, 4 * NOTE_CHARS)])

    @staticmethod
    def _idb(buf: mmap.mmap, body: int, end: int, order: str) -> _Interface:
        linktype, _, snaplen = struct.unpack_from(order + "HHI", buf, body)
        units, tsoffset = 1e-6, 0.0
        for code, val, length in _options(buf, body + 8, end, order):
            if code == 9 and length >= 1:
                r = buf[val]
                units = 2.0 ** -(r & 0x7F) if r & 0x80 else 10.0 ** -r
            elif code == 14 and length >= 8:
                (tsoffset,) = struct.unpack_from(order + "q", buf, val)
        return _Interface(linktype, units, float(tsoffset), snaplen)

    def _block_fail(self, block: _Block, detail: str) -> bool:
        self._fail(f"corrupt {_block_what(block.btype, block.number, block.start)}: {detail}")
        return False

    def _packet_block(self, buf: mmap.mmap, block: _Block, sec: _Section) -> Record | bool:
        body, end, order, ifaces = block.body, block.end, block.order, sec.ifaces
        if not ifaces:
            return self._block_fail(block, f"packet {self.records + 1} comes before any interface description")
        if block.btype == 3:  # Simple Packet Block: interface 0, no timestamp
            (wire,) = struct.unpack_from(order + "I", buf, body)
            iface, ts = ifaces[0], sec.last_ts
            data_off = body + 4
            caplen = min(wire, end - data_off)
            if iface.snaplen:
                caplen = min(caplen, iface.snaplen)
            return ts, buf[data_off:data_off + caplen], wire, iface.linktype
        if block.btype == 6:
            index, hi, lo, caplen, wire = struct.unpack_from(order + "IIIII", buf, body)
            lost = None
        else:  # the obsolete Packet Block: its 16-bit drops count is 0xFFFF when unknown
            index, lost, hi, lo, caplen, wire = struct.unpack_from(order + "HHIIII", buf, body)
            lost = None if lost == 0xFFFF else lost
        data_off = body + 20
        if index >= len(ifaces):
            return self._block_fail(block, f"packet {self.records + 1} names interface {index}, "
                                           f"which was never described")
        if data_off + caplen > end:
            return self._block_fail(block, f"packet {self.records + 1}'s captured length {caplen} does not "
                                           f"fit in its {end + 4 - block.start}-byte block")
        iface = ifaces[index]
        opts = data_off + ((caplen + 3) & ~3)
        if block.btype == 6 and opts + 4 <= end:  # options after the data: epb_dropcount (4)
            for code, val, length in _options(buf, opts, end, order):
                if code == 4 and length == 8:
                    lost = struct.unpack_from(order + "Q", buf, val)[0]
        if lost is not None:
            iface.epb_drops = (iface.epb_drops or 0) + lost
        ts = ((hi << 32) | lo) * iface.units + iface.tsoffset
        return ts, buf[data_off:data_off + caplen], wire, iface.linktype

    def _isb(self, buf: mmap.mmap, block: _Block, sec: _Section) -> bool | None:
        """Interface Statistics Block: keep the latest isb_ifdrop (5) + isb_osdrop (7) of its interface."""
        (index,) = struct.unpack_from(block.order + "I", buf, block.body)
        if index >= len(sec.ifaces):
            return self._block_fail(block, f"statistics for interface {index}, which was never described")
        drops = None
        for code, val, length in _options(buf, block.body + 12, block.end, block.order):
            if code in (5, 7) and length == 8:
                drops = (drops or 0) + struct.unpack_from(block.order + "Q", buf, val)[0]
        if drops is not None:  # the counters run from the start of the capture: the latest block has them all
            sec.ifaces[index].isb_drops = drops
        return None

    def _end_section(self, sec: _Section) -> None:
        """Add the drops a finished section's interfaces reported to capturer_drops."""
        for iface in sec.ifaces:
            lost = iface.drops()
            if lost is not None:
                self.capturer_drops = (self.capturer_drops or 0) + lost
        sec.ifaces = []


SHB_TYPE = 0x0A0D0D0A
SHB_BOMS = {b"\x4d\x3c\x2b\x1a": "<", b"\x1a\x2b\x3c\x4d": ">"}
BLOCK_NAMES = {SHB_TYPE: "section header", 1: "interface description", 2: "packet (obsolete)",
               3: "simple packet", 5: "interface statistics", 6: "enhanced packet"}
# The smallest length of each block type: 12 bytes of framing plus its fixed fields.
BLOCK_MIN = {SHB_TYPE: 28, 1: 20, 2: 32, 3: 16, 5: 24, 6: 32}


def _block_what(btype: int, number: int, off: int) -> str:
    """'enhanced packet block 7 (type 6) at byte offset 1234': how an error names a block."""
    name = BLOCK_NAMES.get(btype, "unknown")
    return f"{name} block {number} (type {btype:#x}) at byte offset {off}"


def _options(buf, p: int, end: int, order: str) -> Iterator[tuple[int, int, int]]:
    """(code, value offset, value length) of the pcapng options in [p, end), up to opt_endofopt or damage."""
    u16s = struct.Struct(order + "HH").unpack_from
    while p + 4 <= end:
        code, length = u16s(buf, p)
        if code == 0 or p + 4 + length > end:
            return
        yield code, p + 4, length
        p += 4 + ((length + 3) & ~3)


@dataclass
class _Interface:
    """What a pcapng Interface Description Block says, and the drops the file reports for it."""

    linktype: int
    units: float
    tsoffset: float
    snaplen: int
    isb_drops: int | None = None  # isb_ifdrop + isb_osdrop of its latest statistics block
    epb_drops: int | None = None  # the sum of its packets' epb_dropcount

    def drops(self) -> int | None:
        """The packets this interface's capturer lost, as the file says (None: it says nothing)."""
        known = [d for d in (self.isb_drops, self.epb_drops) if d is not None]
        return max(known) if known else None  # both count the same losses: never add them


@dataclass
class _Section:
    """A pcapng section's state: byte order, interfaces, last timestamp (for Simple Packet Blocks)."""

    order: str = "<"
    ifaces: list[_Interface] = field(default_factory=list)
    last_ts: float = 0.0


@dataclass
class _Block:
    """A framed pcapng block: its type, number in the file, start, body and end (before the trailer)."""

    btype: int
    number: int
    start: int
    body: int
    end: int
    order: str


def _close(buf: mmap.mmap) -> bool:
    """Close a mapping; while numpy views of it live on, leave that to the garbage collector (False)."""
    try:
        buf.close()
    except BufferError:
        return False
    return True


# --------------------------------------------------------------------------------------
# Interfaces
# --------------------------------------------------------------------------------------


def _netlink_interfaces() -> dict | None:
    """Scapy's rtnetlink view of the interfaces (names, types, all addresses), or None."""
    try:
        from scapy.arch.linux import _get_if_list  # pinned Scapy: rtnetlink, no full import

        return _get_if_list()
    except (ImportError, OSError, ValueError) as exc:
        log.warning("Scapy could not list interfaces over netlink (%s); using the kernel's files", exc)
        return None


def list_interfaces() -> list[str]:
    """Names of the machine's network interfaces, as Scapy sees them, plus `any`."""
    info = _netlink_interfaces()
    names = [i["name"] for i in info.values()] if info else [n for _, n in socket.if_nameindex()]
    return [*sorted(set(names)), "any"]


def default_interface() -> str:
    """The interface of the default route (IPv4, else IPv6), or `any` when there is none."""
    try:
        with open("/proc/net/route", encoding="ascii") as fh:
            next(fh)
            for line in fh:
                parts = line.split()
                if len(parts) > 3 and parts[1] == "00000000" and int(parts[3], 16) & 2:
                    return parts[0]
    except (OSError, StopIteration, ValueError):
        pass
    try:
        with open("/proc/net/ipv6_route", encoding="ascii") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) == 10 and parts[0] == "0" * 32 and parts[1] == "00" and parts[9] != "lo":
                    return parts[9]
    except OSError:
        pass
    return "any"


def interface_exists(name: str) -> bool:
    """True when `name` is a current network interface (or `any`)."""
    return name == "any" or os.path.exists(f"/sys/class/net/{name}")


V4_PREFIX = b"\x00" * 10 + b"\xff\xff"


def local_addresses() -> set[bytes]:
    """The machine's own IPv4 and IPv6 addresses as 16-byte keys (IPv4 mapped into IPv6)."""
    info = _netlink_interfaces()
    if info:
        addrs = set()
        for iface in info.values():
            for ip in iface.get("ips", []):
                family = socket.AF_INET if ip["af_family"] == socket.AF_INET else socket.AF_INET6
                packed = socket.inet_pton(family, ip["address"].split("%")[0])
                addrs.add(V4_PREFIX + packed if family == socket.AF_INET else packed)
        return addrs
    addrs = _ipv4_from_proc()
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as fh:
            for line in fh:
                addrs.add(bytes.fromhex(line.split()[0]))
    except OSError:
        pass
    return addrs


def _ipv4_from_proc() -> set[bytes]:
    """All local IPv4 addresses from the kernel's local routing table (/proc/net/fib_trie)."""
    out: set[bytes] = set()
    try:
        with open("/proc/net/fib_trie", encoding="ascii") as fh:
            prev = ""
            for line in fh:
                if "/32 host LOCAL" in line and prev:
                    out.add(V4_PREFIX + socket.inet_aton(prev))
                parts = line.split()
                if len(parts) >= 2 and parts[0] in ("|--", "+--"):
                    prev = parts[1].split("/")[0]
    except (OSError, ValueError):
        pass
    return out


def interface_index(name: str) -> int:
    """The kernel index of an interface, 0 when unknown."""
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return 0


# --------------------------------------------------------------------------------------
# Live capture: TPACKET_V3 ring
# --------------------------------------------------------------------------------------

SOL_PACKET = 263
PACKET_RX_RING = 5
PACKET_STATISTICS = 6
PACKET_VERSION = 10
TPACKET_V3 = 2
ETH_P_ALL = 0x0003
PACKET_ADD_MEMBERSHIP = 1
PACKET_DROP_MEMBERSHIP = 2
PACKET_MR_PROMISC = 1
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
TP_STATUS_USER = 1
TP_STATUS_VLAN_VALID = 0x10
PACKET_OUTGOING = 4
ARPHRD_ETHER = 1
ARPHRD_LOOPBACK = 772

# struct tpacket3_hdr (48 bytes, then struct sockaddr_ll) is read with numpy in LiveRing._batch:
# tp_next_offset +0, tp_sec +4, tp_nsec +8, tp_snaplen +12, tp_len +16, tp_status +20, tp_mac +24,
# tp_net +26, tp_vlan_tci +32, sll_protocol +50 (network order), sll_hatype +56; all native byte order otherwise.
BLOCK_STATUS = struct.Struct("=III")  # block_status, num_pkts, offset_to_first_pkt (at +8)
DRAIN_S = 0.25  # after stop(), how long the capture thread keeps taking ring blocks before it leaves

# BPF opcodes for the loopback prefix below.
BPF_LD_W_ABS = 0x20
BPF_JEQ_K = 0x15
BPF_RET_K = 0x06
SKF_AD_OFF = -0x1000
SKF_AD_PKTTYPE = 4
SKF_AD_IFINDEX = 8


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


DLT_EN10MB = 1
DLT_LINUX_SLL2 = 276
SLL2_HDR_LEN = 20
SKF_AD_PROTOCOL = 0
PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF
BPF_CLASS_LD, BPF_CLASS_LDX = 0x00, 0x01
BPF_MODES_WITH_OFFSET = (0x20, 0x40, 0xA0)  # BPF_ABS, BPF_IND, BPF_MSH
_libpcap: list[ctypes.CDLL | None] = []


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.POINTER(_SockFilter))]


def _pcap_library() -> ctypes.CDLL:
    """libpcap (Debian's libpcap0.8), with the signatures used here; CaptureError when it is missing."""
    if not _libpcap:
        name = ctypes.util.find_library("pcap") or "libpcap.so.0.8"
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            lib = None
        if lib is not None:
            vp, cp, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
            for fn, res, args in (("pcap_open_dead", vp, [i, i]),
                                  ("pcap_compile", i, [vp, ctypes.POINTER(_BpfProgram), cp, i, ctypes.c_uint32]),
                                  ("pcap_geterr", cp, [vp]), ("pcap_freecode", None, [ctypes.POINTER(_BpfProgram)]),
                                  ("pcap_close", None, [vp]),
                                  ("pcap_lookupnet", i, [cp, ctypes.POINTER(ctypes.c_uint32),
                                                         ctypes.POINTER(ctypes.c_uint32), cp])):
                getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
        _libpcap.append(lib)
    if _libpcap[0] is None:
        raise CaptureError("cannot compile BPF filters: libpcap is not available (install Debian's libpcap0.8)")
    return _libpcap[0]


def compile_bpf(expr: str, linktype: int, snaplen: int = DEFAULT_MAX_CAPLEN,
                iface: str | None = None) -> list[tuple[int, int, int, int]]:
    """Compile a BPF expression with libpcap for our socket, as tcpdump would; accepted packets are cut to `snaplen`.

    Ethernet with `iface`: on a live handle of it (by the capture helper after a drop from root), whose
    Linux code tests `vlan` in the metadata where the kernel put the tag; an error if no live handle can
    be had, never a dead handle's program that would look for the tag in the frame. Ethernet without an
    interface: a dead handle (the syntax check). Cooked: Linux cooked v2, as tcpdump -i any, with its
    header's loads mapped to the kernel's metadata (a dead handle gives the same program as a live one)."""
    if linktype != LINKTYPE_COOKED and iface and iface != "any":
        from capture import broker  # here, not at the top: reading a file never needs the capture helper

        try:
            return broker.compile_filter(expr, iface, snaplen)
        except broker.CompileError as exc:
            if exc.denied:
                raise CaptureError(f"cannot compile the filter for {iface!r} as tcpdump does (on a live handle, "
                                   f"for VLAN tags): {privilege_message()}") from exc
            raise CaptureError(str(exc)) from exc
    return _compile_dead(expr, linktype, snaplen, iface)


def _compile_dead(expr: str, linktype: int, snaplen: int, iface: str | None) -> list[tuple[int, int, int, int]]:
    """Compile on a dead handle of `linktype`: no privilege needed."""
    lib = _pcap_library()
    cooked = linktype == LINKTYPE_COOKED
    netmask = PCAP_NETMASK_UNKNOWN
    if iface and iface != "any":  # for `ip broadcast`, as tcpdump
        net, mask = ctypes.c_uint32(), ctypes.c_uint32()
        if lib.pcap_lookupnet(iface.encode(), ctypes.byref(net), ctypes.byref(mask),
                              ctypes.create_string_buffer(256)) == 0:
            netmask = mask.value
    from capture.broker import PCAP_LOCK  # libpcap's compiler kept global state in older versions (shared)

    with PCAP_LOCK:
        handle = lib.pcap_open_dead(DLT_LINUX_SLL2 if cooked else DLT_EN10MB, snaplen)
        if not handle:
            raise CaptureError("cannot compile BPF filters: libpcap could not open a handle")
        prog = _BpfProgram()
        try:
            if lib.pcap_compile(handle, ctypes.byref(prog), expr.encode(), 1, netmask) != 0:
                raise CaptureError(f"bad BPF filter: {lib.pcap_geterr(handle).decode(errors='replace')}")
            insns = [(prog.bf_insns[i].code, prog.bf_insns[i].jt, prog.bf_insns[i].jf,
                      prog.bf_insns[i].k & 0xFFFFFFFF) for i in range(prog.bf_len)]
            lib.pcap_freecode(ctypes.byref(prog))
        finally:
            lib.pcap_close(handle)
    return _cooked_offsets(insns, expr) if cooked else insns


def _cooked_offsets(insns: list[tuple[int, int, int, int]], expr: str) -> list[tuple[int, int, int, int]]:
    """Rewrite a Linux-cooked-v2 program for a SOCK_DGRAM socket, whose packets start at the network
    header, as libpcap does (pcap-linux.c, fix_offset): header fields become the kernel's metadata."""
    out = []
    for code, jt, jf, k in insns:
        if code & 0x07 in (BPF_CLASS_LD, BPF_CLASS_LDX) and code & 0xE0 in BPF_MODES_WITH_OFFSET:
            signed = k - (1 << 32) if k & 0x80000000 else k
            if signed >= SLL2_HDR_LEN:
                k = signed - SLL2_HDR_LEN
            elif signed == 0:  # the protocol field
                k = (SKF_AD_OFF + SKF_AD_PROTOCOL) & 0xFFFFFFFF
            elif signed == 4:  # the interface index
                k = (SKF_AD_OFF + SKF_AD_IFINDEX) & 0xFFFFFFFF
            elif signed == 10:  # the packet type
                k = (SKF_AD_OFF + SKF_AD_PKTTYPE) & 0xFFFFFFFF
            elif signed > 0:
                raise CaptureError(f"bad BPF filter for a cooked capture: {expr!r} reads link-layer header "
                                   f"bytes the kernel cannot filter on (tcpdump filters those in user space); "
                                   f"capture on one Ethernet interface instead")
        out.append((code, jt, jf, k))
    return out


def iface_linktype(iface: str) -> int:
    """The link type a live capture on `iface` delivers: Ethernet, or cooked (network header first)."""
    if iface != "any" and _arphrd(iface) in (ARPHRD_ETHER, ARPHRD_LOOPBACK):
        return LINKTYPE_ETHERNET
    return LINKTYPE_COOKED


def validate_bpf(expr: str, iface: str = "any") -> str | None:
    """None when `expr` compiles for a capture on `iface`, else the compiler's message."""
    if not expr.strip():
        return None
    try:
        # A dead handle: no capture privilege needed. No interface means the default route's, as at Start.
        compile_bpf(expr, iface_linktype(iface or default_interface()))
    except CaptureError as exc:
        return str(exc)
    return None


def safe_capture_path(name: str, folder: str) -> str:
    """The real path of capture file `name` inside `folder`; ValueError for anything outside it."""
    base = os.path.realpath(folder)
    path = os.path.realpath(os.path.join(base, name))
    if os.path.commonpath([base, path]) != base:
        raise ValueError(f"refused: {name!r} is outside the capture folder {base}")
    if not os.path.isfile(path):
        raise ValueError(f"no capture file {name!r} in {base}")
    return path


def _loopback_prefix(lo_index: int) -> list[tuple[int, int, int, int]]:
    """BPF that rejects the outgoing copy of loopback packets, as libpcap does, so each counts once."""
    return [
        (BPF_LD_W_ABS, 0, 0, (SKF_AD_OFF + SKF_AD_PKTTYPE) & 0xFFFFFFFF),
        (BPF_JEQ_K, 0, 3, PACKET_OUTGOING),
        (BPF_LD_W_ABS, 0, 0, (SKF_AD_OFF + SKF_AD_IFINDEX) & 0xFFFFFFFF),
        (BPF_JEQ_K, 0, 1, lo_index),
        (BPF_RET_K, 0, 0, 0),
    ]


def _attach(sock: socket.socket, insns: list[tuple[int, int, int, int]]) -> None:
    arr = (_SockFilter * len(insns))(*[_SockFilter(*i) for i in insns])
    prog = _SockFprog(len(insns), ctypes.cast(arr, ctypes.POINTER(_SockFilter)))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, bytes(prog))


def _bind(sock: socket.socket, ifindex: int) -> None:
    """Bind a packet socket to one interface, or with ifindex 0 to all of them (`any`), for ETH_P_ALL.

    Python's bind() looks the interface up by name, so it cannot say "all interfaces"; libc's can."""
    libc = ctypes.CDLL(None, use_errno=True)
    addr = struct.pack("=HHiHBB8s", socket.AF_PACKET, socket.htons(ETH_P_ALL), ifindex, 0, 0, 0, b"")
    if libc.bind(sock.fileno(), ctypes.c_char_p(addr), len(addr)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _arphrd(name: str) -> int:
    try:
        with open(f"/sys/class/net/{name}/type", encoding="ascii") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return -1


PRIVILEGE_HELP = ("capture needs root or the CAP_NET_RAW capability: run `sudo streamlit run dashboard.py`, "
                  "or grant it once with `sudo setcap cap_net_raw+eip {python}`")


def privilege_message() -> str:
    """The fix for a missing capture privilege, naming the real Python binary."""
    return PRIVILEGE_HELP.format(python=os.path.realpath(os.sys.executable))


class LiveRing:
    """A TPACKET_V3 capture socket on one interface (or `any`), with its mmap'ed ring."""

    def __init__(self, iface: str, bpf: str = "", *, block_size: int = 1 << 20, block_nr: int = 64,
                 snaplen: int = DEFAULT_MAX_CAPLEN, block_timeout_ms: int = 50, promisc: bool = True) -> None:
        if not interface_exists(iface):
            avail = ", ".join(list_interfaces())
            raise CaptureError(f"unknown interface {iface!r}; available: {avail}")
        self.iface = iface
        # Ethernet-like links keep their link header; everything else is captured "cooked"
        # (from the network header), like libpcap's `any`, so one BPF dialect fits all packets.
        self.linktype = iface_linktype(iface)
        self.cooked = self.linktype == LINKTYPE_COOKED
        self.snaplen = snaplen
        # As libpcap: every interface but `any` (where it means nothing) joins promiscuously unless told
        # not to, so a mirror port's traffic is seen; the kernel leaves the mode when the socket closes.
        self.promisc = promisc and iface != "any"
        insns = compile_bpf(bpf, self.linktype, snaplen, iface) if bpf.strip() else [(BPF_RET_K, 0, 0, snaplen)]
        lo_index = interface_index("lo")
        if iface in ("lo", "any") and lo_index:
            insns = _loopback_prefix(lo_index) + insns
        kind = socket.SOCK_DGRAM if self.cooked else socket.SOCK_RAW
        try:
            # Protocol 0: the socket receives nothing until bind() names the interface and
            # ETH_P_ALL, so no packet of another interface slips into the ring in between.
            from capture import broker

            self.sock = broker.packet_socket(kind, iface)  # after a drop from root, the broker opens it
        except PermissionError as exc:
            raise CaptureError(privilege_message()) from exc
        try:
            self._setup(insns, block_size, block_nr, block_timeout_ms)
        except OSError as exc:
            self.sock.close()
            if exc.errno == errno.ENODEV:
                raise CaptureError(f"interface {iface!r} went away") from exc
            if exc.errno in (errno.EPERM, errno.EACCES):
                raise CaptureError(privilege_message()) from exc
            raise CaptureError(f"cannot capture on {iface!r}: {exc.strerror or exc}") from exc
        self.received = 0  # packets the kernel accepted for this socket, dropped ones included
        self.dropped = 0  # the kernel's drops: the ring was full
        self.consumed = 0  # packets handed to the caller
        self._finished = False
        self._stats_lock = threading.Lock()

    def _setup(self, insns, block_size: int, block_nr: int, block_timeout_ms: int) -> None:
        s = self.sock
        # The filter goes on before bind so no unfiltered packet slips into the ring.
        _attach(s, insns)
        s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
        req = struct.pack("=IIIIIII", block_size, block_nr, 2048, block_size * block_nr // 2048,
                          block_timeout_ms, 0, 0)
        s.setsockopt(SOL_PACKET, PACKET_RX_RING, req)
        self.block_size, self.block_nr = block_size, block_nr
        self.block_timeout_ms = block_timeout_ms
        self.ring = mmap.mmap(s.fileno(), block_size * block_nr, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        ifindex = 0 if self.iface == "any" else interface_index(self.iface)
        if self.iface != "any" and not ifindex:  # 0 would mean every interface
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))
        _bind(s, ifindex)
        if self.promisc:
            mreq = struct.pack("=iHH8s", interface_index(self.iface), PACKET_MR_PROMISC, 0, b"")
            s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
        self._poll = select.poll()
        self._poll.register(s.fileno(), select.POLLIN | select.POLLERR)
        self._block = 0

    def batches(self, stop: threading.Event, poll_ms: int = 200) -> Iterator[RawBatch]:
        """Yield one RawBatch per filled ring block, read in place; returns soon after `stop` is set.

        The batch points into the ring: it is valid until the next iteration, when its block
        goes back to the kernel, so the caller must parse it before asking for more.
        """
        try:
            yield from self._blocks(stop, poll_ms)
        finally:
            self._finished = True  # from now on, what is left in the ring counts as dropped

    def _blocks(self, stop: threading.Event, poll_ms: int) -> Iterator[RawBatch]:
        ring, bsize = self.ring, self.block_size
        u8 = np.frombuffer(ring, np.uint8)
        u16 = np.frombuffer(ring, np.uint16)
        u32 = np.frombuffer(ring, np.uint32)
        next_at = struct.Struct("=I").unpack_from
        handover_until = drain_until = None
        while True:
            if stop.is_set() and drain_until is None:
                # Packets already in the ring were seen by the kernel: take what can be taken in
                # a short while (a partly filled block is handed over when its timeout expires),
                # and leave the rest to stats(), which counts it as dropped. stop() stays prompt
                # even when other threads keep this one waiting for the GIL.
                now = time.monotonic()
                handover_until = now + self.block_timeout_ms * 2 / 1000
                drain_until = now + DRAIN_S
            base = self._block * bsize
            status, num, first = BLOCK_STATUS.unpack_from(ring, base + 8)
            if drain_until is not None and time.monotonic() > drain_until:
                return
            if not status & TP_STATUS_USER:
                if drain_until is None:
                    self._wait(poll_ms)
                elif time.monotonic() < handover_until:
                    time.sleep(0.01)
                else:
                    return
                continue
            offs = native.block_walk(u8, base + first, num, base + bsize)
            if offs is None:
                offs, off = [], base + first
                for _ in range(num):  # without the compiled helper, the one per-packet Python step
                    offs.append(off)
                    off += next_at(ring, off)[0]
                offs = np.array(offs, np.int64)
            with self._stats_lock:
                self.consumed += num
            yield self._batch(offs, u8, u16, u32)
            struct.pack_into("=I", ring, base + 8, 0)  # hand the block back to the kernel
            self._block = (self._block + 1) % self.block_nr

    def _wait(self, poll_ms: int) -> None:
        events = self._poll.poll(poll_ms)
        if any(ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, ev in events):
            self._raise_socket_error()
        if not events and not interface_exists(self.iface):
            raise CaptureError(f"interface {self.iface} went away")

    def _batch(self, h: np.ndarray, u8: np.ndarray, u16: np.ndarray, u32: np.ndarray) -> RawBatch:
        """Read the tpacket3_hdr fields of every packet of a block at once (h: header offsets)."""
        ts = u32[(h + 4) // 4] + u32[(h + 8) // 4] * 1e-9
        snap = u32[(h + 12) // 4].astype(np.int64)
        wire = u32[(h + 16) // 4].astype(np.int64)
        tagged = (u32[(h + 20) // 4] & TP_STATUS_VLAN_VALID) != 0
        vlan = np.where(tagged, u32[(h + 32) // 4].astype(np.int64) & 0x0FFF, -1)
        if self.cooked:
            # Cooked records start at the network header; the EtherType rides along in the
            # linktype, and the wire length gets back the Ethernet header it had on the wire.
            proto = (u8[h + 50].astype(np.int64) << 8) | u8[h + 51]
            hatype = u16[(h + 56) // 2]
            wire += np.where((hatype == ARPHRD_ETHER) | (hatype == ARPHRD_LOOPBACK), 14, 0) + np.where(tagged, 4, 0)
            return RawBatch(u8, h + u16[(h + 26) // 2], snap, wire, ts, COOKED_BASE | proto, vlan)
        # The kernel strips an 802.1Q tag that was on the wire and reports it beside the packet.
        wire += np.where(tagged, 4, 0)
        return RawBatch(u8, h + u16[(h + 24) // 2], snap, wire, ts, np.full(len(h), self.linktype, np.int64), vlan)

    def _raise_socket_error(self) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err in (errno.ENETDOWN, errno.ENODEV, errno.ENXIO) or not interface_exists(self.iface):
            raise CaptureError(f"interface {self.iface} went away")
        raise CaptureError(f"capture socket error on {self.iface}: {os.strerror(err) if err else 'unknown'}")

    def stats(self) -> tuple[int, int]:
        """(packets received, packets dropped) since the socket opened: the kernel's drops, plus,
        once batches() has returned, the packets still in the ring that the caller never got."""
        with self._stats_lock:
            try:
                raw = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12)
            except OSError:
                raw = None
            if raw is not None:
                pkts, drops, _ = struct.unpack("=III", raw)
                # The kernel resets these counters on every read, so keep the running sums.
                # With TPACKET_V3 its packet count includes the drops.
                self.received += pkts
                self.dropped += drops
            left = self.received - self.dropped - self.consumed if self._finished else 0
            return self.received, self.dropped + max(left, 0)

    def _quiesce(self) -> None:
        """Stop the socket receiving and leave promiscuous mode, while something keeps it open."""
        if self.sock.fileno() < 0:
            return
        # A filter that takes nothing (a bind cannot unbind: protocol 0 there means "keep the current one").
        with contextlib.suppress(OSError):
            _attach(self.sock, [(BPF_RET_K, 0, 0, 0)])
        if self.promisc:
            with contextlib.suppress(OSError):
                mreq = struct.pack("=iHH8s", interface_index(self.iface), PACKET_MR_PROMISC, 0, b"")
                self.sock.setsockopt(SOL_PACKET, PACKET_DROP_MEMBERSHIP, mreq)

    def close(self) -> None:
        """Release the ring and the socket; safe to call twice."""
        ring = getattr(self, "ring", None)
        # The mapping holds its own copy of the socket's descriptor: while it stays, so does the socket
        # (and the interface's promiscuous mode), so a view kept only by a reference cycle is collected.
        if ring is not None and not ring.closed and not _close(ring) and self.sock.fileno() >= 0:
            gc.collect()  # once: a second close() only tries the mapping again
            if not _close(ring):
                self._quiesce()
                log.warning("the capture ring of %s stays mapped while a view of it is alive; its socket, no "
                            "longer receiving, closes with that view", self.iface)
        if self.sock.fileno() >= 0:
            self.sock.close()
