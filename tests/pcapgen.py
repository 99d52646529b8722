"""Small capture files built by the tests themselves (pcap and pcapng writers, no external tools)."""

from __future__ import annotations

import struct
from collections.abc import Iterable

Frame = tuple[float, bytes]  # (timestamp, frame bytes)


def pcap_bytes(frames: Iterable[Frame], linktype: int = 1, nanosecond: bool = False,
               big_endian: bool = False) -> bytes:
    """A classic pcap file image."""
    e = ">" if big_endian else "<"
    magic = 0xA1B23C4D if nanosecond else 0xA1B2C3D4
    unit = 1_000_000_000 if nanosecond else 1_000_000
    out = [struct.pack(e + "IHHiIII", magic, 2, 4, 0, 0, 262144, linktype)]
    for ts, data in frames:
        sec = int(ts)
        frac = round((ts - sec) * unit)
        out.append(struct.pack(e + "IIII", sec, frac, len(data), len(data)) + data)
    return b"".join(out)


def _block(btype: int, body: bytes) -> bytes:
    body += b"\x00" * (-len(body) % 4)
    total = len(body) + 12
    return struct.pack("<II", btype, total) + body + struct.pack("<I", total)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\x00" * (-len(value) % 4)


def pcapng_bytes(frames: Iterable[tuple[float, bytes, int]], linktypes: list[int], tsresol: int = 6,
                 shb_text: dict[int, bytes] | None = None, if_names: list[bytes] | None = None) -> bytes:
    """A pcapng image: one SHB, one IDB per link type, EPBs (frame = (ts, data, interface index)).

    shb_text: section header text options by code (2 hardware, 3 os, 4 application, 1 comment);
    if_names: an if_name option for each interface."""
    shb_opts = b"".join(_option(c, v) for c, v in (shb_text or {}).items())
    shb_opts += _option(0, b"") if shb_opts else b""
    out = [_block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1) + shb_opts)]
    for i, lt in enumerate(linktypes):
        opts = struct.pack("<HHB3x", 9, 1, tsresol)
        if if_names:
            opts += _option(2, if_names[i])
        opts += struct.pack("<HH", 0, 0)
        out.append(_block(1, struct.pack("<HHI", lt, 0, 262144) + opts))
    for ts, data, iface in frames:
        units = round(ts * 10 ** tsresol)
        out.append(_block(6, struct.pack("<IIIII", iface, units >> 32, units & 0xFFFFFFFF,
                                         len(data), len(data)) + data))
    return b"".join(out)
