"""Byte sources for the capture engine: pcap/pcapng files and live Linux interfaces.

Each source yields *records* ``(ts, data, wire_len, linktype)``: the capture timestamp
(epoch seconds, from the file record or the kernel), the captured bytes, the original
length on the wire and the link type (a pcap LINKTYPE_* number) of ``data``.

Files are read with our own small readers instead of Scapy's: they report exactly
where a damaged file breaks (record number and byte offset) and keep every record
before it. Live capture uses a TPACKET_V3 memory-mapped ring (one wake-up per block
of packets), with Scapy compiling the BPF filter through libpcap and listing
interfaces. Nothing here imports Streamlit.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
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

    def describe_file(self) -> str:
        """The pcapng file's own description in one line ('' for pcap, or when it says nothing)."""
        parts = [f"{label}: {', '.join(self.notes[key])}" for key, label in NOTE_LABELS if self.notes.get(key)]
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
        size = len(buf)
        off = 0
        order = "<"
        ifaces: list[tuple[int, float, float, int]] = []  # (linktype, units, offset, snaplen)
        last_ts = 0.0
        while off < size:
            if size - off < 12:
                self._fail(f"file cut short: block at byte offset {off} has only {size - off} bytes")
                return
            if buf[off:off + 4] == PCAPNG_SHB:
                bom = buf[off + 8:off + 12]
                if bom == b"\x4d\x3c\x2b\x1a":
                    order = "<"
                elif bom == b"\x1a\x2b\x3c\x4d":
                    order = ">"
                else:
                    self._fail(f"corrupt section header at byte offset {off}: bad byte-order magic {bom.hex()}")
                    return
                ifaces = []
            btype, blen = struct.unpack_from(order + "II", buf, off)
            if btype == 0x0A0D0D0A and 28 <= blen <= size - off:
                self._text_options(buf, off + 24, off + blen - 4, order, SHB_NOTES)
            if blen < 12 or blen % 4:
                self._fail(f"corrupt block at byte offset {off}: bad block length {blen}")
                return
            if off + blen > size:
                self._fail(f"file cut short: block at byte offset {off} claims {blen} bytes, "
                           f"only {size - off} remain")
                return
            (trailer,) = struct.unpack_from(order + "I", buf, off + blen - 4)
            if trailer != blen:
                self._fail(f"corrupt block at byte offset {off}: block lengths disagree ({blen} vs {trailer})")
                return
            body = off + 8
            end = off + blen - 4
            if btype == 1:
                ifaces.append(self._idb(buf, body, end, order))
                self._text_options(buf, body + 8, end, order, IDB_NOTES)
                self.linktypes.add(ifaces[-1][0])
            elif btype in (6, 2, 3):
                rec = self._packet_block(buf, btype, body, end, order, ifaces, last_ts, off)
                if rec is None:
                    return
                last_ts = rec[0]
                self.records += 1
                yield rec
            off += blen

    def _text_options(self, buf: mmap.mmap, p: int, end: int, order: str, wanted: dict[int, str]) -> None:
        """Keep the text options of a block that the page shows (the rest are skipped)."""
        while p + 4 <= end:
            code, length = struct.unpack_from(order + "HH", buf, p)
            if code == 0 or p + 4 + length > end:
                return
            if code in wanted:
                self._note(wanted[code], buf[p + 4:p + 4 + min(length, 4 * NOTE_CHARS)])
            p += 4 + ((length + 3) & ~3)

    @staticmethod
    def _idb(buf: mmap.mmap, body: int, end: int, order: str) -> tuple[int, float, float, int]:
        linktype, _, snaplen = struct.unpack_from(order + "HHI", buf, body)
        units, tsoffset = 1e-6, 0.0
        p = body + 8
        while p + 4 <= end:
            code, length = struct.unpack_from(order + "HH", buf, p)
            if code == 0:
                break
            val = p + 4
            if val + length > end:
                break
            if code == 9 and length >= 1:
                r = buf[val]
                units = 2.0 ** -(r & 0x7F) if r & 0x80 else 10.0 ** -r
            elif code == 14 and length >= 8:
                (tsoffset,) = struct.unpack_from(order + "q", buf, val)
            p = val + ((length + 3) & ~3)
        return linktype, units, float(tsoffset), snaplen

    def _packet_block(self, buf, btype, body, end, order, ifaces, last_ts, off) -> Record | None:
        n = self.records + 1
        if btype == 3:  # Simple Packet Block: interface 0, no timestamp
            (wire,) = struct.unpack_from(order + "I", buf, body)
            iface, ts = 0, last_ts
            data_off = body + 4
            caplen = min(wire, end - data_off)
            if ifaces and ifaces[0][3]:
                caplen = min(caplen, ifaces[0][3])
        else:
            if btype == 6:
                iface, hi, lo, caplen, wire = struct.unpack_from(order + "IIIII", buf, body)
            else:
                iface, _, hi, lo, caplen, wire = struct.unpack_from(order + "HHIIII", buf, body)
            data_off = body + 20
            if iface >= len(ifaces):
                self._fail(f"corrupt packet {n} at byte offset {off}: interface {iface} was never described")
                return None
            if data_off + caplen > end:
                self._fail(f"corrupt packet {n} at byte offset {off}: captured length {caplen} "
                           f"does not fit in its {end - body + 12}-byte block")
                return None
            _, units, tsoffset, _ = ifaces[iface]
            ts = ((hi << 32) | lo) * units + tsoffset
        if iface >= len(ifaces):
            self._fail(f"corrupt packet {n} at byte offset {off}: no interface description before it")
            return None
        return ts, buf[data_off:data_off + caplen], wire, ifaces[iface][0]


def _close(buf: mmap.mmap) -> None:
    """Close a mapping; while numpy views of it live on, leave that to the garbage collector."""
    with contextlib.suppress(BufferError):
        buf.close()


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


def compile_bpf(expr: str, linktype: int) -> list[tuple[int, int, int, int]]:
    """Compile a BPF expression with libpcap (through Scapy); raise CaptureError with its complaint."""
    try:
        from scapy.arch.common import compile_filter
        from scapy.error import Scapy_Exception
    except ImportError as exc:  # pragma: no cover
        raise CaptureError(f"cannot compile BPF filters: {exc}") from exc
    dlt = 12 if linktype in (LINKTYPE_RAW, LINKTYPE_COOKED) else linktype  # 12: libpcap's DLT_RAW
    try:
        prog = compile_filter(expr, linktype=dlt)
    except (Scapy_Exception, ImportError, OSError) as exc:
        msg = str(exc)
        if "libpcap" in msg and "not available" in msg:
            msg += " (install Debian's libpcap0.8)"
        raise CaptureError(f"bad BPF filter: {msg}") from exc
    return [(prog.bf_insns[i].code, prog.bf_insns[i].jt, prog.bf_insns[i].jf,
             prog.bf_insns[i].k & 0xFFFFFFFF) for i in range(prog.bf_len)]


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
        compile_bpf(expr, iface_linktype(iface))
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


def _arphrd(name: str) -> int:
    try:
        with open(f"/sys/class/net/{name}/type", encoding="ascii") as fh:
            return int(fh.read().strip())
    except (OSError, ValueError):
        return -1


PRIVILEGE_HELP = ("capture needs root or the CAP_NET_RAW capability: run `sudo streamlit run dashboard.py`, "
                  "or grant it once with `sudo setcap cap_net_raw,cap_net_admin+eip {python}`")


def privilege_message() -> str:
    """The fix for a missing capture privilege, naming the real Python binary."""
    return PRIVILEGE_HELP.format(python=os.path.realpath(os.sys.executable))


class LiveRing:
    """A TPACKET_V3 capture socket on one interface (or `any`), with its mmap'ed ring."""

    def __init__(self, iface: str, bpf: str = "", *, block_size: int = 1 << 20, block_nr: int = 64,
                 snaplen: int = DEFAULT_MAX_CAPLEN, block_timeout_ms: int = 50) -> None:
        if not interface_exists(iface):
            avail = ", ".join(list_interfaces())
            raise CaptureError(f"unknown interface {iface!r}; available: {avail}")
        self.iface = iface
        # Ethernet-like links keep their link header; everything else is captured "cooked"
        # (from the network header), like libpcap's `any`, so one BPF dialect fits all packets.
        self.linktype = iface_linktype(iface)
        self.cooked = self.linktype == LINKTYPE_COOKED
        self.snaplen = snaplen
        insns = compile_bpf(bpf, self.linktype) if bpf.strip() else [(BPF_RET_K, 0, 0, snaplen)]
        lo_index = interface_index("lo")
        if iface in ("lo", "any") and lo_index:
            insns = _loopback_prefix(lo_index) + insns
        kind = socket.SOCK_DGRAM if self.cooked else socket.SOCK_RAW
        try:
            # Protocol 0: the socket receives nothing until bind() names the interface and
            # ETH_P_ALL, so no packet of another interface slips into the ring in between.
            self.sock = socket.socket(socket.AF_PACKET, kind, 0)
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
        s.bind((self.iface if self.iface != "any" else "", ETH_P_ALL))
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
            wire += np.where((hatype == ARPHRD_ETHER) | (hatype == ARPHRD_LOOPBACK), 14, 0)
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

    def close(self) -> None:
        """Release the ring and the socket; safe to call twice."""
        ring = getattr(self, "ring", None)
        if ring is not None and not ring.closed:
            _close(ring)
        if self.sock.fileno() >= 0:
            self.sock.close()
